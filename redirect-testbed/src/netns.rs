//! Named network namespaces (`/var/run/netns/NAME`, as `ip netns` and CNI runtimes use them).

use std::{
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use anyhow::{Context as _, Result};

pub(crate) const NETNS_DIR: &str = "/var/run/netns";

/// `ip netns add` sets up the shared bind mount of `/var/run/netns` on first use; two of them
/// racing on a fresh machine may stack mounts, so one process adds namespaces one at a time.
static ADD_LOCK: Mutex<()> = Mutex::new(());

pub(crate) fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub(crate) fn add(name: &str) -> Result<PathBuf> {
    let _g = ADD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    run_cmd(Command::new("ip").args(["netns", "add", name]))?;
    Ok(path_of(name))
}

/// Deletes a named netns; a missing one is not an error (cleanup is idempotent).
pub(crate) fn delete(name: &str) -> Result<()> {
    if !path_of(name).exists() {
        return Ok(());
    }
    run_cmd(Command::new("ip").args(["netns", "delete", name]))?;
    Ok(())
}

/// Runs `f` on a fresh thread that joined the namespace at `path`; a panic in `f` is re-raised
/// in the caller, so assertions inside behave as if they ran in place.
pub(crate) fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    std::thread::scope(|s| {
        let h = s.spawn(|| -> Result<T> {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {}", path.display()))?;
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Runs a command, returns its stdout, and turns a non-zero exit into an error with stderr.
pub(crate) fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns exec NAME program args...`: the netns plus a matching `/sys`, as tools expect.
pub(crate) fn exec(name: &str, program: &str, args: &[&str]) -> Result<String> {
    run_cmd(
        Command::new("ip")
            .args(["netns", "exec", name, program])
            .args(args),
    )
}
