//! One KV-event subscriber per endpoint, following the datastore's endpoint set (like the metric
//! pollers): a ZMQ SUB socket on vLLM's publisher (`tcp://<pod ip>:<socketPort>`, topic prefix
//! `topicFilter`) or the decode server's gRPC stream (`grpc://<pod ip>:<grpcPort>`), per the
//! plugin's parameters.
//!
//! A stream is *live* while connected; the scorer uses the approximate index for endpoints that
//! are not. A disconnect or a publisher restart (sequence back to 0, or a new gRPC instance)
//! clears the endpoint's blocks: the engine's cache is unknown until it reports again. A payload
//! that does not decode is logged and counted, and the subscriber goes on with the next one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zeromq::{Socket, SocketEvent, SocketRecv};

use super::index::{BlockIndex, EndpointBlocks};
use super::params::BearerToken;
use super::Precise;
use crate::epp::datastore::{Datastore, EndpointSlot};
use crate::kvwire::{self, DecodeLimits, Event};
use crate::serve::kv_events::pb;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Counters of all subscribers of one precise scorer.
#[derive(Debug, Clone, Default)]
pub struct StreamMetrics {
    pub batches: Counter,
    pub events: Counter,
    pub malformed: Counter,
    pub gaps: Counter,
    pub resets: Counter,
}

impl StreamMetrics {
    /// Registers these counters and the index's under `switchyard_kv_events_*`.
    pub fn register(&self, index: &BlockIndex, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("switchyard_kv_events");
        r.register("batches", "Event batches received.", self.batches.clone());
        r.register(
            "events",
            "KV-cache events applied or skipped.",
            self.events.clone(),
        );
        r.register(
            "malformed",
            "Messages dropped because they did not decode (bad framing or msgpack).",
            self.malformed.clone(),
        );
        r.register(
            "gaps",
            "Sequence gaps (batches missed by a subscriber).",
            self.gaps.clone(),
        );
        r.register(
            "resets",
            "Endpoint indexes cleared after a disconnect or a publisher restart.",
            self.resets.clone(),
        );
        r.register(
            "index_keys",
            "Request keys (prefix blocks) held across endpoints in the precise index.",
            index.metrics.keys.clone(),
        );
        r.register(
            "skipped",
            "Stored events not indexed, by reason.",
            index.metrics.skipped.clone(),
        );
    }
}

/// Where an endpoint's events come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `tcp://HOST:PORT` as the zeromq crate takes it.
    Zmq(String),
    /// `http://HOST:PORT` for tonic.
    Grpc(String),
}

/// The event source of `slot` under `precise`'s parameters.
pub fn source_for(precise: &Precise, slot: &EndpointSlot) -> Source {
    let ep = slot.endpoint();
    let p = &precise.params;
    let explicit = p
        .endpoint_sockets
        .get(&ep.name)
        .or_else(|| p.endpoint_sockets.get(&ep.addr.to_string()));
    if let Some(s) = explicit {
        if let Some(rest) = s.strip_prefix("grpc://") {
            return Source::Grpc(format!("http://{rest}"));
        }
        return Source::Zmq(s.clone());
    }
    let host = match ep.addr.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    match p.grpc_port {
        Some(port) => Source::Grpc(format!("http://{host}:{port}")),
        None => Source::Zmq(format!("tcp://{host}:{}", p.socket_port)),
    }
}

