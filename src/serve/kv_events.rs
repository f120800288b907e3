//! KV-cache event stream: a bounded, resumable log of the prefix-cache changes the engine makes,
//! served over gRPC (`proto/kv_events.proto`, `switchyard.kvevents.v1.KvEvents/Subscribe`).
//!
//! The engine appends once per step ([`KvEventLog::publish`]); each subscriber task reads from the
//! log at its own cursor and waits on a `watch` channel when caught up, so a slow subscriber never
//! blocks the engine: if it falls behind the retained window it gets `OUT_OF_RANGE` and resyncs.
//!
//! The stream carries the token ids of every cached prompt block, so it is guarded
//! ([`SubscriberPolicy`]): an optional bearer token (`--kv-events-token-file`, compared by SHA-256
//! digest in constant time) and a cap on concurrent subscribers (`--kv-events-max-subscribers`).
//!
//! The same events also go out in vLLM's format over ZMQ when a [`ZmqSink`] is attached
//! (`--kv-events-config`, `serve::kv_zmq`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::kvwire;
use crate::serve::engine::block_pool::PoolEvent;
use crate::serve::kv_zmq::ZmqSink;

/// Generated types of `switchyard.kvevents.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("switchyard.kvevents.v1");
}

use pb::kv_event::Event;

/// Events sent per subscriber read, bounding the time the log lock is held.
const READ_BATCH: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvEventsError {
    #[error("sequence {requested} is no longer retained; oldest retained is {oldest}")]
    TooOld { requested: u64, oldest: u64 },
    #[error("sequence {requested} is beyond the next sequence {next} (server restarted?)")]
    InFuture { requested: u64, next: u64 },
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Arc<pb::KvEvent>>,
    /// Sequence of `events[0]`.
    oldest: u64,
    capacity: usize,
}

impl Ring {
    fn next(&self) -> u64 {
        self.oldest + self.events.len() as u64
    }
}

/// The bounded event log shared by the engine (writer) and the gRPC subscribers (readers).
#[derive(Debug)]
pub struct KvEventLog {
    ring: Mutex<Ring>,
    next_tx: watch::Sender<u64>,
    model_name: String,
    block_size: u32,
    root_hash: u64,
    num_blocks: AtomicU64,
    instance_id: u64,
    zmq: std::sync::OnceLock<ZmqSink>,
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

impl KvEventLog {
    /// A log retaining the last `capacity` (≥ 1) events; event 1 is `AllCleared`.
    pub fn new(capacity: usize, model_name: &str, block_size: usize) -> Arc<Self> {
        let first = Arc::new(pb::KvEvent {
            sequence: 1,
            timestamp_unix_nanos: now_nanos(),
            event: Some(Event::Cleared(pb::AllCleared {})),
        });
        let capacity = capacity.max(1);
        let mut events = VecDeque::with_capacity(capacity.min(1 << 16));
        events.push_back(first);
        let (next_tx, _) = watch::channel(2);
        Arc::new(Self {
            ring: Mutex::new(Ring {
                events,
                oldest: 1,
                capacity,
            }),
            next_tx,
            model_name: model_name.to_owned(),
            block_size: u32::try_from(block_size).unwrap_or(u32::MAX),
            root_hash: crate::serve::engine::hashing::root_hash(model_name),
            num_blocks: AtomicU64::new(0),
            instance_id: rand::random(),
            zmq: std::sync::OnceLock::new(),
        })
    }

    pub fn set_num_blocks(&self, n: usize) {
        self.num_blocks.store(n as u64, Ordering::Relaxed);
    }

    /// `(oldest retained, next)` sequence numbers.
    pub fn bounds(&self) -> (u64, u64) {
        let ring = self.ring.lock();
        (ring.oldest, ring.next())
    }

    /// Also sends every published step to `sink` in vLLM's format (once; later calls are
    /// ignored).
    pub fn attach_zmq(&self, sink: ZmqSink) {
        let _ = self.zmq.set(sink);
    }

