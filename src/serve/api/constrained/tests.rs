//! Masks over the tiny byte-level tokenizer: whatever the logits, the masked argmax walk yields
//! text the constraint accepts; compile errors and unavailable token tables are reported.

use super::*;
use crate::serve::approx_codec::ApproxCodec;
use crate::serve::model::load_codec;
use crate::serve::model::testing::{tiny_special_id, write_tiny_qwen2};

/// The tiny model's vocabulary (config vocab 300, ids 271.. unused) and EOS `<|im_end|>`.
fn grammars() -> (Grammars, Arc<dyn TextCodec>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), 0).unwrap();
    let codec = load_codec(dir.path()).unwrap();
    let g = Grammars::new(Arc::clone(&codec), 300, Some(tiny_special_id("<|im_end|>")));
    (g, codec, dir)
}

fn spec(constraint: Constraint) -> ConstraintSpec {
    ConstraintSpec {
        constraint,
        json: JsonOptions::default(),
        param: "structured_outputs",
    }
}

/// Greedy decoding over pseudo-random logits (SplitMix-style, seeded) under the mask, until EOS
/// or `max` tokens; returns the text before EOS and whether EOS came.
fn walk(
    g: &Grammars,
    codec: &dyn TextCodec,
    s: &ConstraintSpec,
    seed: u64,
    max: usize,
) -> (String, bool) {
    let mut c = g.compile(s).unwrap();
    let eos = tiny_special_id("<|im_end|>");
    let mut state = seed;
    let mut ids = Vec::new();
    for _ in 0..max {
        let mut logits: Vec<f32> = (0..300)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z >> 40) as f32) / (1u64 << 24) as f32
            })
            .collect();
        c.mask(&mut logits).unwrap();
        let (tok, _) = logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &l)| {
                if l > b.1 {
                    (i, l)
                } else {
                    b
                }
            });
        c.accept(tok as u32).unwrap();
        if tok as u32 == eos {
            return (codec.decode(&ids, false).unwrap(), true);
        }
        ids.push(tok as u32);
    }
    (codec.decode(&ids, false).unwrap(), false)
}

#[test]
fn regex_choice_and_grammar_outputs_match_whatever_the_logits() {
    let (g, codec, _dir) = grammars();
    for seed in 0..5 {
        let (text, done) = walk(
            &g,
            codec.as_ref(),
            &spec(Constraint::Regex("[0-9]{3}-[a-c]+".into())),
            seed,
            40,
        );
        assert!(done, "{text:?}");
        let (num, letters) = text.split_once('-').unwrap();
        assert!(
            num.len() == 3 && num.bytes().all(|b| b.is_ascii_digit()),
            "{text:?}"
        );
        assert!(
            !letters.is_empty() && letters.bytes().all(|b| (b'a'..=b'c').contains(&b)),
            "{text:?}"
        );

        let choices = vec!["yes".to_owned(), "no (maybe?)".to_owned()];
        let (text, done) = walk(
            &g,
            codec.as_ref(),
            &spec(Constraint::Choice(choices.clone())),
            seed,
            40,
        );
        assert!(done && choices.contains(&text), "{text:?}");

        let lark = "start: \"(\" num (\",\" num)* \")\"\nnum: /[1-9][0-9]?/";
        let (text, done) = walk(
            &g,
            codec.as_ref(),
            &spec(Constraint::Grammar(lark.into())),
            seed,
            60,
        );
        assert!(done, "{text:?}");
        let inner = text
            .strip_prefix('(')
            .and_then(|t| t.strip_suffix(')'))
            .unwrap();
        assert!(
            inner
                .split(',')
                .all(|n| n.parse::<u32>().is_ok_and(|n| (1..100).contains(&n))),
            "{text:?}"
        );
    }
}

#[test]
fn json_schema_output_parses_and_validates() {
    let (g, codec, _dir) = grammars();
    let schema = json!({"type": "object", "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"type": "string", "enum": ["a", "b"]}},
        "required": ["ok", "n", "tag"], "additionalProperties": false});
    let mut s = spec(Constraint::JsonSchema(schema));
    s.json.compact = true;
    for seed in 0..5 {
        let (text, done) = walk(&g, codec.as_ref(), &s, seed, 80);
        assert!(done, "{text:?}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["ok"].is_boolean(), "{text}");
        assert!(v["n"].as_u64().is_some_and(|n| n <= 99), "{text}");
        assert!(v["tag"] == "a" || v["tag"] == "b", "{text}");
        assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
        assert!(!text.contains(' '), "compact: {text}");
    }
}

#[test]
fn uncompilable_inputs_and_missing_token_tables_are_errors() {
    let (g, _codec, _dir) = grammars();
    let err = g
        .compile(&spec(Constraint::Regex("(unclosed".into())))
        .unwrap_err();
    assert!(
        matches!(&err, GrammarError::Compile(m) if !m.is_empty()),
        "{err:?}"
    );
    let err = g
        .compile(&spec(Constraint::JsonSchema(
            json!({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}),
        )))
        .unwrap_err();
    assert!(matches!(&err, GrammarError::Compile(_)), "{err:?}");
    let err = g
        .compile(&spec(Constraint::Grammar("start: undefined_rule".into())))
        .unwrap_err();
    assert!(matches!(&err, GrammarError::Compile(_)), "{err:?}");

    let approx: Arc<dyn TextCodec> = Arc::new(ApproxCodec::new(151_643));
    let g = Grammars::new(approx, 152_064, Some(151_645));
    assert_eq!(
        g.compile(&spec(Constraint::JsonObject))
            .unwrap_err()
            .to_string(),
        "constrained decoding is not available for this model: its tokenizer has no token table"
    );
}
