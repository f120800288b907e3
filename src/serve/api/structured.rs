//! What a request constrains its output to: OpenAI `response_format` (`json_object`,
//! `json_schema`), vLLM `structured_outputs` (`json`, `regex`, `choice`, `grammar`,
//! `json_object`) and the forced tool calls (`tool_choice` `required` or a named function, which
//! vLLM also implements as a JSON schema). This module only reads and validates the request; the
//! grammar is compiled by `crate::serve::constrained`.

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::messages::{ToolChoice, Tools};

/// The constraint a request asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Output is JSON matching this schema.
    JsonSchema(Value),
    /// Output is any JSON object.
    JsonObject,
    Regex(String),
    /// Output is exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark (or GBNF-style) grammar, as llguidance reads it.
    Grammar(String),
}

/// Options of `structured_outputs` that shape JSON output.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonOptions {
    /// `disable_any_whitespace`: no optional whitespace in JSON output.
    pub compact: bool,
    /// `whitespace_pattern`: regex for the whitespace JSON output may use.
    pub whitespace_pattern: Option<String>,
}

/// A validated constraint with its JSON options.
#[derive(Debug, Clone, PartialEq)]
pub struct ConstraintSpec {
    pub constraint: Constraint,
    pub json: JsonOptions,
    /// Which request field asked for it (named in compile errors).
    pub param: &'static str,
}

fn bad(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::bad(message, Some(param))
}

/// The constraint of a request, if any. `tools` is the chat request's tool setup.
pub fn plan(
    response_format: Option<&Value>,
    structured_outputs: Option<&Value>,
    tools: Option<&Tools>,
) -> Result<Option<ConstraintSpec>, ApiError> {
    let from_rf = match response_format.filter(|v| !v.is_null()) {
        None => None,
        Some(rf) => response_format_constraint(rf)?,
    };
    let from_so = match structured_outputs.filter(|v| !v.is_null()) {
        None => None,
        Some(so) => structured_outputs_constraint(so)?,
    };
    let forced = tools.and_then(tool_constraint);
    let user = match (from_rf, from_so) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "Use either response_format or structured_outputs, not both.",
                "structured_outputs",
            ))
        }
        (a, b) => a.or(b),
    };
    match (user, forced) {
        (Some(_), Some(_)) => Err(bad(
            "You can only either use constraints for structured outputs or tools, not both.",
            "tool_choice",
        )),
        (a, b) => Ok(a.or(b)),
    }
}

fn response_format_constraint(rf: &Value) -> Result<Option<ConstraintSpec>, ApiError> {
    const P: &str = "response_format";
    let kind = rf
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("response_format must be an object with a string `type`.", P))?;
    let constraint = match kind {
        "text" => return Ok(None),
        "json_object" => Constraint::JsonObject,
        "json_schema" => {
            let Some(js) = rf.get("json_schema").filter(|v| !v.is_null()) else {
                return Err(bad(
                    "When response_format type is 'json_schema', the 'json_schema' field must \
                     be provided.",
                    P,
                ));
            };
            match js.get("schema") {
                Some(s @ (Value::Object(_) | Value::Bool(_))) => Constraint::JsonSchema(s.clone()),
                _ => {
                    return Err(bad(
                        "response_format.json_schema.schema must be a JSON schema object.",
                        P,
                    ))
                }
            }
        }
        other => {
            return Err(bad(
                format!(
                    "response_format type `{other}` is not supported; use `text`, `json_object` \
                     or `json_schema`."
                ),
                P,
            ))
        }
    };
    Ok(Some(ConstraintSpec {
        constraint,
        json: JsonOptions::default(),
        param: P,
    }))
}

