//! Every map of the datapath. All are pinned by name, so the agent that enrolls the next pod,
//! or a restarted agent, reuses them instead of creating new ones.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use redirect_common::{
    AddrKey, CidrKey4, CidrKey6, ListenerKey, OrigDst, PodConfig, PortKey, SockTuple,
    COUNTERS_PER_POD, MAX_CIDR_RULES, MAX_ORIG_DST, MAX_PENDING_ORIG_DST, MAX_PODS, MAX_PORT_RULES,
};

/// Pod configuration by slot.
#[map]
pub static PODS: Array<PodConfig> = Array::pinned(MAX_PODS, 0);

/// Pod slot by cgroup id: how cgroup hooks find their pod.
#[map]
pub static POD_CGROUPS: HashMap<u64, u32> = HashMap::pinned(MAX_PODS, 0);

/// Pod slot by pod address: how sk_lookup (no cgroup there) finds its pod, and how any hook
/// tells the pod's own address from other destinations.
#[map]
pub static POD_ADDRS: HashMap<AddrKey, u32> = HashMap::pinned(MAX_PODS * 4, 0);

/// Exclusions and per-port delivery policies, see `redirect_common::port_rule`.
#[map]
pub static PORT_RULES: HashMap<PortKey, u32> = HashMap::pinned(MAX_PORT_RULES, 0);

/// Outbound IPv4 CIDR exclusions.
#[map]
pub static CIDR4: LpmTrie<CidrKey4, u32> = LpmTrie::pinned(MAX_CIDR_RULES, 0);

/// Outbound IPv6 CIDR exclusions.
#[map]
pub static CIDR6: LpmTrie<CidrKey6, u32> = LpmTrie::pinned(MAX_CIDR_RULES, 0);

/// The proxy's inbound listener of each pod and family, target of sk_lookup.
#[map]
pub static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(MAX_PODS * 2, 0);

/// Sockets the proxy bound to its inbound port, by socket cookie, until they listen.
/// LRU: a socket that binds and never listens must not hold an entry forever.
#[map]
pub static LISTENER_TAGS: LruHashMap<u64, ListenerKey> = LruHashMap::pinned(MAX_PODS * 4, 0);

/// Original destination of a redirected connection by socket cookie, from connect() until the
/// connection is established and its four-tuple is known.
#[map]
pub static PENDING: HashMap<u64, OrigDst> = HashMap::pinned(MAX_PENDING_ORIG_DST, 0);

/// Original destination of an established redirected connection by its four-tuple, which the
/// proxy's accepted socket can name (its peer is the client).
#[map]
pub static ORIG_DST: HashMap<SockTuple, OrigDst> = HashMap::pinned(MAX_ORIG_DST, 0);

/// Per-pod event counters, `Counter::index(slot)`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_PODS * COUNTERS_PER_POD, 0);
