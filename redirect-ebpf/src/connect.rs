//! cgroup/connect4 and cgroup/connect6: outbound capture and inbound delivery.
//!
//! Every decision of the reference-semantics table that depends on who connects (the proxy, by
//! uid, or the application) is taken here, before the SYN exists: rewriting the destination
//! of a connect() costs no NAT and leaves no conntrack entry.
//!
//! Per-connection state lives in the socket (`CONN_ORIG`, socket-local storage) and is freed
//! with it: a connect() that fails before its SYN leaves nothing behind anywhere else. What a
//! pod may hold in the node-wide `ORIG_DST` is capped per pod (`orig_dst`).
//!
//! A dual-stack `AF_INET6` socket connecting to `::ffff:a.b.c.d` is treated as the IPv4
//! connection the kernel makes of it: IPv4 exclusions, pod addresses and listeners, and an IPv4
//! original destination (`SO_ORIGINAL_DST` at `SOL_IP`), as iptables' IPv4 rules see it.
//!
//! # Minimum kernel version
//! 5.7: the cgroup helpers in sock_addr programs (4.17 for the hooks themselves); socket-local
//! storage needs 5.3 (`storage`).

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_bind, bpf_get_current_uid_gid},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{
    cidr_rule, pod_flags, port_rule, CidrKey4, CidrKey6, ConnKind, Counter, InboundPolicy, OrigDst,
    PodConfig, AF_INET, AF_INET6,
};

use crate::{
    addr::{loopback, spread4, spread6, Addr, SockaddrIn, SockaddrIn6},
    dns,
    maps::{CIDR4, CIDR6, CONN_ORIG},
    orig_dst,
    pod::{count, current_pod, delivery, inbound_captured, is_proxy_port, pod_of_addr, port_rule},
};

const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

#[cgroup_sock_addr(connect4)]
pub fn rd_connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn rd_connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, AF_INET6);
    ALLOW
}

/// Never refuses a connect(): at worst it leaves the destination alone and counts why.
#[inline(always)]
fn on_connect(ctx: &SockAddrContext, family: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context's own `bpf_sock_addr`; `type` is readable in every sock_addr
    // hook.
    let ty = unsafe { (*sa).type_ };
    if ty != SOCK_STREAM {
        if ty == SOCK_DGRAM {
            udp_connect(ctx, family);
        }
        return;
    }
    let Some((slot, cfg)) = current_pod() else {
        return;
    };
    // A dual-stack socket's `::ffff:a.b.c.d` is the IPv4 connection it is: the IPv4 rules,
    // exclusions and pod addresses apply, and the proxy's IPv4 listener gets it.
    let dst = read_dst(sa, family).unmapped();
    // SAFETY: `sa` is the context's own `bpf_sock_addr`; user_port is readable in connect hooks.
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    let uid = bpf_get_current_uid_gid() as u32;
    if uid == cfg.proxy_uid {
        proxy_connect(ctx, slot, cfg, dst, port, family);
    } else {
        app_connect(ctx, slot, cfg, dst, port, family);
    }
}

/// The application's connections: everything off-pod goes to the outbound listener.
/// `sf` is the socket's family; `dst.family` the connection's (IPv4 for a mapped address).
#[inline(always)]
fn app_connect(ctx: &SockAddrContext, slot: u32, cfg: &PodConfig, dst: Addr, port: u16, sf: u16) {
    // Loopback (and the spread prefix) and the pod's own address are the application talking
    // to itself.
    if dst.is_local() || dst.is_unspecified() || pod_of_addr(&dst) == Some(slot) {
        return;
    }
    if cfg.dns_capture != 0 && dns::is_dns(&dst, port) {
        // DNS over TCP goes to the proxy's DNS port, before any exclusion (as Istio's rules),
        // at 127.0.0.1 / ::1: a DNS server bound to the wildcard accepts TCP only at an
        // address of one of its interfaces (dnsmasq does), and TCP needs no per-server reply
        // address (getpeername answers from CONN_ORIG).
        let to = loopback(dst.family);
        if remember_quiet(ctx, slot, dst, port, ConnKind::Dns) {
            bind_pod_src(ctx, cfg, dst.family, sf);
            write_dst(ctx.sock_addr, to, cfg.dns_port(), sf);
            count(slot, Counter::DnsTcpCaptured);
        } else {
            count(slot, Counter::MapFull);
        }
        return;
    }
    if !outbound_captured(slot, cfg, &dst, port) {
        count(slot, Counter::OutboundExcluded);
        return;
    }
    if remember(ctx, slot, dst, port, ConnKind::Outbound) {
        bind_pod_src(ctx, cfg, dst.family, sf);
        write_dst(
            ctx.sock_addr,
            outbound_target(cfg, &dst, port),
            cfg.proxy_outbound_port,
            sf,
        );
        count(slot, Counter::OutboundCaptured);
    }
}

