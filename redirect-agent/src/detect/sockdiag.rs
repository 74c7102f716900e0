//! Listening sockets of the calling thread's network namespace, from the kernel's sock_diag
//! netlink interface (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY` with `inet_diag_req_v2`).
//!
//! A netlink socket belongs to the network namespace its creator was in, and sock_diag only dumps
//! sockets of that namespace: create the socket on a thread that has joined the namespace.
//!
//! This is raw netlink over `libc` rather than a netlink crate: two request shapes and one
//! attribute (`INET_DIAG_SKV6ONLY`) are all that is needed, the wire format is stable kernel ABI,
//! and it keeps the agent free of a family of crates whose versions move together.
//!
//! # Minimum kernel version
//! sock_diag for TCP: 3.3; UDP: 3.3; `INET_DIAG_SKV6ONLY`: 4.1 (older kernels omit the
//! attribute and an IPv6 socket is then reported as dual-stack).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// Transport protocol of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One socket as sock_diag reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    pub protocol: Protocol,
    pub address: IpAddr,
    pub port: u16,
    /// `IPV6_V6ONLY` for IPv6 sockets; always false for IPv4 ones.
    pub v6only: bool,
    /// Socket inode, the key to its owners in `/proc/PID/fd`.
    pub inode: u64,
    /// uid that created the socket.
    pub uid: u32,
}

/// Failure to read sockets through sock_diag.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    /// The netlink socket could not be created (no sock_diag in this kernel, or no permission).
    #[error("cannot open a NETLINK_SOCK_DIAG socket: {0}")]
    Socket(#[source] io::Error),
    /// Sending the dump request failed.
    #[error("cannot send the sock_diag request: {0}")]
    Send(#[source] io::Error),
    /// Receiving the dump failed, or the kernel answered with an error.
    #[error("sock_diag dump of {what} failed: {source}")]
    Dump {
        what: &'static str,
        source: io::Error,
    },
    /// The kernel's answer did not parse.
    #[error("malformed sock_diag answer for {0}")]
    Malformed(&'static str),
}

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x100 | 0x200;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_SKV6ONLY: u16 = 11;
const TCP_LISTEN: u32 = 10;
/// Unconnected UDP sockets are in `TCP_CLOSE`; connected ones (`TCP_ESTABLISHED`) are clients.
const TCP_CLOSE: u32 = 7;

const NLMSG_HDRLEN: usize = 16;
const INET_DIAG_REQ_V2_LEN: usize = 56;
const INET_DIAG_MSG_LEN: usize = 72;

/// Dumps TCP listeners and bound, unconnected UDP sockets, IPv4 and IPv6, of the calling
/// thread's network namespace.
pub fn dump_listeners() -> Result<Vec<DiagSocket>, SockDiagError> {
    dump_protocols(&[Protocol::Tcp, Protocol::Udp])
}

/// Dumps TCP listeners only, IPv4 and IPv6 (the kernel walks every UDP socket of the machine
/// for a UDP dump: a caller that needs TCP only does not pay for it).
pub fn dump_tcp_listeners() -> Result<Vec<DiagSocket>, SockDiagError> {
    dump_protocols(&[Protocol::Tcp])
}

fn dump_protocols(protocols: &[Protocol]) -> Result<Vec<DiagSocket>, SockDiagError> {
    let sock = open()?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for (what, family, protocol, states) in [
        ("tcp/ipv4", libc::AF_INET, Protocol::Tcp, 1u32 << TCP_LISTEN),
        ("tcp/ipv6", libc::AF_INET6, Protocol::Tcp, 1 << TCP_LISTEN),
        ("udp/ipv4", libc::AF_INET, Protocol::Udp, 1 << TCP_CLOSE),
        ("udp/ipv6", libc::AF_INET6, Protocol::Udp, 1 << TCP_CLOSE),
    ] {
        if !protocols.contains(&protocol) {
            continue;
        }
        dump(
            &sock,
            &mut buf,
            what,
            family as u8,
            protocol,
            states,
            &mut out,
        )?;
    }
    Ok(out)
}

fn open() -> Result<OwnedFd, SockDiagError> {
    // SAFETY: plain socket(2) call; the result is checked before it is wrapped.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(SockDiagError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn dump(
    sock: &OwnedFd,
    buf: &mut [u8],
    what: &'static str,
    family: u8,
    protocol: Protocol,
    states: u32,
    out: &mut Vec<DiagSocket>,
) -> Result<(), SockDiagError> {
    let mut req = [0u8; NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN];
    let total = req.len() as u32;
    req[0..4].copy_from_slice(&total.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let body = &mut req[NLMSG_HDRLEN..];
    body[0] = family;
    body[1] = match protocol {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    };
    body[4..8].copy_from_slice(&states.to_ne_bytes());
    // The kernel fills the port-id of the destination itself (0 = kernel).
    // SAFETY: req is a valid buffer of req.len() bytes; a null address sends to the kernel.
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(SockDiagError::Send(io::Error::last_os_error()));
    }
    loop {
        // SAFETY: buf is a valid writable buffer of buf.len() bytes.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SockDiagError::Dump { what, source: e });
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(msgs[4..6].try_into().unwrap());
            if len < NLMSG_HDRLEN || len > msgs.len() {
                return Err(SockDiagError::Malformed(what));
            }
            let payload = &msgs[NLMSG_HDRLEN..len];
            match ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = payload
                        .get(0..4)
                        .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                        .ok_or(SockDiagError::Malformed(what))?;
                    if errno == 0 {
                        return Ok(());
                    }
                    return Err(SockDiagError::Dump {
                        what,
                        source: io::Error::from_raw_os_error(-errno),
                    });
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(s) = parse_msg(payload, protocol) {
                        out.push(s);
                    } else {
                        return Err(SockDiagError::Malformed(what));
                    }
                }
                _ => {}
            }
            let aligned = (len + 3) & !3;
            msgs = msgs.get(aligned..).unwrap_or(&[]);
        }
    }
}

/// Parses one `inet_diag_msg` and its attributes.
fn parse_msg(p: &[u8], protocol: Protocol) -> Option<DiagSocket> {
    if p.len() < INET_DIAG_MSG_LEN {
        return None;
    }
    let family = p[0];
    // inet_diag_sockid starts at offset 4: sport (be16), dport (be16), src[16], dst[16], ...
    let port = u16::from_be_bytes([p[4], p[5]]);
    let src = &p[8..24];
    let address = if family == libc::AF_INET as u8 {
        IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(src).ok()?))
    };
    let uid = u32::from_ne_bytes(p[64..68].try_into().ok()?);
    let inode = u64::from(u32::from_ne_bytes(p[68..72].try_into().ok()?));
    let mut v6only = false;
    let mut attrs = &p[INET_DIAG_MSG_LEN..];
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        if ty == INET_DIAG_SKV6ONLY && len >= 5 {
            v6only = attrs[4] != 0;
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or(&[]);
    }
    Some(DiagSocket {
        protocol,
        address,
        port,
        v6only,
        inode,
        uid,
    })
}
