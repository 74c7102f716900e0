//! The pure translation of a checked [`PodSpec`] into the datapath's map rows.
//!
//! Nothing here touches the kernel: enroll writes exactly these rows, and the golden tests
//! (`tests/golden/rows/*.txt`, run as an ordinary user) pin down what each spec installs, as
//! Istio's `istio-iptables` tests pin down the rules it generates.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use redirect_common::{
    cidr_rule, pod_flags, port_rule, AddrKey, CidrKey4, CidrKey6, InboundPolicy, PodConfig,
    PortKey, AF_INET, AF_INET6, DEFAULT_EXCLUDED_INBOUND_PORTS,
};

use crate::spec::{Cidr, PodSpec};

/// Every row one pod owns, in the order enroll writes them (see [`crate::enroll`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRows {
    pub slot: u32,
    /// `PODS[slot]`.
    pub config: PodConfig,
    /// `POD_CGROUPS[cgroup_id] = slot`.
    pub cgroup_id: u64,
    /// `POD_ADDRS[addr] = slot`.
    pub addrs: Vec<AddrKey>,
    /// `PORT_RULES[slot, port] = bits`.
    pub port_rules: Vec<(PortKey, u32)>,
    /// `CIDR4[slot . net / 32 + len] = rule`: (prefix length in the trie, key, [`cidr_rule`]).
    pub cidr4: Vec<(u32, CidrKey4, u32)>,
    /// `CIDR6[slot . net / 32 + len] = rule`.
    pub cidr6: Vec<(u32, CidrKey6, u32)>,
}

/// The kernel's view of an address: network-order words, IPv4 in word 0.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let b = v6.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
            })
        }
    }
}

/// The address back from its words (for golden output and for checking pins).
pub fn words_addr(words: [u32; 4], family: u32) -> IpAddr {
    if family == u32::from(AF_INET) {
        IpAddr::from(words[0].to_ne_bytes())
    } else {
        let mut b = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(b)
    }
}

/// The `POD_ADDRS` key of an address.
pub fn addr_key(ip: IpAddr) -> AddrKey {
    let family = if ip.is_ipv4() { AF_INET } else { AF_INET6 };
    AddrKey {
        addr: addr_words(ip),
        family: u32::from(family),
    }
}

/// Every port rule of the pod, Istio's default inbound exclusions included, by port.
pub fn port_rules(spec: &PodSpec) -> BTreeMap<u16, u32> {
    let mut ports: BTreeMap<u16, u32> = BTreeMap::new();
    // With an include list Istio ignores `excludeInboundPorts`; its own ports stay excluded.
    let user_excluded = match spec.include_inbound_ports {
        None => &spec.exclude_inbound_ports[..],
        Some(_) => &[],
    };
    for p in DEFAULT_EXCLUDED_INBOUND_PORTS.iter().chain(user_excluded) {
        *ports.entry(*p).or_default() |= port_rule::EXCLUDE_INBOUND;
    }
    for p in spec.include_inbound_ports.iter().flatten() {
        *ports.entry(*p).or_default() |= port_rule::INCLUDE_INBOUND;
    }
    for p in &spec.exclude_outbound_ports {
        *ports.entry(*p).or_default() |= port_rule::EXCLUDE_OUTBOUND;
    }
    for p in &spec.include_outbound_ports {
        *ports.entry(*p).or_default() |= port_rule::INCLUDE_OUTBOUND;
    }
    for (p, policy) in &spec.port_policies {
        *ports.entry(*p).or_default() |= match policy {
            InboundPolicy::Passthrough => port_rule::DELIVERY_OVERRIDE,
            InboundPolicy::Localhost => {
                port_rule::DELIVERY_OVERRIDE | port_rule::DELIVERY_LOCALHOST
            }
        };
    }
    ports
}

