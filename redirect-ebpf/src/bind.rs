//! cgroup/bind4 and cgroup/bind6: notice the proxy binding its inbound port.
//!
//! sock_ops, which sees the socket start listening, cannot tell which pod it belongs to on older
//! kernels (no cgroup or netns helpers there before 5.15), so the pod is noted here, by socket
//! cookie, for sock_ops to find.
//!
//! # Minimum kernel version
//! 5.7 (cgroup helpers in sock_addr programs).

use aya_ebpf::{
    helpers::{bpf_get_current_uid_gid, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext as _,
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
    if unsafe { (*sa).type_ } != SOCK_STREAM {
        return;
    }
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    let Some((slot, cfg)) = current_pod() else {
        return;
    };
    if port != cfg.proxy_inbound_port || bpf_get_current_uid_gid() as u32 != cfg.proxy_uid {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = ListenerKey {
        slot,
        family: family as u32,
    };
    let _ = LISTENER_TAGS.insert(cookie, key, 0);
}