    /// vLLM's form of one pool event: no parent for a sequence's first block, medium "GPU".
    fn vllm_event(&self, ev: &PoolEvent) -> kvwire::Event {
        match ev {
            PoolEvent::Stored {
                block_hashes,
                parent_hash,
                token_ids,
            } => kvwire::Event::Stored(kvwire::BlockStored {
                block_hashes: block_hashes.clone(),
                parent_block_hash: (*parent_hash != self.root_hash).then_some(*parent_hash),
                token_ids: token_ids.clone(),
                block_size: self.block_size,
                lora_id: None,
                medium: Some(kvwire::MEDIUM_GPU.to_string()),
                lora_name: None,
            }),
            PoolEvent::Removed { block_hashes } => kvwire::Event::Removed(kvwire::BlockRemoved {
                block_hashes: block_hashes.clone(),
                medium: Some(kvwire::MEDIUM_GPU.to_string()),
            }),
            PoolEvent::AllCleared => kvwire::Event::AllCleared,
        }
    }

    /// Appends the engine's pool events (one lock per call) and wakes subscribers.
    pub fn publish(&self, events: impl IntoIterator<Item = PoolEvent>) {
        let ts = now_nanos();
        let zmq = self.zmq.get();
        let mut vllm = Vec::new();
        let next = {
            let mut ring = self.ring.lock();
            let before = ring.next();
            for ev in events {
                if zmq.is_some() {
                    vllm.push(self.vllm_event(&ev));
                }
                let event = match ev {
                    PoolEvent::Stored {
                        block_hashes,
                        parent_hash,
                        token_ids,
                    } => Event::Stored(pb::BlockStored {
                        token_count: u32::try_from(token_ids.len()).unwrap_or(u32::MAX),
                        block_hashes,
                        parent_hash,
                        token_ids,
                        block_size: self.block_size,
                    }),
                    PoolEvent::Removed { block_hashes } => {
                        Event::Removed(pb::BlockRemoved { block_hashes })
                    }
                    PoolEvent::AllCleared => Event::Cleared(pb::AllCleared {}),
                };
                let sequence = ring.next();
                if ring.events.len() == ring.capacity {
                    ring.events.pop_front();
                    ring.oldest += 1;
                }
                ring.events.push_back(Arc::new(pb::KvEvent {
                    sequence,
                    timestamp_unix_nanos: ts,
                    event: Some(event),
                }));
            }
            let next = ring.next();
            if next == before {
                return;
            }
            next
        };
        if let Some(sink) = zmq {
            sink.send(kvwire::EventBatch {
                ts: ts as f64 / 1e9,
                events: vllm,
                data_parallel_rank: Some(0),
            });
        }
        self.next_tx.send_replace(next);
    }

    /// Copies up to `max` events starting at sequence `from` into `out`.
    pub fn read_from(
        &self,
        from: u64,
        max: usize,
        out: &mut Vec<Arc<pb::KvEvent>>,
    ) -> Result<(), KvEventsError> {
        let ring = self.ring.lock();
        if from < ring.oldest {
            return Err(KvEventsError::TooOld {
                requested: from,
                oldest: ring.oldest,
            });
        }
        if from > ring.next() {
            return Err(KvEventsError::InFuture {
                requested: from,
                next: ring.next(),
            });
        }
        let start = (from - ring.oldest) as usize;
        out.extend(ring.events.iter().skip(start).take(max).cloned());
        Ok(())
    }

    fn info(&self) -> pb::ServerInfo {
        let (oldest, next) = self.bounds();
        pb::ServerInfo {
            model_name: self.model_name.clone(),
            block_size: self.block_size,
            root_hash: self.root_hash,
            num_blocks: self.num_blocks.load(Ordering::Relaxed),
            instance_id: self.instance_id,
            oldest_sequence: oldest,
            next_sequence: next,
        }
    }

