//! cgroup v2 directories: checking one, naming it by id, finding its processes.

use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Why a path is not usable as a pod's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}")]
    Io { path: PathBuf, source: io::Error },
    /// A cgroup v1 hierarchy: BPF programs attach to cgroup v2 only.
    #[error("cgroup {0} is a cgroup v1 directory; redirect needs a cgroup v2 directory")]
    V1(PathBuf),
    #[error("{0} is not a cgroup directory (not on a cgroup2 filesystem)")]
    NotCgroup(PathBuf),
}

/// Checks that `path` is a cgroup v2 directory and returns its id (the inode number, which is
/// what `bpf_get_current_cgroup_id` returns for it).
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    let io = |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Err(CgroupError::NotCgroup(path.to_owned()));
    }
    let st = nix::sys::statfs::statfs(path).map_err(|e| io(e.into()))?;
    match st.filesystem_type().0 as i64 {
        CGROUP2_SUPER_MAGIC => Ok(meta.ino()),
        CGROUP_SUPER_MAGIC => Err(CgroupError::V1(path.to_owned())),
        TMPFS_MAGIC if path.join("cgroup.procs").exists() => Err(CgroupError::V1(path.to_owned())),
        _ => Err(CgroupError::NotCgroup(path.to_owned())),
    }
}

/// Pids of every process in the cgroup and its descendants.
pub fn pids(path: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}
