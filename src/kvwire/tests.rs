use super::*;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> Event {
    Event::Stored(BlockStored {
        block_hashes: hashes,
        parent_block_hash: parent,
        token_ids: tokens,
        block_size: bs,
        lora_id: None,
        medium: Some(MEDIUM_GPU.into()),
        lora_name: None,
    })
}

/// Derived by hand from the msgpack spec and vLLM's struct declarations (array_like, tag first,
/// every field written); msgspec 0.23 encodes the same `KVEventBatch` to the same bytes.
const FIXTURE: &str = concat!(
    "93",                                   // KVEventBatch: array of 3
    "cb3ff8000000000000",                   // ts = 1.5 (float64)
    "93",                                   // events: array of 3
    "98",                                   //   BlockStored: array of 8
    "ab426c6f636b53746f726564",             //     "BlockStored"
    "9201cfffffffffffffffff",               //     block_hashes [1, 2^64-1]
    "c0",                                   //     parent_block_hash None
    "9401020304",                           //     token_ids [1, 2, 3, 4]
    "02",                                   //     block_size 2
    "c0",                                   //     lora_id None
    "a3475055",                             //     medium "GPU"
    "c0",                                   //     lora_name None
    "93",                                   //   BlockRemoved: array of 3
    "ac426c6f636b52656d6f766564",           //     "BlockRemoved"
    "9107",                                 //     block_hashes [7]
    "a3475055",                             //     medium "GPU"
    "91b0416c6c426c6f636b73436c6561726564", //   ["AllBlocksCleared"]
    "00",                                   // data_parallel_rank 0
);

fn fixture_batch() -> EventBatch {
    EventBatch {
        ts: 1.5,
        events: vec![
            stored(vec![1, u64::MAX], None, vec![1, 2, 3, 4], 2),
            Event::Removed(BlockRemoved {
                block_hashes: vec![7],
                medium: Some(MEDIUM_GPU.into()),
            }),
            Event::AllCleared,
        ],
        data_parallel_rank: Some(0),
    }
}

#[test]
fn encodes_exactly_like_msgspec() {
    let mut out = Vec::new();
    encode_batch(&fixture_batch(), &mut out);
    assert_eq!(out, hex(FIXTURE));

    // Wider integers, a negative lora_id, a LoRA name; no rank is written as nil.
    let batch = EventBatch {
        ts: 1.5,
        events: vec![Event::Stored(BlockStored {
            block_hashes: vec![300],
            parent_block_hash: Some(5),
            token_ids: vec![65_536, 151_644],
            block_size: 1,
            lora_id: Some(-1),
            medium: Some("GPU".into()),
            lora_name: Some("sql-lora".into()),
        })],
        data_parallel_rank: None,
    };
    out.clear();
    encode_batch(&batch, &mut out);
    assert_eq!(
        out,
        hex(concat!(
            "93cb3ff8000000000000",
            "9198ab426c6f636b53746f726564",
            "91cd012c", // [300]
            "05",
            "92ce00010000ce0002505c", // [65536, 151644]
            "01ff",                   // block_size 1, lora_id -1
            "a3475055a873716c2d6c6f7261",
            "c0"
        ))
    );
    let mut empty = Vec::new();
    encode_batch(
        &EventBatch {
            ts: 0.25,
            events: vec![],
            data_parallel_rank: None,
        },
        &mut empty,
    );
    assert_eq!(empty, hex("93cb3fd000000000000090c0"));
}

#[test]
fn decodes_what_it_encodes() {
    let batch = decode_batch(&hex(FIXTURE), DecodeLimits::default()).unwrap();
    assert_eq!(batch, fixture_batch());
}