/// A UDP socket connected to a DNS server: connected to the proxy's DNS port instead (see
/// `dns`), its `CONN_ORIG` (kind `Dns`) for getpeername and its `DNS_REPLIES` entry for
/// recvmsg. Never the proxy's own sockets.
#[inline(always)]
fn udp_connect(ctx: &SockAddrContext, sf: u16) {
    let Some((slot, cfg)) = dns::dns_pod() else {
        return;
    };
    let sa = ctx.sock_addr;
    let dst = read_dst(sa, sf).unmapped();
    // SAFETY: `sa` is the context's own `bpf_sock_addr`; user_port is readable in connect hooks.
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    if !dns::is_dns(&dst, port) {
        return;
    }
    if !remember_quiet(ctx, slot, dst, port, ConnKind::Dns) {
        count(slot, Counter::MapFull);
        return;
    }
    match dns::claim(sa, cfg, &dst) {
        Some(to) => {
            write_dst(sa, to, cfg.dns_port(), sf);
            count(slot, Counter::DnsCaptured);
        }
        None => count(slot, Counter::MapFull),
    }
}

/// Where a captured connection to `dst:port` goes (at the proxy's outbound port): an address
/// of its own per original destination, so the port space is iptables' (one ephemeral range per
/// destination), not one range for every destination of the pod. IPv4: one of 127.128.0.0/12
/// (`addr::spread4`). IPv6: one of `100::/64` (`addr::spread6`), which the agent makes local on
/// the `lo` of every pod with an IPv6 address before its rows exist; a pod without one (whose
/// namespace may not even have IPv6) keeps `::1`, the only loopback address a namespace has.
#[inline(always)]
fn outbound_target(cfg: &PodConfig, dst: &Addr, port: u16) -> Addr {
    if dst.family == AF_INET {
        spread4(dst.words[0], port)
    } else if pod_addr(cfg, AF_INET6).is_some() {
        spread6(dst.words, port)
    } else {
        loopback(AF_INET6)
    }
}

/// Binds an unbound socket to the pod's own address (port chosen at connect), as routing would
/// have for the original destination: the application's getsockname() and the proxy's
/// getpeername() show the pod address as with iptables REDIRECT, and the connection's four-tuple
/// is unique on the node (pod addresses are), so `ORIG_DST` entries of two pods never share a
/// key even though their proxies both listen on loopback. A socket already bound keeps its
/// address; a failed bind leaves it unbound (loopback source).
#[inline(always)]
fn bind_pod_src(ctx: &SockAddrContext, cfg: &PodConfig, family: u16, sf: u16) {
    if !bound_src(ctx.sock_addr, sf).is_unspecified() {
        return;
    }
    if let Some(pod_ip) = pod_addr(cfg, family) {
        let _ = bind_src(ctx, pod_ip, sf);
    }
}

