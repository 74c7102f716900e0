//! sock_ops: registers the proxy's inbound listener for sk_lookup, and moves each redirected
//! connection's original destination from the client's socket to the proxy's.
//!
//! The client socket's storage (`CONN_ORIG`, set by the connect hook) is filed in `ORIG_DST`
//! under the four-tuple when the SYN leaves; the proxy's accepted socket takes it from there into
//! its own storage (`ACCEPTED_ORIG`) when it is established, which `SO_ORIGINAL_DST` answers
//! from. So `ORIG_DST` only holds connections in their handshake, and every other piece of
//! per-connection state lives in, and dies with, its socket.
//!
//! # Minimum kernel version
//! 5.3 (the `sk` field of the context and socket storage in sock_ops); 4.19 for
//! `BPF_SOCK_OPS_TCP_LISTEN_CB`; the other callbacks and `bpf_sock_hash_update` are older.

use aya_ebpf::{
    bindings::{
        bpf_sock, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use redirect_common::{ConnKind, Counter, SockTuple, AF_INET};

use crate::{
    addr::Addr,
    maps::{ACCEPTED_ORIG, CONN_ORIG, LISTENERS, LISTENER_TAGS},
    orig_dst::{self, NotFiled},
    pod::{count, pod_of_addr},
};

#[sock_ops]
pub fn rd_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state(&ctx),
        _ => {}
    }
    1
}

/// The context's full socket; `None` for request and time-wait sockets.
#[inline(always)]
fn sock(ctx: &SockOpsContext) -> Option<*mut bpf_sock> {
    const SK: usize = core::mem::offset_of!(aya_ebpf::bindings::bpf_sock_ops, __bindgen_anon_2);
    // SAFETY: `ops` is the context; its `sk` field (PTR_TO_SOCKET_OR_NULL) is readable in
    // every callback. Loaded at a fixed offset (see `ctx`).
    let sk: *mut bpf_sock = unsafe { crate::ctx::load_ptr::<SK, _>(ctx.ops as *const _) };
    (!sk.is_null()).then_some(sk)
}

/// The proxy called listen() on its inbound port: make this socket the pod's capture target.
/// A restarted proxy's new listener simply replaces the old one.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let Some(sk) = sock(ctx) else {
        return;
    };
    // SAFETY: `sk` is the context's full socket, checked for null.
    let Some(mut key) = (unsafe { LISTENER_TAGS.get(sk) }) else {
        return;
    };
    // SAFETY: as above.
    unsafe { LISTENER_TAGS.delete(sk) };
    // SAFETY: `ops` is the context of a full socket in TCP_LISTEN_CB, as the helper requires.
    let ops = unsafe { &mut *ctx.ops };
    if LISTENERS.update(&mut key, ops, 0).is_ok() {
        count(key.slot, Counter::ListenerRegistered);
    } else {
        count(key.slot, Counter::MapFull);
    }
}

/// A redirected connection sends its SYN and has its four-tuple: file its original destination
/// where the proxy's side will look, and ask for state callbacks so that the entry goes when the
/// connection does, and a refused delivery is counted.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let Some(sk) = sock(ctx) else {
        return;
    };
    // SAFETY: `sk` is the context's full socket, checked for null.
    let Some(orig) = (unsafe { CONN_ORIG.get(sk) }) else {
        return;
    };
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    if !matches!(orig.kind, ConnKind::Outbound | ConnKind::ProxySelf) {
        return;
    }
    let tuple = tuple(ctx);
    // The connect hook bound the socket to its pod's address (or it was bound already). A
    // source that is another pod's address, or any other foreign one (IP_FREEBIND), could only
    // claim another pod's four-tuple: not filed, so the proxy gets no original destination.
    let src = Addr {
        words: tuple.src,
        family: tuple.family as u16,
    };
    if !src.is_loopback() && pod_of_addr(&src) != Some(orig.slot) {
        return;
    }
    match orig_dst::file(&tuple, &orig) {
        Ok(()) | Err(NotFiled::Taken) => {}
        Err(NotFiled::Full) => count(orig.slot, Counter::MapFull),
    }
}

