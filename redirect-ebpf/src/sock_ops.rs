//! sock_ops: registers the proxy's inbound listener for sk_lookup, and keeps the
//! original-destination maps in step with the connections they describe.
//!
//! # Minimum kernel version
//! 4.19 (`BPF_SOCK_OPS_TCP_LISTEN_CB`); the other callbacks and `bpf_sock_hash_update` are older.

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext as _,
};
use redirect_common::{ConnKind, Counter, SockTuple, AF_INET};

use crate::{
    maps::{LISTENERS, LISTENER_TAGS, ORIG_DST, PENDING},
    pod::count,
};

#[sock_ops]
pub fn rd_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The proxy called listen() on its inbound port: make this socket the pod's capture target.
/// A restarted proxy's new listener simply replaces the old one.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    let Some(key) = (unsafe { LISTENER_TAGS.get(cookie) }).copied() else {
        return;
    };
    let _ = LISTENER_TAGS.remove(cookie);
    let mut key = key;
    if LISTENERS
        .update(&mut key, unsafe { &mut *ctx.ops }, 0)
        .is_ok()
    {
        count(key.slot, Counter::ListenerRegistered);
    } else {
        count(key.slot, Counter::MapFull);
    }
}

/// A redirected connection sends its SYN: ask for state callbacks so its entries are removed
/// when it closes, and a refused delivery is counted.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    if unsafe { PENDING.get(cookie(ctx)) }.is_some() {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// The client side is established and has its four-tuple: file the original destination under
/// it, where the proxy's accepted socket will look.
#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    let Some(orig) = (unsafe { PENDING.get(cookie) }).copied() else {
        return;
    };
    let _ = PENDING.remove(cookie);
    if orig.kind == ConnKind::Delivery as u32 {
        // Deliveries need no bookkeeping once connected; stop the per-state callbacks.
        let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        return;
    }
    if ORIG_DST.insert(tuple(ctx), orig, 0).is_err() {
        count(orig.slot, Counter::MapFull);
    }
}

#[inline(always)]
fn on_state(ctx: &SockOpsContext) {
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return;
    }
    let cookie = cookie(ctx);
    if let Some(orig) = unsafe { PENDING.get(cookie) } {
        if orig.kind == ConnKind::Delivery as u32 && ctx.arg(0) == BPF_TCP_SYN_SENT {
            count(orig.slot, Counter::DeliveryRefused);
        }
        let _ = PENDING.remove(cookie);
        return;
    }
    let _ = ORIG_DST.remove(tuple(ctx));
}

/// The connection's four-tuple from the client socket's point of view.
#[inline(always)]
fn tuple(ctx: &SockOpsContext) -> SockTuple {
    let family = ctx.family();
    let (src, dst) = if family == AF_INET as u32 {
        ([ctx.local_ip4(), 0, 0, 0], [ctx.remote_ip4(), 0, 0, 0])
    } else {
        (
            crate::load_ip6!(ctx.ops, bpf_sock_ops, local_ip6),
            crate::load_ip6!(ctx.ops, bpf_sock_ops, remote_ip6),
        )
    };
    SockTuple {
        src,
        dst,
        src_port: ctx.local_port() as u16,
        // remote_port holds the network-order port in its high half on little-endian machines.
        dst_port: u32::from_be(ctx.remote_port()) as u16,
        family,
    }
}
