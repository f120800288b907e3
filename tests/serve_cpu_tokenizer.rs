//! The Hugging Face text codec: the tiny byte-level tokenizer `write_tiny_qwen2` generates, chat
//! templates and EOS ids, and the real Qwen tokenizer when `scripts/fetch-tokenizer.sh` has put it
//! in `.cache/qwen-tokenizer/` (without it those tests print `SKIPPED`, and fail under `CI=true`).

mod support;

use std::path::{Path, PathBuf};

use switchyard::serve::codec::{ChatMessage, CodecError, TextCodec};
use switchyard::serve::model::testing::{
    tiny_special_id, write_tiny_qwen2, write_tiny_qwen2_with, TinyQwen2,
};
use switchyard::serve::model::{load_codec, HfCodec};

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::text(role, content)
}

#[test]
fn tiny_tokenizer_encodes_bpe_merges_and_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), 0).unwrap();
    let codec = load_codec(dir.path()).unwrap();
    // "Hello" merges fully (l+l, H+e, He+ll, Hell+o); " the" via Ġ+t, h+e, Ġt+he; " world"
    // only merges Ġ+w.
    let ids = codec.encode("Hello the world", false).unwrap();
    assert_eq!(ids, vec![267, 260, 263, 111, 114, 108, 100]);
    assert_eq!(codec.decode(&ids, false).unwrap(), "Hello the world");
    let (start, end) = (
        tiny_special_id("<|im_start|>"),
        tiny_special_id("<|im_end|>"),
    );
    assert_eq!((start, end), (269, 270));
    // Special tokens are matched in text; "er" merges; "\n" is its own byte.
    let ids = codec
        .encode("<|im_start|>user\nHi<|im_end|>", true)
        .unwrap();
    assert_eq!(ids, vec![269, 117, 115, 261, 10, 72, 105, 270]);
    assert_eq!(codec.decode(&ids, true).unwrap(), "user\nHi");
    assert_eq!(
        codec.decode(&ids, false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>"
    );
    // Non-ASCII goes through the byte-level alphabet and back.
    let text = "naïve — 東京 🚀";
    let ids = codec.encode(text, false).unwrap();
    assert_eq!(ids.len(), text.len(), "no merge applies: one id per byte");
    assert_eq!(codec.decode(&ids, false).unwrap(), text);
    // generation_config.json eos_token_id [<|im_end|>, <|endoftext|>], tokenizer_config's
    // eos_token adds nothing new.
    assert_eq!(codec.eos_token_ids(), &[270, 268]);
}

#[test]
fn chat_template_from_tokenizer_config_and_chatml_fallback() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), 0).unwrap();
    let codec = load_codec(dir.path()).unwrap();
    assert_eq!(
        codec.render_chat(&[msg("user", "Hi")]).unwrap(),
        "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        codec
            .render_chat(&[msg("system", "Be brief."), msg("user", "Hi")])
            .unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );

    let plain = tempfile::tempdir().unwrap();
    write_tiny_qwen2_with(
        plain.path(),
        &TinyQwen2 {
            chat_template: false,
            ..TinyQwen2::default()
        },
    )
    .unwrap();
    let codec = load_codec(plain.path()).unwrap();
    assert_eq!(
        codec.render_chat(&[msg("user", "Hi")]).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // A separate chat_template.jinja (newer transformers) wins over tokenizer_config.json.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}<{{ m.role }}>{% endfor %}",
    )
    .unwrap();
    let codec = load_codec(dir.path()).unwrap();
    assert_eq!(codec.render_chat(&[msg("user", "Hi")]).unwrap(), "<user>");
}

#[test]
fn template_list_form_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), 0).unwrap();
    let tc = dir.path().join("tokenizer_config.json");
    let set_template = |t: serde_json::Value| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&tc).unwrap()).unwrap();
        v["chat_template"] = t;
        std::fs::write(&tc, v.to_string()).unwrap();
    };
    // transformers' list form: the one named "default" is used.
    set_template(serde_json::json!([
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{% for m in messages %}[{{ m.role }}]{% endfor %}{{ eos_token }}"}
    ]));
    let codec = load_codec(dir.path()).unwrap();
    assert_eq!(
        codec.render_chat(&[msg("user", "x")]).unwrap(),
        "[user]<|im_end|>"
    );

    set_template(
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}ok".into(),
    );
    let codec = load_codec(dir.path()).unwrap();
    assert_eq!(codec.render_chat(&[msg("user", "x")]).unwrap(), "ok");
    match codec.render_chat(&[msg("user", "x"), msg("user", "y")]) {
        Err(CodecError::Template(m)) => assert_eq!(m, "one message only"),
        other => panic!("{other:?}"),
    }

    set_template("{% if %}".into());
    let err = HfCodec::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("chat template in {} is invalid: ", tc.display())),
        "{err}"
    );

    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let err = HfCodec::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json: cannot load tokenizer: "),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = HfCodec::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with("cannot read ") && err.contains("tokenizer.json"),
        "{err}"
    );
}

/// Where `scripts/fetch-tokenizer.sh` puts the real Qwen tokenizer.
fn qwen_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/qwen-tokenizer");
    if dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else {
        support::tools::missing_dependency(
            "qwen tokenizer not in .cache/qwen-tokenizer (run scripts/fetch-tokenizer.sh)",
        );
        None
    }
}

#[test]
fn real_qwen_tokenizer_ids() {
    let Some(dir) = qwen_dir() else { return };
    let codec = HfCodec::load(&dir).unwrap();
    assert_eq!(
        codec.encode("Hello, world!", false).unwrap(),
        vec![9707, 11, 1879, 0]
    );
    assert_eq!(codec.token_to_id("<|im_start|>"), Some(151644));
    assert_eq!(codec.token_to_id("<|im_end|>"), Some(151645));
    assert_eq!(codec.token_to_id("<|endoftext|>"), Some(151643));
    // The package ships no generation_config.json: EOS comes from tokenizer_config's eos_token.
    assert_eq!(codec.eos_token_ids(), &[151645]);
    let ids = codec
        .encode("<|im_start|>user\nfn main() {}<|im_end|>", false)
        .unwrap();
    assert_eq!(ids.first(), Some(&151644));
    assert_eq!(ids.last(), Some(&151645));
    assert_eq!(codec.decode(&ids, true).unwrap(), "user\nfn main() {}");
    let text = "naïve — 東京 🚀\n\tdef f(x):  return x**2";
    let ids = codec.encode(text, false).unwrap();
    assert_eq!(codec.decode(&ids, false).unwrap(), text);
}

#[test]
fn real_qwen3_chat_template_renders_like_transformers() {
    let Some(dir) = qwen_dir() else { return };
    let codec = load_codec(&dir).unwrap();
    // Exercises namespace(), messages[::-1], str.split/lstrip/startswith: expected text rendered
    // with Python jinja2 using transformers' settings.
    let messages = [
        msg("system", "Be brief."),
        msg("user", "Hi"),
        msg("assistant", "<think>\nhmm\n</think>\n\nHello!"),
        msg("user", "Bye"),
    ];
    assert_eq!(
        codec.render_chat(&messages).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    );
}
