//! Adopting the inbound listener of a proxy that was already listening when its pod was
//! enrolled: sock_ops only sees listen() calls made after enrolment, so the agent fetches the
//! socket from the proxy process (pidfd_getfd) and puts it into the listener map itself.
//!
//! # Minimum kernel version
//! 5.6 (`pidfd_getfd`).

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

use redirect_common::{ListenerKey, AF_INET, AF_INET6};

use crate::{
    cgroup,
    datapath::Datapath,
    detect::{
        procs,
        sockdiag::{self, Protocol, SockDiagError},
    },
    netns,
    state::PodRecord,
};

/// The proxy's listening TCP sockets on `port` in the calling thread's network namespace, by
/// sock_diag (which names each socket's inode and creator uid), as `(inode, family)`.
fn listening_on(port: u16, uid: u32) -> Result<Vec<(u64, u16)>, SockDiagError> {
    Ok(sockdiag::dump_tcp_listeners()?
        .into_iter()
        .filter(|s| s.protocol == Protocol::Tcp && s.port == port && s.uid == uid)
        .map(|s| {
            let family = if s.address.is_ipv4() {
                AF_INET
            } else {
                AF_INET6
            };
            (s.inode, family)
        })
        .collect())
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
    let uid = rec.spec.proxy_uid;
    let sockets = netns::run_at(&rec.spec.netns, || listening_on(port, uid))
        .map_err(io::Error::other)?
        .map_err(io::Error::other)?;
    if sockets.is_empty() {
        return Ok(0);
    }
    let pids = cgroup::pids(&rec.spec.cgroup);
    let mut adopted = 0;
    let mut map = dp.listeners().map_err(io::Error::other)?;
    for (inode, family) in sockets {
        let Some((pid, fd)) = procs::socket_fd(&pids, inode) else {
            continue;
        };
        let sock = pidfd_getfd(pid, fd)?;
        let key = ListenerKey {
            slot: rec.slot,
            family: u32::from(family),
        };
        map.insert(key, std::os::fd::AsRawFd::as_raw_fd(&sock), 0)
            .map_err(io::Error::other)?;
        adopted += 1;
    }
    Ok(adopted)
}
