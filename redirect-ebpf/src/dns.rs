//! DNS capture (per pod, off unless `PodConfig::dns_capture`): the application's DNS goes to
//! the proxy's DNS port on loopback (Istio's `ISTIO_META_DNS_CAPTURE`), and its answers come
//! back from the server it asked.
//!
//! - cgroup/sendmsg4/6: an unconnected UDP datagram to port 53 is sent to the proxy's DNS port
//!   instead, at a local address of its server's own on that socket ([`claim`]): IPv4, one of
//!   127.128.0.0/12 (from `addr::spread4` of the server on); IPv6, one of the eight reply
//!   addresses the agent assigns to the pod's `lo` (`redirect_common::DNS_POOL6_BASE`,
//!   `100::53:0/125`). `DNS_REPLIES` remembers, by socket and that address, which server it was.
//! - connect4/6 (in `connect`): a UDP socket connected to port 53 is connected to the same
//!   place, and a TCP connection to port 53 goes to the proxy's DNS port at `127.0.0.1`/`::1`
//!   (its `CONN_ORIG` kind is `Dns`).
//! - cgroup/recvmsg4/6: a datagram from the proxy's DNS port at such an address is reported as
//!   coming from the server the socket sent to there, so one socket asking two servers gets each
//!   answer from the right one (keyed by socket *and* address, and no two servers of one socket
//!   share an address while it asks at most `DNS_PROBES` of them).
//! - getpeername (in `peername`): a connected socket's peer is the server it asked.
//!
//! Why IPv6 needs assigned addresses: a DNS server bound to the wildcard (dnsmasq, Envoy's
//! DNS filter, CoreDNS) answers from the address the query reached, set with `IPV6_PKTINFO`,
//! and the kernel refuses that source with `EINVAL` unless it is assigned to an interface (or
//! the socket may bind non-local addresses); an address that is local only through the
//! `100::/64` route is not. IPv4 has no such check: any 127/8 address is a valid source.
//!
//! The proxy's own queries (its uid) are never captured, nor queries to loopback. No conntrack
//! is involved.
//!
//! A DNS server that does not take datagrams at those addresses (bound to `127.0.0.1`/`::1`
//! only, as istio-agent's `localhost:15053` is) gets them at loopback instead ([`claim`] asks
//! the kernel with `bpf_sk_lookup_udp` first); its replies then all come from loopback, and the
//! last server a socket asked names them.
//!
//! # Minimum kernel version
//! 5.2 for the recvmsg hooks (4.18 for sendmsg); `bpf_get_socket_cookie` and `bpf_sk_lookup_udp`
//! in sock_addr programs are 5.0, LRU hash maps 4.10, bounded loops (the probe over candidates)
//! 5.3.

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Tuple4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as Tuple6, BPF_F_CURRENT_NETNS, BPF_NOEXIST,
    },
    helpers::{
        bpf_get_current_uid_gid,
        generated::{bpf_get_socket_cookie, bpf_sk_lookup_udp, bpf_sk_release},
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{
    pod_flags, Counter, DnsKey, DnsOrig, PodConfig, AF_INET, AF_INET6, DNS_POOL6_BASE,
    DNS_POOL6_LEN, DNS_PROBES,
};

use crate::{
    addr::{loopback, spread4, spread6, Addr},
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

/// Where this socket's query to `dst` goes (the proxy's DNS port at the address returned), with
/// `DNS_REPLIES` saying, under this socket and that address, that replies from there are
/// `dst`'s. Candidates are tried in order: one that already names `dst` for this socket is
/// used again, a free one is taken (`NOEXIST`: two threads of one socket racing for it cannot
/// both win); so up to [`DNS_PROBES`] servers of one socket each get an address of their own.
/// A socket asking more at once takes `dst`'s first candidate from whichever server held it
/// (the last server asked names those replies). IPv6 without the reply addresses
/// (no [`pod_flags::DNS_POOL6`]) has `::1` only. `None`: the map refused.
#[inline(always)]
pub fn claim(sa: *mut bpf_sock_addr, cfg: &PodConfig, dst: &Addr) -> Option<Addr> {
    // SAFETY: `sa` is the running sock_addr program's context, which the helper takes.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let value = DnsOrig {
        addr: dst.words,
        family: dst.family as u32,
        port: DNS_PORT,
        dns_port: cfg.dns_port(),
    };
    // One address only: IPv6 without the reply addresses, or a DNS server that does not take
    // datagrams at the spread addresses (bound to 127.0.0.1 / ::1, as istio-agent's
    // `localhost:15053` is, not to the wildcard). Its replies come from loopback, so the last
    // server asked on the socket names them.
    if (dst.family != AF_INET && cfg.enrolled & pod_flags::DNS_POOL6 == 0)
        || !udp_listener_at(sa, &candidate(dst, 0), cfg.dns_port())
    {
        let to = loopback(dst.family);
        return DNS_REPLIES
            .insert(key(cookie, &to), value, 0)
            .is_ok()
            .then_some(to);
    }
    let mut i = 0;
    while i < DNS_PROBES {
        let to = candidate(dst, i);
        let k = key(cookie, &to);
        // SAFETY: a hash map value, compared at once.
        match unsafe { DNS_REPLIES.get(k) } {
            Some(held) if *held == value => return Some(to),
            Some(_) => {}
            None => {
                if DNS_REPLIES.insert(k, value, BPF_NOEXIST.into()).is_ok() {
                    return Some(to);
                }
                // Another thread's query on this socket took it just now: for this server?
                // SAFETY: as above.
                if unsafe { DNS_REPLIES.get(k) }.is_some_and(|held| *held == value) {
                    return Some(to);
                }
            }
        }
        i += 1;
    }
    let to = candidate(dst, 0);
    DNS_REPLIES
        .insert(key(cookie, &to), value, 0)
        .is_ok()
        .then_some(to)
}

/// Whether a UDP socket of this namespace takes datagrams sent to `to` at `port` (the proxy's
/// DNS server bound to the wildcard, or to `to` itself): the kernel's own lookup
/// (`bpf_sk_lookup_udp`, sock_addr programs since 5.0), from loopback port 53.
#[inline(always)]
fn udp_listener_at(sa: *mut bpf_sock_addr, to: &Addr, port: u16) -> bool {
    // SAFETY: an all-zero tuple is a valid value of the plain-integer union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let netns = BPF_F_CURRENT_NETNS as u64;
    let sk = if to.family == AF_INET {
        tuple.__bindgen_anon_1.ipv4 = Tuple4 {
            saddr: loopback(AF_INET).words[0],
            daddr: to.words[0],
            sport: DNS_PORT.to_be(),
            dport: port.to_be(),
        };
        // SAFETY: `sa` is the context, `tuple` an initialised stack tuple of the size given.
        unsafe {
            bpf_sk_lookup_udp(
                sa.cast(),
                &mut tuple,
                core::mem::size_of::<Tuple4>() as u32,
                netns,
                0,
            )
        }
    } else {
        tuple.__bindgen_anon_1.ipv6 = Tuple6 {
            saddr: loopback(AF_INET6).words,
            daddr: to.words,
            sport: DNS_PORT.to_be(),
            dport: port.to_be(),
        };
        // SAFETY: as above.
        unsafe {
            bpf_sk_lookup_udp(
                sa.cast(),
                &mut tuple,
                core::mem::size_of::<Tuple6>() as u32,
                netns,
                0,
            )
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket the lookup returned, released once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// Candidate `i` for a query to `dst`. IPv4: the `i`-th address of 127.128.0.0/12 after the
/// server's own (`spread4`). IPv6: the pool's address `(h + i) mod 8`, `h` a hash of the
/// server, so different servers of different sockets rarely start on the same one.
#[inline(always)]
fn candidate(dst: &Addr, i: u32) -> Addr {
    if dst.family == AF_INET {
        let own = u32::from_be(spread4(dst.words[0], DNS_PORT).words[0]);
        let host = own.wrapping_add(i) & SPREAD4_HOST_MASK;
        Addr::v4(((own & !SPREAD4_HOST_MASK) | host).to_be())
    } else {
        let h = u32::from_be(spread6(dst.words, DNS_PORT).words[3]);
        let n = (h.wrapping_add(i)) % DNS_POOL6_LEN;
        Addr::v6([POOL6_W0, POOL6_W1, POOL6_W2, (POOL6_W3_HOST + n).to_be()])
    }
}

/// Host bits of 127.128.0.0/12 (`addr::spread4`).
const SPREAD4_HOST_MASK: u32 = 0x000f_ffff;
/// [`DNS_POOL6_BASE`] as the kernel's network-order words (the last in host order, to add to).
const POOL6_W0: u32 = u32::from_ne_bytes([
    DNS_POOL6_BASE[0],
    DNS_POOL6_BASE[1],
    DNS_POOL6_BASE[2],
    DNS_POOL6_BASE[3],
]);
const POOL6_W1: u32 = u32::from_ne_bytes([
    DNS_POOL6_BASE[4],
    DNS_POOL6_BASE[5],
    DNS_POOL6_BASE[6],
    DNS_POOL6_BASE[7],
]);
const POOL6_W2: u32 = u32::from_ne_bytes([
    DNS_POOL6_BASE[8],
    DNS_POOL6_BASE[9],
    DNS_POOL6_BASE[10],
    DNS_POOL6_BASE[11],
]);
const POOL6_W3_HOST: u32 = u32::from_be_bytes([
    DNS_POOL6_BASE[12],
    DNS_POOL6_BASE[13],
    DNS_POOL6_BASE[14],
    DNS_POOL6_BASE[15],
]);

#[inline(always)]
fn key(cookie: u64, to: &Addr) -> DnsKey {
    DnsKey {
        cookie,
        addr: to.words,
        family: to.family as u32,
        _pad: 0,
    }
}

/// The `DNS_REPLIES` key of this socket and `to`.
#[inline(always)]
fn socket_key(sa: *mut bpf_sock_addr, to: &Addr) -> DnsKey {
    // SAFETY: `sa` is the running sock_addr program's context, which the helper takes.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    key(cookie, to)
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
    if let Some(to) = claim(sa, cfg, &dst) {
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
    // Loopback (IPv4 and `::1`) or the IPv6 reply addresses (in the spread prefix).
    if !src.is_local() {
        return;
    }
    // SAFETY: `sa` is the context; user_port is readable in recvmsg hooks.
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    // SAFETY: a hash map value, copied at once.
    let Some(orig) = (unsafe { DNS_REPLIES.get(socket_key(sa, &src)) }).copied() else {
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
