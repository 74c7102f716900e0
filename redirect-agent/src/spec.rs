//! What an operator asks for when enrolling a pod, parsed and checked before anything changes.
//!
//! [`PodSpec::check`] holds every refusal that needs nothing but the request: a spec that passes
//! it can be turned into map rows ([`crate::rows`]) without another error. Checks that need the
//! machine (the cgroup, the namespace, other pods) are the enroll transaction's.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    str::FromStr,
};

use redirect_common::{
    InboundPolicy, DEFAULT_EXCLUDED_INBOUND_PORTS, MAX_CIDR_RULES_PER_POD, MAX_PORT_RULES_PER_POD,
    PROXY_PORTS,
};
use serde::{Deserialize, Serialize};

/// An IP network, `ADDR/LEN` (a bare address means the host route). Host bits are cleared on
/// parsing, so `198.18.100.7/24` and `198.18.100.0/24` are the same network and the same row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// The network with its host bits cleared.
    pub fn new(addr: IpAddr, len: u8) -> Cidr {
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Cidr { addr, len }
    }
}

// Records keep CIDRs typed but readable: "198.18.100.0/24". A bad one fails the read, loudly.
impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("invalid CIDR {s:?}: bad address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = if l.is_empty() {
            max
        } else {
            l.trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("invalid CIDR {s:?}: prefix length must be 0..={max}"))?
        };
        Ok(Cidr::new(addr, len))
    }
}

impl Cidr {
    /// Whether `other` lies entirely within this network.
    pub fn contains(&self, other: &Cidr) -> bool {
        self.len <= other.len
            && self.addr.is_ipv4() == other.addr.is_ipv4()
            && Cidr::new(other.addr, self.len).addr == self.addr
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A port, 1..=65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(format!("invalid port {s:?}: must be 1..65535")),
    }
}

/// A comma-separated list of ports (`15020,8080`); empty items are ignored.
pub fn parse_port_list(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_port)
        .collect()
}

/// A comma-separated list of CIDRs.
pub fn parse_cidr_list(s: &str) -> Result<Vec<Cidr>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(Cidr::from_str)
        .collect()
}

/// `PORT=passthrough|localhost`.
pub fn parse_port_policy(s: &str) -> Result<(u16, InboundPolicy), String> {
    let (p, pol) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid port policy {s:?}: expected PORT=passthrough|localhost"))?;
    let port = parse_port(p)?;
    let policy: InboundPolicy = pol
        .parse()
        .map_err(|e| format!("invalid policy {:?} for port {port}: {e}", pol.trim()))?;
    Ok((port, policy))
}

/// An enrollment request: what the operator (or the CNI plugin, or the API watch) asks for.
/// [`PodSpec::check`] is what makes it valid; the stored record is this plus what enroll derived.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    /// The pod's namespace (Kubernetes'), when it has one: a label of its metrics and log
    /// lines, nothing else (the name alone identifies the pod here). A pod enrolled by hand
    /// without `--namespace` has none; records written before it existed load without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    pub pod_ips: Vec<IpAddr>,
    pub proxy_uid: u32,
    pub inbound_policy: InboundPolicy,
    #[serde(default, with = "port_keyed")]
    pub port_policies: BTreeMap<u16, InboundPolicy>,
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
    #[serde(default)]
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Istio's `includeInboundPorts`: `None` is `*` (every port not excluded is captured); a
    /// list, even empty, captures only those ports, and `exclude_inbound_ports` is then
    /// ignored, as Istio does (Istio's own never-captured ports stay excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_inbound_ports: Option<Vec<u16>>,
    /// Istio's `includeOutboundPorts`: captured whatever the destination address (with an
    /// `include_outbound_cidrs` list), unless the port or the address is excluded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_outbound_ports: Vec<u16>,
    /// Istio's `includeOutboundIPRanges`: `None` is `*`; a list, even empty, captures only
    /// destinations in those ranges (or to an included port). Exclusions win over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_outbound_cidrs: Option<Vec<Cidr>>,
    pub proxy_inbound_port: u16,
    pub proxy_outbound_port: u16,
    /// Capture the application's DNS (UDP and TCP to port 53) to `proxy_dns_port` on loopback
    /// (Istio's `ISTIO_META_DNS_CAPTURE`). Off by default; left out of a record when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dns_capture: bool,
    /// The proxy's DNS listener port (Istio's 15053).
    #[serde(
        default = "default_dns_port",
        skip_serializing_if = "is_default_dns_port"
    )]
    pub proxy_dns_port: u16,
    /// The Kubernetes pod this record is, for pods enrolled from the container runtime (CNI,
    /// CRI discovery); absent for pods enrolled by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube: Option<KubeRef>,
}

