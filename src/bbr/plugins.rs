//! BBR request plugins (GIE v1.5.0 `pkg/bbr/plugins`): `body-field-to-header` copies a body
//! field into a header, `base-model-to-header` maps the body's `model` (a LoRA adapter or a base
//! model) to its base model. Plugins are given as `--plugin <type>:<name>[:<json>]`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// The header the default plugin writes the model into.
pub const MODEL_HEADER: &str = "X-Gateway-Model-Name";
/// The header `base-model-to-header` writes.
pub const BASE_MODEL_HEADER: &str = "X-Gateway-Base-Model-Name";

/// Why a `--plugin` value or an adapters file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("usage: --plugin <type>:<name>:<json>")]
    Usage,
    #[error("bbr plugin type cannot be empty")]
    EmptyType,
    #[error("bbr plugin name cannot be empty")]
    EmptyName,
    #[error("invalid json")]
    InvalidJson,
    #[error("unknown plugin type {0:?} (no factory registered)")]
    UnknownType(String),
    #[error("failed to parse the parameters of the 'body-field-to-header' plugin - {0}")]
    Params(serde_json::Error),
    #[error("fieldName is required for plugin 'body-field-to-header'")]
    NoFieldName,
    #[error("headerName is required for plugin 'body-field-to-header'")]
    NoHeaderName,
    #[error("adapters file {path}: {reason}")]
    AdaptersFile { path: String, reason: String },
}

/// One `--plugin` flag value, split (GIE `pkg/bbr/config/spec.go`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSpec {
    pub type_name: String,
    pub name: String,
    /// The JSON parameters, empty when absent.
    pub json: String,
}

impl std::str::FromStr for PluginSpec {
    type Err = PluginError;

    fn from_str(s: &str) -> Result<Self, PluginError> {
        let mut parts = s.splitn(3, ':');
        let (Some(t), Some(n)) = (parts.next(), parts.next()) else {
            return Err(PluginError::Usage);
        };
        let (type_name, name) = (t.trim(), n.trim());
        if type_name.is_empty() {
            return Err(PluginError::EmptyType);
        }
        if name.is_empty() {
            return Err(PluginError::EmptyName);
        }
        let json = parts.next().unwrap_or("").trim().to_string();
        if !json.is_empty() && serde_json::from_str::<&RawValue>(&json).is_err() {
            return Err(PluginError::InvalidJson);
        }
        Ok(PluginSpec {
            type_name: type_name.to_string(),
            name: name.to_string(),
            json,
        })
    }
}

/// What a request plugin does with the parsed body.
#[derive(Debug, Clone, PartialEq)]
pub enum Plugin {
    BodyFieldToHeader { field: String, header: String },
    BaseModelToHeader,
}

impl Plugin {
    pub fn from_spec(spec: &PluginSpec) -> Result<Plugin, PluginError> {
        match spec.type_name.as_str() {
            "body-field-to-header" => {
                #[derive(Deserialize, Default)]
                #[serde(rename_all = "camelCase")]
                struct Params {
                    #[serde(default)]
                    field_name: String,
                    #[serde(default)]
                    header_name: String,
                }
                let p: Params = if spec.json.is_empty() {
                    Params::default()
                } else {
                    serde_json::from_str(&spec.json).map_err(PluginError::Params)?
                };
                if p.field_name.is_empty() {
                    return Err(PluginError::NoFieldName);
                }
                if p.header_name.is_empty() {
                    return Err(PluginError::NoHeaderName);
                }
                Ok(Plugin::BodyFieldToHeader {
                    field: p.field_name,
                    header: p.header_name,
                })
            }
            // Its parameters are ignored upstream too.
            "base-model-to-header" => Ok(Plugin::BaseModelToHeader),
            other => Err(PluginError::UnknownType(other.to_string())),
        }
    }

    /// Upstream's behaviour without `--plugin`: the model into `X-Gateway-Model-Name`, and its
    /// base model into `X-Gateway-Base-Model-Name`.
    pub fn defaults() -> Vec<Plugin> {
        vec![
            Plugin::BodyFieldToHeader {
                field: "model".into(),
                header: MODEL_HEADER.into(),
            },
            Plugin::BaseModelToHeader,
        ]
    }
}

