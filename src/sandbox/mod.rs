//! `switchyard sandbox`: the runtime inside each agent-sandbox pod. It serves the agent-sandbox
//! runtime API on 8888 (the shapes upstream's Python runtime and clients use) and runs every
//! command contained.
//!
//! ```text
//! api        routes and reply shapes (upstream examples/python-runtime-sandbox/main.py)
//! error      ApiError → {"message"} / {"detail"} replies, in one place
//! workspace  file operations confined to the workspace: no absolute paths, no `..`, no symlink
//!            ever followed (walks by descriptor with O_NOFOLLOW)
//! exec       /execute: shlex split, one supervisor per command in its own process group,
//!            bounded concurrency, a backstop kill
//! supervise  `switchyard sandbox-exec`: rlimits, empty netns, wall-clock timer, output caps,
//!            kills every descendant (subreaper) before it answers
//! proctree   descendants through /proc; kill them all
//! isolate    the network namespace (the one unsafe block outside the CUDA backend)
//! limits     the limits and the supervisor's outcome
//! ```

pub mod api;
pub mod error;
pub mod exec;
pub mod isolate;
pub mod limits;
pub mod proctree;
pub mod router;
pub mod supervise;
pub mod workspace;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use self::api::AppState;
use self::exec::{ExecConfig, Executor};
use self::limits::{Limits, NetworkMode};
use self::workspace::Workspace;
use crate::process::{init_logging, shutdown_signal, LogFormat};

/// Parses a byte size: a plain number, or with a suffix `K`/`M`/`G` (powers of 1000) or
/// `Ki`/`Mi`/`Gi` (powers of 1024), as Kubernetes quantities write them.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a byte size (e.g. 512Mi)"))?;
    let unit: u64 = match suffix {
        "" => 1,
        "K" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size suffix `{other}` (use K, M, G, Ki, Mi, Gi)"
            ))
        }
    };
    let bytes = n
        .checked_mul(unit)
        .ok_or_else(|| format!("`{text}` is too large"))?;
    if bytes == 0 {
        return Err("a size limit must be above zero".into());
    }
    Ok(bytes)
}

/// `--run-as`: `UID:GID`, or `self` to keep the runtime's own user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    Keep,
    Ids(u32, u32),
}

