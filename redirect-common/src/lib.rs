//! Types shared by redirect's kernel programs (`redirect-ebpf`) and its agent.
//!
//! Every map key and value here is `#[repr(C)]` and padding-free: hash maps compare keys
//! byte-for-byte, so a padding byte left uninitialised on one side would make lookups miss.
//! Addresses are stored as the kernel hands them to programs: four `u32` words in network byte
//! order (IPv4 in word 0, others zero). Ports are stored in host byte order.
#![no_std]

pub mod matrix;

/// Number of pods one node can enroll: rows in the configuration and counter maps.
pub const MAX_PODS: u32 = 4096;
/// Redirected connections whose original destination waits in `ORIG_DST` at once, over all
/// pods: from the client's SYN until the proxy's side of the connection is established and takes
/// its copy (see `docs/PER-CONNECTION.md`). A connection that finds it full is not redirected.
pub const MAX_ORIG_DST: u32 = 262144;
/// The share of [`MAX_ORIG_DST`] one pod may hold: its connections beyond it are not redirected
/// (`map_full` of that pod), so no pod can exhaust the node's map. The kernel enforces it with
/// a plain read and an atomic add, so concurrent connects can pass it by at most a few entries
/// per CPU.
pub const MAX_ORIG_DST_PER_POD: u32 = 8192;
/// Port rules (exclusions, per-port policies) over all pods.
pub const MAX_PORT_RULES: u32 = 262144;
/// Port rules one pod may have: no single pod can fill [`MAX_PORT_RULES`] (16 pods at this limit
/// can; the agent refuses the next with the pod, the map and the errno named).
pub const MAX_PORT_RULES_PER_POD: u32 = 16384;
/// Outbound CIDR exclusions over all pods, per address family.
pub const MAX_CIDR_RULES: u32 = 262144;
/// Outbound CIDR exclusions one pod may have, per address family.
pub const MAX_CIDR_RULES_PER_POD: u32 = 16384;

/// Source address Istio's proxy uses to deliver inbound traffic (`-s 127.0.0.6 -j RETURN`).
pub const INBOUND_PASSTHROUGH_SRC4: [u8; 4] = [127, 0, 0, 6];
/// IPv6 twin of [`INBOUND_PASSTHROUGH_SRC4`], `::6`.
pub const INBOUND_PASSTHROUGH_SRC6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];

/// Where captured IPv6 connections go: `100::/64` (RFC 6666, the discard-only prefix, never a
/// real destination), which the agent makes local on the pod's `lo` (`ip -6 route add local
/// 100::/64 dev lo`): each original destination gets an address of it of its own, hence its own
/// four-tuple space, as 127.128.0.0/12 gives IPv4 (docs/PER-CONNECTION.md, "Port space").
pub const SPREAD6_PREFIX: [u8; 16] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// Length of [`SPREAD6_PREFIX`]: the datapath fills the other 64 bits.
pub const SPREAD6_PREFIX_LEN: u8 = 64;

/// Where the application's IPv6 DNS queries go under capture, so that their replies can name
/// the server asked: `100::53:0` to `100::53:7`, inside [`SPREAD6_PREFIX`], *assigned* to the
/// pod's `lo` by the agent while the pod captures DNS and has an IPv6 address
/// ([`pod_flags::DNS_POOL6`]). A local route is not enough: a DNS server bound to the wildcard
/// answers from the address a query reached with `IPV6_PKTINFO`, and the kernel refuses
/// (`EINVAL`) a source that is not an assigned address (`ip6_datagram_send_ctl`), unlike IPv4,
/// where any 127/8 address may be the source. Each of a socket's servers gets one of these
/// addresses of its own (`DNS_REPLIES`), so one socket can ask this many servers at once.
pub const DNS_POOL6_BASE: [u8; 16] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x53, 0, 0];
/// How many addresses [`DNS_POOL6_BASE`] starts (the last byte counts them).
pub const DNS_POOL6_LEN: u32 = 8;
/// How many addresses a socket's query tries before it takes one another server of the same
/// socket holds (IPv4: consecutive addresses of 127.128.0.0/12 from the server's own; IPv6: the
/// whole pool).
pub const DNS_PROBES: u32 = 8;

