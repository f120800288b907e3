//! `switchyard sandbox-exec`: runs one command contained and prints its [`Outcome`] as JSON.
//!
//! The runtime starts one supervisor per `/execute`, as the leader of a new process group. The
//! supervisor (synchronous; no async runtime, so it is single-threaded where that matters):
//!
//! ```text
//! subreaper ─► empty netns ─► helper threads ─► rlimits (inherited) ─► spawn command
//! (or, where no subreaper is allowed: netns + pid ns ─► a second supervisor as that ns's init)
//!    │                         (timer, stdout, stderr readers)                │
//!    │        wait for the command's main process, reaping orphans meanwhile ◄┘
//!    └─► kill every live descendant (background jobs, setsid escapees) ─► reap ─► JSON out
//! ```
//!
//! Limits are set on the supervisor itself before the spawn (a child inherits them; setting them
//! in the child would need `pre_exec`, which is `unsafe`); the helper threads exist before that,
//! so RLIMIT_NPROC cannot stop the supervisor from reading output. Hard limits are lowered too,
//! so the command cannot raise them back.

use std::io::Read;
use std::path::PathBuf;
use std::process::{ChildStderr, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use rustix::io::Errno;
use rustix::process::{setrlimit, Resource, Rlimit, WaitOptions};

use super::isolate::{self, UnshareFlags};
use super::limits::{NetworkMode, Outcome, TIMEOUT_EXIT_CODE};
use super::proctree;

/// Flags of the hidden `switchyard sandbox-exec` subcommand (written by `Limits::to_args`).
#[derive(Debug, Clone, clap::Args)]
pub struct SuperviseArgs {
    #[arg(long)]
    pub timeout_ms: u64,
    #[arg(long)]
    pub cpu_seconds: u64,
    #[arg(long)]
    pub memory_bytes: u64,
    #[arg(long)]
    pub max_processes: u64,
    #[arg(long)]
    pub max_file_bytes: u64,
    #[arg(long)]
    pub max_open_files: u64,
    #[arg(long)]
    pub max_output_bytes: usize,
    #[arg(long, value_enum)]
    pub network: NetworkMode,
    #[arg(long)]
    pub uid: Option<u32>,
    #[arg(long)]
    pub gid: Option<u32>,
    #[arg(long)]
    pub cwd: PathBuf,
    /// Set on the second supervisor that runs as init of a fresh pid namespace (where the
    /// kernel refuses a subreaper, as gVisor does).
    #[arg(long, hide = true)]
    pub ns_init: bool,
    /// The program and its arguments (already split; no shell).
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

/// Small stacks: the helper threads only copy bytes, and RLIMIT_AS counts their stacks.
const HELPER_STACK: usize = 64 * 1024;
/// The timer and the two output readers.
const HELPER_THREADS: usize = 3;
/// How long the helpers may take to start (a loaded machine under gVisor: well under this).
const HELPER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the command and prints the outcome to stdout; the process exit code is 0 whenever an
/// outcome was printed.
pub fn main(args: SuperviseArgs) -> i32 {
    let outcome = supervise(&args);
    match serde_json::to_string(&outcome) {
        Ok(json) => {
            println!("{json}");
            0
        }
        Err(e) => {
            eprintln!("sandbox-exec: cannot encode the outcome: {e}");
            1
        }
    }
}

fn failed(message: String, exit_code: i32) -> Outcome {
    Outcome {
        stdout: String::new(),
        stderr: format!("Failed to execute command: {message}"),
        exit_code,
        timed_out: false,
        output_truncated: false,
        leftovers_killed: 0,
    }
}

/// A reader thread waiting for its pipe: reads up to `cap` bytes, then kills the command (it
/// would otherwise write forever) and drains the rest so the writer sees no SIGPIPE surprise.
fn spawn_reader<R: Read + Send + 'static>(
    cap: usize,
    overflow: Arc<AtomicBool>,
    tree: Tree,
    ready: mpsc::Sender<()>,
) -> std::io::Result<(mpsc::Sender<R>, Reader)> {
    let (pipe_tx, pipe_rx) = mpsc::channel::<R>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let kept = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let shared = kept.clone();
    thread::Builder::new()
        .stack_size(HELPER_STACK)
        .spawn(move || {
            let _ = ready.send(());
            let Ok(mut pipe) = pipe_rx.recv() else {
                return;
            };
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let mut kept = shared.lock();
                        let room = cap.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                        drop(kept);
                        if n > room && !overflow.swap(true, Ordering::SeqCst) {
                            tree.kill_all();
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = done_tx.send(());
        })?;
    Ok((
        pipe_tx,
        Reader {
            kept,
            done: done_rx,
        },
    ))
}

/// What a reader thread has kept so far, and word when it reached EOF.
struct Reader {
    kept: Arc<parking_lot::Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Reader {
    /// The output, once the pipe is closed or `wait` has passed (a writer that escaped the
    /// kill would otherwise hold the reply forever; what arrived until then is kept).
    fn finish(self, wait: Duration) -> String {
        let _ = self.done.recv_timeout(wait);
        let kept = std::mem::take(&mut *self.kept.lock());
        String::from_utf8_lossy(&kept).into_owned()
    }
}

fn set_limits(args: &SuperviseArgs) -> Result<(), String> {
    let set = |resource: Resource, soft: u64, hard: u64, name: &str| {
        setrlimit(
            resource,
            Rlimit {
                current: Some(soft),
                maximum: Some(hard),
            },
        )
        .map_err(|e| format!("cannot set {name} limit: {e}"))
    };
    set(Resource::Core, 0, 0, "core")?;
    // SIGXCPU at the soft limit, SIGKILL a second later if the process ignores it.
    set(
        Resource::Cpu,
        args.cpu_seconds,
        args.cpu_seconds.saturating_add(1),
        "cpu",
    )?;
    set(Resource::As, args.memory_bytes, args.memory_bytes, "memory")?;
    set(
        Resource::Nproc,
        args.max_processes,
        args.max_processes,
        "process",
    )?;
    set(
        Resource::Fsize,
        args.max_file_bytes,
        args.max_file_bytes,
        "file size",
    )?;
    set(
        Resource::Nofile,
        args.max_open_files,
        args.max_open_files,
        "open files",
    )?;
    Ok(())
}

/// How the supervisor reaches every process the command started.
#[derive(Debug, Clone)]
enum Tree {
    /// The supervisor is a subreaper: its descendants in `/proc` are the command's processes.
    Reaper(i32),
    /// The supervisor is init of its own pid namespace: everything else in it is the command's.
    NamespaceInit,
    /// Neither is allowed (gVisor with user namespaces blocked by seccomp): the command's process
    /// group (set once spawned) and the supervisor's live descendants. A process that left the
    /// group with `setsid` and lost its parent escapes this; the pod's limits still bound it.
    Group(i32, Arc<AtomicI32>),
}

impl Tree {
    fn kill_all(&self) -> u32 {
        match self {
            Tree::Reaper(me) => proctree::kill_all_descendants(*me),
            Tree::NamespaceInit => u32::from(isolate::kill_rest_of_namespace().is_ok()),
            Tree::Group(me, pgid) => {
                let group = pgid.load(Ordering::SeqCst);
                let mut killed = 0;
                if let Some(pid) = rustix::process::Pid::from_raw(group) {
                    killed += u32::from(
                        rustix::process::kill_process_group(pid, rustix::process::Signal::KILL)
                            .is_ok(),
                    );
                }
                killed + proctree::kill_all_descendants(*me)
            }
        }
    }
}

/// Where the kernel refuses a subreaper: a new pid namespace, entered while still
/// single-threaded, and a second supervisor as its init, whose outcome goes straight to our
/// stdout. The runtime's backstop kills both (they share a process group).
fn supervise_through_namespace(args: &SuperviseArgs, reaper_error: std::io::Error) -> Outcome {
    let want_net = args.network != NetworkMode::Host;
    if !rustix::process::geteuid().is_root() || want_net {
        let flags = if want_net {
            UnshareFlags::NEWNET
        } else {
            UnshareFlags::empty()
        };
        if let Err(e) = isolate::unshare_namespaces(flags) {
            if args.network == NetworkMode::None {
                return failed(format!("network isolation unavailable: {e}"), 1);
            }
        }
    }
    if let Err(e) = isolate::unshare_pid_namespace() {
        eprintln!(
            "sandbox-exec: no subreaper ({reaper_error}) and no pid namespace ({e}): \
             containing the command by its process group"
        );
        let tree = Tree::Group(std::process::id() as i32, Arc::new(AtomicI32::new(0)));
        return run_contained(args, tree);
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return failed(format!("cannot find the supervisor binary: {e}"), 1),
    };
    let mut inner = Command::new(exe);
    inner
        .arg("sandbox-exec")
        .arg("--ns-init")
        .arg(format!("--timeout-ms={}", args.timeout_ms))
        .arg(format!("--cpu-seconds={}", args.cpu_seconds))
        .arg(format!("--memory-bytes={}", args.memory_bytes))
        .arg(format!("--max-processes={}", args.max_processes))
        .arg(format!("--max-file-bytes={}", args.max_file_bytes))
        .arg(format!("--max-open-files={}", args.max_open_files))
        .arg(format!("--max-output-bytes={}", args.max_output_bytes))
        // The network namespace is entered already.
        .arg("--network=host")
        .arg(format!("--cwd={}", args.cwd.display()));
    if let Some(uid) = args.uid {
        inner.arg(format!("--uid={uid}"));
    }
    if let Some(gid) = args.gid {
        inner.arg(format!("--gid={gid}"));
    }
    let status = inner
        .arg("--")
        .args(&args.argv)
        .stdin(Stdio::null())
        .status();
    match status {
        Ok(st) if st.success() => {
            // The inner supervisor printed the outcome; nothing more to say.
            std::process::exit(0)
        }
        Ok(st) => failed(format!("the namespace supervisor failed: {st}"), 1),
        Err(e) => failed(format!("cannot start the namespace supervisor: {e}"), 1),
    }
}

fn supervise(args: &SuperviseArgs) -> Outcome {
    let tree = if args.ns_init {
        // `kill(-1)` from anything but a namespace's init would reach the whole machine.
        if std::process::id() != 1 {
            return failed("--ns-init outside a fresh pid namespace".to_string(), 1);
        }
        Tree::NamespaceInit
    } else {
        match isolate::become_child_subreaper() {
            Ok(()) => Tree::Reaper(std::process::id() as i32),
            Err(e) => return supervise_through_namespace(args, e),
        }
    };
    run_contained(args, tree)
}

/// Runs the command with every process it starts reachable through `tree`.
fn run_contained(args: &SuperviseArgs, tree: Tree) -> Outcome {
    if args.network != NetworkMode::Host {
        if let Err(e) = isolate::unshare_namespaces(UnshareFlags::NEWNET) {
            if args.network == NetworkMode::None {
                return failed(format!("network isolation unavailable: {e}"), 1);
            }
            // `auto`: best effort by definition; the pod's NetworkPolicy still applies.
        }
    }

    let overflow = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    // Each helper says when it runs: std maps a thread's signal stack as the thread starts, and
    // under RLIMIT_AS that mapping can fail (an abort, seen under gVisor), so the limits wait.
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let readers = spawn_reader::<ChildStdout>(
        args.max_output_bytes,
        overflow.clone(),
        tree.clone(),
        ready_tx.clone(),
    )
    .and_then(|out| {
        spawn_reader::<ChildStderr>(
            args.max_output_bytes,
            overflow.clone(),
            tree.clone(),
            ready_tx.clone(),
        )
        .map(|err| (out, err))
    });
    let ((out_pipe, out_rx), (err_pipe, err_rx)) = match readers {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot start a reader thread: {e}"), 1),
    };
    // The timer: kills the whole tree at the deadline unless told (by a message or by the
    // sender's drop) that the command is done.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let timer_flag = timed_out.clone();
    let timer_tree = tree.clone();
    let wall = Duration::from_millis(args.timeout_ms);
    let timer = thread::Builder::new()
        .stack_size(HELPER_STACK)
        .spawn(move || {
            let _ = ready_tx.send(());
            if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(wall) {
                timer_flag.store(true, Ordering::SeqCst);
                timer_tree.kill_all();
            }
        });
    if let Err(e) = timer {
        return failed(format!("cannot start the timer thread: {e}"), 1);
    }

    for _ in 0..HELPER_THREADS {
        if ready_rx.recv_timeout(HELPER_START_TIMEOUT).is_err() {
            return failed("a helper thread did not start".to_string(), 1);
        }
    }
    if let Err(e) = set_limits(args) {
        return failed(e, 1);
    }
    let Some((program, rest)) = args.argv.split_first() else {
        return failed("empty command".to_string(), 1);
    };
    let mut command = Command::new(program);
    command
        .args(rest)
        .current_dir(&args.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    {
        use std::os::unix::process::CommandExt;
        // std drops supplementary groups itself when root switches uid.
        if let Some(gid) = args.gid {
            command.gid(gid);
        }
        if let Some(uid) = args.uid {
            command.uid(uid);
        }
        if let Tree::Group(..) = tree {
            command.process_group(0);
        }
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                std::io::ErrorKind::PermissionDenied => 126,
                _ => 1,
            };
            return failed(format!("{program}: {e}"), code);
        }
    };
    let main_pid = child.id() as i32;
    if let Tree::Group(_, pgid) = &tree {
        pgid.store(main_pid, Ordering::SeqCst);
    }
    if let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) {
        let _ = out_pipe.send(out);
        let _ = err_pipe.send(err);
    }

    // Reap everything that ends until the main process does; orphans re-parented to us are
    // reaped here too, so no zombie piles up during a long command.
    let mut status = None;
    while status.is_none() {
        match rustix::process::wait(WaitOptions::empty()) {
            Ok(Some((pid, st))) if pid.as_raw_nonzero().get() == main_pid => status = Some(st),
            Ok(_) => {}
            Err(Errno::INTR) => {}
            Err(_) => break,
        }
    }
    let _ = done_tx.send(());
    let mut leftovers = match &tree {
        Tree::Reaper(me) | Tree::Group(me, _) => proctree::live_descendants(*me).len() as u32,
        Tree::NamespaceInit => 0,
    };
    tree.kill_all();
    // Everything left is dead or dying: reap until there are no children.
    for _ in 0..1000 {
        match rustix::process::wait(WaitOptions::NOHANG) {
            Ok(Some(_)) => {
                if let Tree::NamespaceInit = tree {
                    leftovers = leftovers.saturating_add(1);
                }
            }
            Err(Errno::INTR) => {}
            Ok(None) => thread::sleep(Duration::from_millis(2)),
            Err(_) => break,
        }
    }

    // The pipes' writers are all dead, so both readers reach EOF now.
    let stdout = out_rx.finish(Duration::from_secs(2));
    let mut stderr = err_rx.finish(Duration::from_secs(1));
    let timed_out = timed_out.load(Ordering::SeqCst);
    let output_truncated = overflow.load(Ordering::SeqCst);
    let mut exit_code = match status {
        Some(st) => st
            .exit_status()
            .or_else(|| st.terminating_signal().map(|sig| -sig))
            .unwrap_or(1),
        None => 1,
    };
    if timed_out {
        exit_code = TIMEOUT_EXIT_CODE;
        stderr.push_str(&format!(
            "\n[sandbox] command timed out after {:.1}s; all of its processes were killed\n",
            wall.as_secs_f64()
        ));
    }
    if output_truncated {
        stderr.push_str(&format!(
            "\n[sandbox] output exceeded {} bytes; the command was killed\n",
            args.max_output_bytes
        ));
    }
    if leftovers > 0 {
        stderr.push_str(&format!(
            "\n[sandbox] killed {leftovers} background process(es) left running after the command exited\n"
        ));
    }
    Outcome {
        stdout,
        stderr,
        exit_code,
        timed_out,
        output_truncated,
        leftovers_killed: leftovers,
    }
}