/// Every CIDR rule of the pod with its [`cidr_rule`] value: the exclusions, and the included
/// ranges that no exclusion covers (the trie's longest prefix would otherwise let an included
/// range inside an excluded one win, where Istio's rules exclude it).
pub fn cidr_rules(spec: &PodSpec) -> Vec<(Cidr, u32)> {
    let mut out: Vec<(Cidr, u32)> = spec
        .exclude_outbound_cidrs
        .iter()
        .map(|c| (*c, cidr_rule::EXCLUDE))
        .collect();
    for inc in spec.include_outbound_cidrs.iter().flatten() {
        if !spec
            .exclude_outbound_cidrs
            .iter()
            .any(|ex| ex.contains(inc))
        {
            out.push((*inc, cidr_rule::INCLUDE));
        }
    }
    out
}

/// The trie key of an outbound CIDR rule: 32 bits of slot, then the network.
fn cidr_prefix(c: &Cidr) -> u32 {
    32 + u32::from(c.len)
}

/// The configuration row of a pod.
pub fn pod_config(spec: &PodSpec) -> PodConfig {
    let mut enrolled = pod_flags::ENROLLED;
    if spec.include_inbound_ports.is_some() {
        enrolled |= pod_flags::INBOUND_INCLUDE_ONLY;
    }
    if spec.include_outbound_cidrs.is_some() {
        enrolled |= pod_flags::OUTBOUND_INCLUDE_ONLY;
    }
    if dns_pool6(spec) {
        enrolled |= pod_flags::DNS_POOL6;
    }
    PodConfig {
        enrolled,
        proxy_uid: spec.proxy_uid,
        ip4: spec.ip4().map_or(0, |a| addr_words(a.into())[0]),
        ip6: spec.ip6().map_or([0; 4], |a| addr_words(a.into())),
        proxy_inbound_port: spec.proxy_inbound_port,
        proxy_outbound_port: spec.proxy_outbound_port,
        policy: spec.inbound_policy,
        dns_capture: u8::from(spec.dns_capture),
        dns_port_be: if spec.dns_capture {
            spec.proxy_dns_port.to_be_bytes()
        } else {
            [0; 2]
        },
    }
}

/// Whether the pod's `lo` holds the IPv6 DNS reply addresses (`netns::dns_pool6`) while it is
/// enrolled with this spec: it captures DNS and has an IPv6 address. Enroll assigns them before
/// the row says so ([`pod_flags::DNS_POOL6`]) and removes them after it no longer does.
pub fn dns_pool6(spec: &PodSpec) -> bool {
    spec.dns_capture && spec.ip6().is_some()
}

/// A free `PODS` row.
pub const FREE_CONFIG: PodConfig = PodConfig {
    enrolled: 0,
    proxy_uid: 0,
    ip4: 0,
    ip6: [0; 4],
    proxy_inbound_port: 0,
    proxy_outbound_port: 0,
    policy: InboundPolicy::Passthrough,
    dns_capture: 0,
    dns_port_be: [0; 2],
};

impl PodRows {
    /// The rows of a checked spec in `slot`, for the cgroup with id `cgroup_id`.
    pub fn new(spec: &PodSpec, slot: u32, cgroup_id: u64) -> PodRows {
        let port_rules = port_rules(spec)
            .into_iter()
            .map(|(port, bits)| {
                (
                    PortKey {
                        slot,
                        port,
                        _pad: 0,
                    },
                    bits,
                )
            })
            .collect();
        let slot_be = slot.to_be();
        let mut cidr4 = Vec::new();
        let mut cidr6 = Vec::new();
        for (c, rule) in cidr_rules(spec) {
            let words = addr_words(c.addr);
            match c.addr {
                IpAddr::V4(_) => cidr4.push((
                    cidr_prefix(&c),
                    CidrKey4 {
                        slot_be,
                        addr: words[0],
                    },
                    rule,
                )),
                IpAddr::V6(_) => cidr6.push((
                    cidr_prefix(&c),
                    CidrKey6 {
                        slot_be,
                        addr: words,
                    },
                    rule,
                )),
            }
        }
        PodRows {
            slot,
            config: pod_config(spec),
            cgroup_id,
            addrs: spec.pod_ips.iter().map(|ip| addr_key(*ip)).collect(),
            port_rules,
            cidr4,
            cidr6,
        }
    }
}

