//! Compiles the CUDA kernel sources with NVRTC for the L4 (sm_89) and H100 (sm_90) and checks
//! every entry point is in the PTX. Needs only libnvrtc, no GPU or driver: on a machine without
//! it the test prints `SKIPPED: <why>` (install: `pip download nvidia-cuda-nvrtc-cu12`, see
//! docs/cuda-backend.md, and put its `lib/` on LD_LIBRARY_PATH).

use switchyard::serve::backend::cuda::compile::{
    compile_ptx, ComputeCapability, PtxCache, KERNEL_NAMES,
};
use switchyard::serve::backend::cuda::probe;

#[test]
fn kernels_compile_for_l4_and_h100_and_cache() {
    if let Err(e) = probe::probe_nvrtc() {
        println!("SKIPPED: {e}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = PtxCache::new(dir.path().to_path_buf());
    for (major, minor) in [(8, 9), (9, 0)] {
        let cc = ComputeCapability { major, minor };
        let ptx = compile_ptx(cc, Some(&cache)).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            ptx.contains(&format!(".target sm_{major}{minor}")),
            "wrong target"
        );
        for name in KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name} missing from PTX"
            );
        }
        // Second call is served from the cache, byte for byte.
        assert_eq!(compile_ptx(cc, Some(&cache)).unwrap(), ptx);
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}
