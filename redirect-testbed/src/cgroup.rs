//! cgroup v2 directories for pods.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// The cgroup v2 mount point, read from `/proc/self/mounts`.
///
/// Hybrid hosts mount v2 somewhere other than `/sys/fs/cgroup` (this project's machines use
/// `/sys/fs/cgroup/unified`), so the location is never assumed.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
        })
        .next()
        .context("no cgroup2 filesystem in /proc/self/mounts")
}

/// `/proc/self/mounts` escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory under which every test pod's cgroup lives.
pub(crate) fn testbed_root() -> Result<PathBuf> {
    Ok(cgroup2_mount()?.join("redirect-testbed"))
}

/// Kills every process in `dir` (and its children cgroups) and removes the directory tree.
///
/// `cgroup.kill` (Linux 5.14) kills atomically, also processes forking right now; on older
/// kernels the pids are SIGKILLed one by one until the cgroup is empty.
pub(crate) fn kill_and_remove(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = kill_and_remove(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let kill_file = dir.join("cgroup.kill");
    let has_kill = kill_file.exists();
    loop {
        let procs = pids(dir);
        if procs.is_empty() {
            match fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                // A killed task leaves the cgroup only once it has fully exited.
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => {}
            }
        } else if has_kill {
            let _ = fs::write(&kill_file, "1");
        } else {
            for pid in procs {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if Instant::now() >= deadline {
            return fs::remove_dir(dir);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Pids listed in `cgroup.procs`.
pub(crate) fn pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_cgroup2_mount() {
        let m = cgroup2_mount().unwrap();
        assert!(m.join("cgroup.procs").exists(), "{}", m.display());
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mount_path(r"/a\040b"), "/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }
}
