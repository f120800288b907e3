//! vLLM-compatible KV-cache events over ZMQ (`serve --kv-events-config`), so routers built for
//! vLLM (llm-d's precise prefix scorer, `switchyard epp`'s `precise-prefix-cache-scorer`) can use
//! this decode server.
//!
//! The engine hands each step's events to [`ZmqSink::send`] (never blocks: a full queue drops the
//! batch and counts it); one task encodes them ([`crate::kvwire`]) and sends
//! `[topic, seq (8 bytes BE), payload]` on a PUB socket, keeping the last `buffer_steps` batches
//! for the optional replay ROUTER socket, as vLLM's `ZmqEventPublisher` does.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use zeromq::{Endpoint, Host, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::kvwire::{self, EventBatch};

/// `--kv-events-config`: vLLM's `KVEventsConfig` JSON (`vllm/config/kv_events.py`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvEventsConfig {
    pub enable_kv_cache_events: bool,
    /// `"null"` (off) or `"zmq"`.
    pub publisher: String,
    /// PUB address: `tcp://*:PORT` / `tcp://[::]:PORT` bind; `tcp://HOST:PORT` connects.
    pub endpoint: String,
    /// ROUTER address serving replays of buffered batches.
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// Accepted for compatibility (ZMQ's high-water mark; the send queue below bounds memory).
    pub hwm: usize,
    /// Batches queued between the engine and the socket before new ones are dropped.
    pub max_queue_size: usize,
    pub topic: String,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        KvEventsConfig {
            enable_kv_cache_events: false,
            publisher: "null".into(),
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: 100_000,
            max_queue_size: 100_000,
            topic: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KvZmqError {
    #[error("--kv-events-config is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("--kv-events-config: unknown publisher {0:?} (supported: \"zmq\", \"null\")")]
    Publisher(String),
    #[error("--kv-events-config: {key} {value:?}: only tcp://HOST:PORT endpoints are supported")]
    Endpoint { key: &'static str, value: String },
    #[error("--kv-events-config: max_queue_size must be at least 1")]
    QueueSize,
    #[error("--kv-events-config: {key} {endpoint}: {source}")]
    Socket {
        key: &'static str,
        endpoint: String,
        source: zeromq::ZmqError,
    },
}

impl KvEventsConfig {
    /// Parses the flag's JSON; `Ok(None)` when events are disabled or the publisher is "null".
    pub fn parse(json: &str) -> Result<Option<KvEventsConfig>, KvZmqError> {
        let cfg: KvEventsConfig = serde_json::from_str(json)?;
        match cfg.publisher.as_str() {
            "null" => return Ok(None),
            "zmq" => {}
            other => return Err(KvZmqError::Publisher(other.to_string())),
        }
        if !cfg.enable_kv_cache_events {
            return Ok(None);
        }
        if cfg.max_queue_size == 0 {
            return Err(KvZmqError::QueueSize);
        }
        tcp_address(&cfg.endpoint, "endpoint")?;
        if let Some(r) = &cfg.replay_endpoint {
            tcp_address(r, "replay_endpoint")?;
        }
        Ok(Some(cfg))
    }
}

/// Whether to bind, and the address in the form the zeromq crate takes. vLLM binds when the
/// endpoint has a wildcard (`*` or `::`) and connects otherwise; `*` means every IPv4 address.
fn tcp_address(endpoint: &str, key: &'static str) -> Result<(bool, String), KvZmqError> {
    let bad = || KvZmqError::Endpoint {
        key,
        value: endpoint.to_string(),
    };
    let rest = endpoint.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    let bind = host == "*" || host.contains("::");
    let host = if host == "*" { "0.0.0.0" } else { host };
    Ok((bind, format!("tcp://{host}:{port}")))
}

/// The engine's handle: queues batches for the publisher task.
#[derive(Debug, Clone)]
pub struct ZmqSink {
    tx: mpsc::Sender<EventBatch>,
    dropped: Arc<AtomicU64>,
}

impl ZmqSink {
    /// Queues `batch`; drops it (and counts it) when the publisher is behind.
    pub fn send(&self, batch: EventBatch) {
        if self.tx.try_send(batch).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "KV-event ZMQ queue full: batches dropped");
            }
        }
    }

    /// Batches dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A started publisher: the sink and the bound addresses (for `tcp://*:0`-style tests).
#[derive(Debug)]
pub struct Publisher {
    pub sink: ZmqSink,
    pub addr: Option<SocketAddr>,
    pub replay_addr: Option<SocketAddr>,
    pub task: tokio::task::JoinHandle<()>,
}

fn socket_addr(ep: &Endpoint) -> Option<SocketAddr> {
    match ep {
        Endpoint::Tcp(Host::Ipv4(ip), port) => Some(SocketAddr::new((*ip).into(), *port)),
        Endpoint::Tcp(Host::Ipv6(ip), port) => Some(SocketAddr::new((*ip).into(), *port)),
        _ => None,
    }
}