/// The client side is established. Deliveries need no more callbacks once connected.
#[inline(always)]
fn on_active_established(ctx: &SockOpsContext) {
    let Some(sk) = sock(ctx) else {
        return;
    };
    // SAFETY: `sk` is the context's full socket, checked for null.
    let Some(orig) = (unsafe { CONN_ORIG.get(sk) }) else {
        return;
    };
    if orig.kind == ConnKind::Delivery {
        let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        // SAFETY: as above.
        unsafe { CONN_ORIG.delete(sk) };
    }
}

/// An accepted socket is established: if its peer is a redirected client of this node, take the
/// original destination into the socket's own storage, where `SO_ORIGINAL_DST` finds it for as
/// long as the socket lives. Left in `ORIG_DST` (getsockopt looks there too) if the storage
/// cannot be allocated.
#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    let t = tuple(ctx);
    // The client's four-tuple: its address (our peer) first.
    let client = SockTuple {
        src: t.dst,
        dst: t.src,
        src_port: t.dst_port,
        dst_port: t.src_port,
        family: t.family,
    };
    let Some(orig) = orig_dst::peek(&client) else {
        return;
    };
    let Some(sk) = sock(ctx) else {
        return;
    };
    // SAFETY: `sk` is the context's full socket, checked for null.
    if unsafe { ACCEPTED_ORIG.set(sk, orig) } {
        let _ = orig_dst::take(&client);
    }
}

#[inline(always)]
fn on_state(ctx: &SockOpsContext) {
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return;
    }
    let Some(sk) = sock(ctx) else {
        return;
    };
    // SAFETY: `sk` is the context's full socket, checked for null.
    let Some(orig) = (unsafe { CONN_ORIG.get(sk) }) else {
        return;
    };
    // SAFETY: as above. A later connect() on this socket stores its own.
    unsafe { CONN_ORIG.delete(sk) };
    match orig.kind {
        ConnKind::Delivery => {
            if ctx.arg(0) == BPF_TCP_SYN_SENT {
                count(orig.slot, Counter::DeliveryRefused);
            }
        }
        // Closed before the proxy's side took the entry (refused, reset, closed in SYN_SENT):
        // remove it if it is still this pod's.
        ConnKind::Outbound | ConnKind::ProxySelf => orig_dst::release(&tuple(ctx), orig.slot),
        ConnKind::Inbound | ConnKind::Dns => {}
    }
}

/// The connection's four-tuple from this socket's point of view (its own address first).
#[inline(always)]
fn tuple(ctx: &SockOpsContext) -> SockTuple {
    let mut family = ctx.family();
    let (mut src, mut dst) = if family == AF_INET as u32 {
        ([ctx.local_ip4(), 0, 0, 0], [ctx.remote_ip4(), 0, 0, 0])
    } else {
        (
            crate::load_ip6!(ctx.ops, aya_ebpf::bindings::bpf_sock_ops, local_ip6),
            crate::load_ip6!(ctx.ops, aya_ebpf::bindings::bpf_sock_ops, remote_ip6),
        )
    };
    // A dual-stack socket's IPv4 connection (both ends `::ffff:a.b.c.d`) is named as the IPv4
    // connection it is, which is how the proxy's IPv4 socket at its other end names it.
    let (s4, d4) = (Addr::v6(src).unmapped(), Addr::v6(dst).unmapped());
    if family != AF_INET as u32 && s4.family == AF_INET && d4.family == AF_INET {
        family = AF_INET as u32;
        src = s4.words;
        dst = d4.words;
    }
    SockTuple {
        src,
        dst,
        src_port: ctx.local_port() as u16,
        // remote_port holds the network-order port in its high half on little-endian machines.
        dst_port: u32::from_be(ctx.remote_port()) as u16,
        family,
    }
}