/// Which Kubernetes pod, and which of its sandboxes, a record is (see `crate::kubepods`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The sandbox (CNI container id): a late DEL of an old sandbox never removes a newer one.
    pub sandbox_id: String,
}

/// Istio's DNS proxy port.
pub const DEFAULT_DNS_PORT: u16 = 15053;

fn default_dns_port() -> u16 {
    DEFAULT_DNS_PORT
}

fn is_default_dns_port(p: &u16) -> bool {
    *p == DEFAULT_DNS_PORT
}

/// A port-keyed map as JSON writes it (`{"9000": ...}`), read through string keys: records
/// are flattened, and serde's flattening cannot turn a string key into a number by itself.
mod port_keyed {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, V: Serialize>(
        m: &BTreeMap<u16, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        m.iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<BTreeMap<String, &V>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, V: Deserialize<'de>>(
        d: D,
    ) -> Result<BTreeMap<u16, V>, D::Error> {
        BTreeMap::<String, V>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| {
                super::parse_port(&k)
                    .map(|p| (p, v))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

/// Input errors found before anything is changed. Each names the offending value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Names become file names and bpffs directory names.
    #[error(
        "invalid pod name {0:?}: use 1-63 characters from [A-Za-z0-9._-], not starting with '.'"
    )]
    Name(String),
    #[error(
        "invalid namespace {0:?}: use a Kubernetes namespace name (1-63 characters from \
         [a-z0-9-], starting and ending with a letter or digit)"
    )]
    Namespace(String),
    #[error("at least one --pod-ip is required")]
    NoPodIp,
    /// An address no pod can own: the datapath would capture or refuse the wrong traffic.
    #[error("pod IP {ip} is not usable: {why}")]
    BadPodIp { ip: IpAddr, why: &'static str },
    #[error("pod IP {0} is given twice")]
    DuplicatePodIp(IpAddr),
    /// sk_lookup and the connect hooks keep one address per family.
    #[error(
        "pod IPs {0} and {1} are of the same family; give at most one IPv4 and one IPv6 address"
    )]
    TwoPodIpsOfFamily(IpAddr, IpAddr),
    #[error("port {0} is given two policies")]
    PortTwoPolicies(u16),
    #[error("proxy inbound and outbound ports must differ (both {0})")]
    SameProxyPorts(u16),
    /// uid 0 would make every root process in the pod "the proxy", never captured.
    #[error("proxy uid 0 is refused: every root process in the pod would bypass the proxy")]
    ProxyUidRoot,
    /// A proxy listener port that the datapath never captures, so capture would never happen.
    #[error("proxy {which} port {port} is {why}: traffic would never reach the proxy")]
    ProxyPortNotCapturable {
        which: &'static str,
        port: u16,
        why: &'static str,
    },
    /// Per-pod capacity of the shared rule maps (docs/DESIGN.md, "Capacity").
    #[error("pod {name}: {count} {what} exceed the per-pod limit of {limit}")]
    TooManyRules {
        name: String,
        what: &'static str,
        count: usize,
        limit: u32,
    },
}

/// Checks a name: it becomes a record file name and (encoded, see [`pin_dir_name`]) a bpffs
/// directory name.
/// A namespace is a Kubernetes namespace name: an RFC 1123 label (1-63 characters of
/// `[a-z0-9-]`, starting and ending with a letter or digit).
pub fn check_namespace(ns: &str) -> Result<(), SpecError> {
    let ok = !ns.is_empty()
        && ns.len() < 64
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::Namespace(ns.to_owned()))
    }
}

pub fn check_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() < 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Name(name.to_owned()))
    }
}

/// The pod's directory name under `PIN_ROOT/pods/`. bpffs refuses names containing `.`
/// (`bpf_lookup` returns EPERM), so `.` is written `~2e`; `~` is not allowed in pod names, so
/// two names never share a directory.
pub fn pin_dir_name(name: &str) -> String {
    name.replace('.', "~2e")
}

/// Builds the per-port policy table, refusing a port named twice.
pub fn port_policies(
    list: &[(u16, InboundPolicy)],
) -> Result<BTreeMap<u16, InboundPolicy>, SpecError> {
    let mut out = BTreeMap::new();
    for (port, policy) in list {
        if out.insert(*port, *policy).is_some() {
            return Err(SpecError::PortTwoPolicies(*port));
        }
    }
    Ok(out)
}

