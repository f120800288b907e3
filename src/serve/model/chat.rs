//! Chat messages → prompt text: the model's Jinja chat template (rendered with minijinja the way
//! `transformers` renders it), or Qwen's ChatML format when the model ships none.

use std::path::Path;

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};

use super::ModelError;
use crate::serve::codec::{ChatMessage, CodecError};

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template.
pub struct ChatTemplate {
    /// `None`: the ChatML fallback (`<|im_start|>role\ncontent<|im_end|>\n`).
    env: Option<Environment<'static>>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("jinja", &self.env.is_some())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
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
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ModelError::Template {
                path: origin.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(ChatTemplate {
            env: Some(env),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders `messages` with the generation prompt appended (`add_generation_prompt=True`).
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, CodecError> {
        let Some(env) = &self.env else {
            return Ok(render_chatml(messages));
        };
        let tmpl = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| CodecError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| CodecError::Template(describe(&e)))
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

fn render_chatml(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            },
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
    fn syntax_error_names_file() {
        let e = ChatTemplate::compile("{% for %}", "", "", Path::new("tc.json")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("chat template in tc.json is invalid: "),
            "{e}"
        );
    }
}
