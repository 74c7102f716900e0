//! What `/proc` tells: which processes hold which sockets, and which network namespaces exist.

use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// A process that holds a socket.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Owner {
    pub pid: u32,
    /// Command name (`/proc/PID/comm`); `null` when the process exited while being read.
    pub comm: Option<String>,
    /// Real uid (first field of `Uid:` in `/proc/PID/status`).
    pub uid: Option<u32>,
    /// cgroup v2 path (the `0::` line of `/proc/PID/cgroup`), or the first v1 line's path.
    pub cgroup: Option<String>,
}

/// Socket inode -> the processes that have it open, sorted by pid.
pub type Owners = HashMap<u64, Vec<Owner>>;

/// Reads every process's file descriptors and maps the socket inodes among `wanted` to their
/// owners. Processes that exit during the walk are skipped; a socket whose only owner exited is
/// then missing from the map.
///
/// Socket inodes are unique across network namespaces (they live in the one sockfs), so one walk
/// serves every namespace.
pub fn socket_owners(proc_root: &Path, wanted: &std::collections::HashSet<u64>) -> Owners {
    let mut owners: Owners = HashMap::new();
    if wanted.is_empty() {
        return owners;
    }
    let Ok(entries) = fs::read_dir(proc_root) else {
        return owners;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let pid_dir = entry.path();
        let Ok(fds) = fs::read_dir(pid_dir.join("fd")) else {
            continue;
        };
        let mut matched: Vec<u64> = Vec::new();
        let mut buf = pid_dir.join("fd");
        for fd in fds.flatten() {
            buf.push(fd.file_name());
            let inode = fs::read_link(&buf).ok().and_then(|l| socket_inode(&l));
            buf.pop();
            // One process may hold a socket through several descriptors.
            if let Some(inode) = inode.filter(|i| wanted.contains(i) && !matched.contains(i)) {
                matched.push(inode);
            }
        }
        if matched.is_empty() {
            continue;
        }
        let owner = Owner {
            pid,
            comm: fs::read_to_string(pid_dir.join("comm"))
                .ok()
                .map(|s| s.trim_end().to_owned()),
            uid: fs::read_to_string(pid_dir.join("status"))
                .ok()
                .and_then(|s| status_uid(&s)),
            cgroup: fs::read_to_string(pid_dir.join("cgroup"))
                .ok()
                .and_then(|s| cgroup_path(&s)),
        };
        for inode in matched {
            owners.entry(inode).or_default().push(owner.clone());
        }
    }
    for list in owners.values_mut() {
        list.sort();
    }
    owners
}

/// The first `(pid, fd)` among `pids` through which socket `inode` is open.
pub fn socket_fd(pids: &[u32], inode: u64) -> Option<(u32, i32)> {
    for pid in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|l| socket_inode(&l) == Some(inode)) {
                if let Some(n) = fd.file_name().to_str().and_then(|n| n.parse().ok()) {
                    return Some((*pid, n));
                }
            }
        }
    }
    None
}

fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn status_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The cgroup v2 path; on a v1-only host, the first hierarchy's.
pub(crate) fn cgroup_path(cgroup: &str) -> Option<String> {
    let mut first = None;
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" {
            return Some(path.to_owned());
        }
        first.get_or_insert_with(|| path.to_owned());
    }
    first
}

/// A network namespace found on the node, with every path that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundNetns {
    pub inode: u64,
    /// Named paths first (`/var/run/netns/NAME`, the operator's), then `/proc/PID/ns/net`.
    pub paths: Vec<PathBuf>,
}

/// Every network namespace on the node: named ones under `netns_dir` and those of every process
/// under `proc_root`, each once, keyed by inode.
pub fn all_netns(proc_root: &Path, netns_dir: &Path) -> BTreeMap<u64, FoundNetns> {
    let mut found: BTreeMap<u64, FoundNetns> = BTreeMap::new();
    let mut add = |inode: u64, path: PathBuf| {
        found
            .entry(inode)
            .or_insert_with(|| FoundNetns {
                inode,
                paths: Vec::new(),
            })
            .paths
            .push(path)
    };
    if let Ok(entries) = fs::read_dir(netns_dir) {
        let mut names: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        for path in names {
            // A name whose namespace is gone is left as an empty regular file: not nsfs.
            if let Ok(inode) = netns_inode(&path) {
                add(inode, path);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(proc_root) {
        let mut pids: Vec<u32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        for pid in pids {
            let path = proc_root.join(pid.to_string()).join("ns/net");
            // Kernel threads have no readable ns link; exited processes are simply skipped.
            if let Some(inode) = fs::read_link(&path).ok().and_then(|l| ns_link_inode(&l)) {
                add(inode, path);
            }
        }
    }
    found
}

fn ns_link_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Inode of the network namespace at `path`, checking that it is one.
pub fn netns_inode(path: &Path) -> io::Result<u64> {
    let f = fs::File::open(path)?;
    check_netns(&f)?;
    Ok(f.metadata()?.ino())
}

/// Fails with `InvalidInput` unless `f` is a network namespace file.
pub fn check_netns(f: &fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let st = nix::sys::statfs::fstatfs(f).map_err(io::Error::from)?;
    if st.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a namespace file",
        ));
    }
    // NS_GET_NSTYPE = _IO(0xb7, 0x3)
    // SAFETY: the ioctl takes no argument and only reads the descriptor's namespace.
    let ty = unsafe { libc::ioctl(f.as_raw_fd(), 0xb703) };
    if ty < 0 {
        return Err(io::Error::last_os_error());
    }
    if ty != libc::CLONE_NEWNET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a network namespace",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_lines() {
        assert_eq!(
            cgroup_path("12:cpu:/a\n0::/kubepods/pod1\n").as_deref(),
            Some("/kubepods/pod1")
        );
        assert_eq!(
            cgroup_path("12:cpu:/a\n11:memory:/b\n").as_deref(),
            Some("/a")
        );
    }

    #[test]
    fn links() {
        assert_eq!(socket_inode(Path::new("socket:[1234]")), Some(1234));
        assert_eq!(socket_inode(Path::new("pipe:[1234]")), None);
        assert_eq!(
            ns_link_inode(Path::new("net:[4026531840]")),
            Some(4026531840)
        );
    }
}
