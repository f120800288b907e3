//! Chat messages → prompt text: the model's Jinja chat template (rendered with minijinja the way
//! `transformers` renders it), or Qwen's ChatML format when the model ships none.

use std::path::Path;

use minijinja::value::Kwargs;
use minijinja::{context, Environment, Error as JinjaError, ErrorKind, Value};

use super::ModelError;
use crate::serve::codec::{ChatExtras, ChatMessage, CodecError};

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template.
pub struct ChatTemplate {
    /// `None`: the ChatML fallback (`<|im_start|>role\ncontent<|im_end|>\n`).
    env: Option<Environment<'static>>,
    bos_token: String,
    eos_token: String,
    /// The template reads `tools` (Qwen2.5's does; it then renders the tool list itself).
    tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("jinja", &self.env.is_some())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("tools", &self.tools)
            .finish()
    }
}

impl ChatTemplate {
    /// The ChatML format Qwen models use, for directories without a template.
    pub fn chatml() -> ChatTemplate {
        ChatTemplate {
            env: None,
            bos_token: String::new(),
            eos_token: "<|im_end|>".into(),
            tools: false,
        }
    }

    /// Compiles `source` with the settings `transformers` uses (`trim_blocks`, `lstrip_blocks`,
    /// loop controls, Python string methods, `raise_exception`). `origin` names the file in errors.
    pub fn compile(
        source: &str,
        bos_token: &str,
        eos_token: &str,
        origin: &Path,
    ) -> Result<ChatTemplate, ModelError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        // HF templates call Python str/dict methods (`.strip()`, `.startswith()`, `.items()`).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        // transformers' own `tojson` (Python `json.dumps`: ", "/": " separators, no HTML
        // escaping), not Jinja's: tool schemas then tokenize as they do under vLLM.
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ModelError::Template {
                path: origin.to_path_buf(),
                reason: e.to_string(),
            })?;
        let tools = env
            .get_template(TEMPLATE_NAME)
            .map(|t| t.undeclared_variables(false).contains("tools"))
            .unwrap_or(false);
        Ok(ChatTemplate {
            env: Some(env),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            tools,
        })
    }

    /// Whether the template renders a `tools` list.
    pub fn supports_tools(&self) -> bool {
        self.tools
    }

    /// Renders `messages` with the generation prompt appended (`add_generation_prompt=True`).
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, CodecError> {
        self.render_with(messages, &ChatExtras::default())
    }

    /// Renders `messages` with tools, template kwargs and the generation-prompt choice.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        extras: &ChatExtras<'_>,
    ) -> Result<String, CodecError> {
        let Some(env) = &self.env else {
            if extras.tools.is_some() || extras.kwargs.is_some() {
                return Err(CodecError::Template(
                    "the ChatML fallback template takes no tools or kwargs".into(),
                ));
            }
            return Ok(render_chatml(messages, extras.add_generation_prompt));
        };
        let tmpl = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| CodecError::Template(e.to_string()))?;
        // Request kwargs first so the fixed variables win, as in vLLM.
        let kwargs = extras.kwargs.map(Value::from_serialize).unwrap_or_default();
        let ctx = context! {
            messages => messages,
            add_generation_prompt => extras.add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => extras.tools,
            ..kwargs
        };
        tmpl.render(ctx)
            .map_err(|e| CodecError::Template(describe(&e)))
    }
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let res = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            serde::Serialize::serialize(
                value,
                &mut serde_json::Serializer::with_formatter(&mut out, fmt),
            )
        }
        None => serde::Serialize::serialize(
            value,
            &mut serde_json::Serializer::with_formatter(&mut out, PySeparators),
        ),
    };
    res.map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let s = String::from_utf8(out)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(s))
}

/// Python's default JSON separators: `", "` between items, `": "` after keys.
struct PySeparators;