/// Why `ip` cannot be a pod's address, if it cannot.
pub fn unusable_pod_ip(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if ip.is_multicast() {
        return Some("multicast");
    }
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            if a.is_broadcast() {
                Some("the limited broadcast address")
            } else if o[0] == 0 {
                Some("in 0.0.0.0/8 (\"this network\")")
            } else if o[0] >= 240 {
                Some("class E (240.0.0.0/4, reserved)")
            } else if a.is_link_local() {
                Some("link-local (169.254.0.0/16)")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let seg = a.segments();
            if a.to_ipv4_mapped().is_some() {
                Some("IPv4-mapped (::ffff:0:0/96); give the IPv4 address itself")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("link-local (fe80::/10)")
            } else {
                None
            }
        }
    }
}

impl PodSpec {
    /// Every check that needs nothing but the request itself. Lists are normalised first
    /// (duplicates in exclusion lists mean nothing), so the rows derived from a checked spec
    /// are exactly what was asked for.
    pub fn check(&mut self) -> Result<(), SpecError> {
        check_name(&self.name)?;
        if let Some(ns) = &self.namespace {
            check_namespace(ns)?;
        }
        if self.pod_ips.is_empty() {
            return Err(SpecError::NoPodIp);
        }
        for (i, ip) in self.pod_ips.iter().enumerate() {
            if let Some(why) = unusable_pod_ip(*ip) {
                return Err(SpecError::BadPodIp { ip: *ip, why });
            }
            if let Some(other) = self.pod_ips[..i]
                .iter()
                .find(|o| o.is_ipv4() == ip.is_ipv4())
            {
                return Err(if other == ip {
                    SpecError::DuplicatePodIp(*ip)
                } else {
                    SpecError::TwoPodIpsOfFamily(*other, *ip)
                });
            }
        }
        if self.proxy_uid == 0 {
            return Err(SpecError::ProxyUidRoot);
        }
        if self.proxy_inbound_port == self.proxy_outbound_port {
            return Err(SpecError::SameProxyPorts(self.proxy_inbound_port));
        }
        if self.dns_capture
            && (self.proxy_dns_port == self.proxy_inbound_port
                || self.proxy_dns_port == self.proxy_outbound_port)
        {
            return Err(SpecError::SameProxyPorts(self.proxy_dns_port));
        }
        for list in [
            &mut self.exclude_inbound_ports,
            &mut self.exclude_outbound_ports,
        ] {
            let set: BTreeSet<u16> = list.iter().copied().collect();
            *list = set.into_iter().collect();
        }
        for list in [&mut self.include_outbound_ports]
            .into_iter()
            .chain(self.include_inbound_ports.as_mut())
        {
            let set: BTreeSet<u16> = list.iter().copied().collect();
            *list = set.into_iter().collect();
        }
        for list in [&mut self.exclude_outbound_cidrs]
            .into_iter()
            .chain(self.include_outbound_cidrs.as_mut())
        {
            let set: BTreeSet<Cidr> = list.iter().copied().collect();
            *list = set.into_iter().collect();
        }
        for (which, port) in [
            ("inbound", self.proxy_inbound_port),
            ("outbound", self.proxy_outbound_port),
        ] {
            let why = if port == 0 {
                Some("0, which names no port")
            } else if DEFAULT_EXCLUDED_INBOUND_PORTS.contains(&port) {
                Some("one of Istio's never-captured inbound ports (15008, 15020, 15021, 15090)")
            } else if PROXY_PORTS.contains(&port) && port != 15001 && port != 15006 {
                Some("another port of the proxy (admin, HBONE, health, DNS...)")
            } else if self.exclude_inbound_ports.contains(&port) {
                Some("also an excluded inbound port")
            } else if self.exclude_outbound_ports.contains(&port) {
                Some("also an excluded outbound port")
            } else if self.port_policies.contains_key(&port) {
                Some("also given a port policy")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(SpecError::ProxyPortNotCapturable { which, port, why });
            }
        }
        let rules = crate::rows::port_rules(self).len();
        if rules > MAX_PORT_RULES_PER_POD as usize {
            return Err(self.too_many(
                "port rules (exclusions and port policies)",
                rules,
                MAX_PORT_RULES_PER_POD,
            ));
        }
        for (v4, what) in [(true, "IPv4 CIDRs"), (false, "IPv6 CIDRs")] {
            let n = self
                .exclude_outbound_cidrs
                .iter()
                .chain(self.include_outbound_cidrs.iter().flatten())
                .filter(|c| c.addr.is_ipv4() == v4)
                .count();
            if n > MAX_CIDR_RULES_PER_POD as usize {
                return Err(self.too_many(what, n, MAX_CIDR_RULES_PER_POD));
            }
        }
        Ok(())
    }

