//! cgroup/getpeername4 and cgroup/getpeername6: a redirected socket's peer is its original
//! destination, as under iptables `REDIRECT` (NAT keeps the socket's addresses).
//!
//! The connect hook sent the socket to the proxy's listener on loopback and kept the original
//! destination in the socket's own storage (`CONN_ORIG`, until the socket closes); the kernel
//! calls this hook after it filled in the real peer, so the answer is replaced only when the
//! real peer is still the proxy's listener of the pod the socket was redirected for. A socket
//! whose storage is stale (a captured connect() that failed before its SYN, then a connect()
//! elsewhere) keeps its true peer.
//!
//! The kernel only runs the hook for a connected socket (it answers `ENOTCONN` before), and
//! ignores its verdict: it can rewrite the address, never refuse the call.
//!
//! A dual-stack socket (`AF_INET6`, redirected as the IPv4 connection it is) gets its IPv4
//! original destination back as `::ffff:a.b.c.d`, the form it connected to.
//!
//! # Minimum kernel version
//! 5.8: the `BPF_CGROUP_INET{4,6}_GETPEERNAME` attach types (1b66d253610c); socket storage in
//! sock_addr programs is 5.3 (`storage`).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::{ConnKind, Counter, AF_INET, AF_INET6};

use crate::{
    addr::Addr,
    maps::CONN_ORIG,
    pod::{config, count},
};

const ALLOW: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn rd_getpeername4(ctx: SockAddrContext) -> i32 {
    on_getpeername(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn rd_getpeername6(ctx: SockAddrContext) -> i32 {
    on_getpeername(&ctx, AF_INET6);
    ALLOW
}

#[inline(always)]
fn on_getpeername(ctx: &SockAddrContext, family: u16) {
    let sa = ctx.sock_addr;
    let sk = crate::connect::sock_of(sa);
    // SAFETY: `sk` of a sock_addr context is a full socket (PTR_TO_SOCKET, never null).
    let Some(orig) = (unsafe { CONN_ORIG.get(sk) }) else {
        return;
    };
    let Some((_, cfg)) = config(orig.slot) else {
        return; // The pod was unenrolled: nothing vouches for the stored value any more.
    };
    let listener = match orig.kind {
        ConnKind::Outbound => cfg.proxy_outbound_port,
        ConnKind::ProxySelf => cfg.proxy_inbound_port,
        ConnKind::Dns => cfg.dns_port(),
        ConnKind::Delivery | ConnKind::Inbound => return,
    };
    let peer = crate::connect::read_dst(sa, family);
    // SAFETY: `sa` is the context; user_port is readable in getpeername hooks.
    let peer_port = u16::from_be(unsafe { (*sa).user_port } as u16);
    if !peer.is_local() || peer_port != listener {
        return;
    }
    crate::connect::write_dst(
        sa,
        Addr {
            words: orig.addr,
            family: orig.family,
        },
        orig.port,
        family,
    );
    count(orig.slot, Counter::PeernameRewritten);
}
