//! Device side of the CUDA backend (placeholder while the runtime is written).
