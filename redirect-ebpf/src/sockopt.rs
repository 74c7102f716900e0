//! cgroup/getsockopt: answers `SO_ORIGINAL_DST` for sockets the datapath redirected, so an
//! unmodified proxy (Envoy's original_dst listener filter) works without conntrack.
//!
//! The answer for a connection the datapath redirected is in the accepted socket's own storage
//! (`ACCEPTED_ORIG`, moved there by sock_ops), or still in `ORIG_DST` under its four-tuple.
//!
//! # Minimum kernel version
//! 5.3 (`BPF_PROG_TYPE_CGROUP_SOCKOPT`, with socket storage from the start).

use aya_ebpf::{
    bindings::bpf_sock, helpers::bpf_get_current_uid_gid, macros::cgroup_sockopt,
    programs::SockoptContext,
};
use redirect_common::{ConnKind, Counter, OrigDst, SockTuple, AF_INET, AF_INET6};

use crate::{
    addr::{Addr, SockaddrIn, SockaddrIn6},
    maps::ACCEPTED_ORIG,
    orig_dst,
    pod::{config, count, current_pod_exact, pod_of_addr},
};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (IPv4) and `IP6T_SO_ORIGINAL_DST` (IPv6) share the number 80.
const SO_ORIGINAL_DST: i32 = 80;

#[cgroup_sockopt(getsockopt)]
pub fn rd_getsockopt(ctx: SockoptContext) -> i32 {
    on_getsockopt(&ctx);
    1
}

#[inline(always)]
fn on_getsockopt(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    // SAFETY: `so` is the context's own `bpf_sockopt`; level and optname are readable.
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    let family = match (level, optname) {
        (SOL_IP, SO_ORIGINAL_DST) => AF_INET,
        (SOL_IPV6, SO_ORIGINAL_DST) => AF_INET6,
        _ => return,
    };
    // SAFETY: as above; `sk` is the socket the option is asked of (PTR_TO_SOCKET).
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: `sk` is the context's full socket, checked for null. The level names the
    // original destination's family, whatever the socket's: a dual-stack proxy socket holding
    // an IPv4 connection is asked at SOL_IP.
    if let Some(orig) = unsafe { ACCEPTED_ORIG.get(sk) } {
        if orig.family == family && answer(ctx, &orig) {
            count(orig.slot, Counter::OrigDstHit);
        }
        return;
    }
    // SAFETY: `sk` checked for null above; `family` is readable.
    if unsafe { (*sk).family } != family as u32 {
        return;
    }
    let (local, local_port, peer, peer_port) = endpoints(sk, family);
    let key = SockTuple {
        src: peer.words,
        dst: local.words,
        src_port: peer_port,
        dst_port: local_port,
        family: family as u32,
    };
    if let Some(orig) = orig_dst::peek(&key) {
        if answer(ctx, &orig) {
            count(orig.slot, Counter::OrigDstHit);
        }
        return;
    }
    // Not one we rewrote. If the proxy asks about a socket sk_lookup handed to it, the socket's
    // own address is the original destination: the connection was never NATed.
    let Some(slot) = pod_of_addr(&local) else {
        if let Some((slot, cfg)) = current_pod_exact() {
            if bpf_get_current_uid_gid() as u32 == cfg.proxy_uid {
                count(slot, Counter::OrigDstMiss);
            }
        }
        return;
    };
    let Some((slot, cfg)) = config(slot) else {
        return;
    };
    if bpf_get_current_uid_gid() as u32 != cfg.proxy_uid {
        return;
    }
    if local_port == cfg.proxy_inbound_port || local_port == cfg.proxy_outbound_port {
        // Dialled the listener directly: there is no other destination to give.
        count(slot, Counter::OrigDstMiss);
        return;
    }
    let orig = OrigDst {
        addr: local.words,
        port: local_port,
        family,
        slot,
        kind: ConnKind::Inbound,
    };
    if answer(ctx, &orig) {
        count(slot, Counter::OrigDstLocal);
    }
}

/// The socket's local and peer addresses and ports (host order).
#[inline(always)]
fn endpoints(sk: *mut bpf_sock, family: u16) -> (Addr, u16, Addr, u16) {
    let (local, peer) = if family == AF_INET {
        // SAFETY: `sk` is a non-null full socket; its address fields are readable.
        unsafe { (Addr::v4((*sk).src_ip4), Addr::v4((*sk).dst_ip4)) }
    } else {
        let s = crate::load_ip6!(sk, bpf_sock, src_ip6);
        let d = crate::load_ip6!(sk, bpf_sock, dst_ip6);
        (Addr::v6(s), Addr::v6(d))
    };
    // dst_port is read as the 4-byte field older kernels define; the port is its low half.
    const DST_PORT: usize = core::mem::offset_of!(bpf_sock, dst_port);
    // SAFETY: as above; a 4-byte load at the field's offset is what every kernel accepts.
    let dst_port = unsafe { crate::ctx::load_u32::<DST_PORT>(sk as *const _) };
    // SAFETY: as above.
    let src_port = unsafe { (*sk).src_port };
    (local, src_port as u16, peer, u16::from_be(dst_port as u16))
}

/// Writes `orig` as the sockaddr the caller expects and clears the kernel's error.
#[inline(always)]
fn answer(ctx: &SockoptContext, orig: &OrigDst) -> bool {
    let so = ctx.sockopt;
    // SAFETY: `so` is the context. optval..optval_end is the caller's buffer as the kernel
    // copied it; every store below is checked against optval_end first, as the verifier
    // demands. optlen and retval are writable in getsockopt.
    unsafe {
        let optval = (*so).__bindgen_anon_2.optval as *mut u8;
        let optval_end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        if orig.family == AF_INET {
            let len = core::mem::size_of::<SockaddrIn>();
            if optval.add(len) > optval_end {
                return false;
            }
            let sa = optval as *mut SockaddrIn;
            (*sa).family = AF_INET;
            (*sa).port_be = orig.port.to_be();
            (*sa).addr = orig.addr[0];
            (*sa).zero = [0; 8];
            (*so).optlen = len as i32;
        } else {
            let len = core::mem::size_of::<SockaddrIn6>();
            if optval.add(len) > optval_end {
                return false;
            }
            let sa = optval as *mut SockaddrIn6;
            (*sa).family = AF_INET6;
            (*sa).port_be = orig.port.to_be();
            (*sa).flowinfo = 0;
            (*sa).addr = orig.addr;
            (*sa).scope_id = 0;
            (*so).optlen = len as i32;
        }
        (*so).retval = 0;
    }
    true
}
