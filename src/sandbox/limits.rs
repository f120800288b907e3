//! What one command may use: the limits the runtime hands to the supervisor (`switchyard
//! sandbox-exec`) on its command line, and the result the supervisor prints back.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whether a command gets its own, empty network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum NetworkMode {
    /// A new network namespace with only a loopback that is down: no egress, no host loopback.
    /// Fails the command when the kernel refuses the namespace.
    None,
    /// A new network namespace when the kernel allows one (root, or unprivileged user
    /// namespaces), else the pod's network (then a NetworkPolicy must restrict egress).
    Auto,
    /// The runtime's own network.
    Host,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Auto => "auto",
            NetworkMode::Host => "host",
        }
    }
}

/// Limits for one command (validated: every value is non-zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall clock from spawn to kill.
    pub wall: Duration,
    /// RLIMIT_CPU per process, seconds (soft; SIGKILL one second later).
    pub cpu_seconds: u64,
    /// RLIMIT_AS per process, bytes.
    pub memory_bytes: u64,
    /// RLIMIT_NPROC: processes (and threads) of the command's user.
    pub max_processes: u64,
    /// RLIMIT_FSIZE: largest file a process may write, bytes.
    pub max_file_bytes: u64,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
    /// Bytes kept from each of stdout and stderr; more kills the command.
    pub max_output_bytes: usize,
    pub network: NetworkMode,
    /// Run the command as this uid/gid (only possible when the runtime is root).
    pub run_as: Option<(u32, u32)>,
}

impl Limits {
    /// The supervisor's flags for these limits (parsed back by `SuperviseArgs`).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--timeout-ms={}", self.wall.as_millis()),
            format!("--cpu-seconds={}", self.cpu_seconds),
            format!("--memory-bytes={}", self.memory_bytes),
            format!("--max-processes={}", self.max_processes),
            format!("--max-file-bytes={}", self.max_file_bytes),
            format!("--max-open-files={}", self.max_open_files),
            format!("--max-output-bytes={}", self.max_output_bytes),
            format!("--network={}", self.network.as_str()),
        ];
        if let Some((uid, gid)) = self.run_as {
            args.push(format!("--uid={uid}"));
            args.push(format!("--gid={gid}"));
        }
        args
    }
}

/// How the command ended, as the supervisor reports it on its stdout (one JSON object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    /// The exit status; a command killed by signal N reports -N (Python's `returncode`, which
    /// upstream's runtime returns); 124 after a wall-clock timeout; 127 when the program does not
    /// exist, 126 when it cannot be executed.
    pub exit_code: i32,
    pub timed_out: bool,
    pub output_truncated: bool,
    /// Processes still alive after the command's main process ended (background jobs), all
    /// killed before the reply.
    pub leftovers_killed: u32,
}

/// Exit code reported after a wall-clock timeout (coreutils `timeout`'s).
pub const TIMEOUT_EXIT_CODE: i32 = 124;
