//! Machine-wide bookkeeping under `/run/redirect-testbed`, shared by every test process.
//!
//! Several test binaries (and many test threads) build nodes at the same time, and a test
//! process killed with SIGKILL never runs its destructors. So every node records its owner
//! (pid plus start time, which survives pid reuse) in `nodes/<id>/owner`, subnets are taken
//! with `O_EXCL` lock files in `subnets/<X>`, and anything whose owner is dead may be swept.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};

/// Root of the bookkeeping tree; on tmpfs so a reboot clears it along with the netns.
pub(crate) const STATE_DIR: &str = "/run/redirect-testbed";
/// Name prefix of every netns and cgroup this crate creates.
pub(crate) const PREFIX: &str = "rdt-";
/// `198.18.0.0/15` split into `/24`s.
pub(crate) const SUBNETS: u16 = 512;

pub(crate) fn nodes_dir() -> PathBuf {
    Path::new(STATE_DIR).join("nodes")
}

pub(crate) fn subnets_dir() -> PathBuf {
    Path::new(STATE_DIR).join("subnets")
}

/// Identity of a live process that cannot be confused with a later process reusing its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pub pid: u32,
    pub start_time: u64,
}

impl Owner {
    pub fn current() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        }
    }

    pub fn is_alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }

    pub fn encode(&self) -> String {
        format!("{} {}", self.pid, self.start_time)
    }

    pub fn parse(s: &str) -> Option<Owner> {
        let mut it = s.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        let start_time = it.next()?.parse().ok()?;
        Some(Owner { pid, start_time })
    }
}

/// Field 22 of `/proc/PID/stat` (clock ticks since boot).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

pub(crate) fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: buf is valid for 8 bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 8 {
        u64::from_ne_bytes(buf)
    } else {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
    }
}

/// A node's run directory `nodes/<id>`; the id is unique among all runs on the machine
/// because `create_dir` refuses an existing name.
pub(crate) fn create_node_dir() -> Result<(String, PathBuf)> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    fs::create_dir_all(nodes_dir())
        .with_context(|| format!("creating {}", nodes_dir().display()))?;
    // Children spawned as uid 1337 must reach files that tests place in a node's directory.
    for d in [Path::new(STATE_DIR).to_path_buf(), nodes_dir()] {
        let _ = fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    }
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // Short ids keep netns names readable: pid, per-process counter, two random digits.
        let id = format!(
            "{}{}{:0>2}",
            base36(u64::from(std::process::id())),
            base36(u64::from(n)),
            base36(random_u64() % (36 * 36)),
        );
        let dir = nodes_dir().join(&id);
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::write(dir.join("owner"), Owner::current().encode())
                    .with_context(|| format!("writing owner of {}", dir.display()))?;
                let _ =
                    fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755));
                return Ok((id, dir));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
}

/// Whether the run `id` is still owned by a live process. A run directory without an owner
/// file is only considered dead after a grace period: its creator may be about to write it.
pub(crate) fn run_alive(id: &str) -> bool {
    let dir = nodes_dir().join(id);
    match fs::read_to_string(dir.join("owner")) {
        Ok(s) => Owner::parse(&s).is_some_and(|o| o.is_alive()),
        Err(_) => match fs::metadata(&dir).and_then(|m| m.modified()) {
            Ok(mtime) => mtime.elapsed().unwrap_or_default() < Duration::from_secs(30),
            // No run directory at all: created resources always outlive their directory only
            // when their owner died mid-cleanup, so they are stale.
            Err(_) => false,
        },
    }
}

/// A held subnet index; the lock file is removed on drop.
#[derive(Debug)]
pub(crate) struct SubnetLease {
    pub index: u16,
    path: PathBuf,
    content: String,
}

impl SubnetLease {
    /// Removes the lock file, unless a sweep already did and another node took the index.
    pub fn release(&mut self) {
        if fs::read_to_string(&self.path).is_ok_and(|c| c == self.content) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Drop for SubnetLease {
    fn drop(&mut self) {
        self.release();
    }
}

/// Takes the first subnet index that no live node holds.
///
/// Allocation happens under a machine-wide `flock`, so reclaiming a stale entry (remove, then
/// create) cannot race with another allocator that read the same stale owner.
pub(crate) fn allocate_subnet(run_id: &str) -> Result<SubnetLease> {
    let dir = subnets_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))
        .context("opening subnet allocation lock")?;
    // SAFETY: flock on an fd we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error()).context("flock subnet allocation lock");
    }
    let content = format!("{} {}\n", Owner::current().encode(), run_id);
    for index in 0..SUBNETS {
        let path = dir.join(index.to_string());
        let file = match create_excl(&path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                let owner = Owner::parse(&holder);
                if owner.is_some_and(|o| o.is_alive()) {
                    None
                } else if owner.is_none() && recently_modified(&path) {
                    // Written by `create_excl` an instant ago and not filled yet: impossible
                    // under the lock unless a crashed writer left it empty; wait it out.
                    None
                } else {
                    // The dead run may still have netns with these addresses: remove them
                    // first so the datapath never sees two pods with one IP.
                    if let Some(stale_run) = holder.split_whitespace().nth(2) {
                        crate::sweep::sweep_run(stale_run);
                    }
                    let _ = fs::remove_file(&path);
                    create_excl(&path).ok()
                }
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        };
        if let Some(mut f) = file {
            f.write_all(content.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            return Ok(SubnetLease {
                index,
                path,
                content,
            });
        }
    }
    anyhow::bail!("all {SUBNETS} test subnets of 198.18.0.0/15 are held by live nodes")
}

fn recently_modified(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .map(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(5))
        .unwrap_or(false)
}

fn create_excl(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
}

/// Subnet lock files owned by `run_id` (used when sweeping a dead run).
pub(crate) fn subnets_of(run_id: &str) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(subnets_dir()) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            fs::read_to_string(e.path())
                .ok()
                .is_some_and(|s| s.split_whitespace().nth(2) == Some(run_id))
        })
        .map(|e| e.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_roundtrip_and_liveness() {
        let me = Owner::current();
        assert!(me.start_time > 0);
        assert!(me.is_alive());
        assert_eq!(Owner::parse(&me.encode()), Some(me));
        let dead = Owner {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!dead.is_alive());
    }

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
    }
}
