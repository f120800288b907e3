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
pub mod usage;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub use replies::BODY_CHUNK_LIMIT;
pub use state::StreamState;

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

/// Replies buffered per stream before the reader waits for Envoy to take them.
const REPLY_QUEUE: usize = 64;

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

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ReplyStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(REPLY_QUEUE);
        let shared = self.shared.clone();
        shared.open_streams.fetch_add(1, Ordering::Relaxed);
        let guard = OpenStreamGuard(shared.clone());
        let deadline = shared
            .config
            .stream_timeout
            .map(|t| tokio::time::Instant::now() + t);
        tokio::spawn(async move {
            let _guard = guard;
            let serve = serve_stream(StreamState::new(shared), &mut inbound, &tx);
            match deadline {
                Some(at) => {
                    if tokio::time::timeout_at(at, serve).await.is_err() {
                        tracing::info!(
                            "ext_proc stream open longer than --grpc-stream-timeout; ended"
                        );
                        // try_send: a peer that stopped reading must not hold the task.
                        let _ = tx.try_send(Err(Status::deadline_exceeded(
                            "ext_proc stream exceeded --grpc-stream-timeout",
                        )));
                    }
                }
                None => serve.await,
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Feeds one stream's messages through its state machine until either side ends it. Dropping
/// the state (here or when the task is cancelled) releases its in-flight accounting.
async fn serve_stream(
    mut state: StreamState,
    inbound: &mut Streaming<ProcessingRequest>,
    tx: &mpsc::Sender<Result<ProcessingResponse, Status>>,
) {
    let mut out = Vec::with_capacity(4);
    loop {
        let Some(msg) = next_message(inbound).await else {
            return;
        };
        out.clear();
        let finished = state.on_message(msg, &mut out);
        if !send_all(tx, &mut out).await || finished {
            return;
        }
        if let Some(ticket) = state.take_ticket() {
            if !wait_in_queue(&mut state, ticket, inbound, tx, &mut out).await {
                return;
            }
        }
    }
}

/// Most messages kept while a request waits in flow control (Envoy sends at most trailers
/// before it has the header reply; more is a broken peer).
const HELD_WHILE_QUEUED: usize = 8;

/// Awaits a queued request's flow-control outcome while watching the stream: if Envoy closes
/// it, the ticket is dropped, which takes the request out of the queue. Messages that arrive
/// meanwhile are handled after the outcome, in order. Returns false when the stream is over.
async fn wait_in_queue(
    state: &mut StreamState,
    mut ticket: crate::epp::flowcontrol::Ticket<crate::epp::flowcontrol::Routed>,
    inbound: &mut Streaming<ProcessingRequest>,
    tx: &mpsc::Sender<Result<ProcessingResponse, Status>>,
    out: &mut Vec<ProcessingResponse>,
) -> bool {
    let mut held = Vec::new();
    let admitted = loop {
        tokio::select! {
            admitted = &mut ticket => break admitted,
            // `Streaming::message` is cancel safe.
            msg = next_message(inbound) => match msg {
                Some(m) if held.len() < HELD_WHILE_QUEUED => held.push(m),
                _ => {
                    tracing::debug!("ext_proc stream closed while the request was queued");
                    return false;
                }
            },
        }
    };
    out.clear();
    let finished = state.on_admitted(admitted, out);
    if !send_all(tx, out).await || finished {
        return false;
    }
    for msg in held {
        out.clear();
        let finished = state.on_message(msg, out);
        if !send_all(tx, out).await || finished {
            return false;
        }
    }
    true
}

/// The next message, or `None` when the stream ended or broke.
async fn next_message(inbound: &mut Streaming<ProcessingRequest>) -> Option<ProcessingRequest> {
    match inbound.message().await {
        Ok(m) => m,
        Err(status) => {
            tracing::debug!(code = ?status.code(), message = status.message(), "ext_proc stream broke");
            None
        }
    }
}

/// Sends `out` in order; false when Envoy went away.
async fn send_all(
    tx: &mpsc::Sender<Result<ProcessingResponse, Status>>,
    out: &mut Vec<ProcessingResponse>,
) -> bool {
    for reply in out.drain(..) {
        if tx.send(Ok(reply)).await.is_err() {
            return false;
        }
    }
    true
}
