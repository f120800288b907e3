//! Namespaces and the subreaper flag for one command. In a new, empty network namespace the
//! command sees only a loopback interface that is down (no egress, and not the pod's or host's
//! loopback services either). Background processes are caught by making the supervisor a child
//! subreaper; where the kernel refuses that (gVisor allows it only for init), a new pid
//! namespace whose init is the command does the same job: it dies with the command.
//!
//! This is the crate's only `unsafe` outside the CUDA backend: `unshare` is `unsafe` in rustix
//! because of `CLONE_FILES` (a thread could keep using descriptors from the old table). Only
//! `CLONE_NEWNET` and `CLONE_NEWUSER` are passed, and the supervisor calls this while it is
//! still single-threaded (which `CLONE_NEWUSER` requires anyway). `prctl` is variadic in C.
#![allow(unsafe_code)]

use std::fs;
use std::io;

use rustix::process::{getegid, geteuid};
use rustix::thread::unshare_unsafe;
pub use rustix::thread::UnshareFlags;

/// Moves the caller into new namespaces of the kinds in `flags` (network). As root that is
/// all; as another user it first creates a user namespace that maps the caller's own uid and gid
/// onto themselves (what unprivileged user namespaces allow), so the command keeps its identity
/// and file ownership. Must be called while single-threaded.
pub fn unshare_namespaces(flags: UnshareFlags) -> io::Result<()> {
    if geteuid().is_root() {
        // SAFETY: only NEWNET is passed (no CLONE_FILES); the caller is single-threaded.
        return unsafe { unshare_unsafe(flags) }.map_err(io::Error::from);
    }
    let (uid, gid) = (geteuid().as_raw(), getegid().as_raw());
    // SAFETY: NEWUSER plus NEWNET only (no CLONE_FILES); the caller is single-threaded.
    unsafe { unshare_unsafe(UnshareFlags::NEWUSER | flags) }.map_err(io::Error::from)?;
    // An unprivileged process may map only its own ids, and only after denying setgroups.
    match fs::write("/proc/self/setgroups", "deny") {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))?;
    fs::write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))?;
    Ok(())
}

/// Makes the caller's next child the init of a new pid namespace (needs root, or the user
/// namespace from [`unshare_namespaces`]).
pub fn unshare_pid_namespace() -> io::Result<()> {
    // SAFETY: NEWPID only (no CLONE_FILES).
    unsafe { unshare_unsafe(UnshareFlags::NEWPID) }.map_err(io::Error::from)
}

/// Makes the calling process a child subreaper: orphaned descendants are re-parented to it
/// instead of to init. Through libc rather than rustix, which leaves `prctl`'s unused argument
/// registers unset; gVisor answers EINVAL unless they are zero.
pub fn become_child_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER reads only its integer arguments; no memory is passed.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_CHILD_SUBREAPER,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// From init of a pid namespace: SIGKILL every other process in it (`kill(-1)` skips the
/// caller).
pub fn kill_rest_of_namespace() -> io::Result<()> {
    // SAFETY: kill takes no pointers.
    let r = unsafe { libc::kill(-1, libc::SIGKILL) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
