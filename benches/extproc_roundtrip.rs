//! Full ext_proc request round trip over loopback gRPC against an in-process EPP.

fn main() {}
