//! sk_lookup: inbound capture without NAT.
//!
//! A connection request for POD_IP:P is handed to the proxy's inbound listener. The accepted
//! socket's local address stays POD_IP:P, so the proxy learns the original destination from
//! getsockname() (or from SO_ORIGINAL_DST, which `sockopt` answers the same way).
//!
//! # Minimum kernel version
//! 5.9 (`BPF_PROG_TYPE_SK_LOOKUP`).

use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action::SK_DROP, sk_action::SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use redirect_common::{Counter, ListenerKey, AF_INET, AF_INET6};

use crate::{
    addr::Addr,
    maps::LISTENERS,
    pod::{config, count, inbound_captured, is_proxy_port, pod_of_addr, port_rule},
};

const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn rd_sk_lookup(ctx: SkLookupContext) -> u32 {
    on_lookup(&ctx)
}

#[inline(always)]
fn on_lookup(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: `l` is the context's own `bpf_sk_lookup`; these fields are readable.
    let (protocol, family, port) = unsafe { ((*l).protocol, (*l).family, (*l).local_port) };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // SAFETY: as above (the IPv6 words are read at fixed offsets by `load_ip6!`).
    let (local, remote) = unsafe {
        if family == AF_INET as u32 {
            (Addr::v4((*l).local_ip4), Addr::v4((*l).remote_ip4))
        } else {
            let lo = crate::load_ip6!(l, bpf_sk_lookup, local_ip6);
            let re = crate::load_ip6!(l, bpf_sk_lookup, remote_ip6);
            (Addr::v6(lo), Addr::v6(re))
        }
    };
    // Connections made inside the pod (the application to its own address or to loopback, the
    // proxy's delivery from 127.0.0.6) are never captured; the connect hooks already decided
    // them. A loopback destination is no pod's address (the agent refuses loopback pod IPs).
    // Both are tested before any map lookup: they cost nothing, and two of the three requests
    // of a sidecar-to-sidecar call (the application to its proxy on loopback, the server
    // proxy's delivery) end here.
    if local.is_loopback() || remote.is_local() || remote.is_passthrough_src() {
        return SK_PASS;
    }
    let Some(slot) = pod_of_addr(&local) else {
        return SK_PASS;
    };
    let Some((slot, cfg)) = config(slot) else {
        return SK_PASS;
    };
    if pod_of_addr(&remote) == Some(slot) {
        return SK_PASS;
    }
    let port = port as u16;
    // Exclusions first: Istio's default ones (15008, 15020, ...) are proxy ports too, and an
    // operator reading `inbound_excluded` expects to see them counted.
    let rule = port_rule(slot, port);
    if !inbound_captured(cfg, rule) {
        count(slot, Counter::InboundExcluded);
        return SK_PASS;
    }
    if is_proxy_port(cfg, port) {
        return SK_PASS;
    }
    let key = ListenerKey { slot, family };
    if LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok() {
        count(slot, Counter::InboundCaptured);
        return SK_PASS;
    }
    // An IPv4 request can go to a dual-stack IPv6 listener.
    if family == AF_INET as u32 {
        let key = ListenerKey {
            slot,
            family: AF_INET6 as u32,
        };
        if LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok() {
            count(slot, Counter::InboundCaptured);
            return SK_PASS;
        }
    }
    // No proxy listening: refuse, as Istio's REDIRECT to an empty port does. Letting it reach the
    // application would bypass the proxy's policy.
    count(slot, Counter::InboundNoListener);
    SK_DROP
}
