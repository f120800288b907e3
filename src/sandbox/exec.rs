//! The runtime's side of `/execute`: split the command like upstream (`shlex.split`, no shell),
//! start one supervisor per command as the leader of a new process group, and read back its
//! outcome. A bounded number run at once.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::Semaphore;

use super::limits::{Limits, Outcome, TIMEOUT_EXIT_CODE};

/// Why a command produced no outcome.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExecError {
    /// The command line does not split (upstream: `shlex.split` raised).
    #[error("No closing quotation")]
    Unsplittable,
    #[error("empty command")]
    Empty,
    #[error("{running} commands are running (limit {limit}); retry later")]
    Busy { running: usize, limit: usize },
    /// The supervisor could not be started or said nothing usable.
    #[error("sandbox supervisor failed: {0}")]
    Supervisor(String),
}

/// Everything `/execute` needs, fixed at startup.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// The `switchyard` binary that provides `sandbox-exec`.
    pub supervisor: PathBuf,
    pub workspace: PathBuf,
    pub limits: Limits,
    /// The command's whole environment (the runtime's own is never passed on).
    pub env: Vec<(String, String)>,
    pub max_concurrent: usize,
}

#[derive(Debug, Clone)]
pub struct Executor {
    config: Arc<ExecConfig>,
    permits: Arc<Semaphore>,
}

/// The supervisor answers within the command's wall clock plus its own cleanup; past this
/// margin it is presumed stuck and its process group is killed from here.
const SUPERVISOR_GRACE: Duration = Duration::from_secs(10);

impl Executor {
    pub fn new(config: ExecConfig) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_concurrent.max(1)));
        Executor {
            config: Arc::new(config),
            permits,
        }
    }

    pub fn config(&self) -> &ExecConfig {
        &self.config
    }

    /// Runs `command` to completion. The work happens in its own task, so a client that hangs
    /// up mid-command cannot cancel it halfway and leave processes behind.
    pub async fn execute(&self, command: &str) -> Result<Outcome, ExecError> {
        let argv = shlex::split(command).ok_or(ExecError::Unsplittable)?;
        if argv.is_empty() {
            return Err(ExecError::Empty);
        }
        let limit = self.config.max_concurrent.max(1);
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ExecError::Busy {
                running: limit,
                limit,
            })?;
        let config = self.config.clone();
        let task = tokio::spawn(async move {
            let outcome = run_supervised(&config, argv).await;
            drop(permit);
            outcome
        });
        task.await
            .map_err(|e| ExecError::Supervisor(format!("execution task failed: {e}")))?
    }
}

async fn run_supervised(config: &ExecConfig, argv: Vec<String>) -> Result<Outcome, ExecError> {
    let limits = &config.limits;
    let mut child = Command::new(&config.supervisor)
        .arg("sandbox-exec")
        .args(limits.to_args())
        .arg(format!("--cwd={}", config.workspace.display()))
        .arg("--")
        .args(&argv)
        .env_clear()
        .envs(config.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&config.workspace)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            ExecError::Supervisor(format!("cannot start {}: {e}", config.supervisor.display()))
        })?;
    let pgid = child.id();
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(ExecError::Supervisor("no pipes to the supervisor".into()));
    };
    // JSON escaping can grow each kept byte to six (`\u0000`); plus the notes.
    let json_cap = (limits.max_output_bytes as u64)
        .saturating_mul(12)
        .saturating_add(64 * 1024);
    let read_out = async move {
        let mut buf = Vec::new();
        let _ = stdout.take(json_cap).read_to_end(&mut buf).await;
        buf
    };
    let read_err = async move {
        let mut buf = Vec::new();
        let _ = stderr.take(64 * 1024).read_to_end(&mut buf).await;
        buf
    };
    let finished = {
        let run = async { tokio::join!(read_out, read_err, child.wait()) };
        tokio::time::timeout(limits.wall + SUPERVISOR_GRACE, run).await
    };
    match finished {
        Ok((out, err, _status)) => {
            if !err.is_empty() {
                tracing::warn!(stderr = %String::from_utf8_lossy(&err).trim(), "sandbox supervisor complained");
            }
            serde_json::from_slice::<Outcome>(&out).map_err(|e| {
                ExecError::Supervisor(format!(
                    "unreadable outcome ({e}): {}",
                    String::from_utf8_lossy(&err).trim()
                ))
            })
        }
        Err(_) => {
            tracing::warn!(
                pgid = pgid,
                "sandbox supervisor did not answer in time; killing its process group"
            );
            if let Some(pid) = pgid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.wait().await;
            Ok(Outcome {
                stdout: String::new(),
                stderr: format!(
                    "[sandbox] command timed out after {:.1}s; its process group was killed\n",
                    limits.wall.as_secs_f64()
                ),
                exit_code: TIMEOUT_EXIT_CODE,
                timed_out: true,
                output_truncated: false,
                leftovers_killed: 0,
            })
        }
    }
}
