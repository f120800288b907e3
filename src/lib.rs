//! Switchyard: an inference routing stack for Kubernetes.
//!
//! - [`epp`]: Envoy ext_proc Endpoint Picker (Gateway API Inference Extension compatible).
//! - [`serve`]: decode server with an OpenAI-compatible API and vLLM-compatible metrics.
//! - [`bench`]: load generator, routing benchmarks and the local demo.
//! - [`promtext`]: Prometheus text-format parsing shared by the scraper and tests.
#![deny(unsafe_code)]

pub mod bench;
pub mod epp;
pub mod flagfmt;
pub mod promencode;
pub mod promtext;
pub mod serve;
