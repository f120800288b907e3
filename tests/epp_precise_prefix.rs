//! Precise prefix routing against test publishers speaking vLLM's KV-event format (ZMQ PUB,
//! `[topic, seq, msgpack KVEventBatch]`, the payload encoded by `kvwire::encode_batch`, whose
//! bytes are held to msgspec's in `src/kvwire/tests.rs`): an in-process `switchyard epp` with the
//! `precise-prefix-cache-scorer` routes a prompt to the endpoint that reported its blocks, and
//! stops doing so after `BlockRemoved` and `AllBlocksCleared`. Malformed payloads are counted
//! and skipped.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::{InProcessEpp, TestEpp};
use switchyard::epp::server::RunningEpp;
use switchyard::kvwire::{self, BlockRemoved, BlockStored, Event, EventBatch};
use switchyard::serve::approx_codec::ApproxCodec;
use switchyard::serve::codec::TextCodec;
use zeromq::{Socket, SocketSend, ZmqMessage};

/// Tokens per block; the approximate codec makes 4 bytes one token, so 16 bytes per block.
const BLOCK: usize = 4;
/// 64 bytes: 16 tokens, 4 blocks.
const PROMPT: &str = "You are a helpful assistant. Answer briefly and precisely. Q: wh";

/// Routes one completion of `prompt` through the EPP; returns the destination.
async fn route(epp: &RunningEpp, prompt: &str) -> String {
    let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 1}).to_string();
    route_via(epp, "/v1/completions", body.as_bytes()).await
}

/// Routes `body` for `path` through the EPP's ext_proc stream; returns the destination.
async fn route_via(epp: &RunningEpp, path: &str, body: &[u8]) -> String {
    use support::ext_proc::{destination, exchange, request_body, request_headers};
    let replies = exchange(
        epp.grpc_addr,
        vec![request_headers(path, &[], false), request_body(body, true)],
    )
    .await;
    destination(&replies).expect("no destination in the EPP's replies")
}

/// A ZMQ PUB socket standing in for one vLLM replica's publisher.
struct TestPublisher {
    socket: zeromq::PubSocket,
    port: u16,
    seq: u64,
}

impl TestPublisher {
    async fn bind() -> Self {
        let mut socket = zeromq::PubSocket::new();
        let ep = socket.bind("tcp://127.0.0.1:0").await.unwrap();
        let port = match ep {
            zeromq::Endpoint::Tcp(_, port) => port,
            other => panic!("bound {other:?}"),
        };
        TestPublisher {
            socket,
            port,
            seq: 0,
        }
    }

    async fn send_raw(&mut self, payload: Vec<u8>) {
        let frames = vec![
            Bytes::from_static(b"kv@pod@m"),
            Bytes::copy_from_slice(&kvwire::sequence_frame(self.seq)),
            Bytes::from(payload),
        ];
        self.seq += 1;
        self.socket
            .send(ZmqMessage::try_from(frames).unwrap())
            .await
            .unwrap();
    }

    async fn publish(&mut self, events: Vec<Event>) {
        let mut payload = Vec::new();
        kvwire::encode_batch(
            &EventBatch {
                ts: 1_700_000_000.0,
                events,
                data_parallel_rank: Some(0),
            },
            &mut payload,
        );
        self.send_raw(payload).await;
    }
}

/// `n` blocks of the prompt's tokens from block `from`, with engine keys `key0 + i` (opaque:
/// vLLM's would be sha256 digests).
fn stored(tokens: &[u32], from: usize, n: usize, key0: u64) -> Event {
    Event::Stored(BlockStored {
        block_hashes: (0..n as u64).map(|i| key0 + i).collect(),
        parent_block_hash: (from > 0).then(|| key0 - 1),
        token_ids: tokens[from * BLOCK..(from + n) * BLOCK].to_vec(),
        block_size: BLOCK as u32,
        lora_id: None,
        medium: Some("GPU".into()),
        lora_name: None,
    })
}

async fn start_epp(pods: &[SocketAddr], pubs: &[&TestPublisher]) -> TestEpp {
    let mut sockets = String::new();
    for (pod, p) in pods.iter().zip(pubs) {
        sockets.push_str(&format!(
            "        \"{pod}\": \"tcp://127.0.0.1:{}\"\n",
            p.port
        ));
    }
    let config = format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {{ blockSize: {BLOCK} }}
    kvEventsConfig:
      topicFilter: \"kv@\"
      endpointSockets:
{sockets}- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
  - pluginRef: max-score-picker
"
    );
    let mut yaml = String::from("endpoints:\n");
    for pod in pods {
        yaml.push_str(&format!("- address: {pod}\n"));
    }
    InProcessEpp::endpoints_file(yaml)
        .config(config)
        .flags(&["--secure-serving=false", "--pool-name", "pool"])
        .start()
        .await
}

