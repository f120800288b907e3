//! Compiles the project-owned gRPC APIs in `proto/` (Envoy's come precompiled from envoy-types).
//! protoc comes from the `protoc-bin-vendored` crate so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut protos: Vec<std::path::PathBuf> = std::fs::read_dir("proto")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    protos.sort();
    if protos.is_empty() {
        return Ok(());
    }
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts are single-threaded, so setting the variable tonic-prost-build reads is sound.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &[std::path::PathBuf::from("proto")])?;
    Ok(())
}
