//! Child processes of a benchmark (sim replicas, the EPP, Envoy): each in its own process
//! group with its output in a log file; stopped with SIGTERM then SIGKILL to the whole group and
//! always reaped, also on drop, so an error or Ctrl-C leaves no process behind.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process_group, Pid, Signal};

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create log file {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) before it was ready; last log lines:\n{tail}")]
    Exited {
        name: String,
        status: String,
        tail: String,
    },
    #[error("{name} not ready after {waited:?}; last log lines:\n{tail}")]
    NotReady {
        name: String,
        waited: Duration,
        tail: String,
    },
    #[error("no free port: {0}")]
    Ports(#[source] std::io::Error),
}

/// A started child process; stopped and reaped on [`stop`](Self::stop) or drop.
#[derive(Debug)]
pub struct ManagedChild {
    name: String,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl ManagedChild {
    /// Starts `cmd` as the leader of a new process group (so the terminal's Ctrl-C reaches only
    /// us, and we decide how children stop) with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self, ProcError> {
        let file = File::create(log).map_err(|source| ProcError::Log {
            path: log.to_owned(),
            source,
        })?;
        let err = file.try_clone().map_err(|source| ProcError::Log {
            path: log.to_owned(),
            source,
        })?;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|source| ProcError::Spawn {
                name: name.to_owned(),
                program: cmd.get_program().to_string_lossy().into_owned(),
                source,
            })?;
        tracing::debug!(name, pid = child.id(), "started child process");
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            reaped: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the log tail if the process has exited.
    pub fn check_running(&mut self) -> Result<(), ProcError> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped = true;
                Err(ProcError::Exited {
                    name: self.name.clone(),
                    status: status.to_string(),
                    tail: self.log_tail(40),
                })
            }
            _ => Ok(()),
        }
    }

    /// The last `lines` lines of the process's log (at most 64 KiB are read).
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Polls `probe` every 50 ms until it returns true, the process exits, or `timeout` passes.
    pub async fn wait_ready<F, Fut>(
        &mut self,
        timeout: Duration,
        mut probe: F,
    ) -> Result<(), ProcError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        loop {
            self.check_running()?;
            if probe().await {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(ProcError::NotReady {
                    name: self.name.clone(),
                    waited: timeout,
                    tail: self.log_tail(40),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM to the process group, up to `grace` for it to exit, then SIGKILL; always reaped.
    pub async fn stop(mut self, grace: Duration) {
        if self.reaped {
            return;
        }
        self.signal_group(Signal::TERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill_and_reap();
    }

    fn signal_group(&self, signal: Signal) {
        let Some(pid) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw) else {
            return;
        };
        // The group id is the child's pid (process_group(0)); ESRCH just means it is gone.
        let _ = kill_process_group(pid, signal);
    }

    fn kill_and_reap(&mut self) {
        if self.reaped {
            return;
        }
        // The group as a whole: a shell script's own children go too.
        self.signal_group(Signal::KILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
        tracing::debug!(name = %self.name, "child process stopped");
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// The last `lines` lines of a log file (reads at most its last 64 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `n` distinct free TCP ports on 127.0.0.1 (the probes are held until all are chosen).
pub fn free_ports(n: usize) -> Result<Vec<u16>, ProcError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(ProcError::Ports)?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(ProcError::Ports)
}

/// A scratch directory for logs and configs, removed on drop unless `keep` is set.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl ScratchDir {
    pub fn new(prefix: &str, keep: bool) -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path, keep })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Whether `/proc/<pid>` exists (a reaped process is gone; a zombie still has an entry).
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name (which may contain spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line: 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    Some((utime + stime) / ticks)
}

/// Peak resident set size in bytes (`VmHWM` of `/proc/<pid>/status`).
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_kills_the_whole_group_and_reaps() {
        let dir = ScratchDir::new("switchyard-procs-test", false).unwrap();
        // A shell that ignores SIGTERM and has a child of its own: only SIGKILL to the group
        // removes both.
        let pidfile = dir.path().join("grandchild.pid");
        let script = format!(
            "trap '' TERM; sleep 60 & echo $! > {}; wait",
            pidfile.display()
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(&script);
        let mut child = ManagedChild::spawn("sh", &mut cmd, &dir.path().join("sh.log")).unwrap();
        let start = Instant::now();
        while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let grandchild: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        child.check_running().unwrap();
        let pid = child.pid();
        child.stop(Duration::from_millis(200)).await;
        assert!(!pid_exists(pid), "shell reaped");
        // The grandchild's parent (the shell) is dead, so init reaps it; give it a moment.
        let start = Instant::now();
        while pid_exists(grandchild) {
            let stat =
                std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
            if stat.contains(") Z") {
                break; // killed, waiting for its new parent to reap it
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "grandchild survived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn drop_reaps_and_exited_child_reports_its_log() {
        let dir = ScratchDir::new("switchyard-procs-test", false).unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("echo boom; exit 3");
        let mut child = ManagedChild::spawn("x", &mut cmd, &dir.path().join("x.log")).unwrap();
        let start = Instant::now();
        let err = loop {
            if let Err(e) = child.check_running() {
                break e;
            }
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            matches!(&err, ProcError::Exited { tail, .. } if tail == "boom"),
            "{err}"
        );

        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let child = ManagedChild::spawn("sleep", &mut cmd, &dir.path().join("s.log")).unwrap();
        let pid = child.pid();
        drop(child);
        assert!(!pid_exists(pid));
    }

    #[test]
    fn proc_accounting_of_self() {
        let me = std::process::id();
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(peak_rss_bytes(me).unwrap() > 1024 * 1024);
        assert_eq!(free_ports(3).unwrap().len(), 3);
    }
}