async fn metric(epp: &TestEpp, name: &str) -> f64 {
    let text = epp.metrics_text().await;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

const KEYS: &str = "switchyard_kv_events_index_keys";
const MALFORMED: &str = "switchyard_kv_events_malformed_total";

/// Waits until `name` reads exactly `want`.
async fn wait_metric(epp: &TestEpp, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = metric(epp, name).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the EPP's subscription to `publisher` is in place: a PUB socket drops what it
/// sends before the subscriber has joined (ZMQ's slow joiner), and an endpoint without a live
/// stream is scored by the approximate index, which learns from the routes themselves.
///
/// Each try stores one more copy of a block of `probe` tokens (a new engine key, the same
/// request key) until the index holds that key, then the publisher clears its cache. Copies
/// never take the key count down, and the clear comes after every copy on the same stream, so
/// once the count is back at `keys` nothing from this publisher is still on its way.
async fn wait_subscribed(epp: &TestEpp, publisher: &mut TestPublisher, probe: &[u32], keys: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut engine_key = 9_000;
    'joined: loop {
        publisher
            .publish(vec![stored(probe, 0, 1, engine_key)])
            .await;
        engine_key += 1;
        let retry = Instant::now() + Duration::from_millis(200);
        while Instant::now() < retry {
            if metric(epp, KEYS).await == keys + 1.0 {
                break 'joined;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(Instant::now() < deadline, "never subscribed");
    }
    publisher.publish(vec![Event::AllCleared]).await;
    wait_metric(epp, KEYS, keys).await;
}

/// Publishes `events`, waits until the index holds `keys` request keys (every step below
/// changes the count, monotonically within a batch, so this is when the batch is applied),
/// then routes the prompt 6 times: every route goes to `want`.
async fn expect_route(
    epp: &TestEpp,
    publisher: &mut TestPublisher,
    events: Vec<Event>,
    keys: f64,
    want: SocketAddr,
) {
    publisher.publish(events).await;
    wait_metric(epp, KEYS, keys).await;
    for _ in 0..6 {
        assert_eq!(route(epp, PROMPT).await, want.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_the_endpoint_that_reported_the_blocks_until_it_drops_them() {
    let mut pubs = Vec::new();
    for _ in 0..3 {
        pubs.push(TestPublisher::bind().await);
    }
    // Nothing listens on these ports: the precise scorer needs only the events.
    let pods: Vec<SocketAddr> = support::ports::free_ports(3)
        .unwrap()
        .into_iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
        .collect();
    let epp = start_epp(&pods, &[&pubs[0], &pubs[1], &pubs[2]]).await;
    let tokens = ApproxCodec::new(151_643).encode(PROMPT, true).unwrap();
    assert_eq!(tokens.len(), 16);
    // Every stream live before the first route (probe tokens share no block with the prompt).
    let probe: Vec<u32> = (0..BLOCK as u32).map(|t| 100_000 + t).collect();
    for p in &mut pubs {
        wait_subscribed(&epp, p, &probe, 0.0).await;
    }

    // A holds the first block, B all four: B. (Request keys held across endpoints: 1, then 5.)
    let [a, b, c] = &mut pubs[..] else {
        unreachable!()
    };
    expect_route(&epp, a, vec![stored(&tokens, 0, 1, 100)], 1.0, pods[0]).await;
    expect_route(
        &epp,
        b,
        vec![stored(&tokens, 0, 2, 200), stored(&tokens, 2, 2, 202)],
        5.0,
        pods[1],
    )
    .await;

    // B evicts its first block: the chain breaks at block 0, A's one block wins.
    expect_route(
        &epp,
        b,
        vec![Event::Removed(BlockRemoved {
            block_hashes: vec![200],
            medium: Some("GPU".into()),
        })],
        4.0,
        pods[0],
    )
    .await;

    // A clears its cache; C reports two blocks: C.
    a.publish(vec![Event::AllCleared]).await;
    wait_metric(&epp, KEYS, 3.0).await;
    expect_route(&epp, c, vec![stored(&tokens, 0, 2, 300)], 5.0, pods[2]).await;

    // Garbage from A is counted and skipped; A's next good batch still applies.
    let before = metric(&epp, MALFORMED).await;
    a.send_raw(vec![0xc1, 0x00]).await;
    a.send_raw(b"not msgpack at all".to_vec()).await;
    expect_route(&epp, a, vec![stored(&tokens, 0, 4, 400)], 9.0, pods[0]).await;
    assert_eq!(metric(&epp, MALFORMED).await - before, 2.0);
    assert!(metric(&epp, KEYS).await >= 6.0);
    epp.shutdown().await;
}
