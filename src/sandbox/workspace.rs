//! File operations confined to the workspace directory.
//!
//! A request path is relative, has no `..` and no control characters; it is then walked one
//! component at a time from a descriptor of the workspace with `O_NOFOLLOW`, so no symlink is
//! ever followed, whoever created it and whenever (a command may swap a directory for a link
//! between two requests; a walk by descriptor cannot be redirected mid-way the way a
//! check-then-open of a path string can). Every open is also checked after the fact: the inode
//! opened must be the one `lstat` saw and that one not a link, because gVisor (2022) follows a
//! final symlink despite `O_NOFOLLOW | O_DIRECTORY`. Blocking calls: run them off the async
//! workers.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{fchown, fstat, mkdirat, openat, renameat, statat, unlinkat};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::process::{Gid, Uid};

/// Why a path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// Absolute, `..`, control characters, or through a symlink.
    #[error("Access denied")]
    Denied,
    #[error("not found")]
    NotFound,
    #[error("not a regular file")]
    NotAFile,
    #[error("not a directory")]
    NotADirectory,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl From<Errno> for PathError {
    fn from(e: Errno) -> Self {
        match e {
            Errno::NOENT => PathError::NotFound,
            // O_NOFOLLOW met a symlink.
            Errno::LOOP => PathError::Denied,
            Errno::NOTDIR => PathError::NotADirectory,
            other => PathError::Io(other.into()),
        }
    }
}

/// One directory entry as `/list` reports it (upstream's `FileEntry`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    /// `file` or `directory` (a symlink is reported as a file: it is never followed).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Seconds since the epoch, with the fraction.
    pub mod_time: f64,
}

/// The workspace root and who owns what the runtime creates in it.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    root_fd: OwnedFd,
    /// Files and directories the runtime creates get this owner, so a command that runs as
    /// another user can change them.
    owner: Option<(u32, u32)>,
}

