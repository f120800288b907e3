//! Switchyard: an inference routing stack for Kubernetes.
//!
//! - [`epp`]: Envoy ext_proc Endpoint Picker (Gateway API Inference Extension compatible).
//! - [`agent`]: the code-generation agent (`switchyard agent`): tool loop, model fallback, sandboxes.
//! - [`bbr`]: body-based routing ext_proc (body `model` → `X-Gateway-Model-Name`).
//! - [`serve`]: decode server with an OpenAI-compatible API and vLLM-compatible metrics.
//! - [`bench`]: load generator, routing benchmarks and the local demo.
//! - [`kvwire`]: vLLM's KV-cache event wire format (msgpack over ZMQ), publisher and EPP side.
//! - [`promtext`]: Prometheus text-format parsing shared by the scraper and tests.
//! - [`sandbox`]: the agent-sandbox runtime (`switchyard sandbox`) and its per-command supervisor.
//! - [`process`]: logging setup and the shutdown signal, shared by every subcommand.
//!
//! In the EPP: a config field takes effect where `epp::config` hands its slice to an owner
//! (`config/mod.rs` lists them); an error becomes an ext_proc reply in `epp::extproc::replies`;
//! a routed request is remembered in `Director::remember` (`epp/director.rs`). See
//! `docs/architecture.md`.
#![deny(unsafe_code)]

pub mod agent;
pub mod bbr;
pub mod bench;
pub mod epp;
pub mod flagfmt;
pub mod kvwire;
pub mod process;
pub mod promencode;
pub mod promtext;
pub mod sandbox;
pub mod serve;
