//! Shared helpers for the integration tests (`mod support;` in a `tests/*.rs` file): a mock
//! OpenAI/vLLM model server, an HTTP client, free ports, tool lookup, process guards for
//! Envoy and the real `switchyard epp` binary, an in-process EPP, and a killable TCP proxy for
//! fault injection.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code, unused_imports, unused_macros)]

pub mod envoy;
pub mod epp_process;
pub mod ext_proc;
pub mod fault_proxy;
pub mod http_client;
pub mod in_process_epp;
pub mod mock_model_server;
pub mod ports;
pub mod sandbox;
pub mod tls_client;
pub mod tools;

pub use envoy::{BodyMode, EnvoyConfig, EnvoyProcess, RouteCluster};
pub use epp_process::{EppOptions, EppProcess};
pub use fault_proxy::FaultProxy;
pub use http_client::{HttpClient, HttpResponse};
pub use in_process_epp::{InProcessEpp, TestEpp};
pub use mock_model_server::MockModelServer;