/// Ports of the proxy and its agent (Envoy admin, listeners, HBONE, health, telemetry, DNS).
/// Connections to them are never captured or rewritten, whoever makes them.
pub const PROXY_PORTS: [u16; 14] = [
    15000, 15001, 15004, 15006, 15008, 15009, 15010, 15012, 15014, 15017, 15020, 15021, 15053,
    15090,
];
/// Inbound ports Istio never captures (`ISTIO_INBOUND_PORTS` exclusions).
pub const DEFAULT_EXCLUDED_INBOUND_PORTS: [u16; 4] = [15008, 15020, 15021, 15090];

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Where the proxy's delivery of inbound traffic to the application ends: the one type for
/// this concept, from the map row to the CLI, the records, the test bed and the demo.
/// See `docs/DESIGN.md`, "Reference semantics".
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum InboundPolicy {
    /// `POD_IP:P` from `127.0.0.6` / `::6` (Istio >= 1.10, the default).
    #[default]
    Passthrough = 0,
    /// `127.0.0.1:P` / `[::1]:P` (Istio < 1.10, `inboundTrafficPolicy.mode: LOCALHOST`).
    Localhost = 1,
}

impl InboundPolicy {
    /// Every policy, default first.
    pub const ALL: [InboundPolicy; 2] = [InboundPolicy::Passthrough, InboundPolicy::Localhost];

    /// The name on the command line, in records and in annotations.
    pub const fn name(self) -> &'static str {
        match self {
            InboundPolicy::Passthrough => "passthrough",
            InboundPolicy::Localhost => "localhost",
        }
    }
}

impl core::fmt::Display for InboundPolicy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// An inbound policy name that is neither `passthrough` nor `localhost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownPolicy;

impl core::fmt::Display for UnknownPolicy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("expected passthrough or localhost")
    }
}

impl core::error::Error for UnknownPolicy {}

impl core::str::FromStr for InboundPolicy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, UnknownPolicy> {
        InboundPolicy::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or(UnknownPolicy)
    }
}

/// Per-pod configuration, one row per enrolled pod in the `PODS` array, indexed by slot.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodConfig {
    /// Non-zero while the pod is enrolled; a row of zeros is a free slot. Bits: [`pod_flags`].
    pub enrolled: u32,
    /// The proxy's uid: its connections are the proxy's, everything else is the application's.
    pub proxy_uid: u32,
    /// First IPv4 address of the pod (network order), 0 if none.
    pub ip4: u32,
    /// First IPv6 address of the pod (network order words), zero if none.
    pub ip6: [u32; 4],
    pub proxy_inbound_port: u16,
    pub proxy_outbound_port: u16,
    /// Policy for ports without a per-port rule.
    pub policy: InboundPolicy,
    /// Non-zero: the application's DNS (UDP and TCP port 53) goes to the proxy's DNS port.
    /// Was padding: a row written without it (zero) leaves DNS alone.
    pub dns_capture: u8,
    /// The proxy's DNS port (`--proxy-dns-port`), network order bytes: a `u16` here would move
    /// the row's layout.
    pub dns_port_be: [u8; 2],
}

impl PodConfig {
    /// The proxy's DNS port.
    pub const fn dns_port(&self) -> u16 {
        u16::from_be_bytes(self.dns_port_be)
    }
}

/// Key of `DNS_REPLIES`: a socket (its cookie) and the loopback address one of its datagrams
/// to port 53 was sent to instead.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub family: u32,
    pub _pad: u32,
}