impl serde_json::ser::Formatter for PySeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `raise_exception(msg)`: templates use it to reject conversations they cannot format.
fn raise_exception(msg: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

/// The message of a template error, including the template's own `raise_exception` text.
fn describe(e: &JinjaError) -> String {
    match e.detail() {
        Some(detail) if e.kind() == ErrorKind::InvalidOperation => detail.to_string(),
        _ => e.to_string(),
    }
}

fn render_chatml(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage::text("system", "Be brief."),
            ChatMessage::text("user", "Hi"),
        ]
    }

    #[test]
    fn chatml_fallback() {
        assert_eq!(
            ChatTemplate::chatml().render(&msgs()).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn jinja_with_hf_settings() {
        // trim_blocks/lstrip_blocks, loop.last, Python string methods, the generation prompt.
        // Expected output produced by Python jinja2 with transformers' settings.
        let src = "{% for m in messages %}\n  {{ m.role.upper() }}: {{ m.content.strip() }}{% if not loop.last %}|{% endif %}\n{% endfor %}\n{% if add_generation_prompt %}>{{ eos_token }}{% endif %}";
        let t = ChatTemplate::compile(src, "", "<e>", Path::new("x")).unwrap();
        assert_eq!(
            t.render(&msgs()).unwrap(),
            "  SYSTEM: Be brief.|  USER: Hi><e>"
        );
    }

    #[test]
    fn raise_exception_message_surfaces() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}";
        let t = ChatTemplate::compile(src, "", "", Path::new("x")).unwrap();
        assert_eq!(
            t.render(&msgs()).unwrap_err().to_string(),
            "chat template failed: first message must be user"
        );
    }

    #[test]
    fn tools_and_tool_history_render_like_transformers() {
        use crate::serve::model::testing::{TINY_CHAT_TEMPLATE, TINY_TOOL_CHAT_TEMPLATE};
        let t = ChatTemplate::compile(TINY_TOOL_CHAT_TEMPLATE, "", "", Path::new("x")).unwrap();
        assert!(t.supports_tools());
        let plain = ChatTemplate::compile(TINY_CHAT_TEMPLATE, "", "", Path::new("x")).unwrap();
        assert!(!plain.supports_tools());
        assert!(!ChatTemplate::chatml().supports_tools());
        // Keys in sorted order at every level, so the text is the same whether or not
        // serde_json keeps insertion order.
        let tools = vec![
            serde_json::json!({"function": {"description": "Weather", "name": "get_weather",
            "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}},
            "type": "function"}),
        ];
        let messages = vec![
            ChatMessage::text("user", "Weather in Paris?"),
            ChatMessage {
                tool_calls: Some(vec![
                    serde_json::json!({"function": {"arguments": {"city": "Paris"},
                    "name": "get_weather"}, "id": "call_1", "type": "function"}),
                ]),
                ..ChatMessage::text("assistant", "")
            },
            ChatMessage {
                tool_call_id: Some("call_1".into()),
                ..ChatMessage::text("tool", "18C")
            },
        ];
        let extras = ChatExtras {
            tools: Some(&tools),
            ..ChatExtras::default()
        };
        assert_eq!(
            t.render_with(&messages, &extras).unwrap(),
            "<|im_start|>system\n# Tools\n<tools>\n{\"function\": {\"description\": \"Weather\", \
             \"name\": \"get_weather\", \"parameters\": {\"properties\": {\"city\": {\"type\": \
             \"string\"}}, \"required\": [\"city\"], \"type\": \"object\"}}, \"type\": \
             \"function\"}\n</tools><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n\
             <|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
             {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n\
             18C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn kwargs_generation_prompt_and_indented_tojson() {
        let src = "{{ greeting }}|{{ messages[0].content }}|{{ {'a': 'é<', 'b': [1, 2]} | tojson(indent=2) }}{% if add_generation_prompt %}>{% endif %}";
        let t = ChatTemplate::compile(src, "", "", Path::new("x")).unwrap();
        let kwargs: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"greeting": "hey", "add_generation_prompt": true}"#).unwrap();
        let extras = ChatExtras {
            add_generation_prompt: false,
            kwargs: Some(&kwargs),
            ..ChatExtras::default()
        };
        // The request's kwargs cannot override the fixed variables.
        assert_eq!(
            t.render_with(&[ChatMessage::text("user", "x")], &extras)
                .unwrap(),
            "hey|x|{\n  \"a\": \"é<\",\n  \"b\": [\n    1,\n    2\n  ]\n}"
        );
        assert_eq!(
            ChatTemplate::chatml()
                .render_with(&msgs(), &extras)
                .unwrap_err()
                .to_string(),
            "chat template failed: the ChatML fallback template takes no tools or kwargs"
        );
    }

    #[test]
    fn syntax_error_names_file() {
        let e = ChatTemplate::compile("{% for %}", "", "", Path::new("tc.json")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("chat template in tc.json is invalid: "),
            "{e}"
        );
    }
}
