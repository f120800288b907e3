//! What a task reports as it runs: one [`Event`] per line of `POST /v1/tasks`' NDJSON reply and
//! per line `switchyard agent run` prints. The last event is always `done` or `failed`.

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallView {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The task was accepted: the models in fallback order and where its sandbox comes from.
    Started {
        task: String,
        models: Vec<String>,
        max_steps: u32,
        sandbox: String,
    },
    /// The sandbox is ready (`claim`: the SandboxClaim's name when one was created).
    Sandbox { url: String, claim: Option<String> },
    /// A model failed for this step; `to` is the next one tried (none: it was the last).
    Fallback {
        step: u32,
        from: String,
        to: Option<String>,
        reason: String,
    },
    /// The model's tool call did not parse; it is told why and asked again.
    Retry {
        step: u32,
        model: String,
        attempt: u32,
        reason: String,
    },
    /// The model's reply for this step.
    Assistant {
        step: u32,
        model: String,
        content: Option<String>,
        tool_calls: Vec<CallView>,
    },
    /// One tool call's outcome (`output` is what the model is shown, as JSON).
    Tool {
        step: u32,
        name: String,
        ok: bool,
        output: Value,
    },
    /// The final answer.
    Done {
        steps: u32,
        model: String,
        answer: String,
    },
    /// The task ended without an answer; `kind` is one of `sandbox`, `sandbox_lost`,
    /// `models_failed`, `refused`, `step_budget`, `cancelled`.
    Failed {
        steps: u32,
        kind: &'static str,
        message: String,
    },
}

impl Event {
    /// Whether this is the task's last event.
    pub fn is_final(&self) -> bool {
        matches!(self, Event::Done { .. } | Event::Failed { .. })
    }

    /// One NDJSON line (with the newline).
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"failed","steps":0,"kind":"internal","message":"{e}"}}"#)
        });
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_tagged_json() {
        let e = Event::Failed {
            steps: 3,
            kind: "step_budget",
            message: "m".into(),
        };
        assert_eq!(
            e.to_line(),
            "{\"type\":\"failed\",\"steps\":3,\"kind\":\"step_budget\",\"message\":\"m\"}\n"
        );
        assert!(e.is_final());
    }
}