fn parse_run_as(text: &str) -> Result<RunAs, String> {
    if text == "self" {
        return Ok(RunAs::Keep);
    }
    let (uid, gid) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}`: expected UID:GID or `self`"))?;
    let parse = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("`{text}`: `{s}` is not a numeric id"))
    };
    Ok(RunAs::Ids(parse(uid)?, parse(gid)?))
}

/// Command-line flags of `switchyard sandbox`.
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// HTTP port (0 picks a free one).
    #[arg(long, default_value_t = 8888)]
    pub port: u16,
    /// Directory commands run in and file operations are confined to (upstream's env name).
    #[arg(long, env = "SANDBOX_BASE_DIR", default_value = "/app")]
    pub workspace: PathBuf,
    /// Wall-clock limit per command, seconds (upstream's env name and default).
    #[arg(long, env = "SANDBOX_EXEC_TIMEOUT_SECONDS", default_value_t = 300.0)]
    pub exec_timeout_seconds: f64,
    /// CPU seconds per process (RLIMIT_CPU); default: the wall-clock limit, rounded up.
    #[arg(long)]
    pub cpu_seconds: Option<u64>,
    /// Address space per process (RLIMIT_AS), e.g. `2Gi`.
    #[arg(long, default_value = "2Gi", value_parser = parse_bytes)]
    pub memory_limit: u64,
    /// Processes and threads the command's user may have (RLIMIT_NPROC).
    #[arg(long, default_value_t = 256)]
    pub max_processes: u64,
    /// Largest file a command may write (RLIMIT_FSIZE), e.g. `256Mi`.
    #[arg(long, default_value = "256Mi", value_parser = parse_bytes)]
    pub max_file_size: u64,
    /// Open files per process (RLIMIT_NOFILE).
    #[arg(long, default_value_t = 1024)]
    pub max_open_files: u64,
    /// Bytes kept from each of stdout and stderr; a command writing more is killed.
    #[arg(long, default_value = "1Mi", value_parser = parse_bytes)]
    pub max_output: u64,
    /// Largest upload accepted.
    #[arg(long, default_value = "64Mi", value_parser = parse_bytes)]
    pub max_upload: u64,
    /// Commands running at once; more get 503 (which clients retry).
    #[arg(long, default_value_t = 4)]
    pub max_concurrent: usize,
    /// Entries returned by one `/list` at most.
    #[arg(long, default_value_t = 10_000)]
    pub max_list_entries: usize,
    /// Network for commands: `none` (an empty namespace, required), `auto` (empty namespace
    /// when the kernel allows one), `host`.
    #[arg(long, value_enum, default_value_t = NetworkMode::Auto)]
    pub network: NetworkMode,
    /// Run commands as `UID:GID` (needs root), or `self`. Default: `65534:65534` when the
    /// runtime is root, else `self`.
    #[arg(long, value_parser = parse_run_as)]
    pub run_as: Option<RunAs>,
    /// The binary that provides `sandbox-exec` (default: this one).
    #[arg(long, hide = true)]
    pub supervisor: Option<PathBuf>,
    /// Log format: `console` or `json`.
    #[arg(long, default_value = "console")]
    pub log_format: String,
}

/// A started runtime: its address and the server task.
pub struct Started {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Validated configuration from the flags.
pub fn state_from_args(args: &SandboxArgs) -> anyhow::Result<AppState> {
    let secs = args.exec_timeout_seconds;
    if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
        anyhow::bail!("--exec-timeout-seconds must be in (0, 86400], got {secs}");
    }
    let wall = Duration::from_secs_f64(secs);
    let run_as = match args.run_as {
        Some(RunAs::Ids(uid, gid)) => Some((uid, gid)),
        Some(RunAs::Keep) => None,
        // Root commands could read every process's environment and kill the runtime: drop to
        // nobody unless told otherwise.
        None if rustix::process::geteuid().is_root() => Some((65534, 65534)),
        None => None,
    };
    for (flag, value) in [
        ("--max-processes", args.max_processes),
        ("--max-open-files", args.max_open_files),
    ] {
        if value == 0 {
            anyhow::bail!("{flag} must be above zero");
        }
    }
    let limits = Limits {
        wall,
        cpu_seconds: args.cpu_seconds.unwrap_or(secs.ceil() as u64).max(1),
        memory_bytes: args.memory_limit,
        max_processes: args.max_processes,
        max_file_bytes: args.max_file_size,
        max_open_files: args.max_open_files,
        max_output_bytes: usize::try_from(args.max_output).context("--max-output")?,
        network: args.network,
        run_as,
    };
    let workspace = Workspace::open(&args.workspace, run_as)
        .with_context(|| format!("workspace {}", args.workspace.display()))?;
    let supervisor = match &args.supervisor {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("locating the switchyard binary")?,
    };
    let root = workspace.root().to_path_buf();
    let env = vec![
        (
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
        ("HOME".to_string(), root.display().to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ("PYTHONDONTWRITEBYTECODE".to_string(), "1".to_string()),
    ];
    let executor = Executor::new(ExecConfig {
        supervisor,
        workspace: root,
        limits,
        env,
        max_concurrent: args.max_concurrent,
    });
    Ok(AppState {
        workspace: Arc::new(workspace),
        executor,
        max_upload_bytes: args.max_upload,
        max_list_entries: args.max_list_entries.max(1),
    })
}

/// Binds and serves until `shutdown` resolves.
pub async fn start(
    args: &SandboxArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Started> {
    let state = state_from_args(args)?;
    let limits = state.executor.config().limits.clone();
    let listener = tokio::net::TcpListener::bind((args.host, args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        workspace = %state.workspace.root().display(),
        timeout_s = limits.wall.as_secs_f64(),
        memory = limits.memory_bytes,
        processes = limits.max_processes,
        network = limits.network.as_str(),
        run_as = ?limits.run_as,
        "sandbox runtime listening"
    );
    let app = api::router(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok(Started { addr, task })
}

/// Set in the environment of the re-executed runtime.
const SCRUBBED_MARK: &str = "SWITCHYARD_SANDBOX_SCRUBBED";

/// Replaces this process with itself under an empty environment (but `RUST_LOG` and the
/// settings read from it), so nothing secret is left in
/// `/proc/<runtime>/environ` for a command to read; gVisor lets any user read it. Returns only
/// when the exec failed.
fn reexec_with_clean_environment(args: &SandboxArgs) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return e,
    };
    let mut cmd = std::process::Command::new(exe);
    // The two settings with upstream's environment names go back as the same (non-secret)
    // variables: a flag given on the command line still wins over them.
    cmd.args(std::env::args_os().skip(1))
        .env_clear()
        .env("SANDBOX_BASE_DIR", &args.workspace)
        .env(
            "SANDBOX_EXEC_TIMEOUT_SECONDS",
            args.exec_timeout_seconds.to_string(),
        )
        .env(SCRUBBED_MARK, "1");
    if let Some(filter) = std::env::var_os("RUST_LOG") {
        cmd.env("RUST_LOG", filter);
    }
    cmd.exec()
}

/// The `switchyard sandbox` entry point.
pub async fn run(args: SandboxArgs) -> anyhow::Result<()> {
    if std::env::var_os(SCRUBBED_MARK).is_none() {
        let e = reexec_with_clean_environment(&args);
        eprintln!("switchyard sandbox: could not re-exec with a clean environment: {e}");
    }
    let format = if args.log_format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Console
    };
    init_logging("info", format);
    // Non-dumpable: /proc/<runtime>/environ and friends become root-owned, so a command running
    // as the runtime's own user cannot read the runtime's environment.
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!(error = %e, "could not mark the runtime non-dumpable");
    }
    let started = start(&args, async {
        let signal = shutdown_signal().await;
        tracing::info!(?signal, "shutting down");
    })
    .await?;
    started.task.await??;
    Ok(())
}
