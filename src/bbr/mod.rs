//! Body-based routing (`switchyard bbr`): an Envoy ext_proc server that copies the OpenAI
//! body's `model` into `X-Gateway-Model-Name` (and its base model into
//! `X-Gateway-Base-Model-Name` for LoRA adapters) so HTTPRoutes can pick the InferencePool per
//! model. Wire-compatible with the GIE v1.5.0 BBR, which moved to llm-d-router.
//!
//! - [`plugins`]: `--plugin` specs, the two request plugins, the adapters store.
//! - [`stream`]: one ext_proc stream as a pure message → replies function.
//! - [`gojson`]: Go's `encoding/json` error texts for the 400 reply.
//! - [`server`]: flags, ext_proc + gRPC health + metrics, shutdown.

pub mod gojson;
pub mod metrics;
pub mod plugins;
pub mod server;
pub mod stream;

pub use server::{run, start, BbrArgs, RunningBbr};
