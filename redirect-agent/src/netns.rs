//! Running work inside another network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling thread only, so the work runs on a
//! dedicated, short-lived thread and the caller's thread never leaves its namespace.

use std::{
    fs::File,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

/// Failure to enter a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened (missing, or no permission).
    #[error("cannot open network namespace {path}")]
    Open { path: PathBuf, source: io::Error },
    /// The file exists but is not a network namespace, or setns was refused.
    #[error("cannot enter network namespace {path}")]
    Enter { path: PathBuf, source: io::Error },
}

/// Opens a network namespace file (`/proc/PID/ns/net`, `/var/run/netns/NAME`).
pub fn open(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Runs `f` on a new thread that has joined the network namespace `ns`.
pub fn run_in<T: Send>(
    ns: &File,
    path: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetnsError::Enter {
                    path: path.to_owned(),
                    source: io::Error::from(e),
                }
            })?;
            Ok(f())
        })
        .join()
        .expect("netns worker panicked")
    })
}

/// Opens `path` and runs `f` inside that network namespace.
pub fn run_at<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let ns = open(path)?;
    run_in(&ns, path, f)
}
