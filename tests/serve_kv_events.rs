//! The KV-cache event stream over real gRPC on loopback: info first, `AllCleared` as event 1,
//! `BlockStored` hashes a router can recompute from the prompt's token ids, `BlockRemoved` on
//! eviction, resuming from a sequence number, and `OUT_OF_RANGE` for a too-old one.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::HttpClient;
use switchyard::serve::engine::hashing::{block_hash, root_hash};
use switchyard::serve::kv_events::pb::kv_event::Event;
use switchyard::serve::kv_events::pb::kv_events_client::KvEventsClient;
use switchyard::serve::kv_events::pb::subscribe_response::Message;
use switchyard::serve::kv_events::pb::{SubscribeRequest, SubscribeResponse};
use switchyard::serve::{self, ServeArgs};
use tonic::Streaming;

async fn next(stream: &mut Streaming<SubscribeResponse>) -> Message {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("timed out waiting for a KV event")
        .unwrap()
        .unwrap()
        .message
        .unwrap()
}

async fn tokens(base: &str, text: &str) -> Vec<u32> {
    let r = HttpClient::new()
        .post_json(
            &format!("{base}/tokenize"),
            &[],
            json!({"prompt": text}).to_string(),
        )
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

#[tokio::test]
async fn stored_removed_and_resume_over_grpc() {
    let mut args = ServeArgs::sim_for_tests("l4-qwen2.5-7b", 0.001);
    args.served_model_name = vec!["kv-model".into()];
    args.kv_events_port = Some(0);
    args.kv_events_buffer = 8;
    // 4 blocks of 16 tokens: the second prompt evicts the first one's blocks.
    args.num_gpu_blocks_override = Some(4);
    args.max_model_len = Some(64);
    let h = serve::start(args).await.unwrap();
    let base = format!("http://{}", h.http_addr);
    let mut client = KvEventsClient::connect(format!("http://{}", h.kv_events_addr.unwrap()))
        .await
        .unwrap();
    let mut stream = client
        .subscribe(SubscribeRequest { from_sequence: 1 })
        .await
        .unwrap()
        .into_inner();
    let Message::Info(info) = next(&mut stream).await else {
        panic!("info must come first")
    };
    assert_eq!(
        (info.model_name.as_str(), info.block_size, info.num_blocks),
        ("kv-model", 16, 4)
    );
    assert_eq!(info.root_hash, root_hash("kv-model"));
    assert_eq!((info.oldest_sequence, info.next_sequence), (1, 2));
    let Message::Event(e) = next(&mut stream).await else {
        panic!()
    };
    assert_eq!(
        (e.sequence, e.event),
        (1, Some(Event::Cleared(Default::default())))
    );

    // 40 tokens of prompt + 1 generated: 2 full blocks are computed and stored together.
    let text_a = "a".repeat(100) + &"b".repeat(60);
    let ids = tokens(&base, &text_a).await;
    assert_eq!(ids.len(), 40);
    let r = HttpClient::new()
        .post_json(
            &format!("{base}/v1/completions"),
            &[],
            json!({"prompt": text_a, "max_tokens": 1}).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let root = root_hash("kv-model");
    let h0 = block_hash(root, &ids[..16]);
    let h1 = block_hash(h0, &ids[16..32]);
    let Message::Event(e) = next(&mut stream).await else {
        panic!()
    };
    assert_eq!(e.sequence, 2);
    let Some(Event::Stored(stored)) = e.event else {
        panic!("{e:?}")
    };
    assert_eq!(stored.block_hashes, vec![h0, h1]);
    assert_eq!(stored.parent_hash, root);
    assert_eq!(stored.token_count, 32);
    assert_eq!(stored.token_ids, ids[..32].to_vec());

    // A different 63-token prompt needs all 4 blocks: both cached blocks are reused.
    let text_b = "c".repeat(252);
    let r = HttpClient::new()
        .post_json(
            &format!("{base}/v1/completions"),
            &[],
            json!({"prompt": text_b, "max_tokens": 1}).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let mut removed = Vec::new();
    let mut stored_b = Vec::new();
    while removed.len() < 2 || stored_b.len() < 3 {
        let Message::Event(e) = next(&mut stream).await else {
            panic!()
        };
        match e.event {
            Some(Event::Removed(r)) => removed.extend(r.block_hashes),
            Some(Event::Stored(s)) => stored_b.extend(s.block_hashes),
            other => panic!("unexpected {other:?}"),
        }
    }
    removed.sort_unstable();
    let mut expect = vec![h0, h1];
    expect.sort_unstable();
    assert_eq!(removed, expect);
    let ids_b = tokens(&base, &text_b).await;
    assert_eq!(stored_b[0], block_hash(root, &ids_b[..16]));

    // Resume from sequence 3 replays the same events.
    let mut replay = client
        .subscribe(SubscribeRequest { from_sequence: 3 })
        .await
        .unwrap()
        .into_inner();
    let Message::Info(_) = next(&mut replay).await else {
        panic!()
    };
    let Message::Event(e) = next(&mut replay).await else {
        panic!()
    };
    assert_eq!(e.sequence, 3);
    drop(replay);

    // More traffic pushes event 1 out of the 8-event window.
    for c in ['d', 'e', 'f', 'g', 'h', 'i'] {
        let body = json!({"prompt": c.to_string().repeat(80), "max_tokens": 1}).to_string();
        let r = HttpClient::new()
            .post_json(&format!("{base}/v1/completions"), &[], body)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let mut live = client
        .subscribe(SubscribeRequest { from_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let Message::Info(now) = next(&mut live).await else {
        panic!()
    };
    assert!(now.next_sequence > 9, "{now:?}");
    assert_eq!(now.oldest_sequence, now.next_sequence - 8);
    let err = client
        .subscribe(SubscribeRequest { from_sequence: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    assert_eq!(
        err.message(),
        format!(
            "sequence 1 is no longer retained; oldest retained is {}",
            now.oldest_sequence
        )
    );
    let err = client
        .subscribe(SubscribeRequest {
            from_sequence: now.next_sequence + 5,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    assert!(
        err.message().contains("beyond the next sequence"),
        "{}",
        err.message()
    );
    drop((stream, live, client));
    h.shutdown(Duration::from_secs(2)).await;
}

/// The stream reveals prompt token ids: with `--kv-events-token-file` only a subscriber with the
/// bearer token gets it, and `--kv-events-max-subscribers` caps concurrent subscribers (the slot
/// frees when a subscriber goes away).
#[tokio::test]
async fn token_and_subscriber_cap_guard_the_stream() {
    use tonic::metadata::MetadataValue;
    use tonic::Code;

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let mut args = ServeArgs::sim_for_tests("l4-qwen2.5-7b", 0.001);
    args.kv_events_port = Some(0);
    args.kv_events_token_file = Some(token_file);
    args.kv_events_max_subscribers = 1;
    let h = serve::start(args).await.unwrap();
    let url = format!("http://{}", h.kv_events_addr.unwrap());
    let mut client = KvEventsClient::connect(url).await.unwrap();

    let with_auth = |value: Option<&str>| {
        let mut req = tonic::Request::new(SubscribeRequest { from_sequence: 0 });
        if let Some(v) = value {
            req.metadata_mut()
                .insert("authorization", MetadataValue::try_from(v).unwrap());
        }
        req
    };
    let err = client.subscribe(with_auth(None)).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unauthenticated, "missing bearer token")
    );
    let err = client
        .subscribe(with_auth(Some("Bearer wrong")))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unauthenticated, "invalid bearer token")
    );

    let mut first = client
        .subscribe(with_auth(Some("Bearer s3cret-token")))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next(&mut first).await, Message::Info(_)));
    let err = client
        .subscribe(with_auth(Some("Bearer s3cret-token")))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::ResourceExhausted, "too many KV-event subscribers")
    );

    // The first subscriber leaves; its slot frees once the server notices the closed stream.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .subscribe(with_auth(Some("Bearer s3cret-token")))
            .await
        {
            Ok(resp) => {
                let mut s = resp.into_inner();
                assert!(matches!(next(&mut s).await, Message::Info(_)));
                break;
            }
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "slot never freed after the subscriber left"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
}

#[tokio::test]
async fn empty_token_file_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "  \n").unwrap();
    let mut args = ServeArgs::sim_for_tests("l4-qwen2.5-7b", 0.001);
    args.kv_events_port = Some(0);
    args.kv_events_token_file = Some(token_file.clone());
    let err = serve::start(args).await.expect_err("must fail");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid flag: --kv-events-token-file {} is empty",
            token_file.display()
        )
    );
}
