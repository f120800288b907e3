//! Fuzzes `bench --workload-file`: the YAML workload file is parsed and validated by
//! `WorkloadArgs::resolve`, and an accepted workload is planned into request bodies. A bad file
//! must be an error, not a panic or an unbounded plan.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard::bench::cli::WorkloadArgs;

fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!(
            "switchyard-fuzz-{}-workload.yaml",
            std::process::id()
        ))
    })
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(path(), data).unwrap();
    let args = WorkloadArgs {
        workload_file: Some(path().clone()),
        ..Default::default()
    };
    if let Ok(resolved) = args.resolve() {
        let _ = resolved.schedule("m", 1.0);
    }
});