    /// The tonic service serving this log to subscribers admitted by `policy`.
    pub fn service(
        self: &Arc<Self>,
        policy: SubscriberPolicy,
    ) -> pb::kv_events_server::KvEventsServer<KvEventsService> {
        pb::kv_events_server::KvEventsServer::new(KvEventsService {
            log: Arc::clone(self),
            token_digest: policy.token.as_deref().map(|t| sha256(t.as_bytes())),
            slots: Arc::new(Semaphore::new(policy.max_subscribers)),
        })
    }
}

/// Who may subscribe: the stream reveals prompt token ids, so it is not for everyone who can
/// reach the port.
#[derive(Debug, Clone)]
pub struct SubscriberPolicy {
    /// Required `authorization: Bearer <token>` value; `None` admits any client (a warning is
    /// logged at startup when the port is not on loopback).
    pub token: Option<String>,
    /// Concurrent subscribers; one more gets `RESOURCE_EXHAUSTED`.
    pub max_subscribers: usize,
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Compares fixed-size digests without an early exit, so timing says nothing about the token.
pub(crate) fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// gRPC front of a [`KvEventLog`].
#[derive(Debug, Clone)]
pub struct KvEventsService {
    log: Arc<KvEventLog>,
    token_digest: Option<[u8; 32]>,
    slots: Arc<Semaphore>,
}

impl KvEventsService {
    /// Checks the bearer token (when one is configured) and takes a subscriber slot.
    fn admit<T>(&self, request: &Request<T>) -> Result<OwnedSemaphorePermit, Status> {
        if let Some(want) = &self.token_digest {
            let presented = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match presented {
                Some(token) if digests_equal(&sha256(token.as_bytes()), want) => {}
                Some(_) => return Err(Status::unauthenticated("invalid bearer token")),
                None => return Err(Status::unauthenticated("missing bearer token")),
            }
        }
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many KV-event subscribers"))
    }
}

fn status_of(e: &KvEventsError) -> Status {
    Status::out_of_range(e.to_string())
}

#[tonic::async_trait]
impl pb::kv_events_server::KvEvents for KvEventsService {
    type SubscribeStream = ReceiverStream<Result<pb::SubscribeResponse, Status>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let permit = self.admit(&request)?;
        let from = request.into_inner().from_sequence;
        let mut next_rx = self.log.next_tx.subscribe();
        let (oldest, next) = self.log.bounds();
        let mut cursor = match from {
            0 => next,
            f if f < oldest => {
                return Err(status_of(&KvEventsError::TooOld {
                    requested: f,
                    oldest,
                }))
            }
            f if f > next => {
                return Err(status_of(&KvEventsError::InFuture { requested: f, next }))
            }
            f => f,
        };
        tracing::debug!(from, cursor, "kv-events subscriber connected");
        let (tx, rx) = mpsc::channel(READ_BATCH);
        let log = Arc::clone(&self.log);
        tokio::spawn(async move {
            // Held for the subscriber's lifetime: the slot frees when this task ends.
            let _permit = permit;
            let info = pb::SubscribeResponse {
                message: Some(pb::subscribe_response::Message::Info(log.info())),
            };
            if tx.send(Ok(info)).await.is_err() {
                return;
            }
            let mut batch = Vec::with_capacity(READ_BATCH);
            loop {
                batch.clear();
                // Mark the current value seen before reading, so a publish after the read wakes us.
                next_rx.borrow_and_update();
                if let Err(e) = log.read_from(cursor, READ_BATCH, &mut batch) {
                    let _ = tx.send(Err(status_of(&e))).await;
                    return;
                }
                if batch.is_empty() {
                    tokio::select! {
                        changed = next_rx.changed() => if changed.is_err() { return },
                        () = tx.closed() => return,
                    }
                    continue;
                }
                for ev in batch.drain(..) {
                    cursor = ev.sequence + 1;
                    let msg = pb::SubscribeResponse {
                        message: Some(pb::subscribe_response::Message::Event((*ev).clone())),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return; // subscriber went away
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_bounded_and_resumable() {
        let log = KvEventLog::new(3, "m", 16);
        log.publish((0..4).map(|i| PoolEvent::Removed {
            block_hashes: vec![i],
        }));
        assert_eq!(log.bounds(), (3, 6));
        let mut out = Vec::new();
        assert_eq!(
            log.read_from(2, 10, &mut out),
            Err(KvEventsError::TooOld {
                requested: 2,
                oldest: 3
            })
        );
        log.read_from(4, 10, &mut out).unwrap();
        let seqs: Vec<u64> = out.iter().map(|e| e.sequence).collect();
        assert_eq!(seqs, vec![4, 5]);
        assert_eq!(
            out[1].event,
            Some(Event::Removed(pb::BlockRemoved {
                block_hashes: vec![3]
            }))
        );
        out.clear();
        log.read_from(6, 10, &mut out).unwrap();
        assert!(out.is_empty());
        assert!(log.read_from(7, 10, &mut out).is_err());
    }
}
