//! `switchyard demo` stops everything it started: Ctrl-C (SIGINT) while the stack is up leaves
//! no replica, EPP or Envoy process behind.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn ctrl_c_leaves_no_process_behind() {
    // Real time (time scale 1): the workload outlasts the test, so the interrupt lands mid-run.
    let mut demo = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "demo",
            "--preset",
            "small",
            "--replicas",
            "2",
            "--time-scale",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = demo.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let pids: Vec<u32> = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the demo never reported its processes");
        eprintln!("demo: {line}");
        if let Some((_, list)) = line.split_once("processes: ") {
            break list
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect();
        }
    };
    // Two replicas, Envoy (round-robin goes first).
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert!(pids.iter().all(|p| exists(*p)));
    std::thread::sleep(Duration::from_millis(500));

    let pid = Pid::from_raw(i32::try_from(demo.id()).unwrap()).unwrap();
    kill_process(pid, Signal::INT).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = demo.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "demo did not exit on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "an interrupted demo reports failure");
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
        eprintln!("demo: {line}");
    }
    // The demo reaped its children before exiting: none may linger, not even as a zombie.
    for p in &pids {
        assert!(!exists(*p), "process {p} outlived the demo");
    }
}
