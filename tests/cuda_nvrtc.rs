//! Compiles the CUDA kernel sources with NVRTC for the L4 (sm_89) and H100 (sm_90) into CUBINs
//! and checks every entry point is in each. Needs only libnvrtc, no GPU or driver: on a machine without
//! it the test prints `SKIPPED: <why>`, and fails under `CI=true`, since NVRTC is a download, not
//! hardware (`scripts/install-test-deps.sh` fetches `nvidia-cuda-nvrtc-cu12` into `.cache/nvrtc`
//! and `.cache/env.sh` puts it on LD_LIBRARY_PATH; see docs/cuda-backend.md).

mod support;

use switchyard::serve::backend::cuda::compile::{
    compile_cubin, ComputeCapability, KernelCache, ELF_MAGIC, KERNEL_NAMES,
};
use switchyard::serve::backend::cuda::probe;

#[test]
fn kernels_compile_to_cubin_for_l4_and_h100_and_cache() {
    if let Err(e) = probe::probe_nvrtc() {
        support::tools::missing_dependency(&format!(
            "NVRTC: {e} (run scripts/install-test-deps.sh, which fetches it into .cache/nvrtc)"
        ));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = KernelCache::new(dir.path().to_path_buf());
    for (major, minor) in [(8, 9), (9, 0)] {
        let cc = ComputeCapability { major, minor };
        let cubin = compile_cubin(cc, Some(&cache)).unwrap_or_else(|e| panic!("{e}"));
        assert!(cubin.starts_with(ELF_MAGIC), "not an ELF CUBIN");
        for name in KERNEL_NAMES {
            // The symbol table holds each entry point's name, NUL-terminated.
            let sym = format!("{name}\0");
            assert!(
                cubin.windows(sym.len()).any(|w| w == sym.as_bytes()),
                "{name} missing from the sm_{major}{minor} CUBIN"
            );
        }
        // Second call is served from the cache, byte for byte.
        assert_eq!(compile_cubin(cc, Some(&cache)).unwrap(), cubin);
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}
