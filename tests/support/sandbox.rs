//! The real `switchyard sandbox` runtime as a child process, and a client for its API
//! (requests built the way upstream's Python client builds them).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::Method;

use super::http_client::{HttpClient, HttpResponse};
use super::ports::free_port;

/// A running runtime; killed on drop.
pub struct SandboxRuntime {
    pub child: tokio::process::Child,
    pub base: String,
    pub workspace: PathBuf,
    _dir: Option<tempfile::TempDir>,
    pub client: HttpClient,
}

/// The `/execute` reply.
#[derive(Debug, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Executed {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// Percent-encodes like Python's `urllib.parse.quote(path, safe='')`.
pub fn quote(path: &str) -> String {
    path.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

impl SandboxRuntime {
    /// Starts the binary at `bin` with `extra` flags and `env` on a free loopback port, with a
    /// fresh workspace, and waits until `GET /` answers.
    pub async fn start(bin: &Path, extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let workspace = dir.path().join("app");
        let port = free_port()?;
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("sandbox")
            .arg("--host=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--workspace={}", workspace.display()))
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let rt = SandboxRuntime {
            child,
            base: format!("http://127.0.0.1:{port}"),
            workspace,
            _dir: Some(dir),
            client: HttpClient::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = rt.client.get(&rt.url("/")).await {
                if r.status == 200 {
                    return Ok(rt);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "sandbox runtime did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().map(|p| p as i32).unwrap_or(0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn execute(&self, command: &str) -> anyhow::Result<Executed> {
        let body = serde_json::json!({ "command": command }).to_string();
        let r = self
            .client
            .post_json(&self.url("/execute"), &[], body)
            .await?;
        anyhow::ensure!(r.status == 200, "execute: {} {}", r.status, r.text());
        serde_json::from_slice(&r.body).with_context(|| format!("execute reply {}", r.text()))
    }

    /// `POST /upload` as `requests` sends `files={'file': (name, data)}`.
    pub async fn upload(&self, name: &str, data: &[u8]) -> anyhow::Result<HttpResponse> {
        let boundary = "d1f5b3c0a9e84c2b9a7e6f5d4c3b2a19";
        let mut body = Vec::new();
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; \
                 filename=\"{name}\"\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let ctype = format!("multipart/form-data; boundary={boundary}");
        self.client
            .send(
                Method::POST,
                &self.url("/upload"),
                &[("content-type", ctype.as_str())],
                Bytes::from(body),
            )
            .await
    }

    /// `GET /{op}/{quote(path)}`.
    pub async fn get(&self, op: &str, path: &str) -> anyhow::Result<HttpResponse> {
        self.client
            .get(&self.url(&format!("/{op}/{}", quote(path))))
            .await
    }

    /// The runtime answers its health check and runs a command.
    pub async fn assert_serving(&self) -> anyhow::Result<()> {
        let health = self.client.get(&self.url("/")).await?;
        anyhow::ensure!(
            health.status == 200
                && health.text() == r#"{"status":"ok","message":"Sandbox Runtime is active."}"#,
            "health: {} {}",
            health.status,
            health.text()
        );
        let echo = self.execute("echo alive").await?;
        anyhow::ensure!(
            echo == Executed {
                stdout: "alive\n".into(),
                stderr: String::new(),
                exit_code: 0
            },
            "echo: {echo:?}"
        );
        Ok(())
    }
}
