//! The decode server's HTTP connections: accept loop with a connection cap, a header-read timeout,
//! an idle timeout and graceful shutdown, around the axum router (HTTP/1.1 and h2c).
//!
//! ```text
//!  accept ──permit? ──no──► 503 OpenAI error JSON, close (lingering, bounded)
//!            │yes
//!            ▼
//!  connection task: hyper auto (h1 / h2c) over ActivityIo
//!     h1: request head must arrive within --header-read-timeout (also between requests)
//!     watchdog: no request in flight and no byte read or written for --idle-timeout → close
//!     shutdown signal → graceful_shutdown (in-flight responses finish)
//! ```

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt as _;

use super::api::error::ApiError;

/// Connection limits (flags of `switchyard serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections at most; more get 503 and are closed.
    pub max_connections: usize,
    /// A request head (HTTP/1) must arrive within this, from connect or the previous response.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no traffic for this long is closed.
    pub idle_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` turns true, then lets open connections finish
/// their in-flight requests (the caller bounds how long).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Refusals linger briefly; beyond this many at once, refused connections are just closed.
    let refusals = Arc::new(Semaphore::new(MAX_LINGERING_REFUSALS));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Dead peers are found by pings; idle live ones by the idle watchdog.
        .keep_alive_interval(Some(limits.idle_timeout.min(Duration::from_secs(60))));
    let builder = Arc::new(builder);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|v| *v) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Nagle would hold back small SSE token chunks behind delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::debug!(%peer, max = limits.max_connections, "connection cap reached; refusing");
            if let Ok(slot) = Arc::clone(&refusals).try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(tcp, limits.max_connections).await;
                    drop(slot);
                });
            }
            continue;
        };
        let builder = Arc::clone(&builder);
        let app = app.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            serve_connection(&builder, tcp, app, limits.idle_timeout, shutdown).await;
            drop(permit);
        });
    }
    // Wait for open connections to finish (each shuts down gracefully on the same signal).
    let _ = permits.acquire_many(limits.max_connections as u32).await;
}

/// Activity shared by a connection's IO, its requests and its watchdog.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last byte read or written.
    last_ms: AtomicU64,
    /// Milliseconds since `start` when a write first found the socket full; `u64::MAX` if none.
    blocked_since_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    fn write_blocked(&self, blocked: bool) {
        let v = if blocked {
            self.start.elapsed().as_millis() as u64
        } else {
            u64::MAX
        };
        if blocked {
            // Keep the first instant of a run of blocked writes.
            let _ = self.blocked_since_ms.compare_exchange(
                u64::MAX,
                v,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            self.blocked_since_ms.store(v, Ordering::Relaxed);
        }
    }

    /// How long the peer has not been reading what the server has to send.
    fn write_blocked_for(&self) -> Duration {
        match self.blocked_since_ms.load(Ordering::Relaxed) {
            u64::MAX => Duration::ZERO,
            ms => self
                .start
                .elapsed()
                .saturating_sub(Duration::from_millis(ms)),
        }
    }
}

async fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    tcp: TcpStream,
    app: Router,
    idle_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        blocked_since_ms: AtomicU64::new(u64::MAX),
        in_flight: AtomicUsize::new(0),
    });
    let io = TokioIo::new(ActivityIo {
        inner: tcp,
        activity: Arc::clone(&activity),
    });
    let act = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let guard = InFlight::new(Arc::clone(&act));
        let app = app.clone();
        async move {
            let resp = app.oneshot(req.map(Body::new)).await?;
            Ok::<_, std::convert::Infallible>(resp.map(|body| {
                Body::new(Tracked {
                    body,
                    _guard: guard,
                })
            }))
        }
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = idle(&activity, idle_timeout) => {
                tracing::debug!(idle = ?idle_timeout, "closing idle or unread connection");
                return;
            }
            _ = shutdown.wait_for(|v| *v), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Resolves once the connection has had no request in flight and no traffic for `timeout`, or
/// the peer has not read what the server has to send for `timeout` (an unread stream).
async fn idle(activity: &Activity, timeout: Duration) {
    loop {
        let idle_for = activity.idle_for();
        let blocked_for = activity.write_blocked_for();
        let quiet = activity.in_flight.load(Ordering::Acquire) == 0 && idle_for >= timeout;
        if quiet || blocked_for >= timeout {
            return;
        }
        let next_idle = timeout.saturating_sub(idle_for);
        let next_blocked = timeout.saturating_sub(blocked_for);
        let wait = next_idle.min(next_blocked).max(Duration::from_millis(10));
        tokio::time::sleep(wait).await;
    }
}

/// Counts a request as in flight until its response body is done (or dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// A response body that keeps its request counted as in flight.
struct Tracked {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A TCP stream that records when bytes last moved.
struct ActivityIo {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for ActivityIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for ActivityIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        match &r {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.activity.touch();
                self.activity.write_blocked(false);
            }
            Poll::Pending => self.activity.write_blocked(true),
            _ => {}
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        match &r {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.activity.touch();
                self.activity.write_blocked(false);
            }
            Poll::Pending => self.activity.write_blocked(true),
            _ => {}
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Refused connections answered at once (each for at most [`REFUSE_TIMEOUT`]).
const MAX_LINGERING_REFUSALS: usize = 64;

/// How long a refused connection may take to receive its 503.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers a connection over the cap with a 503 (OpenAI error JSON) and closes it. The request
/// is drained briefly (bounded) after the answer so the close does not reset it away.
async fn refuse(mut tcp: TcpStream, max: usize) {
    let body = serde_json::to_vec(&ApiError::TooManyConnections { max }.body()).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let work = async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(&body).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            let n = tcp.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, work).await;
}
