//! What an operator asks for when enrolling a pod, parsed and checked before anything changes.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, str::FromStr};

use redirect_common::InboundPolicy;

/// An IP network, `ADDR/LEN` (a bare address means the host route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
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
        Ok(Cidr { addr, len })
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
    let policy: InboundPolicy = pol.parse().map_err(|e| {
        format!("invalid policy {:?} for port {port}: {e}", pol.trim())
    })?;
    Ok((port, policy))
}

/// A validated enrollment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    pub pod_ips: Vec<IpAddr>,
    pub proxy_uid: u32,
    pub inbound_policy: InboundPolicy,
    pub port_policies: BTreeMap<u16, InboundPolicy>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
    pub proxy_inbound_port: u16,
    pub proxy_outbound_port: u16,
}

/// Input errors found before anything is changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid pod name {0:?}: use 1-63 characters from [A-Za-z0-9._-]")]
    Name(String),
    #[error("at least one --pod-ip is required")]
    NoPodIp,
    #[error("pod IP {0} is not usable (unspecified, loopback or multicast)")]
    BadPodIp(IpAddr),
    #[error("port {0} is given two policies")]
    PortTwoPolicies(u16),
    #[error("proxy inbound and outbound ports must differ (both {0})")]
    SameProxyPorts(u16),
}

/// Checks a name: it becomes a file name and a bpffs directory.
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

/// Builds the per-port policy table, refusing a port named twice.
pub fn port_policies(list: &[(u16, InboundPolicy)]) -> Result<BTreeMap<u16, InboundPolicy>, SpecError> {
    let mut out = BTreeMap::new();
    for (port, policy) in list {
        if out.insert(*port, *policy).is_some() {
            return Err(SpecError::PortTwoPolicies(*port));
        }
    }
    Ok(out)
}

impl PodSpec {
    /// The checks that need nothing but the request itself.
    pub fn check(&self) -> Result<(), SpecError> {
        check_name(&self.name)?;
        if self.pod_ips.is_empty() {
            return Err(SpecError::NoPodIp);
        }
        for ip in &self.pod_ips {
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                return Err(SpecError::BadPodIp(*ip));
            }
        }
        if self.proxy_inbound_port == self.proxy_outbound_port {
            return Err(SpecError::SameProxyPorts(self.proxy_inbound_port));
        }
        Ok(())
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
            port_policies(&[(80, InboundPolicy::Localhost), (80, InboundPolicy::Passthrough)]),
            Err(SpecError::PortTwoPolicies(80))
        );
    }

    #[test]
    fn names() {
        assert!(check_name("server-1.ns").is_ok());
        assert!(check_name("../x").is_err());
        assert!(check_name("").is_err());
    }
}