#[test]
fn decodes_older_and_newer_field_sets() {
    // vLLM 0.9: no medium/lora_name, BlockRemoved without medium, batch without rank.
    let old = hex(concat!(
        "92cb3ff0000000000000",
        "92",
        "96ab426c6f636b53746f726564910a0b92010202c0",
        "92ac426c6f636b52656d6f766564910a"
    ));
    let b = decode_batch(&old, DecodeLimits::default()).unwrap();
    assert_eq!(b.ts, 1.0);
    assert_eq!(b.data_parallel_rank, None);
    assert_eq!(
        b.events,
        vec![
            Event::Stored(BlockStored {
                block_hashes: vec![10],
                parent_block_hash: Some(11),
                token_ids: vec![1, 2],
                block_size: 2,
                ..BlockStored::default()
            }),
            Event::Removed(BlockRemoved {
                block_hashes: vec![10],
                medium: None,
            }),
        ]
    );
    // Newer: trailing extra_keys / group_idx fields are ignored.
    let newer = hex(concat!(
        "93cb3ff000000000000091",
        "9bab426c6f636b53746f726564910ac0910102c0a3475055c0c0c0c0",
        "00"
    ));
    let b = decode_batch(&newer, DecodeLimits::default()).unwrap();
    assert_eq!(b.events, vec![stored(vec![10], None, vec![1], 2)]);
}

#[test]
fn decodes_map_form_and_sha256_bytes() {
    // msgspec without array_like: maps with a "type" tag; the hash a 32-byte sha256 digest.
    let map = hex(concat!(
        "82a27473cb4000000000000000a66576656e74739187a474797065",
        "ab426c6f636b53746f726564",
        "ac626c6f636b5f68617368657391c420",
        "000000000000000000000000000000000000000000000000",
        "0102030405060708",
        "b1706172656e745f626c6f636b5f68617368c0",
        "a9746f6b656e5f6964739109aa626c6f636b5f73697a6501",
        "a76c6f72615f6964c0a66d656469756da3475055"
    ));
    let b = decode_batch(&map, DecodeLimits::default()).unwrap();
    assert_eq!(b.ts, 2.0);
    assert_eq!(
        b.events,
        vec![stored(vec![0x0102_0304_0506_0708], None, vec![9], 1)]
    );
}

#[test]
fn rejects_malformed_payloads_with_reasons() {
    let l = DecodeLimits::default();
    let cases: &[(&str, WireError)] = &[
        ("", WireError::Truncated(0)),
        ("93cb3ff8", WireError::Truncated(2)),
        (
            "c1",
            WireError::BadMarker {
                marker: 0xc1,
                at: 0,
            },
        ),
        ("9300", WireError::Truncated(1)),
        ("dd7fffffff", WireError::Truncated(5)),
        ("9201900102", WireError::Trailing(2)),
        (
            "92c090",
            WireError::Shape {
                what: "ts",
                expected: "a number",
            },
        ),
        (
            "920100",
            WireError::Shape {
                what: "events",
                expected: "an array",
            },
        ),
        (
            "9201919101",
            WireError::Shape {
                what: "event",
                expected: "an array starting with its tag",
            },
        ),
        ("92019191a3466f6f", WireError::UnknownTag("Foo".into())),
        (
            "92019192ab426c6f636b53746f72656490",
            WireError::Shape {
                what: "parent_block_hash",
                expected: "present",
            },
        ),
        ("9191919191919191919191", WireError::TooDeep(8)),
    ];
    for (bytes, want) in cases {
        assert_eq!(
            decode_batch(&hex(bytes), l).as_ref().err(),
            Some(want),
            "payload {bytes}"
        );
    }
    let two = hex("92019291b0416c6c426c6f636b73436c656172656491b0416c6c426c6f636b73436c6561726564");
    assert_eq!(
        decode_batch(&two, DecodeLimits { max_events: 1 }).err(),
        Some(WireError::TooManyEvents { got: 2, limit: 1 })
    );
    assert_eq!(
        decode_batch(&two, DecodeLimits { max_events: 2 })
            .unwrap()
            .events
            .len(),
        2
    );
}

#[test]
fn framing_helpers() {
    assert_eq!(sequence_frame(258), [0, 0, 0, 0, 0, 0, 1, 2]);
    assert_eq!(parse_sequence_frame(&[0, 0, 0, 0, 0, 0, 1, 2]), Some(258));
    assert_eq!(parse_sequence_frame(&[1, 2]), None);
    assert_eq!(
        parse_llmd_topic("kv@10.0.0.1@Qwen/Qwen3"),
        Some(("10.0.0.1", "Qwen/Qwen3"))
    );
    assert_eq!(parse_llmd_topic("kv-events"), None);
}
