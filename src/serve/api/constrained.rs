//! Constrained decoding with llguidance: a [`ConstraintSpec`] compiled into a per-request
//! [`TokenConstraint`] whose mask the engine applies to each sampling row.
//!
//! The token table (each id's bytes, from the tokenizer's JSON) and llguidance's parser factory
//! are built once, on the first constrained request, so servers that never see one pay nothing.
//! Compiling a request's grammar runs on the API's blocking pool, off the engine thread; only the
//! mask (a bitset over the vocabulary, computed by an Earley parser over a lexer DFA) and the
//! token commit run on the engine thread, per generated token. docs/openai-api.md has the
//! measured costs and why llguidance and not outlines-core.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::{json, Value};

use super::structured::{Constraint, ConstraintSpec, JsonOptions};
use crate::serve::codec::TextCodec;
use crate::serve::protocol::TokenConstraint;

/// Why a constraint could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    /// The model's tokenizer gives no token table (the sim's approximate codec).
    #[error("constrained decoding is not available for this model: {0}")]
    Unavailable(String),
    /// llguidance refused the schema, regex or grammar.
    #[error("{0}")]
    Compile(String),
}

/// The per-model state for building constraints.
pub struct Grammars {
    codec: Arc<dyn TextCodec>,
    vocab_size: usize,
    eos: Option<u32>,
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab_size", &self.vocab_size)
            .field("built", &self.factory.get().is_some())
            .finish()
    }
}

impl Grammars {
    /// `vocab_size`: the engine's logits width (may exceed the tokenizer's ids, as Qwen's padded
    /// vocabulary does); `eos`: the token that ends a constrained output.
    pub fn new(codec: Arc<dyn TextCodec>, vocab_size: usize, eos: Option<u32>) -> Self {
        Self {
            codec,
            vocab_size,
            eos,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, GrammarError> {
        self.factory
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let built = build_factory(self.codec.as_ref(), self.vocab_size, self.eos);
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    ok = built.is_ok(),
                    "constrained decoding token table built"
                );
                built
            })
            .as_ref()
            .map_err(|e| GrammarError::Unavailable(e.clone()))
    }

    /// Compiles `spec` into a fresh constraint for one request.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Box<dyn TokenConstraint>, GrammarError> {
        let factory = self.factory()?;
        let grammar = match &spec.constraint {
            Constraint::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(json_schema(schema.clone(), &spec.json))
            }
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(json_schema(
                json!({"type": "object"}),
                &spec.json,
            )),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Choice(choices) => TopLevelGrammar::from_regex(&alternation(choices)),
            Constraint::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        let parser = factory
            .create_parser(grammar)
            .map_err(|e| GrammarError::Compile(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Compile(e));
        }
        Ok(Box::new(LlgConstraint { matcher }))
    }
}

/// The token table and parser factory for `codec`'s vocabulary.
fn build_factory(
    codec: &dyn TextCodec,
    vocab_size: usize,
    eos: Option<u32>,
) -> Result<ParserFactory, String> {
    let json = codec
        .tokenizer_json()
        .ok_or_else(|| "its tokenizer has no token table".to_owned())?;
    let eos = eos.ok_or_else(|| "it has no EOS token".to_owned())?;
    let mut words =
        llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())?;
    let n = words.len().max(vocab_size).max(eos as usize + 1);
    // Ids without bytes (padding beyond the tokenizer) are never allowed.
    words.resize(n, Vec::new());
    let info = TokRxInfo::new(n as u32, eos);
    // The trie builder asserts on malformed tables; a model file must not take the server down.
    let trie = std::panic::catch_unwind(|| TokTrie::from(&info, &words))
        .map_err(|_| "its token table is malformed".to_owned())?;
    let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    factory.quiet();
    Ok(factory)
}

/// The schema with `structured_outputs`' whitespace options as llguidance's `x-guidance`.
fn json_schema(schema: Value, opts: &JsonOptions) -> Value {
    let mut schema = match schema {
        Value::Bool(true) => json!({}),
        s => s,
    };
    if (opts.compact || opts.whitespace_pattern.is_some()) && schema.is_object() {
        let o = JsonCompileOptions {
            whitespace_flexible: !opts.compact && opts.whitespace_pattern.is_none(),
            whitespace_pattern: opts.whitespace_pattern.clone(),
            ..JsonCompileOptions::default()
        };
        o.apply_to(&mut schema);
    }
    schema
}

/// A regex matching exactly one of `choices`.
fn alternation(choices: &[String]) -> String {
    let mut rx = String::from("(");
    for (i, c) in choices.iter().enumerate() {
        if i > 0 {
            rx.push('|');
        }
        for ch in c.chars() {
            if "\\.+*?()|[]{}^$#&-~".contains(ch) {
                rx.push('\\');
            }
            rx.push(ch);
        }
    }
    rx.push(')');
    rx
}

/// One request's llguidance matcher.
struct LlgConstraint {
    matcher: Matcher,
}

impl std::fmt::Debug for LlgConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlgConstraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl TokenConstraint for LlgConstraint {
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        // Once the grammar is complete the mask is EOS alone.
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        if mask.num_set() == 0 {
            return Err("no token can continue the output".into());
        }
        let words = mask.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if bits >> b & 1 == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    fn accept(&mut self, token: u32) -> Result<(), String> {
        if self.matcher.is_stopped() {
            return Ok(()); // the EOS that ends it
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests;