/// Splits a request path into checked components; empty means the workspace itself.
pub fn components(path: &str) -> Result<Vec<&str>, PathError> {
    if path.chars().any(|c| c.is_control()) || path.starts_with('/') {
        return Err(PathError::Denied);
    }
    let mut out = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(PathError::Denied),
            name => out.push(name),
        }
    }
    Ok(out)
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl Workspace {
    /// Opens (creating when missing) the workspace at `root`.
    pub fn open(root: &Path, owner: Option<(u32, u32)>) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let root_fd = openat(rustix::fs::CWD, &root, DIR_FLAGS, Mode::empty())?;
        if let Some((uid, gid)) = owner {
            chown(&root_fd, uid, gid)?;
        }
        Ok(Workspace {
            root,
            root_fd,
            owner,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory named by `parts`, walked without following links; with `create`, missing
    /// directories are made (owned like the workspace).
    fn dir(&self, parts: &[&str], create: bool) -> Result<OwnedFd, PathError> {
        let mut fd = openat(&self.root_fd, ".", DIR_FLAGS, Mode::empty())?;
        for part in parts {
            let next = match open_checked(&fd, part, DIR_FLAGS) {
                Err(PathError::NotFound) if create => {
                    match mkdirat(&fd, *part, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    let made = open_checked(&fd, part, DIR_FLAGS)?;
                    if let Some((uid, gid)) = self.owner {
                        chown(&made, uid, gid)?;
                    }
                    made
                }
                other => other?,
            };
            fd = next;
        }
        Ok(fd)
    }

    /// Opens a regular file for reading.
    pub fn read(&self, path: &str) -> Result<File, PathError> {
        let parts = components(path)?;
        let (name, parents) = parts.split_last().ok_or(PathError::NotAFile)?;
        let dir = self.dir(parents, false)?;
        // O_NONBLOCK: opening a FIFO a command left behind must not hang the request.
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let fd = open_checked(&dir, name, flags)?;
        if FileType::from_raw_mode(fstat(&fd)?.st_mode) != FileType::RegularFile {
            return Err(PathError::NotAFile);
        }
        Ok(File::from(fd))
    }

    /// Entries of a directory, at most `max` of them (bounded reply), sorted by name.
    pub fn list(&self, path: &str, max: usize) -> Result<Vec<Entry>, PathError> {
        let dir = self.dir(&components(path)?, false)?;
        let mut entries = Vec::new();
        let mut reader = rustix::fs::Dir::read_from(&dir)?;
        while let Some(entry) = reader.read() {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            // The entry may be gone already (a command is deleting files): skip it.
            let Ok(st) = statat(&dir, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            let kind = if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                "directory"
            } else {
                "file"
            };
            entries.push(Entry {
                name,
                size: st.st_size.max(0) as u64,
                kind,
                mod_time: st.st_mtime as f64 + st.st_mtime_nsec as f64 / 1e9,
            });
            if entries.len() >= max {
                tracing::warn!(path, max, "directory listing truncated");
                break;
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Whether the path names anything (a symlink counts as itself; it is not followed).
    pub fn exists(&self, path: &str) -> Result<bool, PathError> {
        let parts = components(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Ok(true);
        };
        let dir = match self.dir(parents, false) {
            Ok(dir) => dir,
            Err(PathError::NotFound | PathError::NotADirectory) => return Ok(false),
            Err(e) => return Err(e),
        };
        Ok(statat(&dir, *name, AtFlags::SYMLINK_NOFOLLOW).is_ok())
    }

    /// Starts writing `path`: the data goes to a hidden temporary file beside it, which
    /// [`Upload::commit`] renames into place (replacing a symlink there instead of following it).
    pub fn create(&self, path: &str) -> Result<Upload, PathError> {
        let parts = components(path)?;
        let (name, parents) = parts.split_last().ok_or(PathError::NotAFile)?;
        let dir = self.dir(parents, true)?;
        let temp = format!(".upload-{:016x}", rand::random::<u64>());
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        let fd = openat(
            &dir,
            temp.as_str(),
            flags | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        if let Some((uid, gid)) = self.owner {
            chown(&fd, uid, gid)?;
        }
        Ok(Upload {
            dir,
            temp,
            name: (*name).to_string(),
            file: Some(File::from(fd)),
        })
    }
}

/// Opens `name` in `dir` without following a link, and proves it: the inode opened must be the
/// one `lstat` saw, and that one not a symlink. A swap between the two calls is caught by the
/// inode comparison.
fn open_checked(dir: &OwnedFd, name: &str, flags: OFlags) -> Result<OwnedFd, PathError> {
    let seen = statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(seen.st_mode) == FileType::Symlink {
        return Err(PathError::Denied);
    }
    let fd = match openat(dir, name, flags | OFlags::NOFOLLOW, Mode::empty()) {
        Err(Errno::LOOP) => return Err(PathError::Denied),
        other => other?,
    };
    let opened = fstat(&fd)?;
    if (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino) {
        return Err(PathError::Denied);
    }
    Ok(fd)
}

fn chown(fd: &OwnedFd, uid: u32, gid: u32) -> io::Result<()> {
    fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    Ok(())
}

/// A file being uploaded; dropped without [`Upload::commit`], its temporary file is removed.
#[derive(Debug)]
pub struct Upload {
    dir: OwnedFd,
    temp: String,
    name: String,
    file: Option<File>,
}

impl Upload {
    pub fn file(&mut self) -> Option<&mut File> {
        self.file.as_mut()
    }

    /// Moves the written file into place.
    pub fn commit(mut self) -> Result<(), PathError> {
        if let Some(file) = self.file.take() {
            file.sync_all()?;
        }
        match renameat(&self.dir, self.temp.as_str(), &self.dir, self.name.as_str()) {
            Ok(()) => {
                // Renamed: nothing left for Drop to remove.
                self.temp.clear();
                Ok(())
            }
            // The name is a directory.
            Err(Errno::ISDIR | Errno::NOTEMPTY) => Err(PathError::NotAFile),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.temp.is_empty() {
            let _ = unlinkat(&self.dir, self.temp.as_str(), AtFlags::empty());
        }
    }
}

#[cfg(test)]
mod tests;
