//! Scheduler, block manager with prefix cache, sequences and sampling.
