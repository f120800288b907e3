//! Fuzzes the EPP's request-body inspection (`epp::request::inspect`) for every API type and, on
//! success, the in-place model rewrite: the rewritten body must still be a JSON object whose
//! `model` is the new name, with every other top-level field unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::Value;
use switchyard::epp::request::{compact_json, inspect, ApiType};

const APIS: [ApiType; 4] = [
    ApiType::Completions,
    ApiType::ChatCompletions,
    ApiType::Responses,
    ApiType::Embeddings,
];

/// Names that need escaping, to check the rewrite writes a JSON string, not raw text.
const TARGETS: [&str; 3] = ["rewritten", "quo\"te\\ \u{1}", "ünï/\u{2028}"];

/// Only the model; everything else is skipped without converting numbers, so bodies with
/// numbers outside f64 (which `Value` rejects but a proxy must forward) still check.
#[derive(Deserialize)]
struct ModelOnly {
    model: String,
}

fuzz_target!(|data: &[u8]| {
    // Which rewrite target to use comes from the input, so the corpus explores all three.
    let target = TARGETS[data.first().map_or(0, |b| *b as usize % TARGETS.len())];
    let original: Option<Value> = serde_json::from_slice(data).ok();
    for api in APIS {
        let Ok(inspected) = inspect(data, api) else {
            continue;
        };
        let model = inspected.model.to_string();
        // Compaction never grows the bytes.
        assert!(compact_json(data).len() <= data.len());

        let rewritten = inspected.rewrite_model(data, target);
        let parsed: ModelOnly = serde_json::from_slice(&rewritten).unwrap_or_else(|e| {
            panic!(
                "rewritten body does not parse ({e}): {:?}",
                String::from_utf8_lossy(&rewritten)
            )
        });
        assert_eq!(parsed.model, target);

        // When the body is representable as a Value, everything but the model is unchanged.
        if let Some(Value::Object(before)) = &original {
            assert_eq!(
                before.get("model").and_then(Value::as_str),
                Some(model.as_str())
            );
            let after: Value = serde_json::from_slice(&rewritten).expect("reparse");
            let Value::Object(after) = after else {
                panic!("rewritten body is not an object");
            };
            assert_eq!(before.len(), after.len());
            for (k, v) in before {
                if k != "model" {
                    assert_eq!(after.get(k), Some(v), "field {k} changed by the rewrite");
                }
            }
        }
    }
});
