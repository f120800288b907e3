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
use clap::Parser;
use switchyard::epp::args::EppArgs;
use switchyard::epp::server::{start, RunningEpp};
use switchyard::kvwire::{self, BlockRemoved, BlockStored, Event, EventBatch};
use switchyard::serve::approx_codec::ApproxCodec;
use switchyard::serve::codec::TextCodec;
use zeromq::{Socket, SocketSend, ZmqMessage};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: EppArgs,
}

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

async fn start_epp(
    pods: &[SocketAddr],
    pubs: &[&TestPublisher],
) -> (tempfile::NamedTempFile, RunningEpp) {
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
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut yaml = String::from("endpoints:\n");
    for pod in pods {
        yaml.push_str(&format!("- address: {pod}\n"));
    }
    std::fs::write(file.path(), yaml).unwrap();
    let path = file.path().to_str().unwrap().to_string();
    let argv = vec![
        "epp",
        "--endpoints-file",
        &path,
        "--grpc-port",
        "0",
        "--grpc-health-port",
        "0",
        "--metrics-port",
        "0",
        "--bind-address",
        "127.0.0.1",
        "--secure-serving=false",
        "--config-text",
        &config,
        "--pool-name",
        "pool",
    ];
    let args = Cli::try_parse_from(argv).unwrap().args;
    (file, start(args).await.unwrap())
}

async fn metric(epp: &RunningEpp, name: &str) -> f64 {
    let url = format!("http://{}/metrics", epp.metrics_addr);
    let text = support::HttpClient::new().get(&url).await.unwrap().text();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Publishes `events` until the prompt routes to `want` (the first batches can be lost while
/// the subscription is still on its way: ZMQ's slow joiner), then checks 5 more routes.
async fn expect_route(
    epp: &RunningEpp,
    publisher: &mut TestPublisher,
    events: Vec<Event>,
    want: SocketAddr,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Route only once the batch is in (a tie between empty endpoints could pick `want` by
        // chance).
        let before = metric(epp, "switchyard_kv_events_batches_total").await;
        publisher.publish(events.clone()).await;
        let wait = Instant::now() + Duration::from_millis(500);
        while metric(epp, "switchyard_kv_events_batches_total").await <= before
            && Instant::now() < wait
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if route(epp, PROMPT).await == want.to_string() {
            break;
        }
        assert!(Instant::now() < deadline, "never routed to {want}");
    }
    for _ in 0..5 {
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
    let (_file, epp) = start_epp(&pods, &[&pubs[0], &pubs[1], &pubs[2]]).await;
    let tokens = ApproxCodec::new(151_643).encode(PROMPT, true).unwrap();
    assert_eq!(tokens.len(), 16);

    // A holds the first block, B all four: B.
    let [a, b, c] = &mut pubs[..] else {
        unreachable!()
    };
    expect_route(&epp, a, vec![stored(&tokens, 0, 1, 100)], pods[0]).await;
    expect_route(
        &epp,
        b,
        vec![stored(&tokens, 0, 2, 200), stored(&tokens, 2, 2, 202)],
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
        pods[0],
    )
    .await;

    // A clears its cache; C reports two blocks: C.
    a.publish(vec![Event::AllCleared]).await;
    expect_route(&epp, c, vec![stored(&tokens, 0, 2, 300)], pods[2]).await;

    // Garbage from A is counted and skipped; A's next good batch still applies.
    let before = metric(&epp, "switchyard_kv_events_malformed_total").await;
    a.send_raw(vec![0xc1, 0x00]).await;
    a.send_raw(b"not msgpack at all".to_vec()).await;
    expect_route(&epp, a, vec![stored(&tokens, 0, 4, 400)], pods[0]).await;
    assert_eq!(
        metric(&epp, "switchyard_kv_events_malformed_total").await - before,
        2.0
    );
    assert!(metric(&epp, "switchyard_kv_events_index_keys").await >= 6.0);
    epp.shutdown().await;
}