/// Runs one subscriber per endpoint until `shutdown` turns true.
pub fn spawn_manager(
    datastore: Arc<Datastore>,
    precise: Arc<Precise>,
    metrics: StreamMetrics,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut versions = datastore.subscribe();
        let mut tasks: HashMap<String, (Source, JoinHandle<()>)> = HashMap::new();
        loop {
            versions.borrow_and_update();
            let slots = datastore.slots();
            let mut current = HashMap::new();
            for slot in slots.iter() {
                current.insert(slot.endpoint().name.clone(), source_for(&precise, slot));
            }
            tasks.retain(|name, (source, handle)| {
                let keep = current.get(name) == Some(source);
                if !keep {
                    handle.abort();
                    precise.index.remove_endpoint(name);
                    tracing::debug!(endpoint = %name, "KV-event subscriber stopped");
                }
                keep
            });
            for (name, source) in current {
                if tasks.contains_key(&name) {
                    continue;
                }
                let blocks = precise.index.endpoint(&name);
                let sub = Subscriber {
                    endpoint: name.clone(),
                    blocks,
                    index: Arc::clone(&precise.index),
                    metrics: metrics.clone(),
                    malformed_logged: Arc::new(AtomicU64::new(0)),
                };
                let handle = match &source {
                    Source::Zmq(addr) => {
                        tokio::spawn(sub.run_zmq(addr.clone(), precise.params.topic_filter.clone()))
                    }
                    Source::Grpc(url) => {
                        tokio::spawn(sub.run_grpc(url.clone(), precise.params.grpc_token.clone()))
                    }
                };
                tracing::info!(endpoint = %name, source = ?source, "KV-event subscriber started");
                tasks.insert(name, (source, handle));
            }
            tokio::select! {
                changed = versions.changed() => if changed.is_err() { break },
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        for (_, (_, handle)) in tasks.drain() {
            handle.abort();
        }
    })
}

/// One endpoint's subscriber.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub endpoint: String,
    pub blocks: Arc<EndpointBlocks>,
    pub index: Arc<BlockIndex>,
    pub metrics: StreamMetrics,
    malformed_logged: Arc<AtomicU64>,
}

/// Sequence tracking of one ZMQ connection.
#[derive(Debug, Default)]
pub struct SeqState {
    last: Option<u64>,
}

impl Subscriber {
    pub fn new(
        endpoint: &str,
        blocks: Arc<EndpointBlocks>,
        index: Arc<BlockIndex>,
        metrics: StreamMetrics,
    ) -> Self {
        Subscriber {
            endpoint: endpoint.to_string(),
            blocks,
            index,
            metrics,
            malformed_logged: Arc::new(AtomicU64::new(0)),
        }
    }

    fn reset(&self) {
        self.metrics.resets.inc();
        self.index.clear(&self.blocks);
    }

