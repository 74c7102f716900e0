//! DNS capture (per pod, off unless `PodConfig::dns_capture`): the application's DNS goes to
//! the proxy's DNS port on loopback (Istio's `ISTIO_META_DNS_CAPTURE`), and its answers come
//! back from the server it asked.
//!
//! - cgroup/sendmsg4/6: an unconnected UDP datagram to port 53 is sent to the proxy's DNS port
//!   instead, at a loopback address chosen by the server asked (IPv4: `addr::spread4`, one of
//!   127.128.0.0/12; IPv6: `::1`). `DNS_REPLIES` remembers, by socket and that address, which
//!   server it was.
//! - connect4/6 (in `connect`): a UDP socket connected to port 53 is connected to the same
//!   place, and a TCP connection to port 53 too (its `CONN_ORIG` kind is `Dns`).
//! - cgroup/recvmsg4/6: a datagram from the proxy's DNS port at such an address is reported as
//!   coming from the server the socket sent to there, so one socket asking two servers gets each
//!   answer from the right one (keyed by socket *and* address). IPv6 has one loopback address:
//!   there the last server asked on that socket names the replies.
//! - getpeername (in `peername`): a connected socket's peer is the server it asked.
//!
//! The proxy's own queries (its uid) are never captured, nor queries to loopback. No conntrack
//! is involved.
//!
//! # Minimum kernel version
//! 5.2 for the recvmsg hooks (4.18 for sendmsg); `bpf_get_socket_cookie` in sock_addr programs
//! is 5.0, LRU hash maps 4.10.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_uid_gid, generated::bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{Counter, DnsKey, DnsOrig, PodConfig, AF_INET, AF_INET6};

use crate::{
    addr::{loopback, spread4, Addr},
    connect::{read_dst, write_dst},
    maps::DNS_REPLIES,
    pod::{count, current_pod},
};

const ALLOW: i32 = 1;
pub const DNS_PORT: u16 = 53;

#[cgroup_sock_addr(sendmsg4)]
pub fn rd_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn rd_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, AF_INET6);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn rd_recvmsg4(ctx: SockAddrContext) -> i32 {
    on_recvmsg(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn rd_recvmsg6(ctx: SockAddrContext) -> i32 {
    on_recvmsg(&ctx, AF_INET6);
    ALLOW
}

/// The pod's configuration if the calling task is one of its application's (not its proxy's)
/// and the pod captures DNS.
#[inline(always)]
pub fn dns_pod() -> Option<(u32, &'static PodConfig)> {
    let (slot, cfg) = current_pod()?;
    if cfg.dns_capture == 0 || bpf_get_current_uid_gid() as u32 == cfg.proxy_uid {
        return None;
    }
    Some((slot, cfg))
}

/// Whether a destination is an off-host DNS server the pod's capture takes.
#[inline(always)]
pub fn is_dns(dst: &Addr, port: u16) -> bool {
    port == DNS_PORT && !dst.is_local() && !dst.is_unspecified()
}

/// Where a query to `dst` goes: a loopback address of the server's own (IPv4), `::1` (IPv6).
#[inline(always)]
pub fn target(dst: &Addr) -> Addr {
    if dst.family == AF_INET {
        spread4(dst.words[0], DNS_PORT)
    } else {
        loopback(AF_INET6)
    }
}

/// Remembers that this socket's datagrams to `to` are for `dst`; `false` if the map refused.
#[inline(always)]
pub fn remember(sa: *mut bpf_sock_addr, to: &Addr, dst: &Addr, dns_port: u16) -> bool {
    let key = key(sa, to);
    let value = DnsOrig {
        addr: dst.words,
        family: dst.family as u32,
        port: DNS_PORT,
        dns_port,
    };
    DNS_REPLIES.insert(key, value, 0).is_ok()
}

#[inline(always)]
fn key(sa: *mut bpf_sock_addr, to: &Addr) -> DnsKey {
    // SAFETY: `sa` is the running sock_addr program's context, which the helper takes.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    DnsKey {
        cookie,
        addr: to.words,
        family: to.family as u32,
        _pad: 0,
    }
}

#[inline(always)]
fn on_sendmsg(ctx: &SockAddrContext, sf: u16) {
    let Some((slot, cfg)) = dns_pod() else {
        return;
    };
    let sa = ctx.sock_addr;
    let dst = read_dst(sa, sf).unmapped();
    // SAFETY: `sa` is the context; user_port is readable in sendmsg hooks.
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    if !is_dns(&dst, port) {
        return;
    }
    let to = target(&dst);
    if remember(sa, &to, &dst, cfg.dns_port()) {
        write_dst(sa, to, cfg.dns_port(), sf);
        count(slot, Counter::DnsCaptured);
    } else {
        count(slot, Counter::MapFull);
    }
}

#[inline(always)]
fn on_recvmsg(ctx: &SockAddrContext, sf: u16) {
    let sa = ctx.sock_addr;
    let src = read_dst(sa, sf).unmapped();
    if !src.is_loopback() {
        return;
    }
    // SAFETY: `sa` is the context; user_port is readable in recvmsg hooks.
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    // SAFETY: a hash map value, copied at once.
    let Some(orig) = (unsafe { DNS_REPLIES.get(key(sa, &src)) }).copied() else {
        return;
    };
    if orig.dns_port != port {
        return;
    }
    let server = Addr {
        words: orig.addr,
        family: orig.family as u16,
    };
    write_dst(sa, server, orig.port, sf);
    // The receiving task is the application that asked (its socket's entry matched).
    if let Some((slot, _)) = current_pod() {
        count(slot, Counter::DnsRepliesRewritten);
    }
}