/// The proxy's connections: deliveries of inbound traffic, and its own calls to the pod address.
#[inline(always)]
fn proxy_connect(ctx: &SockAddrContext, slot: u32, cfg: &PodConfig, dst: Addr, port: u16, sf: u16) {
    if is_proxy_port(cfg, port) {
        return;
    }
    let rule = port_rule(slot, port);
    if !inbound_captured(cfg, rule) {
        return;
    }
    let to_pod = pod_of_addr(&dst) == Some(slot);
    let to_loopback = dst.is_loopback();
    if !to_pod && !to_loopback {
        return; // Off-pod: the proxy's upstream traffic is never captured.
    }
    let bound = bound_src(ctx.sock_addr, sf);
    if to_pod && !bound.is_passthrough_src() {
        // The proxy's outbound side calling its own pod (a Service whose endpoint is this pod):
        // through the inbound listener, so inbound policy applies (iptables: uid 1337, -o lo).
        if remember(ctx, slot, dst, port, ConnKind::ProxySelf) {
            bind_pod_src(ctx, cfg, dst.family, sf);
            write_dst(
                ctx.sock_addr,
                loopback(dst.family),
                cfg.proxy_inbound_port,
                sf,
            );
            count(slot, Counter::ProxySelfCaptured);
        }
        return;
    }
    // A delivery, dialled the old way (127.0.0.1:P) or the new way (POD_IP:P from 127.0.0.6):
    // the pod's policy, not the proxy's configuration, decides where it ends.
    match delivery(cfg, rule) {
        InboundPolicy::Passthrough => {
            let Some(pod_ip) = pod_addr(cfg, dst.family) else {
                return;
            };
            if to_loopback {
                if bound.is_unspecified() && !bind_src(ctx, passthrough_src(dst.family), sf) {
                    return;
                }
                write_dst(ctx.sock_addr, pod_ip, port, sf);
            }
            count(slot, Counter::DeliveredPodIp);
        }
        InboundPolicy::Localhost => {
            if to_pod {
                write_dst(ctx.sock_addr, loopback(dst.family), port, sf);
            }
            count(slot, Counter::DeliveredLoopback);
        }
    }
    // Tracked only to count deliveries the kernel refuses; a full map just loses that count.
    let _ = remember_quiet(ctx, slot, dst, port, ConnKind::Delivery);
}

/// Records the original destination in the socket's own storage, for sock_ops to file in
/// `ORIG_DST` when the SYN leaves. A pod over its `ORIG_DST` share, or a socket whose storage
/// cannot be allocated, is counted (`map_full`) and left alone: better unproxied than
/// blackholed, and no other pod is affected.
#[inline(always)]
fn remember(ctx: &SockAddrContext, slot: u32, dst: Addr, port: u16, kind: ConnKind) -> bool {
    if orig_dst::has_room(slot) && remember_quiet(ctx, slot, dst, port, kind) {
        return true;
    }
    count(slot, Counter::MapFull);
    false
}

#[inline(always)]
fn remember_quiet(ctx: &SockAddrContext, slot: u32, dst: Addr, port: u16, kind: ConnKind) -> bool {
    let orig = OrigDst {
        addr: dst.words,
        port,
        family: dst.family,
        slot,
        kind,
    };
    // SAFETY: `sk` of a sock_addr context is a full socket (PTR_TO_SOCKET, never null).
    unsafe { CONN_ORIG.set(sock(ctx), orig) }
}

/// The context's socket (PTR_TO_SOCKET, never null in sock_addr programs).
#[inline(always)]
fn sock(ctx: &SockAddrContext) -> *mut aya_ebpf::bindings::bpf_sock {
    sock_of(ctx.sock_addr)
}

#[inline(always)]
pub(crate) fn sock_of(sa: *mut bpf_sock_addr) -> *mut aya_ebpf::bindings::bpf_sock {
    const SK: usize = core::mem::offset_of!(bpf_sock_addr, __bindgen_anon_1);
    // SAFETY: `sa` is the context; `sk` is a readable pointer field of sock_addr contexts.
    // Loaded at a fixed offset (see `ctx`): LLVM would otherwise reuse a moved ctx pointer.
    unsafe { crate::ctx::load_ptr::<SK, _>(sa as *const _) }
}

/// Istio's outbound order (`istio-iptables`): excluded ports, then excluded ranges, return;
/// included ports, then included ranges (or all, `*`), are redirected; the rest returns.
#[inline(always)]
fn outbound_captured(slot: u32, cfg: &PodConfig, dst: &Addr, port: u16) -> bool {
    let rule = port_rule(slot, port);
    if rule & port_rule::EXCLUDE_OUTBOUND != 0 {
        return false;
    }
    let cidr = cidr_rule_of(slot, dst);
    if cidr == cidr_rule::EXCLUDE {
        return false;
    }
    rule & port_rule::INCLUDE_OUTBOUND != 0
        || cfg.enrolled & pod_flags::OUTBOUND_INCLUDE_ONLY == 0
        || cidr == cidr_rule::INCLUDE
}

/// The value of the longest CIDR rule of the pod that holds `dst` ([`cidr_rule`]), 0 if none.
#[inline(always)]
fn cidr_rule_of(slot: u32, dst: &Addr) -> u32 {
    let slot_be = slot.to_be();
    if dst.family == AF_INET {
        let key = aya_ebpf::maps::lpm_trie::Key::new(
            64,
            CidrKey4 {
                slot_be,
                addr: dst.words[0],
            },
        );
        CIDR4.get(&key).copied().unwrap_or(0)
    } else {
        let key = aya_ebpf::maps::lpm_trie::Key::new(
            160,
            CidrKey6 {
                slot_be,
                addr: dst.words,
            },
        );
        CIDR6.get(&key).copied().unwrap_or(0)
    }
}

