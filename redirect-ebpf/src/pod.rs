//! Finding the pod a hook runs for, and counting what happened to it.

use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id};
use redirect_common::{pod_flags, port_rule, AddrKey, Counter, InboundPolicy, PodConfig, PortKey};

use crate::{
    addr::Addr,
    maps::{COUNTERS, PODS, POD_ADDRS, POD_CGROUPS, PORT_RULES},
};

/// Deepest cgroup level searched above the current one. Kubernetes puts containers one level
/// below the pod (kubepods/<qos>/pod<uid>/<container>), so a few levels are plenty.
const MAX_ANCESTOR_LEVELS: i32 = 16;

/// The enrolled pod whose cgroup (or an ancestor's) the current task is in.
///
/// # Minimum kernel version
/// 5.7 (`bpf_get_current_ancestor_cgroup_id` in cgroup sock_addr programs).
#[inline(always)]
pub fn current_pod() -> Option<(u32, &'static PodConfig)> {
    // SAFETY: a helper without arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: a hash map value, read at once.
    if let Some(slot) = unsafe { POD_CGROUPS.get(id) } {
        return config(*slot);
    }
    // The task sits below the pod's cgroup (a container's cgroup): walk down from the root.
    for level in 1..MAX_ANCESTOR_LEVELS {
        // SAFETY: a helper taking a plain level number.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return None;
        }
        // SAFETY: a hash map value, read at once.
        if let Some(slot) = unsafe { POD_CGROUPS.get(id) } {
            return config(*slot);
        }
    }
    None
}

/// The enrolled pod that owns the current cgroup exactly; for hooks without the ancestor helper.
#[inline(always)]
pub fn current_pod_exact() -> Option<(u32, &'static PodConfig)> {
    // SAFETY: a helper without arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: a hash map value, read at once.
    let slot = unsafe { POD_CGROUPS.get(id) }?;
    config(*slot)
}

#[inline(always)]
pub fn config(slot: u32) -> Option<(u32, &'static PodConfig)> {
    let cfg = PODS.get(slot)?;
    if cfg.enrolled == 0 {
        return None;
    }
    Some((slot, cfg))
}

/// The pod that owns `addr`, if any.
#[inline(always)]
pub fn pod_of_addr(addr: &Addr) -> Option<u32> {
    let key = AddrKey {
        addr: addr.words,
        family: addr.family as u32,
    };
    // SAFETY: a hash map value, copied at once.
    unsafe { POD_ADDRS.get(key) }.copied()
}

/// The port's rule bits for a pod, 0 when it has none.
#[inline(always)]
pub fn port_rule(slot: u32, port: u16) -> u32 {
    let key = PortKey {
        slot,
        port,
        _pad: 0,
    };
    // SAFETY: a hash map value, copied at once.
    unsafe { PORT_RULES.get(key) }.copied().unwrap_or(0)
}

/// Whether inbound connections to a port with rule bits `rule` are captured: not excluded,
/// and included when the pod has an `includeInboundPorts` list (Istio ignores
/// `excludeInboundPorts` then; the agent writes no such exclusion but Istio's default ones).
#[inline(always)]
pub fn inbound_captured(cfg: &PodConfig, rule: u32) -> bool {
    rule & port_rule::EXCLUDE_INBOUND == 0
        && (cfg.enrolled & pod_flags::INBOUND_INCLUDE_ONLY == 0
            || rule & port_rule::INCLUDE_INBOUND != 0)
}

/// The delivery policy for `port`: its own, else the pod's.
#[inline(always)]
pub fn delivery(cfg: &PodConfig, rule: u32) -> InboundPolicy {
    if rule & port_rule::DELIVERY_OVERRIDE == 0 {
        cfg.policy
    } else if rule & port_rule::DELIVERY_LOCALHOST != 0 {
        InboundPolicy::Localhost
    } else {
        InboundPolicy::Passthrough
    }
}

/// The pod's own listener ports: the proxy's, which nothing may capture or rewrite.
#[inline(always)]
pub fn is_proxy_port(cfg: &PodConfig, port: u16) -> bool {
    port == cfg.proxy_inbound_port
        || port == cfg.proxy_outbound_port
        || redirect_common::is_proxy_port(port)
}

#[inline(always)]
pub fn count(slot: u32, counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter.index(slot)) {
        // SAFETY: a per-CPU array value, valid for this run; no other CPU writes this copy, so
        // a plain add is enough.
        unsafe { *value += 1 };
    }
}
