//! cgroup/bind4 and cgroup/bind6: notice the proxy binding its inbound port.
//!
//! sock_ops, which sees the socket start listening, cannot tell which pod it belongs to on older
//! kernels (no cgroup or netns helpers there before 5.15), so the pod is noted here, in the
//! socket's own storage, for sock_ops to find. The note dies with the socket: a socket that binds
//! and never listens holds nothing anywhere else, however many there are.
//!
//! # Minimum kernel version
//! 5.7 (cgroup helpers in sock_addr programs); socket storage needs 5.3.

use aya_ebpf::{
    helpers::bpf_get_current_uid_gid, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use redirect_common::{ListenerKey, AF_INET, AF_INET6};

use crate::{maps::LISTENER_TAGS, pod::current_pod};

const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;

#[cgroup_sock_addr(bind4)]
pub fn rd_bind4(ctx: SockAddrContext) -> i32 {
    on_bind(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn rd_bind6(ctx: SockAddrContext) -> i32 {
    on_bind(&ctx, AF_INET6);
    ALLOW
}

#[inline(always)]
fn on_bind(ctx: &SockAddrContext, family: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context's own `bpf_sock_addr`; `type` and `user_port` are readable
    // in bind hooks.
    let (type_, user_port) = unsafe { ((*sa).type_, (*sa).user_port) };
    if type_ != SOCK_STREAM {
        return;
    }
    let port = u16::from_be(user_port as u16);
    // Port 0 (an ephemeral port, as a proxy's bind-before-connect to 127.0.0.6 asks) is never
    // the proxy's inbound port (the agent refuses 0 there): no cgroup or map lookup for it.
    if port == 0 {
        return;
    }
    let Some((slot, cfg)) = current_pod() else {
        return;
    };
    if port != cfg.proxy_inbound_port || bpf_get_current_uid_gid() as u32 != cfg.proxy_uid {
        return;
    }
    let key = ListenerKey {
        slot,
        family: family as u32,
    };
    const SK: usize = core::mem::offset_of!(aya_ebpf::bindings::bpf_sock_addr, __bindgen_anon_1);
    // SAFETY: `sa` is the context; `sk` is a readable pointer field, loaded at a fixed offset
    // (see `ctx`), and a full socket (PTR_TO_SOCKET, never null) as the storage needs.
    let _ = unsafe {
        let sk = crate::ctx::load_ptr::<SK, _>(sa as *const _);
        LISTENER_TAGS.set(sk, key)
    };
}