#[inline(always)]
fn pod_addr(cfg: &PodConfig, family: u16) -> Option<Addr> {
    if family == AF_INET {
        (cfg.ip4 != 0).then(|| Addr::v4(cfg.ip4))
    } else {
        let a = Addr::v6(cfg.ip6);
        (!a.is_unspecified()).then_some(a)
    }
}

/// 127.0.0.6 / ::6: the source the application sees on a delivery (Istio's passthrough
/// source), which also tells sk_lookup not to capture the delivery again.
#[inline(always)]
fn passthrough_src(family: u16) -> Addr {
    if family == AF_INET {
        Addr::v4(u32::from_be(0x7f00_0006))
    } else {
        Addr::v6([0, 0, 0, u32::from_be(6)])
    }
}

/// Binds the socket (of family `sf`) to `addr`, port 0 (the port is chosen with the four-tuple
/// at connect); an IPv4 address for an `AF_INET6` socket as `::ffff:a.b.c.d`.
#[inline(always)]
fn bind_src(ctx: &SockAddrContext, addr: Addr, sf: u16) -> bool {
    let ret = if sf == AF_INET {
        let mut sa = SockaddrIn {
            family: AF_INET,
            port_be: 0,
            addr: addr.words[0],
            zero: [0; 8],
        };
        // SAFETY: `sa` is a complete sockaddr_in on the stack, its length passed with it.
        unsafe {
            bpf_bind(
                ctx.sock_addr,
                &mut sa as *mut SockaddrIn as *mut _,
                core::mem::size_of::<SockaddrIn>() as i32,
            )
        }
    } else {
        let mut sa = SockaddrIn6 {
            family: AF_INET6,
            port_be: 0,
            flowinfo: 0,
            addr: addr.words_for(AF_INET6),
            scope_id: 0,
        };
        // SAFETY: `sa` is a complete sockaddr_in6 on the stack, its length passed with it.
        unsafe {
            bpf_bind(
                ctx.sock_addr,
                &mut sa as *mut SockaddrIn6 as *mut _,
                core::mem::size_of::<SockaddrIn6>() as i32,
            )
        }
    };
    ret == 0
}

/// The context's destination as a socket of `family` names it (mapped addresses included).
#[inline(always)]
pub(crate) fn read_dst(sa: *mut bpf_sock_addr, family: u16) -> Addr {
    if family == AF_INET {
        // SAFETY: `sa` is the context; user_ip4 is readable in connect4.
        Addr::v4(unsafe { (*sa).user_ip4 })
    } else {
        Addr::v6(crate::load_ip6!(sa, bpf_sock_addr, user_ip6))
    }
}

/// Sets the context's address and port; `sf` is the hook's (the socket's) family, which
/// decides the field: an IPv4 address goes to an `AF_INET6` socket as `::ffff:a.b.c.d`.
#[inline(always)]
pub(crate) fn write_dst(sa: *mut bpf_sock_addr, addr: Addr, port: u16, sf: u16) {
    if sf == AF_INET {
        // SAFETY: `sa` is the context; user_ip4 is writable in connect4 and getpeername4.
        unsafe { (*sa).user_ip4 = addr.words[0] };
    } else {
        crate::store_ip6!(sa, bpf_sock_addr, user_ip6, addr.words_for(AF_INET6));
    }
    // SAFETY: `sa` is the context; user_port is writable in connect and getpeername hooks.
    unsafe { (*sa).user_port = port.to_be() as u32 };
}

/// The address the socket (of family `sf`) is already bound to (unspecified if none), a
/// mapped address as the IPv4 one it is.
#[inline(always)]
fn bound_src(sa: *mut bpf_sock_addr, sf: u16) -> Addr {
    let sk = sock_of(sa);
    if sf == AF_INET {
        // SAFETY: `sk` is a full socket (PTR_TO_SOCKET, never null); src_ip4 is readable.
        Addr::v4(unsafe { (*sk).src_ip4 })
    } else {
        Addr::v6(crate::load_ip6!(sk, aya_ebpf::bindings::bpf_sock, src_ip6)).unmapped()
    }
}