/// Value of `DNS_REPLIES`: the server the application asked, and the proxy's DNS port its
/// datagram went to; replies from that port are reported as coming from the server.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsOrig {
    pub addr: [u32; 4],
    pub family: u32,
    pub port: u16,
    pub dns_port: u16,
}

/// Entries of `DNS_REPLIES` (LRU: a socket that closes leaves its entries to be evicted).
pub const MAX_DNS_REPLIES: u32 = 16_384;

/// Key of `POD_ADDRS`: one of a pod's addresses.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrKey {
    pub addr: [u32; 4],
    pub family: u32,
}

/// Key of `PORT_RULES`: a port of a pod.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortKey {
    pub slot: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Bits of a `PORT_RULES` value.
pub mod port_rule {
    /// Inbound connections to this port are not captured.
    pub const EXCLUDE_INBOUND: u32 = 1 << 0;
    /// Outbound connections to this port are not captured.
    pub const EXCLUDE_OUTBOUND: u32 = 1 << 1;
    /// This port has its own delivery policy, given by [`DELIVERY_LOCALHOST`].
    pub const DELIVERY_OVERRIDE: u32 = 1 << 2;
    /// With [`DELIVERY_OVERRIDE`]: deliver to loopback; without it: to the pod IP.
    pub const DELIVERY_LOCALHOST: u32 = 1 << 3;
    /// In Istio's `includeInboundPorts` list: with [`super::pod_flags::INBOUND_INCLUDE_ONLY`],
    /// only such ports are captured inbound.
    pub const INCLUDE_INBOUND: u32 = 1 << 4;
    /// In Istio's `includeOutboundPorts` list: captured outbound whatever the destination
    /// address, unless the port or the address is excluded.
    pub const INCLUDE_OUTBOUND: u32 = 1 << 5;
}

/// Bits of `PodConfig::enrolled`. Bit 0 is "enrolled"; the others say which of Istio's include
/// lists the pod has (without one, `*`: everything not excluded is captured). A row written
/// before these existed holds 1 and means what it always meant.
pub mod pod_flags {
    pub const ENROLLED: u32 = 1 << 0;
    /// `includeInboundPorts` is a list, not `*`: only ports with
    /// [`super::port_rule::INCLUDE_INBOUND`] are captured inbound.
    pub const INBOUND_INCLUDE_ONLY: u32 = 1 << 1;
    /// `includeOutboundIPRanges` is a list, not `*`: only destinations in an included CIDR
    /// ([`super::cidr_rule::INCLUDE`]), or to an included port, are captured outbound.
    pub const OUTBOUND_INCLUDE_ONLY: u32 = 1 << 2;
    /// The pod captures DNS and its `lo` holds the IPv6 reply addresses
    /// ([`super::DNS_POOL6_BASE`]): unconnected and connected IPv6 UDP queries go to one of
    /// them per server. Without it (a row of an agent that did not assign them, or a pod
    /// without IPv6) they go to `::1`, and a socket's replies are named after the last server
    /// it asked.
    pub const DNS_POOL6: u32 = 1 << 3;
}

/// Values of the `CIDR4`/`CIDR6` tries. The longest prefix decides; the agent leaves out an
/// included range that an excluded one covers, so exclusions win as in Istio's rules
/// (`-d EXCLUDED -j RETURN` comes before `-d INCLUDED -j ISTIO_REDIRECT`).
pub mod cidr_rule {
    /// `excludeOutboundIPRanges`: never captured.
    pub const EXCLUDE: u32 = 1;
    /// `includeOutboundIPRanges`: captured (with `pod_flags::OUTBOUND_INCLUDE_ONLY`).
    pub const INCLUDE: u32 = 2;
}

/// Key of the outbound CIDR exclusion tries: the pod's slot, then the address, so one trie
/// serves every pod. The LPM prefix length counts the 32 slot bits plus the CIDR's length.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrKey4 {
    pub slot_be: u32,
    pub addr: u32,
}

