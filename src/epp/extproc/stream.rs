//! The reply stream of one ext_proc stream, which is also what drives it: each poll reads the
//! next inbound message and runs it through the state machine, on the task hyper already runs
//! for the HTTP/2 stream.
//!
//! An earlier design spawned a task per stream and handed replies to tonic over an mpsc
//! channel: a task spawn per request and one more cross-task wake-up per message, which the
//! profile showed as a large share of the EPP's CPU per request (docs/benchmarks.md, "Where an
//! EPP request's CPU goes"). Backpressure is now HTTP/2's own: nothing more is read while Envoy
//! is not taking replies. Dropping the stream (it ended, Envoy went away, shutdown) drops the
//! state and a queued request's ticket, which releases its in-flight accounting and its place in
//! the flow-control queue.
//!
//! ```text
//!  poll ──▶ pending reply? ──yes──▶ hand it to tonic
//!             │ no
//!             ▼
//!  queued in flow control? ──yes──▶ ticket ready? ─▶ on_admitted ─▶ then the held messages
//!             │ no                    │ not yet: keep reading; hold ≤ 8 messages, a close ends it
//!             ▼
//!  next inbound message ──▶ on_message (may queue the request: take its ticket)
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures::Stream;
use tonic::{Status, Streaming};

use super::{OpenStreamGuard, Shared, StreamState};
use crate::epp::flowcontrol::{Routed, Ticket};

/// Most messages kept while a request waits in flow control (Envoy sends at most trailers
/// before it has the header reply; more is a broken peer).
const HELD_WHILE_QUEUED: usize = 8;

/// See the module docs. Every field is `Unpin` (the timer is boxed), so polling needs no
/// projection.
pub struct Replies {
    state: StreamState,
    inbound: Streaming<ProcessingRequest>,
    /// Replies produced but not yet taken by tonic (one message can produce several).
    pending: VecDeque<ProcessingResponse>,
    scratch: Vec<ProcessingResponse>,
    /// The request waits in flow control for this outcome.
    queued: Option<Ticket<Routed>>,
    /// Messages that arrived while the request was queued, handled after the outcome.
    held: VecDeque<ProcessingRequest>,
    finished: bool,
    /// `--grpc-stream-timeout`.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _open: OpenStreamGuard,
}

impl Replies {
    pub(super) fn new(shared: Arc<Shared>, inbound: Streaming<ProcessingRequest>) -> Self {
        shared.open_streams.fetch_add(1, Ordering::Relaxed);
        let deadline = shared
            .config
            .stream_timeout
            .map(|t| Box::pin(tokio::time::sleep(t)));
        Replies {
            state: StreamState::new(shared.clone()),
            inbound,
            pending: VecDeque::with_capacity(4),
            scratch: Vec::with_capacity(4),
            queued: None,
            held: VecDeque::new(),
            finished: false,
            deadline,
            _open: OpenStreamGuard(shared),
        }
    }

    /// Runs one message through the state machine and queues its replies.
    fn handle(&mut self, msg: ProcessingRequest) {
        self.finished = self.state.on_message(msg, &mut self.scratch);
        self.pending.extend(self.scratch.drain(..));
        if !self.finished {
            self.queued = self.state.take_ticket();
        }
    }

    /// Ends the stream without a further reply; a queued request leaves the queue now.
    fn close(&mut self) {
        self.finished = true;
        self.queued = None;
        self.held.clear();
    }
}

impl Stream for Replies {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(reply) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(reply)));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            if let Some(deadline) = this.deadline.as_mut() {
                if deadline.as_mut().poll(cx).is_ready() {
                    tracing::info!("ext_proc stream open longer than --grpc-stream-timeout; ended");
                    this.close();
                    return Poll::Ready(Some(Err(Status::deadline_exceeded(
                        "ext_proc stream exceeded --grpc-stream-timeout",
                    ))));
                }
            }
            if let Some(ticket) = this.queued.as_mut() {
                if let Poll::Ready(admitted) = Pin::new(ticket).poll(cx) {
                    this.queued = None;
                    this.finished = this.state.on_admitted(admitted, &mut this.scratch);
                    this.pending.extend(this.scratch.drain(..));
                    continue;
                }
                // Still queued: keep reading so a closed stream takes the request out of the
                // queue at once.
                match Pin::new(&mut this.inbound).poll_next(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(msg))) if this.held.len() < HELD_WHILE_QUEUED => {
                        this.held.push_back(msg);
                        continue;
                    }
                    Poll::Ready(_) => {
                        tracing::debug!("ext_proc stream closed while the request was queued");
                        this.close();
                        return Poll::Ready(None);
                    }
                }
            }
            if let Some(msg) = this.held.pop_front() {
                this.handle(msg);
                continue;
            }
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.close(),
                Poll::Ready(Some(Err(status))) => {
                    tracing::debug!(code = ?status.code(), message = status.message(), "ext_proc stream broke");
                    this.close();
                }
                Poll::Ready(Some(Ok(msg))) => this.handle(msg),
            }
        }
    }
}