    fn too_many(&self, what: &'static str, count: usize, limit: u32) -> SpecError {
        SpecError::TooManyRules {
            name: self.name.clone(),
            what,
            count,
            limit,
        }
    }

    /// The pod's `namespace` and `pod` labels (metrics, logs): its namespace, empty for a pod
    /// enrolled without one, and its name.
    pub fn labels(&self) -> (&str, &str) {
        // A pod from the runtime is labelled with its Kubernetes name, not its record name
        // (`NAMESPACE.NAME`, see `crate::kubepods::record_name`).
        let pod = self.kube.as_ref().map_or(&self.name[..], |k| &k.name[..]);
        (self.namespace.as_deref().unwrap_or(""), pod)
    }

    /// The pod's IPv4 address, if it has one.
    pub fn ip4(&self) -> Option<Ipv4Addr> {
        self.pod_ips.iter().find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
    }

    /// The pod's IPv6 address, if it has one.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.pod_ips.iter().find_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
    }

    /// Whether an inbound connection to `port` of the pod is captured: the question the
    /// datapath's sk_lookup answers from the rows of [`crate::rows::port_rules`], asked here of
    /// the same rows (for `detect`).
    pub fn captures_inbound(&self, port: u16) -> bool {
        !redirect_common::is_proxy_port(port)
            && port != self.proxy_inbound_port
            && port != self.proxy_outbound_port
            && {
                use redirect_common::port_rule::{EXCLUDE_INBOUND, INCLUDE_INBOUND};
                let bits = crate::rows::port_rules(self)
                    .get(&port)
                    .copied()
                    .unwrap_or(0);
                bits & EXCLUDE_INBOUND == 0
                    && (self.include_inbound_ports.is_none() || bits & INCLUDE_INBOUND != 0)
            }
    }

    /// The policy that applies to inbound port `port`: the per-port override or the pod's.
    pub fn policy_for(&self, port: u16) -> InboundPolicy {
        self.port_policies
            .get(&port)
            .copied()
            .unwrap_or(self.inbound_policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_lists() {
        assert_eq!(parse_port_list("15020, 8080,").unwrap(), vec![15020, 8080]);
        assert!(parse_port("0").is_err());
        assert!(parse_port("65536").is_err());
        assert!(parse_port_list("80,x").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr_list("10.0.0.0/8,2001:db8::/32").unwrap().len(),
            2
        );
        assert_eq!("198.18.0.1".parse::<Cidr>().unwrap().len, 32);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("2001:db8::/129".parse::<Cidr>().is_err());
    }

    #[test]
    fn policies() {
        assert_eq!(
            parse_port_policy("80=localhost").unwrap(),
            (80, InboundPolicy::Localhost)
        );
        assert!(parse_port_policy("80=other").is_err());
        assert_eq!(
            port_policies(&[
                (80, InboundPolicy::Localhost),
                (80, InboundPolicy::Passthrough)
            ]),
            Err(SpecError::PortTwoPolicies(80))
        );
    }

    #[test]
    fn namespaces() {
        assert!(check_namespace("kube-system").is_ok());
        assert!(check_namespace("a").is_ok());
        for bad in ["", "Prod", "-a", "a-", "a.b", "a/b", &"x".repeat(64)] {
            assert!(check_namespace(bad).is_err(), "{bad:?}");
        }
    }

    /// Port 0 names no listener; the bind hook relies on the inbound port never being 0.
    #[test]
    fn proxy_port_zero_is_refused() {
        for (inbound, outbound) in [(0, 15001), (15006, 0)] {
            let mut spec = PodSpec {
                name: "p".into(),
                pod_ips: vec!["198.18.0.10".parse().unwrap()],
                proxy_uid: 1337,
                proxy_inbound_port: inbound,
                proxy_outbound_port: outbound,
                ..PodSpec::default()
            };
            assert!(
                matches!(
                    spec.check(),
                    Err(SpecError::ProxyPortNotCapturable { port: 0, .. })
                ),
                "{inbound} {outbound}"
            );
        }
    }

    #[test]
    fn names() {
        assert!(check_name("server-1.ns").is_ok());
        assert!(check_name("../x").is_err());
        assert!(check_name("").is_err());
    }
}