/// Names of the port rule bits, in bit order.
fn rule_names(bits: u32) -> String {
    let mut out = Vec::new();
    if bits & port_rule::EXCLUDE_INBOUND != 0 {
        out.push("exclude-inbound");
    }
    if bits & port_rule::EXCLUDE_OUTBOUND != 0 {
        out.push("exclude-outbound");
    }
    if bits & port_rule::INCLUDE_INBOUND != 0 {
        out.push("include-inbound");
    }
    if bits & port_rule::INCLUDE_OUTBOUND != 0 {
        out.push("include-outbound");
    }
    if bits & port_rule::DELIVERY_OVERRIDE != 0 {
        out.push(if bits & port_rule::DELIVERY_LOCALHOST != 0 {
            "deliver-localhost"
        } else {
            "deliver-passthrough"
        });
    }
    out.join(",")
}

/// One line per row, as the golden files hold them.
impl fmt::Display for PodRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let ip4 = if c.ip4 == 0 {
            "-".to_owned()
        } else {
            words_addr([c.ip4, 0, 0, 0], AF_INET.into()).to_string()
        };
        let ip6 = if c.ip6 == [0; 4] {
            "-".to_owned()
        } else {
            words_addr(c.ip6, AF_INET6.into()).to_string()
        };
        // DNS capture only when on: the rows of a pod without it read as they always did.
        let dns = if c.dns_capture != 0 {
            format!(" dns_port={}", c.dns_port())
        } else {
            String::new()
        };
        // Include lists only when given: the rows of a pod without them read as they always did.
        let mut includes = String::new();
        if c.enrolled & pod_flags::INBOUND_INCLUDE_ONLY != 0 {
            includes.push_str(" inbound=include-only");
        }
        if c.enrolled & pod_flags::OUTBOUND_INCLUDE_ONLY != 0 {
            includes.push_str(" outbound=include-only");
        }
        let dns = if c.enrolled & pod_flags::DNS_POOL6 != 0 {
            format!("{dns} dns_pool6")
        } else {
            dns
        };
        writeln!(
            f,
            "PODS[{}] = enrolled{includes} proxy_uid={} ip4={ip4} ip6={ip6} inbound_port={} outbound_port={} policy={}{dns}",
            self.slot, c.proxy_uid, c.proxy_inbound_port, c.proxy_outbound_port, c.policy
        )?;
        writeln!(f, "POD_CGROUPS[{}] = {}", self.cgroup_id, self.slot)?;
        for a in &self.addrs {
            writeln!(
                f,
                "POD_ADDRS[{}] = {}",
                words_addr(a.addr, a.family),
                self.slot
            )?;
        }
        for (k, bits) in &self.port_rules {
            writeln!(
                f,
                "PORT_RULES[{}:{}] = {}",
                k.slot,
                k.port,
                rule_names(*bits)
            )?;
        }
        let cidr_name = |rule: u32| {
            if rule == cidr_rule::INCLUDE {
                "include"
            } else {
                "1"
            }
        };
        for (len, k, rule) in &self.cidr4 {
            let net = words_addr([k.addr, 0, 0, 0], AF_INET.into());
            writeln!(
                f,
                "CIDR4[{}:{net}/{}] = {}",
                u32::from_be(k.slot_be),
                len - 32,
                cidr_name(*rule)
            )?;
        }
        for (len, k, rule) in &self.cidr6 {
            let net = words_addr(k.addr, AF_INET6.into());
            writeln!(
                f,
                "CIDR6[{}:{net}/{}] = {}",
                u32::from_be(k.slot_be),
                len - 32,
                cidr_name(*rule)
            )?;
        }
        Ok(())
    }
}
