//! Every map of the datapath. All are pinned by name, so the agent that enrolls the next pod,
//! or a restarted agent, reuses them instead of creating new ones.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::{btf_map, map},
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use redirect_common::{
    AddrKey, CidrKey4, CidrKey6, DnsKey, DnsOrig, ListenerKey, OrigDst, PodConfig, PortKey,
    SockTuple, COUNTERS_PER_POD, MAX_CIDR_RULES, MAX_DNS_REPLIES, MAX_ORIG_DST, MAX_PODS,
    MAX_PORT_RULES,
};

use crate::storage::SkStorage;

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

/// A socket the proxy bound to its inbound port, until it listens: the pod and family it will
/// serve. Socket-local storage, freed with the socket, so a socket that binds and never listens
/// holds nothing anywhere else.
#[btf_map]
pub static LISTENER_TAGS: SkStorage<ListenerKey> = SkStorage::new();

/// A redirected socket's original destination, from connect() to close: read by sock_ops when
/// the SYN leaves (to file it in `ORIG_DST`) and when the socket closes. Freed with the socket,
/// whatever happens to it (a connect() that fails before its SYN leaves it here until then).
#[btf_map]
pub static CONN_ORIG: SkStorage<OrigDst> = SkStorage::new();

/// The original destination on the proxy's side of a redirected connection (the accepted
/// socket), copied there from `ORIG_DST` when that side is established; `SO_ORIGINAL_DST`
/// answers from it for as long as the socket lives.
#[btf_map]
pub static ACCEPTED_ORIG: SkStorage<OrigDst> = SkStorage::new();

/// Original destination of a redirected connection by its four-tuple (client address first),
/// from the client's SYN until the proxy's side takes its copy into `ACCEPTED_ORIG` (or the
/// client closes): the four-tuple is the only name both sides of a connection know. Each pod may
/// hold `MAX_ORIG_DST_PER_POD` of them (`ORIG_DST_USED`). Allocated on insert.
#[map]
pub static ORIG_DST: HashMap<SockTuple, OrigDst> = HashMap::pinned(MAX_ORIG_DST, BPF_F_NO_PREALLOC);

/// `ORIG_DST` entries each pod holds, by slot: raised on insert and lowered on removal with
/// atomic adds. The agent zeroes a slot's row when it sweeps the slot's entries.
#[map]
pub static ORIG_DST_USED: Array<u32> = Array::pinned(MAX_PODS, 0);

/// Per-pod event counters, `Counter::index(slot)`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_PODS * COUNTERS_PER_POD, 0);

/// Where an application's DNS datagram was sent instead (socket and loopback address) -> the
/// server it asked: recvmsg reports replies as the server's. LRU, because UDP sockets close
/// without any callback; a socket that asks more servers than the map keeps for it gets the
/// proxy's address as the source of an old reply, never another server's.
#[map]
pub static DNS_REPLIES: LruHashMap<DnsKey, DnsOrig> = LruHashMap::pinned(MAX_DNS_REPLIES, 0);
