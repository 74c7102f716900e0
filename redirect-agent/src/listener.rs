//! Adopting the inbound listener of a proxy that was already listening when its pod was
//! enrolled: sock_ops only sees listen() calls made after enrolment, so the agent fetches the
//! socket from the proxy process (pidfd_getfd) and puts it into the listener map itself.
//!
//! # Minimum kernel version
//! 5.6 (`pidfd_getfd`).

use std::{
    fs, io,
    os::fd::{FromRawFd as _, OwnedFd},
};

use redirect_common::{ListenerKey, AF_INET, AF_INET6};

use crate::{cgroup, datapath::Datapath, netns, state::PodRecord};

/// A listening TCP socket, as `/proc/net/tcp{,6}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening {
    pub inode: u64,
    pub family: u16,
}

/// Listening sockets on `port` in the calling thread's network namespace.
fn listening_on(port: u16) -> Vec<Listening> {
    let mut out = Vec::new();
    for (file, family) in [("tcp", AF_INET), ("tcp6", AF_INET6)] {
        // thread-self: /proc/self/net follows the thread group leader, not this setns'd thread.
        let Ok(text) = fs::read_to_string(format!("/proc/thread-self/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let Some(p) = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
            else {
                continue;
            };
            if p == port {
                if let Ok(inode) = f[9].parse() {
                    out.push(Listening { inode, family });
                }
            }
        }
    }
    out
}

/// Finds (pid, fd) holding socket `inode` among `pids` owned by `uid`.
fn owner(pids: &[u32], uid: u32, inode: u64) -> Option<(u32, i32)> {
    let target = format!("socket:[{inode}]");
    for pid in pids {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let real_uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if real_uid != Some(uid) {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                if let Some(n) = fd.file_name().to_str().and_then(|n| n.parse().ok()) {
                    return Some((*pid, n));
                }
            }
        }
    }
    None
}

fn pidfd_getfd(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls; the returned fds are new and owned here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let sock = libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        );
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(sock as i32))
    }
}

/// Puts the running proxy's inbound listeners into the listener map; returns how many.
pub fn adopt(dp: &mut Datapath, rec: &PodRecord) -> io::Result<usize> {
    let port = rec.spec.proxy_inbound_port;
    let sockets =
        netns::run_at(&rec.spec.netns, || listening_on(port)).map_err(io::Error::other)?;
    if sockets.is_empty() {
        return Ok(0);
    }
    let pids = cgroup::pids(&rec.spec.cgroup);
    let mut adopted = 0;
    let mut map = dp.listeners().map_err(io::Error::other)?;
    for s in sockets {
        let Some((pid, fd)) = owner(&pids, rec.spec.proxy_uid, s.inode) else {
            continue;
        };
        let sock = pidfd_getfd(pid, fd)?;
        let key = ListenerKey {
            slot: rec.slot,
            family: s.family as u32,
        };
        map.insert(key, std::os::fd::AsRawFd::as_raw_fd(&sock), 0)
            .map_err(io::Error::other)?;
        adopted += 1;
    }
    Ok(adopted)
}
