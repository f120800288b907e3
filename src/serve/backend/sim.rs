//! Simulated-GPU backend (in progress).