fn structured_outputs_constraint(so: &Value) -> Result<Option<ConstraintSpec>, ApiError> {
    const P: &str = "structured_outputs";
    let Value::Object(o) = so else {
        return Err(bad("structured_outputs must be an object.", P));
    };
    const KNOWN: [&str; 10] = [
        "json",
        "regex",
        "choice",
        "grammar",
        "json_object",
        "disable_any_whitespace",
        "disable_additional_properties",
        "whitespace_pattern",
        "structural_tag",
        "disable_fallback",
    ];
    if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(
            format!("structured_outputs has an unknown field `{k}`."),
            P,
        ));
    }
    let set = |k: &str| {
        o.get(k)
            .filter(|v| !v.is_null() && **v != Value::Bool(false))
    };
    if set("structural_tag").is_some() {
        return Err(bad(
            "structured_outputs.structural_tag is not supported by this server.",
            P,
        ));
    }
    if set("disable_additional_properties").is_some() {
        return Err(bad(
            "structured_outputs.disable_additional_properties is not supported by this server; \
             set additionalProperties in the schema.",
            P,
        ));
    }
    let kinds = ["json", "regex", "choice", "grammar", "json_object"];
    if kinds.iter().filter(|k| set(k).is_some()).count() > 1 {
        return Err(bad(
            "You can only use one kind of constraints for structured outputs ('json', 'regex', \
             'choice', 'grammar' or 'json_object').",
            P,
        ));
    }
    let text = |k: &str| -> Result<Option<String>, ApiError> {
        match set(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(format!("structured_outputs.{k} must be a string."), P)),
        }
    };
    let constraint = if let Some(j) = set("json") {
        match j {
            Value::String(s) => {
                Constraint::JsonSchema(serde_json::from_str(s).map_err(|e| {
                    bad(format!("structured_outputs.json is not valid JSON: {e}"), P)
                })?)
            }
            Value::Object(_) | Value::Bool(true) => Constraint::JsonSchema(j.clone()),
            _ => return Err(bad("structured_outputs.json must be a JSON schema.", P)),
        }
    } else if let Some(r) = text("regex")? {
        Constraint::Regex(r)
    } else if let Some(c) = set("choice") {
        let choices: Option<Vec<String>> = c
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or(None);
        match choices {
            Some(c) if !c.is_empty() => Constraint::Choice(c),
            _ => {
                return Err(bad(
                    "structured_outputs.choice must be a non-empty list of strings.",
                    P,
                ))
            }
        }
    } else if let Some(g) = text("grammar")? {
        Constraint::Grammar(g)
    } else if set("json_object").is_some() {
        Constraint::JsonObject
    } else {
        return Ok(None);
    };
    let whitespace_pattern = text("whitespace_pattern")?;
    Ok(Some(ConstraintSpec {
        constraint,
        json: JsonOptions {
            compact: set("disable_any_whitespace").is_some(),
            whitespace_pattern,
        },
        param: P,
    }))
}

/// vLLM's schemas for forced tool calls: the named function's parameters (output = its
/// arguments), or for `required` a list of `{"name", "parameters"}` objects (one at most when
/// `parallel_tool_calls` is false).
fn tool_constraint(tools: &Tools) -> Option<ConstraintSpec> {
    let schema = match &tools.choice {
        ToolChoice::None | ToolChoice::Auto => return None,
        ToolChoice::Named(name) => tools
            .defs
            .iter()
            .find(|d| &d.name == name)
            .map(|d| d.parameters.clone())?,
        ToolChoice::Required => {
            let any_of: Vec<Value> = tools
                .defs
                .iter()
                .map(|d| {
                    json!({
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "enum": [d.name]},
                            "parameters": d.parameters,
                        },
                        "required": ["name", "parameters"],
                    })
                })
                .collect();
            let mut list = Map::new();
            list.insert("type".into(), json!("array"));
            list.insert("minItems".into(), json!(1));
            if !tools.parallel {
                list.insert("maxItems".into(), json!(1));
            }
            list.insert("items".into(), json!({ "anyOf": any_of }));
            Value::Object(list)
        }
    };
    Some(ConstraintSpec {
        constraint: Constraint::JsonSchema(schema),
        json: JsonOptions::default(),
        param: "tool_choice",
    })
}

#[cfg(test)]
mod tests {
    use super::super::messages::{ToolDef, Tools};
    use super::*;

    fn one(rf: Option<Value>, so: Option<Value>) -> Result<Option<Constraint>, ApiError> {
        plan(rf.as_ref(), so.as_ref(), None).map(|s| s.map(|s| s.constraint))
    }