/// LoRA adapter → base model, from the adapters files (each a ConfigMap as upstream's
/// base-model-to-header watches: `data.baseModel` and `data.adapters`, a YAML list).
#[derive(Debug, Clone, Default)]
pub struct AdaptersStore {
    adapter_to_base: HashMap<String, String>,
    base_models: std::collections::HashSet<String>,
}

#[derive(Deserialize)]
struct ConfigMapDoc {
    #[serde(default)]
    data: BTreeMap<String, String>,
}

impl AdaptersStore {
    /// Reads every path: a directory is a mounted ConfigMap (files `baseModel` and
    /// `adapters`), a file holds ConfigMap YAML documents.
    pub fn load(paths: &[impl AsRef<Path>]) -> Result<Self, PluginError> {
        let mut store = AdaptersStore::default();
        for path in paths {
            let path = path.as_ref();
            let err = |reason: String| PluginError::AdaptersFile {
                path: path.display().to_string(),
                reason,
            };
            if path.is_dir() {
                let mut data = BTreeMap::new();
                for key in ["baseModel", "adapters"] {
                    match std::fs::read_to_string(path.join(key)) {
                        Ok(v) => {
                            data.insert(key.to_string(), v);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(err(format!("{key}: {e}"))),
                    }
                }
                store.add(&data).map_err(err)?;
                continue;
            }
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let cm = ConfigMapDoc::deserialize(doc).map_err(|e| err(e.to_string()))?;
                store.add(&cm.data).map_err(err)?;
            }
        }
        Ok(store)
    }

    /// Adds one ConfigMap's data (upstream `parseConfigMap`).
    pub fn add(&mut self, data: &BTreeMap<String, String>) -> Result<(), String> {
        let base = data
            .get("baseModel")
            .map(|b| b.trim())
            .filter(|b| !b.is_empty())
            .ok_or("missing or empty baseModel in configmap")?
            .to_string();
        if let Some(raw) = data.get("adapters").filter(|r| !r.trim().is_empty()) {
            let list: Vec<String> =
                serde_yaml::from_str(raw).map_err(|e| format!("failed to parse adapters: {e}"))?;
            for adapter in list.iter().map(|a| a.trim()).filter(|a| !a.is_empty()) {
                self.adapter_to_base
                    .insert(adapter.to_string(), base.clone());
            }
        }
        self.base_models.insert(base);
        Ok(())
    }

    /// The base model of `model`: its base when it is an adapter, itself when it is a base
    /// model, else empty (upstream `getBaseModel`).
    pub fn base_model(&self, model: &str) -> &str {
        let model = model.trim();
        if let Some(base) = self.adapter_to_base.get(model) {
            return base;
        }
        if let Some(base) = self.base_models.get(model) {
            return base;
        }
        ""
    }
}

/// A JSON value as Go's `fmt.Sprintf("%v", v)` prints what `encoding/json` decoded it into:
/// strings as is, numbers as float64 (`%g` with Go's shortest form), `<nil>`, `[a b]`,
/// `map[k:v]` with sorted keys.
pub fn go_format(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "<nil>".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => go_float(n.as_f64().unwrap_or(0.0)),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(go_format).collect();
            format!("[{}]", inner.join(" "))
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{k}:{}", go_format(v)))
                .collect();
            format!("map[{}]", inner.join(" "))
        }
    }
}

