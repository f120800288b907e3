//! The tools the model may call: their JSON schemas (sent as `tools`) and the parse of a call
//! into a typed [`Tool`]. A call that does not parse is a [`Malformed`] call, which the loop
//! answers with the error and retries (then falls back to the next model).

use serde::Deserialize;
use serde_json::{json, Value};

/// A parsed, valid tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tool {
    /// Runs a program: Python (`python3 -c`) or shell (`sh -c`).
    RunCode {
        language: Language,
        code: String,
    },
    /// Runs one shell command line (`sh -c`).
    Shell {
        command: String,
    },
    WriteFile {
        path: String,
        content: String,
    },
    ReadFile {
        path: String,
    },
    ListFiles {
        path: String,
    },
    /// Ends the task with this answer.
    Finish {
        answer: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    #[serde(alias = "sh", alias = "shell")]
    Bash,
}

/// Why a call could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error(
        "unknown tool `{0}` (tools: run_code, shell, write_file, read_file, list_files, finish)"
    )]
    UnknownTool(String),
    #[error("bad arguments for `{tool}`: {reason}")]
    BadArguments { tool: String, reason: String },
    #[error("the reply has neither text nor tool calls")]
    Empty,
}

#[derive(Deserialize)]
struct RunCodeArgs {
    code: String,
    #[serde(default)]
    language: Option<Language>,
}

#[derive(Deserialize)]
struct ShellArgs {
    command: String,
}

#[derive(Deserialize)]
struct WriteArgs {
    path: String,
    content: String,
}

#[derive(Deserialize)]
struct PathArgs {
    path: String,
}

#[derive(Deserialize)]
struct ListArgs {
    #[serde(default)]
    path: String,
}

#[derive(Deserialize)]
struct FinishArgs {
    answer: String,
}

fn args<'a, T: Deserialize<'a>>(tool: &str, arguments: &'a str) -> Result<T, Malformed> {
    // Some models send no arguments at all for a call whose fields are all optional.
    let text = if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    };
    serde_json::from_str(text).map_err(|e| Malformed::BadArguments {
        tool: tool.to_string(),
        reason: e.to_string(),
    })
}

/// Workspace paths are relative; the runtime refuses `..` and absolute paths itself, but a
/// clear message to the model saves a round trip.
fn check_path(tool: &str, path: &str) -> Result<(), Malformed> {
    let bad = |reason: &str| {
        Err(Malformed::BadArguments {
            tool: tool.to_string(),
            reason: reason.to_string(),
        })
    };
    if path.starts_with('/') {
        return bad("`path` must be relative to the workspace");
    }
    if path.split('/').any(|s| s == "..") {
        return bad("`path` must not contain `..`");
    }
    if path.contains(['"', '\r', '\n', '\0']) {
        return bad("`path` must not contain quotes, newlines or NUL");
    }
    Ok(())
}

impl Tool {
    /// Parses one call.
    pub fn parse(name: &str, arguments: &str) -> Result<Tool, Malformed> {
        let tool = match name {
            "run_code" => {
                let a: RunCodeArgs = args(name, arguments)?;
                Tool::RunCode {
                    language: a.language.unwrap_or(Language::Python),
                    code: a.code,
                }
            }
            "shell" => {
                let a: ShellArgs = args(name, arguments)?;
                Tool::Shell { command: a.command }
            }
            "write_file" => {
                let a: WriteArgs = args(name, arguments)?;
                check_path(name, &a.path)?;
                if a.path.is_empty() {
                    return Err(Malformed::BadArguments {
                        tool: name.to_string(),
                        reason: "`path` is empty".into(),
                    });
                }
                Tool::WriteFile {
                    path: a.path,
                    content: a.content,
                }
            }
            "read_file" => {
                let a: PathArgs = args(name, arguments)?;
                check_path(name, &a.path)?;
                Tool::ReadFile { path: a.path }
            }
            "list_files" => {
                let a: ListArgs = args(name, arguments)?;
                check_path(name, &a.path)?;
                Tool::ListFiles { path: a.path }
            }
            "finish" => {
                let a: FinishArgs = args(name, arguments)?;
                Tool::Finish { answer: a.answer }
            }
            other => return Err(Malformed::UnknownTool(other.to_string())),
        };
        Ok(tool)
    }

