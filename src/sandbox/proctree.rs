//! The supervisor's descendants, found through `/proc`, and killing all of them.
//!
//! The supervisor is a child subreaper, so a process whose parent dies is re-parented to it
//! rather than to init: every process the command ever started stays in the supervisor's tree,
//! including ones that called `setsid` to leave the process group. Walking parent links from
//! `/proc/*/stat` therefore finds them all.

use std::collections::{HashMap, HashSet};
use std::fs;

use rustix::process::{kill_process, Pid, Signal};

/// One `/proc/<pid>/stat` line: its parent and whether it is a zombie (already dead, only
/// waiting to be reaped).
fn parse_stat(stat: &str) -> Option<(i32, bool)> {
    // `pid (comm) state ppid ...`: comm may contain spaces and parentheses, so split after the
    // last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state == "Z"))
}

/// Live (non-zombie) descendants of `root`.
pub fn live_descendants(root: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: HashMap<i32, Vec<(i32, bool)>> = HashMap::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // A process can vanish between readdir and read: skip it.
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((ppid, zombie)) = parse_stat(&stat) {
            children.entry(ppid).or_default().push((pid, zombie));
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(parent) = stack.pop() {
        for &(pid, zombie) in children.get(&parent).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(pid) {
                // A zombie's children were re-parented already; it needs no kill.
                if !zombie {
                    out.push(pid);
                }
                stack.push(pid);
            }
        }
    }
    out
}

/// SIGKILLs every live descendant of `root` until none is left; returns how many kills were
/// sent. Repeats because a process may fork between the scan and the kill (a fork bomb does);
/// each round kills everything that exists, and a killed process forks no more, so the rounds
/// end. Bounded anyway, so a kernel that refuses kills cannot hang the caller.
pub fn kill_all_descendants(root: i32) -> u32 {
    let mut killed = 0u32;
    for _round in 0..1000 {
        let pids = live_descendants(root);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if let Some(pid) = Pid::from_raw(pid) {
                if kill_process(pid, Signal::KILL).is_ok() {
                    killed = killed.saturating_add(1);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        assert_eq!(parse_stat("42 (a b) c) S 7 42 42 0 -1"), Some((7, false)));
        assert_eq!(parse_stat("43 (sh) Z 1 43 43"), Some((1, true)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn kills_the_whole_subtree_and_nothing_else() {
        // Only the shell's subtree: other tests in this process have children of their own.
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .expect("spawn sh");
        let root = shell.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while live_descendants(root).len() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(live_descendants(root).len(), 2);
        assert_eq!(kill_all_descendants(root), 2);
        // `wait` returns once both sleeps are dead, so the shell exits by itself.
        assert!(shell.wait().expect("wait").success());
        assert_eq!(live_descendants(root), Vec::<i32>::new());
    }
}