/// IPv6 twin of [`CidrKey4`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrKey6 {
    pub slot_be: u32,
    pub addr: [u32; 4],
}

/// Key of the inbound listener `SockHash`: the pod's proxy listener for one address family.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerKey {
    pub slot: u32,
    pub family: u32,
}

/// What a redirected connection was, for the proxy's `SO_ORIGINAL_DST` and for bookkeeping.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// An application's outbound connection sent to the outbound listener.
    Outbound = 1,
    /// The proxy's own connection to its pod's address, sent to the inbound listener.
    ProxySelf = 2,
    /// The proxy's delivery of inbound traffic to the application.
    Delivery = 3,
    /// An inbound connection sk_lookup handed to the proxy: never rewritten, so the accepted
    /// socket's own address is the original destination (`orig_dst_local`).
    Inbound = 4,
    /// An application's DNS (connected UDP or TCP to port 53) sent to the proxy's DNS port.
    Dns = 5,
}

/// The original destination of a redirected connection: the value of `ORIG_DST` and of the
/// per-socket storage maps.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
    pub slot: u32,
    pub kind: ConnKind,
}

/// The four-tuple of a connection as its client sees it (client address first).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockTuple {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub family: u32,
}

/// Per-pod event counters: the index of each in a pod's row of the `COUNTERS` per-CPU array.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// A connection to the pod's address was handed to the proxy's inbound listener.
    InboundCaptured = 0,
    /// An inbound connection was not captured: its port is excluded.
    InboundExcluded,
    /// An inbound connection was refused: the pod's proxy has no inbound listener.
    InboundNoListener,
    /// An application connection was sent to the proxy's outbound listener.
    OutboundCaptured,
    /// An application connection was not captured: its port or CIDR is excluded.
    OutboundExcluded,
    /// The proxy's connection to its own pod address went to the inbound listener.
    ProxySelfCaptured,
    /// The proxy's delivery ended at the pod IP (from 127.0.0.6 / ::6).
    DeliveredPodIp,
    /// The proxy's delivery ended at loopback.
    DeliveredLoopback,
    /// A delivery was refused by the kernel: nothing listens where the policy sends it.
    DeliveryRefused,
    /// `SO_ORIGINAL_DST` answered from the remembered original destination.
    OrigDstHit,
    /// `SO_ORIGINAL_DST` answered with the socket's own address (captured by sk_lookup).
    OrigDstLocal,
    /// `SO_ORIGINAL_DST` asked by the proxy and nothing to answer.
    OrigDstMiss,
    /// A map was full: the connection went through unchanged.
    MapFull,
    /// The proxy started listening on its inbound port and was registered for capture.
    ListenerRegistered,
    /// An application's UDP DNS query went to the proxy's DNS port: one per datagram sent with
    /// an address (`sendmsg`), one per UDP socket connected to a DNS server.
    DnsCaptured,
    /// An application's TCP connection to port 53 went to the proxy's DNS port.
    DnsTcpCaptured,
    /// A datagram from the proxy's DNS port was reported to the application as coming from the
    /// server it asked (`recvmsg`).
    DnsRepliesRewritten,
    /// A redirected socket's `getpeername()` was answered with its original destination.
    PeernameRewritten,
}

/// Width of a pod's row in `COUNTERS`: room for counters added later. A counter added at an
/// index below it keeps `COUNTERS`' layout (older programs never write that index, so it reads
/// zero until they are replaced): compatible by design. Changing this value changes the map's
/// size, which the agent's layout check refuses as an incompatible datapath.
pub const COUNTERS_PER_POD: u32 = 24;