    fn malformed(&self, reason: &dyn std::fmt::Display) {
        self.metrics.malformed.inc();
        // First, then every power of two: a broken publisher cannot flood the log.
        let n = self.malformed_logged.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(endpoint = %self.endpoint, count = n, error = %reason,
                "malformed KV-event message dropped");
        }
    }

    fn apply(&self, events: &[Event]) {
        for ev in events {
            self.metrics.events.inc();
            // Only the engine's own (GPU) cache: offloaded tiers are not prefix hits here.
            let own = |m: &Option<String>| {
                m.as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(kvwire::MEDIUM_GPU))
            };
            match ev {
                Event::Stored(s) if !own(&s.medium) => continue,
                Event::Removed(r) if !own(&r.medium) => continue,
                _ => {}
            }
            self.index.apply(&self.blocks, ev);
        }
    }

    /// Handles one ZMQ multipart message `[topic, seq, payload]`.
    pub fn on_message(&self, frames: &[bytes::Bytes], seq: &mut SeqState) {
        let [_topic, seq_frame, payload] = frames else {
            self.malformed(&format!("{} frames, expected 3", frames.len()));
            return;
        };
        let Some(n) = kvwire::parse_sequence_frame(seq_frame) else {
            self.malformed(&format!("sequence frame of {} bytes", seq_frame.len()));
            return;
        };
        match seq.last {
            // The publisher restarted: its engine's cache starts empty.
            Some(last) if n == 0 && last > 0 => self.reset(),
            Some(last) if n != last.wrapping_add(1) => {
                self.metrics.gaps.inc();
                tracing::debug!(endpoint = %self.endpoint, last, got = n, "KV-event sequence gap");
            }
            _ => {}
        }
        seq.last = Some(n);
        match kvwire::decode_batch(payload, DecodeLimits::default()) {
            Ok(batch) => {
                self.blocks.set_live(true);
                self.apply(&batch.events);
                // Counted once applied: a reader that sees the count sees the index with it.
                self.metrics.batches.inc();
            }
            Err(e) => self.malformed(&e),
        }
    }

    /// Subscribes to a vLLM-format ZMQ publisher, reconnecting with backoff, until aborted.
    pub async fn run_zmq(self, addr: String, topic: String) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut options = zeromq::SocketOptions::default();
            options.connect_timeout(Duration::from_secs(2));
            let mut socket = zeromq::SubSocket::with_options(options);
            let mut monitor = socket.monitor();
            if let Err(e) = socket.connect(&addr).await {
                tracing::debug!(endpoint = %self.endpoint, %addr, error = %e, "KV-event connect failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            if let Err(e) = socket.subscribe(&topic).await {
                tracing::debug!(endpoint = %self.endpoint, error = %e, "KV-event subscribe failed");
                tokio::time::sleep(backoff).await;
                continue;
            }
            backoff = BACKOFF_MIN;
            self.blocks.set_live(true);
            tracing::debug!(endpoint = %self.endpoint, %addr, "KV-event stream connected");
            let mut seq = SeqState::default();
            loop {
                tokio::select! {
                    msg = socket.recv() => match msg {
                        Ok(m) => self.on_message(&m.into_vec(), &mut seq),
                        Err(e) => {
                            tracing::debug!(endpoint = %self.endpoint, error = %e, "KV-event receive failed");
                            break;
                        }
                    },
                    ev = monitor.next() => match ev {
                        Some(SocketEvent::Disconnected(_)) => {
                            // Events are lost while disconnected: start over from empty.
                            self.blocks.set_live(false);
                            self.reset();
                            seq = SeqState::default();
                        }
                        Some(SocketEvent::Connected(..)) => self.blocks.set_live(true),
                        Some(_) => {}
                        None => break,
                    },
                }
            }
            self.blocks.set_live(false);
            self.reset();
            tokio::time::sleep(backoff).await;
        }
    }

    /// Follows the decode server's gRPC stream (`proto/kv_events.proto`), from its oldest
    /// retained event when it still has the first one, else from now; presents `token` as
    /// `authorization: Bearer …` when given.
    pub async fn run_grpc(self, url: String, token: Option<BearerToken>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.grpc_once(&url, token.as_ref()).await {
                // A refused token is a misconfiguration an operator must see, not noise.
                Err(GrpcStreamError::Refused(status)) => {
                    tracing::warn!(endpoint = %self.endpoint, %url, code = ?status.code(),
                        message = status.message(), "KV-event gRPC subscription refused")
                }
                Err(e) => {
                    tracing::debug!(endpoint = %self.endpoint, %url, error = %e, "KV-event gRPC stream ended")
                }
                Ok(()) => {}
            }
            self.blocks.set_live(false);
            self.reset();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One subscription, until the stream ends.
    pub async fn grpc_once(
        &self,
        url: &str,
        token: Option<&BearerToken>,
    ) -> Result<(), GrpcStreamError> {
        let mut client = pb::kv_events_client::KvEventsClient::connect(url.to_string()).await?;
        let request = |from_sequence| {
            let mut r = tonic::Request::new(pb::SubscribeRequest { from_sequence });
            if let Some(t) = token {
                match t.header_value().parse() {
                    Ok(v) => {
                        r.metadata_mut().insert("authorization", v);
                    }
                    Err(_) => tracing::warn!("KV-event bearer token is not a valid header value"),
                }
            }
            r
        };
        // Sequence 1 is the server's initial AllCleared: replaying from it rebuilds the full
        // state; once it has left the ring, only new events can be followed.
        let mut stream = match client.subscribe(request(1)).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::OutOfRange => {
                client.subscribe(request(0)).await?.into_inner()
            }
            Err(s) => return Err(s.into()),
        };
        let mut root = None;
        while let Some(msg) = stream.message().await.map_err(GrpcStreamError::Broken)? {
            match msg.message {
                Some(pb::subscribe_response::Message::Info(info)) => {
                    self.reset();
                    root = Some(info.root_hash);
                    self.blocks.set_live(true);
                }
                Some(pb::subscribe_response::Message::Event(ev)) => {
                    let Some(root) = root else { continue };
                    if let Some(e) = grpc_event(ev, root) {
                        self.apply(std::slice::from_ref(&e));
                    }
                    // After the apply, as for ZMQ batches.
                    self.metrics.batches.inc();
                }
                None => self.malformed(&"empty gRPC message"),
            }
        }
        Ok(())
    }
}