/// Go's `strconv.FormatFloat(f, 'g', -1, 64)`: the shortest digits, in exponent form when the
/// decimal exponent is below -4 or at least 6 (the exponent has at least two digits).
fn go_float(f: f64) -> String {
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.into();
    }
    // Rust's `{:e}` is the shortest round-trip digits: "1.5e6", "-2e-7".
    let e = format!("{f:e}");
    let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        format!("{f}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_flags_parse_like_upstream() {
        let spec: PluginSpec =
            "body-field-to-header:m:{\"fieldName\":\"model\",\"headerName\":\"X-M\"}"
                .parse()
                .unwrap();
        assert_eq!(
            Plugin::from_spec(&spec).unwrap(),
            Plugin::BodyFieldToHeader {
                field: "model".into(),
                header: "X-M".into()
            }
        );
        let spec: PluginSpec = "base-model-to-header:b".parse().unwrap();
        assert_eq!(Plugin::from_spec(&spec).unwrap(), Plugin::BaseModelToHeader);
        for (flag, want) in [
            ("nocolon", "usage: --plugin <type>:<name>:<json>"),
            (":n", "bbr plugin type cannot be empty"),
            ("t: ", "bbr plugin name cannot be empty"),
            ("t:n:{bad", "invalid json"),
        ] {
            assert_eq!(
                flag.parse::<PluginSpec>().unwrap_err().to_string(),
                want,
                "{flag}"
            );
        }
        let spec: PluginSpec = "body-field-to-header:m".parse().unwrap();
        assert_eq!(
            Plugin::from_spec(&spec).unwrap_err().to_string(),
            "fieldName is required for plugin 'body-field-to-header'"
        );
        let spec: PluginSpec = "model-router:m".parse().unwrap();
        assert_eq!(
            Plugin::from_spec(&spec).unwrap_err().to_string(),
            "unknown plugin type \"model-router\" (no factory registered)"
        );
    }

    #[test]
    fn adapters_load_from_a_mounted_configmap_or_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let cm = dir.path().join("llama");
        std::fs::create_dir(&cm).unwrap();
        std::fs::write(cm.join("baseModel"), "meta/llama-3\n").unwrap();
        std::fs::write(cm.join("adapters"), "- sql-lora\n").unwrap();
        let file = dir.path().join("q.yaml");
        std::fs::write(
            &file,
            "kind: ConfigMap\ndata:\n  baseModel: qwen\n---\nkind: ConfigMap\ndata:\n  baseModel: qwen\n  adapters: '[qa-lora]'\n",
        )
        .unwrap();
        let store = AdaptersStore::load(&[cm, file.clone()]).unwrap();
        assert_eq!(store.base_model("sql-lora"), "meta/llama-3");
        assert_eq!(store.base_model("qa-lora"), "qwen");
        std::fs::write(&file, "data: {adapters: '[x]'}\n").unwrap();
        assert_eq!(
            AdaptersStore::load(&[&file]).unwrap_err().to_string(),
            format!(
                "adapters file {}: missing or empty baseModel in configmap",
                file.display()
            )
        );
    }

    #[test]
    fn adapters_map_to_their_base_model() {
        let mut store = AdaptersStore::default();
        store
            .add(&BTreeMap::from([
                ("baseModel".into(), " meta/llama-3 ".into()),
                (
                    "adapters".into(),
                    "- sql-lora\n- ' chat-lora '\n- ''\n".into(),
                ),
            ]))
            .unwrap();
        assert_eq!(store.base_model("sql-lora"), "meta/llama-3");
        assert_eq!(store.base_model(" chat-lora"), "meta/llama-3");
        assert_eq!(store.base_model("meta/llama-3"), "meta/llama-3");
        assert_eq!(store.base_model("other"), "");
        assert_eq!(
            store
                .add(&BTreeMap::from([("adapters".into(), "[a]".into())]))
                .unwrap_err(),
            "missing or empty baseModel in configmap"
        );
    }

    #[test]
    fn values_print_like_go() {
        let cases = [
            (r#""m""#, "m"),
            ("1", "1"),
            ("1.5", "1.5"),
            ("123456", "123456"),
            ("1000000", "1e+06"),
            ("0.00001", "1e-05"),
            ("0.0001", "0.0001"),
            ("-2.5e100", "-2.5e+100"),
            ("true", "true"),
            ("null", "<nil>"),
            (r#"["a",1]"#, "[a 1]"),
            (r#"{"b":2,"a":"x"}"#, "map[a:x b:2]"),
        ];
        for (json, want) in cases {
            let v: Value = serde_json::from_str(json).unwrap();
            assert_eq!(go_format(&v), want, "{json}");
        }
    }
}