/// Number of counters a pod has now ([`Counter::ALL`]), at most [`COUNTERS_PER_POD`].
pub const COUNTERS_USED: usize = 18;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTERS_USED] = [
        Counter::InboundCaptured,
        Counter::InboundExcluded,
        Counter::InboundNoListener,
        Counter::OutboundCaptured,
        Counter::OutboundExcluded,
        Counter::ProxySelfCaptured,
        Counter::DeliveredPodIp,
        Counter::DeliveredLoopback,
        Counter::DeliveryRefused,
        Counter::OrigDstHit,
        Counter::OrigDstLocal,
        Counter::OrigDstMiss,
        Counter::MapFull,
        Counter::ListenerRegistered,
        Counter::DnsCaptured,
        Counter::DnsTcpCaptured,
        Counter::DnsRepliesRewritten,
        Counter::PeernameRewritten,
    ];

    /// The name used in `stats` output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::InboundCaptured => "inbound_captured",
            Counter::InboundExcluded => "inbound_excluded",
            Counter::InboundNoListener => "inbound_no_listener",
            Counter::OutboundCaptured => "outbound_captured",
            Counter::OutboundExcluded => "outbound_excluded",
            Counter::ProxySelfCaptured => "proxy_self_captured",
            Counter::DeliveredPodIp => "delivered_pod_ip",
            Counter::DeliveredLoopback => "delivered_loopback",
            Counter::DeliveryRefused => "delivery_refused",
            Counter::OrigDstHit => "orig_dst_hit",
            Counter::OrigDstLocal => "orig_dst_local",
            Counter::OrigDstMiss => "orig_dst_miss",
            Counter::MapFull => "map_full",
            Counter::ListenerRegistered => "listener_registered",
            Counter::DnsCaptured => "dns_captured",
            Counter::DnsTcpCaptured => "dns_tcp_captured",
            Counter::DnsRepliesRewritten => "dns_replies_rewritten",
            Counter::PeernameRewritten => "peername_rewritten",
        }
    }

    /// Index of this counter of the pod in `slot` in the `COUNTERS` array.
    #[inline(always)]
    pub const fn index(self, slot: u32) -> u32 {
        slot * COUNTERS_PER_POD + self as u32
    }
}

/// Whether `port` belongs to the proxy (never captured, never rewritten).
#[inline(always)]
pub fn is_proxy_port(port: u16) -> bool {
    // A plain loop over the table: LLVM turns it into a few compares, and the verifier sees no loop.
    let mut i = 0;
    while i < PROXY_PORTS.len() {
        if PROXY_PORTS[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: PodConfig is repr(C) and padding-free. Its `policy` byte is valid only as 0 or 1:
    // PODS is written by the agent alone, from this type, and a pin set of another layout is
    // refused by the datapath's compatibility check before any row is read.
    unsafe impl aya::Pod for PodConfig {}
    // SAFETY: OrigDst is repr(C) and padding-free. Its `kind` is valid only as a ConnKind:
    // ORIG_DST is written by the datapath alone, from this type, under the same compatibility
    // check as PODS.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: the rest are repr(C), padding-free (see the size asserts below) and valid for
    // any bit pattern: integers and arrays of integers only.
    unsafe impl aya::Pod for AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CidrKey4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CidrKey6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockTuple {}
}

// Padding would break byte-wise key comparison; fail the build instead.
const _: () = {
    assert!(core::mem::size_of::<PodConfig>() == 36);
    assert!(core::mem::size_of::<AddrKey>() == 20);
    assert!(core::mem::size_of::<PortKey>() == 8);
    assert!(core::mem::size_of::<CidrKey4>() == 8);
    assert!(core::mem::size_of::<CidrKey6>() == 20);
    assert!(core::mem::size_of::<ListenerKey>() == 8);
    assert!(core::mem::size_of::<OrigDst>() == 28);
    assert!(core::mem::size_of::<SockTuple>() == 40);
    assert!(Counter::ALL.len() <= COUNTERS_PER_POD as usize);
    // ALL is in index order: `stats` and the metrics read index i as ALL[i].
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!(Counter::ALL[i] as usize == i);
        i += 1;
    }
};