/// Opens the sockets and starts the publisher task; it ends when `shutdown` turns true.
pub async fn start(
    cfg: &KvEventsConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Publisher, KvZmqError> {
    let sock_err = |key: &'static str, endpoint: &str| {
        let endpoint = endpoint.to_string();
        move |source| KvZmqError::Socket {
            key,
            endpoint,
            source,
        }
    };
    let (bind, address) = tcp_address(&cfg.endpoint, "endpoint")?;
    let mut publisher = zeromq::PubSocket::new();
    let addr = if bind {
        let ep = publisher
            .bind(&address)
            .await
            .map_err(sock_err("endpoint", &cfg.endpoint))?;
        socket_addr(&ep)
    } else {
        publisher
            .connect(&address)
            .await
            .map_err(sock_err("endpoint", &cfg.endpoint))?;
        None
    };
    let mut replay = None;
    let mut replay_addr = None;
    if let Some(r) = &cfg.replay_endpoint {
        let (_, address) = tcp_address(r, "replay_endpoint")?;
        let mut router = zeromq::RouterSocket::new();
        let ep = router
            .bind(&address)
            .await
            .map_err(sock_err("replay_endpoint", r))?;
        replay_addr = socket_addr(&ep);
        replay = Some(router);
    }
    let (tx, mut rx) = mpsc::channel::<EventBatch>(cfg.max_queue_size.min(1 << 20));
    let topic = Bytes::from(cfg.topic.clone().into_bytes());
    let buffer_steps = cfg.buffer_steps;
    let task = tokio::spawn(async move {
        let mut seq: u64 = 0;
        let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::new();
        let mut payload = Vec::new();
        loop {
            tokio::select! {
                batch = rx.recv() => {
                    let Some(batch) = batch else { break };
                    payload.clear();
                    kvwire::encode_batch(&batch, &mut payload);
                    let body = Bytes::copy_from_slice(&payload);
                    let frames = vec![
                        topic.clone(),
                        Bytes::copy_from_slice(&kvwire::sequence_frame(seq)),
                        body.clone(),
                    ];
                    if let Ok(msg) = ZmqMessage::try_from(frames) {
                        if let Err(e) = publisher.send(msg).await {
                            tracing::warn!(error = %e, seq, "KV-event ZMQ send failed");
                        }
                    }
                    if buffer_steps > 0 {
                        if buffer.len() == buffer_steps {
                            buffer.pop_front();
                        }
                        buffer.push_back((seq, body));
                    }
                    seq += 1;
                }
                req = recv_replay(&mut replay) => {
                    if let (Ok(req), Some(router)) = (req, replay.as_mut()) {
                        serve_replay(router, req, &buffer).await;
                    }
                }
                // The watch guard must not live across the awaits in the other arms.
                () = async { let _ = shutdown.wait_for(|v| *v).await; } => break,
            }
        }
        tracing::debug!(published = seq, "KV-event ZMQ publisher stopped");
    });
    Ok(Publisher {
        sink: ZmqSink {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        },
        addr,
        replay_addr,
        task,
    })
}

async fn recv_replay(
    replay: &mut Option<zeromq::RouterSocket>,
) -> Result<ZmqMessage, zeromq::ZmqError> {
    match replay {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// vLLM's replay protocol: the request is `[identity, "", start_seq (8 bytes BE)]`; the reply is
/// one `[identity, "", seq, payload]` per buffered batch with `seq >= start_seq`, then
/// `[identity, "", -1 (8 bytes BE), ""]`.
async fn serve_replay(
    router: &mut zeromq::RouterSocket,
    req: ZmqMessage,
    buffer: &VecDeque<(u64, Bytes)>,
) {
    let frames = req.into_vec();
    let (Some(identity), Some(start)) = (
        frames.first(),
        frames.last().and_then(|f| kvwire::parse_sequence_frame(f)),
    ) else {
        tracing::warn!(frames = frames.len(), "invalid KV-event replay request");
        return;
    };
    let reply = |seq: [u8; 8], payload: Bytes| {
        ZmqMessage::try_from(vec![
            identity.clone(),
            Bytes::new(),
            Bytes::copy_from_slice(&seq),
            payload,
        ])
    };
    for (seq, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
        if let Ok(msg) = reply(kvwire::sequence_frame(*seq), payload.clone()) {
            if router.send(msg).await.is_err() {
                return;
            }
        }
    }
    if let Ok(msg) = reply((-1i64).to_be_bytes(), Bytes::new()) {
        let _ = router.send(msg).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_config() {
        let cfg = KvEventsConfig::parse(
            r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","topic":"kv-events"}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(cfg.topic, "kv-events");
        assert_eq!(cfg.buffer_steps, 10_000);
        assert_eq!(
            tcp_address(&cfg.endpoint, "endpoint").unwrap(),
            (true, "tcp://0.0.0.0:5557".to_string())
        );
        assert_eq!(
            tcp_address("tcp://10.0.0.1:5557", "endpoint").unwrap(),
            (false, "tcp://10.0.0.1:5557".to_string())
        );
        assert_eq!(
            KvEventsConfig::parse(r#"{"enable_kv_cache_events":false,"publisher":"zmq"}"#).unwrap(),
            None
        );
        assert_eq!(
            KvEventsConfig::parse(r#"{"publisher":"null"}"#).unwrap(),
            None
        );
        let err = |j: &str| KvEventsConfig::parse(j).unwrap_err().to_string();
        assert_eq!(
            err(r#"{"enable_kv_cache_events":true,"publisher":"kafka"}"#),
            "--kv-events-config: unknown publisher \"kafka\" (supported: \"zmq\", \"null\")"
        );
        assert_eq!(
            err(r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"ipc:///tmp/x"}"#),
            "--kv-events-config: endpoint \"ipc:///tmp/x\": only tcp://HOST:PORT endpoints are supported"
        );
        assert!(err(r#"{"enable_kv_cache_events":true,"bogus":1}"#)
            .starts_with("--kv-events-config is not valid: unknown field `bogus`"));
    }
}