    fn msg(e: ApiError) -> (String, Option<&'static str>) {
        match e {
            ApiError::BadRequest { message, param } => (message, param),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn request_fields_map_to_constraints() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(one(Some(json!({"type": "text"})), None).unwrap(), None);
        assert_eq!(
            one(Some(json!({"type": "json_object"})), None).unwrap(),
            Some(Constraint::JsonObject)
        );
        assert_eq!(
            one(
                Some(
                    json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
                ),
                None
            )
            .unwrap(),
            Some(Constraint::JsonSchema(schema.clone()))
        );
        assert_eq!(
            one(None, Some(json!({"json": schema.to_string()}))).unwrap(),
            Some(Constraint::JsonSchema(schema.clone()))
        );
        assert_eq!(
            one(
                None,
                Some(json!({"regex": "[0-9]+", "disable_fallback": true}))
            )
            .unwrap(),
            Some(Constraint::Regex("[0-9]+".into()))
        );
        assert_eq!(
            one(None, Some(json!({"choice": ["yes", "no"]}))).unwrap(),
            Some(Constraint::Choice(vec!["yes".into(), "no".into()]))
        );
        assert_eq!(
            one(None, Some(json!({"grammar": "start: \"a\"+"}))).unwrap(),
            Some(Constraint::Grammar("start: \"a\"+".into()))
        );
        let spec = plan(
            None,
            Some(&json!({"json_object": true, "disable_any_whitespace": true, "whitespace_pattern": " ?"})),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(spec.constraint, Constraint::JsonObject);
        assert_eq!(
            spec.json,
            JsonOptions {
                compact: true,
                whitespace_pattern: Some(" ?".into())
            }
        );
    }

    #[test]
    fn invalid_requests_have_exact_texts() {
        let so = "structured_outputs";
        let cases: Vec<(Option<Value>, Option<Value>, &str, &str)> = vec![
            (Some(json!({"type": "json_schema"})), None, "When response_format type is 'json_schema', the 'json_schema' field must be provided.", "response_format"),
            (Some(json!({"type": "json_schema", "json_schema": {"name": "x"}})), None, "response_format.json_schema.schema must be a JSON schema object.", "response_format"),
            (Some(json!({"type": "structural_tag"})), None, "response_format type `structural_tag` is not supported; use `text`, `json_object` or `json_schema`.", "response_format"),
            (Some(json!("json")), None, "response_format must be an object with a string `type`.", "response_format"),
            (None, Some(json!({"regex": "a", "choice": ["a"]})), "You can only use one kind of constraints for structured outputs ('json', 'regex', 'choice', 'grammar' or 'json_object').", so),
            (None, Some(json!({"choice": []})), "structured_outputs.choice must be a non-empty list of strings.", so),
            (None, Some(json!({"json": "{nope"})), "structured_outputs.json is not valid JSON: key must be a string at line 1 column 2", so),
            (None, Some(json!({"regex": 5})), "structured_outputs.regex must be a string.", so),
            (None, Some(json!({"structural_tag": "{}"})), "structured_outputs.structural_tag is not supported by this server.", so),
            (None, Some(json!({"jsn": {}})), "structured_outputs has an unknown field `jsn`.", so),
            (Some(json!({"type": "json_object"})), Some(json!({"regex": "a"})), "Use either response_format or structured_outputs, not both.", so),
        ];
        for (rf, so_v, message, param) in cases {
            assert_eq!(
                msg(one(rf.clone(), so_v.clone()).unwrap_err()),
                (message.to_owned(), Some(param)),
                "{rf:?} {so_v:?}"
            );
        }
    }

    #[test]
    fn forced_tool_calls_become_schemas() {
        let params = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
        let mut tools = Tools {
            defs: vec![ToolDef {
                name: "get_weather".into(),
                parameters: params.clone(),
            }],
            choice: ToolChoice::Named("get_weather".into()),
            parallel: true,
        };
        let spec = plan(None, None, Some(&tools)).unwrap().unwrap();
        assert_eq!(spec.constraint, Constraint::JsonSchema(params.clone()));
        assert_eq!(spec.param, "tool_choice");
        tools.choice = ToolChoice::Required;
        tools.parallel = false;
        let spec = plan(None, None, Some(&tools)).unwrap().unwrap();
        assert_eq!(
            spec.constraint,
            Constraint::JsonSchema(json!({"type": "array", "minItems": 1, "maxItems": 1,
                "items": {"anyOf": [{"type": "object", "properties": {"name": {"type": "string",
                "enum": ["get_weather"]}, "parameters": params}, "required": ["name", "parameters"]}]}}))
        );
        assert_eq!(
            msg(plan(None, Some(&json!({"regex": "a"})), Some(&tools)).unwrap_err()),
            (
                "You can only either use constraints for structured outputs or tools, not both."
                    .into(),
                Some("tool_choice")
            )
        );
        tools.choice = ToolChoice::Auto;
        assert_eq!(plan(None, None, Some(&tools)).unwrap(), None);
    }
}