/// Why a gRPC subscription ended.
#[derive(Debug, thiserror::Error)]
pub enum GrpcStreamError {
    #[error("connecting: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The server answered with an error status (e.g. `UNAUTHENTICATED` for a missing or wrong
    /// token, `RESOURCE_EXHAUSTED` over its subscriber cap).
    #[error("{}: {}", .0.code(), .0.message())]
    Refused(#[from] tonic::Status),
    /// The stream failed after it was established.
    #[error("stream broken: {}: {}", .0.code(), .0.message())]
    Broken(tonic::Status),
}

/// The vLLM-format equivalent of one gRPC event (the first block's parent is the root hash).
fn grpc_event(ev: pb::KvEvent, root: u64) -> Option<Event> {
    use pb::kv_event::Event as E;
    Some(match ev.event? {
        E::Stored(s) => Event::Stored(kvwire::BlockStored {
            block_hashes: s.block_hashes,
            parent_block_hash: (s.parent_hash != root).then_some(s.parent_hash),
            token_ids: s.token_ids,
            block_size: s.block_size,
            ..kvwire::BlockStored::default()
        }),
        E::Removed(r) => Event::Removed(kvwire::BlockRemoved {
            block_hashes: r.block_hashes,
            medium: None,
        }),
        E::Cleared(_) => Event::AllCleared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epp::kvcache::index::{chain_root, request_keys};
    use crate::epp::kvcache::PreciseParams;
    use bytes::Bytes;

    fn sub(block_size: usize) -> Subscriber {
        let p = Precise::new(PreciseParams {
            block_size,
            ..PreciseParams::default()
        })
        .unwrap();
        let blocks = p.index.endpoint("a");
        Subscriber::new("a", blocks, Arc::clone(&p.index), StreamMetrics::default())
    }

    fn frames(seq: u64, batch: &kvwire::EventBatch) -> Vec<Bytes> {
        let mut payload = Vec::new();
        kvwire::encode_batch(batch, &mut payload);
        vec![
            Bytes::from_static(b"kv@a@m"),
            Bytes::copy_from_slice(&kvwire::sequence_frame(seq)),
            Bytes::from(payload),
        ]
    }

    fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, medium: &str) -> Event {
        Event::Stored(kvwire::BlockStored {
            block_hashes: hashes,
            parent_block_hash: parent,
            token_ids: tokens,
            block_size: 1,
            medium: Some(medium.into()),
            ..kvwire::BlockStored::default()
        })
    }

    fn batch(events: Vec<Event>) -> kvwire::EventBatch {
        kvwire::EventBatch {
            ts: 0.0,
            events,
            data_parallel_rank: Some(0),
        }
    }

    #[test]
    fn malformed_messages_are_counted_and_skipped() {
        let s = sub(1);
        let mut seq = SeqState::default();
        s.on_message(&[Bytes::from_static(b"t")], &mut seq);
        s.on_message(
            &[Bytes::new(), Bytes::from_static(b"\x00\x01"), Bytes::new()],
            &mut seq,
        );
        s.on_message(
            &[
                Bytes::new(),
                Bytes::copy_from_slice(&kvwire::sequence_frame(0)),
                Bytes::from_static(b"\xc1garbage"),
            ],
            &mut seq,
        );
        assert_eq!(s.metrics.malformed.get(), 3);
        // The next good message still applies.
        s.on_message(
            &frames(1, &batch(vec![stored(vec![9], None, vec![5], "GPU")])),
            &mut seq,
        );
        let mut keys = Vec::new();
        request_keys(chain_root("", ""), 1, &[5], &mut keys);
        assert_eq!(s.blocks.matched(&keys), 1);
        assert!(s.blocks.is_live());
        assert_eq!(s.metrics.batches.get(), 1);
        assert_eq!(s.metrics.malformed.get(), 3);
    }

    #[test]
    fn gaps_restarts_and_offloaded_tiers() {
        let s = sub(1);
        let mut seq = SeqState::default();
        s.on_message(
            &frames(0, &batch(vec![stored(vec![1], None, vec![5], "GPU")])),
            &mut seq,
        );
        // A CPU-tier copy is not indexed.
        s.on_message(
            &frames(1, &batch(vec![stored(vec![2], None, vec![6], "CPU")])),
            &mut seq,
        );
        assert_eq!(s.blocks.len(), 1);
        s.on_message(&frames(5, &batch(vec![])), &mut seq);
        assert_eq!(s.metrics.gaps.get(), 1);
        assert_eq!(s.blocks.len(), 1);
        // Sequence back to 0: the publisher restarted, its cache is empty.
        s.on_message(&frames(0, &batch(vec![])), &mut seq);
        assert_eq!(s.metrics.resets.get(), 1);
        assert_eq!(s.blocks.len(), 0);
    }

    #[test]
    fn sources_from_parameters() {
        use crate::epp::datastore::DiscoveryEvent;
        use crate::epp::endpoint::Endpoint;
        let ds = Datastore::new();
        ds.apply(DiscoveryEvent::Reset(vec![
            Endpoint::from_addr("10.0.0.1:8000".parse().unwrap()),
            Endpoint::from_addr("10.0.0.2:8000".parse().unwrap()),
        ]));
        let slots = ds.slots();
        let mut params = PreciseParams::default();
        params
            .endpoint_sockets
            .insert("10.0.0.2:8000".into(), "grpc://127.0.0.1:7000".into());
        let p = Precise::new(params.clone()).unwrap();
        assert_eq!(
            source_for(&p, &slots[0]),
            Source::Zmq("tcp://10.0.0.1:5557".into())
        );
        assert_eq!(
            source_for(&p, &slots[1]),
            Source::Grpc("http://127.0.0.1:7000".into())
        );
        params.grpc_port = Some(5570);
        let p = Precise::new(params).unwrap();
        assert_eq!(
            source_for(&p, &slots[0]),
            Source::Grpc("http://10.0.0.1:5570".into())
        );
    }

    /// The decode server's gRPC KV-event service on loopback, requiring `token`.
    async fn grpc_server(token: &str) -> String {
        use crate::serve::kv_events::{KvEventLog, SubscriberPolicy};
        let log = KvEventLog::new(16, "m", 16);
        let svc = log.service(SubscriberPolicy {
            token: Some(token.to_owned()),
            max_subscribers: 4,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn grpc_subscription_presents_the_bearer_token() {
        let url = grpc_server("s3cret").await;
        let s = sub(16);
        let token = |t: &str| BearerToken::from_file_text(t).unwrap();
        for (presented, want) in [
            (None, "missing bearer token"),
            (Some(token("wrong")), "invalid bearer token"),
        ] {
            match s.grpc_once(&url, presented.as_ref()).await {
                Err(GrpcStreamError::Refused(st)) => {
                    assert_eq!(st.code(), tonic::Code::Unauthenticated);
                    assert_eq!(st.message(), want);
                }
                other => panic!("{presented:?}: {other:?}"),
            }
            assert!(!s.blocks.is_live());
        }
        // The right token: the stream opens (its Info message makes the endpoint live) and stays.
        let task = {
            let s = s.clone();
            tokio::spawn(async move { s.grpc_once(&url, Some(&token("s3cret"))).await })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !s.blocks.is_live() {
            assert!(!task.is_finished(), "{:?}", task.await);
            assert!(std::time::Instant::now() < deadline, "never live");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
    }
}
