//! Chat request → template input: messages (text parts, assistant `tool_calls`, `tool` turns)
//! in the shape Hugging Face templates read, and `tools` / `tool_choice` /
//! `parallel_tool_calls` validated the way vLLM validates them (same texts).

use serde_json::Value;

use super::error::ApiError;
use super::types::{ChatMessageIn, MessageContent};
use crate::serve::codec::ChatMessage;

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// One declared function.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    pub name: String,
    /// JSON schema of the arguments (`{}` when the tool declares none).
    pub parameters: Value,
}

/// The request's tool setup.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub defs: Vec<ToolDef>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl Tools {
    pub fn names(&self) -> Vec<String> {
        self.defs.iter().map(|d| d.name.clone()).collect()
    }
}

const CORRECT_USAGE: &str =
    "Correct usage: `{\"type\": \"function\", \"function\": {\"name\": \"my_function\"}}`";

/// Validates `tools`, `tool_choice` and `parallel_tool_calls` (vLLM's `check_tool_usage`).
/// `None` when the request declares no tools.
pub fn resolve_tools(
    tools: Option<&[Value]>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<Tools>, ApiError> {
    let choice = choice.filter(|c| !c.is_null());
    let Some(tools) = tools else {
        return match choice {
            None => Ok(None),
            Some(Value::String(s)) if s == "none" => Ok(None),
            Some(_) => Err(ApiError::bad(
                "When using `tool_choice`, `tools` must be set.",
                Some("tool_choice"),
            )),
        };
    };
    if tools.is_empty() {
        return Err(ApiError::bad(
            "`tools` must not be an empty array. Either provide at least one tool or omit the \
             field entirely.",
            Some("tools"),
        ));
    }
    let mut defs = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let kind = t.get("type").and_then(Value::as_str).unwrap_or("function");
        if kind != "function" {
            return Err(ApiError::bad(
                format!("tools[{i}] has type `{kind}`; only `function` tools are supported."),
                Some("tools"),
            ));
        }
        let Some(name) = t
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        else {
            return Err(ApiError::bad(
                format!("tools[{i}].function.name must be a non-empty string."),
                Some("tools"),
            ));
        };
        let parameters = t
            .get("function")
            .and_then(|f| f.get("parameters"))
            .filter(|p| !p.is_null())
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default()));
        defs.push(ToolDef {
            name: name.to_owned(),
            parameters,
        });
    }
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => return Err(invalid_choice(other)),
        },
        Some(Value::Object(o)) => {
            let function = o.get("function");
            let Some(Value::Object(f)) = function else {
                let shown = function.map_or("None".to_owned(), Value::to_string);
                return Err(ApiError::bad(
                    format!(
                        "Invalid value for `function`: `{shown}` in `tool_choice`! \
                         {CORRECT_USAGE}"
                    ),
                    Some("tool_choice.function"),
                ));
            };
            let Some(name) = f.get("name") else {
                return Err(ApiError::bad(
                    format!(
                        "Expected field `name` in `function` in `tool_choice`! {CORRECT_USAGE}"
                    ),
                    Some("tool_choice.function.name"),
                ));
            };
            let Some(name) = name.as_str().filter(|n| !n.is_empty()) else {
                return Err(ApiError::bad(
                    format!(
                        "Invalid `name` in `function`: `{name}` in `tool_choice`! {CORRECT_USAGE}"
                    ),
                    Some("tool_choice.function.name"),
                ));
            };
            if !defs.iter().any(|d| d.name == name) {
                return Err(ApiError::bad(
                    "The tool specified in `tool_choice` does not match any of the specified \
                     `tools`",
                    Some("tool_choice"),
                ));
            }
            ToolChoice::Named(name.to_owned())
        }
        Some(other) => return Err(invalid_choice(&other.to_string())),
    };
    Ok(Some(Tools {
        defs,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

fn invalid_choice(v: &str) -> ApiError {
    ApiError::bad(
        format!(
            "Invalid value for `tool_choice`: {v}! Only named tools, \"none\", \"auto\" or \
             \"required\" are supported."
        ),
        Some("tool_choice"),
    )
}

/// The messages as the template sees them. Content parts other than text are refused (this
/// server has no multimodal input), never dropped.
pub fn chat_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let tool_calls = match &m.tool_calls {
                None => None,
                Some(calls) => Some(
                    calls
                        .iter()
                        .map(|c| template_call(i, c))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            Ok(ChatMessage {
                role: m.role.clone(),
                content: message_text(i, m)?,
                tool_calls,
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
            })
        })
        .collect()
}

fn message_text(i: usize, m: &ChatMessageIn) -> Result<String, ApiError> {
    Ok(match &m.content {
        None => String::new(),
        Some(MessageContent::Text(s)) => s.clone(),
        Some(MessageContent::Parts(parts)) => {
            if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                return Err(ApiError::bad(
                    format!(
                        "messages[{i}] has a `{}` content part; this server accepts text only.",
                        p.kind
                    ),
                    Some("messages"),
                ));
            }
            parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n")
        }
    })
}

/// An assistant call as templates read it: `arguments` parsed from the API's JSON string into
/// an object (what vLLM does before rendering).
fn template_call(i: usize, c: &super::types::ToolCallIn) -> Result<Value, ApiError> {
    let arguments = match &c.function.arguments {
        None => Value::Object(Default::default()),
        Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
            ApiError::bad(
                format!(
                    "messages[{i}].tool_calls: arguments of `{}` are not JSON: {e}",
                    c.function.name
                ),
                Some("messages"),
            )
        })?,
        Some(v) => v.clone(),
    };
    let mut function = serde_json::Map::new();
    function.insert("name".into(), Value::String(c.function.name.clone()));
    function.insert("arguments".into(), arguments);
    let mut call = serde_json::Map::new();
    if let Some(id) = &c.id {
        call.insert("id".into(), Value::String(id.clone()));
    }
    call.insert(
        "type".into(),
        Value::String(c.kind.clone().unwrap_or_else(|| "function".into())),
    );
    call.insert("function".into(), Value::Object(function));
    Ok(Value::Object(call))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}),
            json!({"type": "function", "function": {"name": "run_python"}}),
        ]
    }

    fn err(tools: Option<&[Value]>, choice: Value) -> (String, Option<&'static str>) {
        match resolve_tools(tools, Some(&choice), None).unwrap_err() {
            ApiError::BadRequest { message, param } => (message, param),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn choices_resolve_with_vllm_defaults() {
        let t = tools();
        let auto = resolve_tools(Some(&t), None, None).unwrap().unwrap();
        assert_eq!(
            auto.choice,
            ToolChoice::Auto,
            "tools without tool_choice mean auto"
        );
        assert!(auto.parallel);
        assert_eq!(auto.names(), vec!["get_weather", "run_python"]);
        assert_eq!(auto.defs[1].parameters, json!({}));
        for (v, want) in [
            (json!("none"), ToolChoice::None),
            (json!("required"), ToolChoice::Required),
            (
                json!({"type": "function", "function": {"name": "run_python"}}),
                ToolChoice::Named("run_python".into()),
            ),
        ] {
            let got = resolve_tools(Some(&t), Some(&v), Some(false))
                .unwrap()
                .unwrap();
            assert_eq!(got.choice, want);
            assert!(!got.parallel);
        }
        assert_eq!(
            resolve_tools(None, Some(&json!("none")), None).unwrap(),
            None
        );
        assert_eq!(resolve_tools(None, None, None).unwrap(), None);
    }

    #[test]
    fn invalid_tool_setups_have_vllm_texts() {
        let t = tools();
        let usage =
            "Correct usage: `{\"type\": \"function\", \"function\": {\"name\": \"my_function\"}}`";
        let cases: Vec<(Option<&[Value]>, Value, String, &str)> = vec![
            (None, json!("auto"), "When using `tool_choice`, `tools` must be set.".into(), "tool_choice"),
            (Some(&[]), json!("auto"), "`tools` must not be an empty array. Either provide at least one tool or omit the field entirely.".into(), "tools"),
            (Some(&t), json!("sometimes"), "Invalid value for `tool_choice`: sometimes! Only named tools, \"none\", \"auto\" or \"required\" are supported.".into(), "tool_choice"),
            (Some(&t), json!({"type": "function"}), format!("Invalid value for `function`: `None` in `tool_choice`! {usage}"), "tool_choice.function"),
            (Some(&t), json!({"type": "function", "function": {}}), format!("Expected field `name` in `function` in `tool_choice`! {usage}"), "tool_choice.function.name"),
            (Some(&t), json!({"type": "function", "function": {"name": ""}}), format!("Invalid `name` in `function`: `\"\"` in `tool_choice`! {usage}"), "tool_choice.function.name"),
            (Some(&t), json!({"type": "function", "function": {"name": "nope"}}), "The tool specified in `tool_choice` does not match any of the specified `tools`".into(), "tool_choice"),
        ];
        for (tools, choice, message, param) in cases {
            assert_eq!(
                err(tools, choice.clone()),
                (message, Some(param)),
                "{choice}"
            );
        }
        let bad = vec![json!({"type": "retrieval"})];
        assert_eq!(
            err(Some(&bad), json!("auto")),
            (
                "tools[0] has type `retrieval`; only `function` tools are supported.".into(),
                Some("tools")
            )
        );
        let bad = vec![json!({"type": "function", "function": {"description": "x"}})];
        assert_eq!(
            err(Some(&bad), json!("auto")),
            (
                "tools[0].function.name must be a non-empty string.".into(),
                Some("tools")
            )
        );
    }

    #[test]
    fn history_calls_get_object_arguments_and_images_are_refused() {
        let msgs: Vec<ChatMessageIn> = serde_json::from_value(json!([
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"}
        ]))
        .unwrap();
        let out = chat_messages(&msgs).unwrap();
        assert_eq!(out[0].content, "a\nb");
        assert_eq!(
            out[1].tool_calls,
            Some(vec![json!({"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})])
        );
        assert_eq!(out[1].content, "");
        assert_eq!(out[2].tool_call_id.as_deref(), Some("call_1"));

        let msgs: Vec<ChatMessageIn> = serde_json::from_value(json!([
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ]))
        .unwrap();
        assert_eq!(
            chat_messages(&msgs).unwrap_err(),
            ApiError::bad(
                "messages[0] has a `image_url` content part; this server accepts text only.",
                Some("messages")
            )
        );
        let msgs: Vec<ChatMessageIn> = serde_json::from_value(json!([
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}
        ]))
        .unwrap();
        assert!(matches!(
            chat_messages(&msgs).unwrap_err(),
            ApiError::BadRequest {
                param: Some("messages"),
                ..
            }
        ));
    }
}