    /// The command line for `/execute`, or `None` for a tool that is not a command.
    /// `/execute` splits it like `shlex.split` and runs it without a shell, so code is quoted.
    pub fn command_line(&self) -> Option<Result<String, String>> {
        let (program, flag, text) = match self {
            Tool::RunCode {
                language: Language::Python,
                code,
            } => ("python3", "-c", code),
            Tool::RunCode {
                language: Language::Bash,
                code,
            } => ("sh", "-c", code),
            Tool::Shell { command } => ("sh", "-c", command),
            _ => return None,
        };
        Some(
            shlex::try_quote(text)
                .map(|q| format!("{program} {flag} {q}"))
                .map_err(|e| format!("cannot quote the code: {e}")),
        )
    }
}

/// The `tools` array of every request.
pub fn definitions() -> Value {
    fn function(name: &str, description: &str, parameters: Value) -> Value {
        json!({"type": "function", "function": {
            "name": name, "description": description, "parameters": parameters}})
    }
    json!([
        function(
            "run_code",
            "Run a program in the sandbox workspace and return its exit code, stdout and stderr.",
            json!({"type": "object", "properties": {
                "language": {"type": "string", "enum": ["python", "bash"]},
                "code": {"type": "string"}}, "required": ["code"]})
        ),
        function(
            "shell",
            "Run a shell command line in the sandbox workspace (e.g. `python3 -m pytest -q`).",
            json!({"type": "object", "properties": {"command": {"type": "string"}},
                "required": ["command"]})
        ),
        function(
            "write_file",
            "Create or replace a file in the workspace (path relative to it).",
            json!({"type": "object", "properties": {"path": {"type": "string"},
                "content": {"type": "string"}}, "required": ["path", "content"]})
        ),
        function(
            "read_file",
            "Read a file of the workspace.",
            json!({"type": "object", "properties": {"path": {"type": "string"}},
                "required": ["path"]})
        ),
        function(
            "list_files",
            "List a directory of the workspace (empty path: its root).",
            json!({"type": "object", "properties": {"path": {"type": "string"}}})
        ),
        function(
            "finish",
            "End the task with a short answer for the user, once the work is done and tested.",
            json!({"type": "object", "properties": {"answer": {"type": "string"}},
                "required": ["answer"]})
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_tool() {
        assert_eq!(
            Tool::parse("run_code", r#"{"code": "print(1)"}"#),
            Ok(Tool::RunCode {
                language: Language::Python,
                code: "print(1)".into()
            })
        );
        assert_eq!(
            Tool::parse("run_code", r#"{"code": "ls", "language": "sh"}"#),
            Ok(Tool::RunCode {
                language: Language::Bash,
                code: "ls".into()
            })
        );
        assert_eq!(
            Tool::parse("write_file", r#"{"path": "a/b.py", "content": "x"}"#),
            Ok(Tool::WriteFile {
                path: "a/b.py".into(),
                content: "x".into()
            })
        );
        assert_eq!(
            Tool::parse("list_files", ""),
            Ok(Tool::ListFiles { path: "".into() })
        );
        assert_eq!(
            Tool::parse("finish", r#"{"answer": "done"}"#),
            Ok(Tool::Finish {
                answer: "done".into()
            })
        );
    }

    #[test]
    fn refuses_malformed_calls() {
        assert_eq!(
            Tool::parse("rm_rf", "{}"),
            Err(Malformed::UnknownTool("rm_rf".into()))
        );
        let Err(Malformed::BadArguments { tool, reason }) = Tool::parse("shell", "{\"command\": ")
        else {
            panic!("expected bad arguments");
        };
        assert_eq!(tool, "shell");
        assert!(reason.contains("EOF"), "{reason}");
        assert_eq!(
            Tool::parse("read_file", r#"{"path": "../etc/passwd"}"#),
            Err(Malformed::BadArguments {
                tool: "read_file".into(),
                reason: "`path` must not contain `..`".into()
            })
        );
        assert_eq!(
            Tool::parse("write_file", r#"{"path": "/etc/x", "content": ""}"#),
            Err(Malformed::BadArguments {
                tool: "write_file".into(),
                reason: "`path` must be relative to the workspace".into()
            })
        );
    }

    #[test]
    fn command_lines_quote_code() {
        let t = Tool::RunCode {
            language: Language::Python,
            code: "print('a b')".into(),
        };
        assert_eq!(
            t.command_line(),
            Some(Ok("python3 -c \"print('a b')\"".to_string()))
        );
        let t = Tool::Shell {
            command: "echo hi && ls".into(),
        };
        assert_eq!(t.command_line(), Some(Ok("sh -c 'echo hi && ls'".into())));
        assert_eq!(Tool::ReadFile { path: "a".into() }.command_line(), None);
    }

    #[test]
    fn definitions_name_every_tool() {
        let names: Vec<String> = definitions()
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "run_code",
                "shell",
                "write_file",
                "read_file",
                "list_files",
                "finish"
            ]
        );
    }
}
