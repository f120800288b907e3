//! The ext_proc stream: one per HTTP request. A typed state machine turns each
//! `ProcessingRequest` into zero or more `ProcessingResponse`s; routing itself is the director's.
//!
//! ```text
//!  RequestHeaders ──eos──▶ route now ─────────────────────────────┐
//!        │ (full duplex: hold the header reply)                   │
//!  RequestBody* ──eos──▶ director.route ──▶ header reply + body ──┤──▶ ResponseHeaders ──▶
//!        │ (buffered: headers answered at once, body reply routes)│    ResponseBody* (SSE: pass
//!        └── error ──▶ ImmediateResponse, stream ends             │    through; JSON: buffer)
//! ```

mod replies;
mod state;
mod stream;
pub mod usage;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use tonic::{Request, Response, Status, Streaming};

pub use replies::BODY_CHUNK_LIMIT;
pub use state::StreamState;
pub use stream::Replies;

use super::director::{Director, RoutingError};
use super::flowcontrol::EppFlowController;
use super::metrics::EppMetrics;

/// Why a stream ends with an error reply. Mapped to status and text in `replies`.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Route(#[from] RoutingError),
    #[error("request body exceeds the limit of {limit} bytes (--max-body-bytes)")]
    BodyTooLarge { limit: usize },
}

/// Knobs of the ext_proc handler, from flags.
#[derive(Debug, Clone)]
pub struct ExtProcConfig {
    /// Largest request body accepted (`--max-body-bytes`); larger gets a 413.
    pub max_body_bytes: usize,
    /// Largest JSON response body buffered for usage parsing; larger is passed through unparsed.
    pub max_response_buffer_bytes: usize,
    /// Longest a stream may stay open (`--grpc-stream-timeout`); `None`: no limit.
    pub stream_timeout: Option<std::time::Duration>,
    /// The lightweight EPP's conformance contract (`--enable-conformance-test-header`): the
    /// `test-epp-endpoint-selection` header is a strict subset hint and the response carries
    /// `x-conformance-test-served-endpoint`.
    pub conformance_test_header: bool,
    /// A `destination-endpoint-served-verifier` plugin is configured: every response carries
    /// `x-conformance-test-served-endpoint` from Envoy's served-endpoint metadata.
    pub served_verifier: bool,
}

impl Default for ExtProcConfig {
    fn default() -> Self {
        ExtProcConfig {
            max_body_bytes: 16 << 20,
            max_response_buffer_bytes: 16 << 20,
            stream_timeout: None,
            conformance_test_header: false,
            served_verifier: false,
        }
    }
}

/// What every stream shares.
pub struct Shared {
    pub director: Arc<Director>,
    pub metrics: EppMetrics,
    pub config: ExtProcConfig,
    /// Flow control (`flowControl` feature gate); `None`: requests are routed on arrival.
    pub flow: Option<EppFlowController>,
    open_streams: AtomicUsize,
}

impl Shared {
    pub fn new(director: Arc<Director>, metrics: EppMetrics, config: ExtProcConfig) -> Arc<Self> {
        Self::with_flow_control(director, metrics, config, None)
    }

    /// [`Self::new`] with flow control on when `flow` is given (its dispatcher must be running).
    pub fn with_flow_control(
        director: Arc<Director>,
        metrics: EppMetrics,
        config: ExtProcConfig,
        flow: Option<EppFlowController>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            director,
            metrics,
            config,
            flow,
            open_streams: AtomicUsize::new(0),
        })
    }

    /// Streams currently open (for draining on shutdown).
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Relaxed)
    }
}

/// Counts a stream as open for as long as it lives, whatever way it ends.
struct OpenStreamGuard(Arc<Shared>);

impl Drop for OpenStreamGuard {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct ExtProcService {
    shared: Arc<Shared>,
}

impl ExtProcService {
    pub fn new(shared: Arc<Shared>) -> Self {
        ExtProcService { shared }
    }

    pub fn into_server(self) -> ExtProcServer {
        // Full-duplex bodies arrive as chunks; a chunk is bounded by Envoy's buffer, but keep
        // room above the body limit for the protobuf framing.
        let limit = self.shared.config.max_body_bytes.saturating_add(1 << 20);
        ExternalProcessorServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }
}

/// The tonic server wrapping [`ExtProcService`].
pub type ExtProcServer = ExternalProcessorServer<ExtProcService>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = Replies;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        Ok(Response::new(Replies::new(
            self.shared.clone(),
            request.into_inner(),
        )))
    }
}
