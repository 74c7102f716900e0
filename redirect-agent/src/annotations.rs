//! A Kubernetes pod's annotations, read as Istio reads them: which pods are enrolled, and the
//! [`PodSpec`] of one, from Istio's `traffic.sidecar.istio.io/*` annotations, redirect's own
//! `redirect.dev/*` ones and the node's defaults (the agent's `--config`, `podDefaults`).
//!
//! Values are parsed as `istio-iptables` validates them: lists are comma-separated, items are
//! trimmed, an empty value is an empty list (which for an include list means "nothing"), `*`
//! means every port or address and may not be mixed with items, and an empty item (`"80,"`)
//! or a bad value is refused with the annotation named, before anything changes.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, str::FromStr as _};

use redirect_common::InboundPolicy;
use serde::{Deserialize, Serialize};

use crate::spec::{self, Cidr, KubeRef, PodSpec};

/// Istio's injection status: present on every pod whose sidecar was injected.
pub const ISTIO_STATUS: &str = "sidecar.istio.io/status";
/// Istio's injection switch; `"false"` keeps the pod out.
pub const ISTIO_INJECT: &str = "sidecar.istio.io/inject";
/// redirect's own switch: `"true"` enrolls a pod without Istio's injection, `"false"` never.
pub const ENABLED: &str = "redirect.dev/enabled";
/// Set on the agent's own pods (the DaemonSet's template): never enrolled, so the agent's pod
/// never waits for the agent.
pub const AGENT: &str = "redirect.dev/agent";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// `passthrough` or `localhost`: where inbound traffic ends (Istio's
/// `inboundTrafficPolicy.mode`, per pod).
pub const INBOUND_POLICY: &str = "redirect.dev/inbound-policy";
/// `PORT=passthrough|localhost,...`: per-port overrides of the inbound policy.
pub const PORT_POLICY: &str = "redirect.dev/port-policy";
/// `"true"`: capture the application's DNS to the proxy's DNS port.
pub const DNS_CAPTURE: &str = "redirect.dev/dns-capture";
/// Istio's per-pod `ProxyConfig` (YAML); its `proxyMetadata.ISTIO_META_DNS_CAPTURE: "true"`
/// turns DNS capture on, as in Istio.
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";

/// Kubernetes namespaces never enrolled unless configured otherwise (the plugin's
/// `excludeNamespaces` default).
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 1] = ["kube-system"];

/// A pod's annotations.
pub type Annotations = BTreeMap<String, String>;

/// Why a pod is not enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    /// Its namespace is excluded.
    ExcludedNamespace,
    /// One of the agent's own pods.
    AgentPod,
    /// `redirect.dev/enabled: "false"`.
    Disabled,
    /// `sidecar.istio.io/inject: "false"`.
    InjectFalse,
    /// Neither Istio's injection status nor `redirect.dev/enabled: "true"`.
    NotSelected,
}

impl Skip {
    pub const fn name(self) -> &'static str {
        match self {
            Skip::ExcludedNamespace => "excluded namespace",
            Skip::AgentPod => "the agent's own pod",
            Skip::Disabled => "redirect.dev/enabled is false",
            Skip::InjectFalse => "sidecar.istio.io/inject is false",
            Skip::NotSelected => {
                "neither sidecar.istio.io/status nor redirect.dev/enabled: \"true\""
            }
        }
    }
}

/// A bad annotation value: the pod is refused, with the annotation and the value named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}: {value:?}: {why}")]
pub struct AnnotationError {
    pub key: String,
    pub value: String,
    pub why: String,
}

fn bad(key: &str, value: &str, why: impl Into<String>) -> AnnotationError {
    AnnotationError {
        key: key.to_owned(),
        value: value.to_owned(),
        why: why.into(),
    }
}

/// A boolean as Go's `strconv.ParseBool` reads it (what Istio uses for its annotations).
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Whether a pod is enrolled. The refusals come first: an excluded namespace, the agent's own
/// pods, `redirect.dev/enabled: "false"`, `sidecar.istio.io/inject: "false"`; then a pod is
/// enrolled if it has `redirect.dev/enabled: "true"` or Istio's injection status. A
/// `redirect.dev/enabled` that is not a boolean is refused.
pub fn select<S: AsRef<str>>(
    namespace: &str,
    annotations: &Annotations,
    exclude_namespaces: &[S],
) -> Result<Result<(), Skip>, AnnotationError> {
    if exclude_namespaces.iter().any(|n| n.as_ref() == namespace) {
        return Ok(Err(Skip::ExcludedNamespace));
    }
    if annotations.get(AGENT).and_then(|v| parse_bool(v)) == Some(true) {
        return Ok(Err(Skip::AgentPod));
    }
    let enabled = match annotations.get(ENABLED) {
        None => None,
        Some(v) => Some(parse_bool(v).ok_or_else(|| bad(ENABLED, v, "expected true or false"))?),
    };
    if enabled == Some(false) {
        return Ok(Err(Skip::Disabled));
    }
    if annotations.get(ISTIO_INJECT).and_then(|v| parse_bool(v)) == Some(false) {
        return Ok(Err(Skip::InjectFalse));
    }
    if enabled == Some(true) || annotations.contains_key(ISTIO_STATUS) {
        Ok(Ok(()))
    } else {
        Ok(Err(Skip::NotSelected))
    }
}

/// `*` or a list of items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wildcard<T> {
    All,
    List(Vec<T>),
}

impl<T> Wildcard<T> {
    /// `None` for `*`, as [`PodSpec`] keeps include lists.
    pub fn into_option(self) -> Option<Vec<T>> {
        match self {
            Wildcard::All => None,
            Wildcard::List(l) => Some(l),
        }
    }
}

/// Items of a comma-separated list, trimmed; empty value, empty list; an empty item refused.
fn items(s: &str) -> Result<Vec<&str>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|i| {
            let i = i.trim();
            if i.is_empty() {
                Err("an empty item in the list".to_owned())
            } else {
                Ok(i)
            }
        })
        .collect()
}

/// A comma-separated list of items, each read by `parse`; `*` is refused (only the wildcard
/// forms below accept it, alone).
fn parse_list<T>(s: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    items(s)?
        .into_iter()
        .map(|i| {
            if i == "*" {
                Err("\"*\" is not allowed here".to_owned())
            } else {
                parse(i)
            }
        })
        .collect()
}

/// `*` alone, or a list of `what` read by `list`.
fn parse_wildcard<T>(
    s: &str,
    what: &str,
    list: impl Fn(&str) -> Result<Vec<T>, String>,
) -> Result<Wildcard<T>, String> {
    if s.trim() == "*" {
        return Ok(Wildcard::All);
    }
    list(s)
        .map_err(|e| format!("{e} (give \"*\" alone or a list of {what})"))
        .map(Wildcard::List)
}

/// A comma-separated port list (Istio's `parsePorts`).
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    parse_list(s, spec::parse_port)
}

/// `*` or a port list.
pub fn parse_ports_wildcard(s: &str) -> Result<Wildcard<u16>, String> {
    parse_wildcard(s, "ports", parse_ports)
}

/// A comma-separated CIDR list.
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    parse_list(s, Cidr::from_str)
}

/// `*` or a CIDR list.
pub fn parse_cidrs_wildcard(s: &str) -> Result<Wildcard<Cidr>, String> {
    parse_wildcard(s, "CIDRs", parse_cidrs)
}

/// An inbound policy, case-insensitive (`LOCALHOST` as Istio's mesh config writes it).
pub fn parse_policy(s: &str) -> Result<InboundPolicy, String> {
    s.trim()
        .to_ascii_lowercase()
        .parse()
        .map_err(|e| format!("{e}"))
}

/// `PORT=POLICY,...`.
pub fn parse_port_policies(s: &str) -> Result<BTreeMap<u16, InboundPolicy>, String> {
    let mut out = BTreeMap::new();
    for item in items(s)? {
        let (port, policy) = spec::parse_port_policy(item)?;
        if out.insert(port, policy).is_some() {
            return Err(format!("port {port} is given two policies"));
        }
    }
    Ok(out)
}

/// Whether Istio's `ProxyConfig` (the YAML of `proxy.istio.io/config`) turns DNS capture on.
pub fn proxy_config_dns_capture(yaml: &str) -> Result<Option<bool>, String> {
    if yaml.trim().is_empty() {
        return Ok(None);
    }
    let v: serde_norway::Value =
        serde_norway::from_str(yaml).map_err(|e| format!("not a ProxyConfig in YAML: {e}"))?;
    let Some(value) = v
        .get("proxyMetadata")
        .and_then(|m| m.get("ISTIO_META_DNS_CAPTURE"))
    else {
        return Ok(None);
    };
    let text = match value {
        serde_norway::Value::String(s) => s.clone(),
        serde_norway::Value::Bool(b) => b.to_string(),
        other => return Err(format!("ISTIO_META_DNS_CAPTURE is {other:?}, not a string")),
    };
    parse_bool(&text)
        .map(Some)
        .ok_or_else(|| format!("ISTIO_META_DNS_CAPTURE {text:?}: expected true or false"))
}

/// The node's defaults for pods enrolled from the runtime: the agent's `--config`,
/// `podDefaults`. Each is what an annotation does not say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct NodeDefaults {
    pub proxy_uid: u32,
    pub proxy_inbound_port: u16,
    pub proxy_outbound_port: u16,
    /// Istio's `meshConfig.inboundTrafficPolicy.mode`: `passthrough` or `localhost`.
    #[serde(with = "policy_any_case")]
    pub inbound_policy: InboundPolicy,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
    pub dns_capture: bool,
    pub proxy_dns_port: u16,
    /// Namespaces the agent never enrolls from CRI discovery (the plugin has its own
    /// `excludeNamespaces`, written by the installer).
    pub exclude_namespaces: Vec<String>,
}

impl Default for NodeDefaults {
    fn default() -> Self {
        NodeDefaults {
            proxy_uid: 1337,
            proxy_inbound_port: 15006,
            proxy_outbound_port: 15001,
            inbound_policy: InboundPolicy::Passthrough,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            dns_capture: false,
            proxy_dns_port: spec::DEFAULT_DNS_PORT,
            exclude_namespaces: DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        }
    }
}

mod policy_any_case {
    use redirect_common::InboundPolicy;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &InboundPolicy, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<InboundPolicy, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_policy(&s).map_err(serde::de::Error::custom)
    }
}

/// What a pod is, besides its annotations: where it lives and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlace {
    pub name: String,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    pub pod_ips: Vec<IpAddr>,
    pub kube: Option<KubeRef>,
}

/// The spec of a selected pod: the node's defaults, overridden by its annotations. The result
/// still goes through [`PodSpec::check`] at enroll (a proxy port excluded by annotation is
/// refused there, with the same message as on the command line).
pub fn pod_spec(
    defaults: &NodeDefaults,
    place: PodPlace,
    a: &Annotations,
) -> Result<PodSpec, AnnotationError> {
    let get = |k: &str| a.get(k).map(String::as_str);
    fn with<T>(
        key: &str,
        v: Option<&str>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, AnnotationError> {
        v.map(|v| parse(v).map_err(|e| bad(key, v, e))).transpose()
    }
    let include_inbound = with(
        INCLUDE_INBOUND_PORTS,
        get(INCLUDE_INBOUND_PORTS),
        parse_ports_wildcard,
    )?
    .and_then(Wildcard::into_option);
    let mut exclude_inbound = defaults.exclude_inbound_ports.clone();
    exclude_inbound.extend(
        with(
            EXCLUDE_INBOUND_PORTS,
            get(EXCLUDE_INBOUND_PORTS),
            parse_ports,
        )?
        .unwrap_or_default(),
    );
    let mut exclude_outbound = defaults.exclude_outbound_ports.clone();
    exclude_outbound.extend(
        with(
            EXCLUDE_OUTBOUND_PORTS,
            get(EXCLUDE_OUTBOUND_PORTS),
            parse_ports,
        )?
        .unwrap_or_default(),
    );
    let include_outbound_ports = with(
        INCLUDE_OUTBOUND_PORTS,
        get(INCLUDE_OUTBOUND_PORTS),
        parse_ports,
    )?
    .unwrap_or_default();
    let mut exclude_cidrs = defaults.exclude_outbound_cidrs.clone();
    exclude_cidrs.extend(
        with(
            EXCLUDE_OUTBOUND_IP_RANGES,
            get(EXCLUDE_OUTBOUND_IP_RANGES),
            parse_cidrs,
        )?
        .unwrap_or_default(),
    );
    let include_cidrs = with(
        INCLUDE_OUTBOUND_IP_RANGES,
        get(INCLUDE_OUTBOUND_IP_RANGES),
        parse_cidrs_wildcard,
    )?
    .and_then(Wildcard::into_option);
    let inbound_policy =
        with(INBOUND_POLICY, get(INBOUND_POLICY), parse_policy)?.unwrap_or(defaults.inbound_policy);
    let port_policies =
        with(PORT_POLICY, get(PORT_POLICY), parse_port_policies)?.unwrap_or_default();
    let dns_own = with(DNS_CAPTURE, get(DNS_CAPTURE), |v| {
        parse_bool(v).ok_or_else(|| "expected true or false".to_owned())
    })?;
    let dns_istio = with(PROXY_CONFIG, get(PROXY_CONFIG), proxy_config_dns_capture)?.flatten();
    Ok(PodSpec {
        name: place.name,
        namespace: place.kube.as_ref().map(|k| k.namespace.clone()),
        cgroup: place.cgroup,
        netns: place.netns,
        pod_ips: place.pod_ips,
        proxy_uid: defaults.proxy_uid,
        inbound_policy,
        port_policies,
        // With an include list Istio ignores excludeInboundPorts (see `PodSpec`).
        exclude_inbound_ports: if include_inbound.is_some() {
            Vec::new()
        } else {
            exclude_inbound
        },
        exclude_outbound_ports: exclude_outbound,
        exclude_outbound_cidrs: exclude_cidrs,
        include_inbound_ports: include_inbound,
        include_outbound_ports,
        include_outbound_cidrs: include_cidrs,
        proxy_inbound_port: defaults.proxy_inbound_port,
        proxy_outbound_port: defaults.proxy_outbound_port,
        dns_capture: dns_own.or(dns_istio).unwrap_or(defaults.dns_capture),
        proxy_dns_port: defaults.proxy_dns_port,
        kube: place.kube,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> Annotations {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn spec_of(pairs: &[(&str, &str)]) -> Result<PodSpec, AnnotationError> {
        pod_spec(
            &NodeDefaults::default(),
            PodPlace {
                name: "ns.p".into(),
                cgroup: "/x".into(),
                netns: "/y".into(),
                pod_ips: vec!["198.18.0.2".parse().unwrap()],
                kube: None,
            },
            &ann(pairs),
        )
    }

    const EX: &[&str] = &["kube-system"];

    #[test]
    fn selection_follows_istio_and_redirect_annotations() {
        let sel = |ns: &str, p: &[(&str, &str)]| select(ns, &ann(p), EX).unwrap();
        assert_eq!(sel("default", &[]), Err(Skip::NotSelected));
        assert_eq!(sel("default", &[(ISTIO_STATUS, "{}")]), Ok(()));
        assert_eq!(sel("default", &[(ENABLED, "true")]), Ok(()));
        assert_eq!(
            sel("kube-system", &[(ENABLED, "true")]),
            Err(Skip::ExcludedNamespace)
        );
        assert_eq!(
            sel("default", &[(ISTIO_STATUS, "{}"), (ENABLED, "false")]),
            Err(Skip::Disabled)
        );
        assert_eq!(
            sel("default", &[(ISTIO_STATUS, "{}"), (ISTIO_INJECT, "false")]),
            Err(Skip::InjectFalse)
        );
        // redirect's own "true" does not override Istio's explicit "false".
        assert_eq!(
            sel("default", &[(ENABLED, "true"), (ISTIO_INJECT, "false")]),
            Err(Skip::InjectFalse)
        );
        assert_eq!(
            sel("default", &[(ENABLED, "true"), (AGENT, "true")]),
            Err(Skip::AgentPod)
        );
        // Istio's inject: "true" alone does not enroll: injection sets the status.
        assert_eq!(
            sel("default", &[(ISTIO_INJECT, "true")]),
            Err(Skip::NotSelected)
        );
        let e = select("default", &ann(&[(ENABLED, "yes")]), EX).unwrap_err();
        assert_eq!(e.key, ENABLED);
        assert!(e.to_string().contains("\"yes\""), "{e}");
    }

    #[test]
    fn port_lists_as_istio_parses_them() {
        assert_eq!(parse_ports(" 80, 8080 ").unwrap(), vec![80, 8080]);
        assert_eq!(parse_ports("").unwrap(), Vec::<u16>::new());
        assert_eq!(parse_ports("  ").unwrap(), Vec::<u16>::new());
        assert!(parse_ports("80,").is_err());
        assert!(parse_ports("80,,81").is_err());
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("65536").is_err());
        assert!(parse_ports("http").is_err());
        assert!(parse_ports("*").is_err());
        assert_eq!(parse_ports_wildcard(" * ").unwrap(), Wildcard::All);
        assert_eq!(
            parse_ports_wildcard("").unwrap(),
            Wildcard::List(Vec::new())
        );
        let e = parse_ports_wildcard("*,80").unwrap_err();
        assert!(e.contains("\"*\" alone"), "{e}");
    }

    #[test]
    fn cidr_lists_as_istio_parses_them() {
        assert_eq!(parse_cidrs("10.0.0.0/8, 2001:db8::/32").unwrap().len(), 2);
        assert_eq!(parse_cidrs_wildcard("*").unwrap(), Wildcard::All);
        assert_eq!(parse_cidrs_wildcard("").unwrap(), Wildcard::List(vec![]));
        assert!(parse_cidrs("10.0.0.0/33").is_err());
        assert!(parse_cidrs("*").is_err());
        assert!(parse_cidrs("10.0.0.0/8,").is_err());
        assert!(parse_cidrs_wildcard("*,10.0.0.0/8").is_err());
    }

    #[test]
    fn spec_from_annotations() {
        let s = spec_of(&[]).unwrap();
        assert_eq!(s.include_inbound_ports, None);
        assert_eq!(s.include_outbound_cidrs, None);
        assert_eq!(s.proxy_uid, 1337);
        assert!(!s.dns_capture);

        let s = spec_of(&[
            (INCLUDE_INBOUND_PORTS, "8080, 9090"),
            (EXCLUDE_INBOUND_PORTS, "7070"),
            (INCLUDE_OUTBOUND_IP_RANGES, "198.18.0.0/16"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "198.18.100.0/24"),
            (INCLUDE_OUTBOUND_PORTS, "5432"),
            (EXCLUDE_OUTBOUND_PORTS, "3306"),
            (INBOUND_POLICY, "localhost"),
            (PORT_POLICY, "9000=passthrough, 9001=localhost"),
        ])
        .unwrap();
        assert_eq!(s.include_inbound_ports, Some(vec![8080, 9090]));
        // Istio ignores excludeInboundPorts beside an include list.
        assert!(s.exclude_inbound_ports.is_empty());
        assert_eq!(
            s.include_outbound_cidrs,
            Some(vec!["198.18.0.0/16".parse().unwrap()])
        );
        assert_eq!(s.exclude_outbound_cidrs.len(), 1);
        assert_eq!(s.include_outbound_ports, vec![5432]);
        assert_eq!(s.exclude_outbound_ports, vec![3306]);
        assert_eq!(s.inbound_policy, InboundPolicy::Localhost);
        assert_eq!(s.port_policies.len(), 2);

        // Empty include lists: nothing captured that way.
        let s = spec_of(&[
            (INCLUDE_INBOUND_PORTS, ""),
            (INCLUDE_OUTBOUND_IP_RANGES, ""),
        ])
        .unwrap();
        assert_eq!(s.include_inbound_ports, Some(vec![]));
        assert_eq!(s.include_outbound_cidrs, Some(vec![]));
        // "*" is the default.
        let s = spec_of(&[
            (INCLUDE_INBOUND_PORTS, "*"),
            (INCLUDE_OUTBOUND_IP_RANGES, "*"),
            (EXCLUDE_INBOUND_PORTS, "7070"),
        ])
        .unwrap();
        assert_eq!(s.include_inbound_ports, None);
        assert_eq!(s.exclude_inbound_ports, vec![7070]);
    }

    #[test]
    fn bad_values_are_refused_with_the_annotation_named() {
        for (k, v) in [
            (INCLUDE_INBOUND_PORTS, "*,80"),
            (EXCLUDE_INBOUND_PORTS, "80,"),
            (INCLUDE_OUTBOUND_PORTS, "x"),
            (EXCLUDE_OUTBOUND_PORTS, "70000"),
            (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/40"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "*"),
            (INBOUND_POLICY, "tproxy"),
            (PORT_POLICY, "9000"),
            (PORT_POLICY, "9000=localhost,9000=passthrough"),
            (DNS_CAPTURE, "maybe"),
            (PROXY_CONFIG, "proxyMetadata: [unclosed"),
            (
                PROXY_CONFIG,
                "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"sure\"",
            ),
        ] {
            let e = spec_of(&[(k, v)]).unwrap_err();
            assert_eq!(e.key, k, "{e}");
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("annotation {k}: ")), "{msg}");
        }
    }

    #[test]
    fn dns_capture_from_either_annotation() {
        assert!(spec_of(&[(DNS_CAPTURE, "true")]).unwrap().dns_capture);
        let cfg = "holdApplicationUntilProxyStarts: true\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n";
        assert!(spec_of(&[(PROXY_CONFIG, cfg)]).unwrap().dns_capture);
        // redirect's own annotation wins.
        assert!(
            !spec_of(&[(PROXY_CONFIG, cfg), (DNS_CAPTURE, "false")])
                .unwrap()
                .dns_capture
        );
        assert!(
            !spec_of(&[(PROXY_CONFIG, "concurrency: 2")])
                .unwrap()
                .dns_capture
        );
    }

    #[test]
    fn node_defaults_from_yaml() {
        let d: NodeDefaults = serde_norway::from_str(
            "proxyUid: 1500\ninboundPolicy: LOCALHOST\nexcludeOutboundCidrs: [\"198.18.9.0/24\"]\n",
        )
        .unwrap();
        assert_eq!(d.proxy_uid, 1500);
        assert_eq!(d.inbound_policy, InboundPolicy::Localhost);
        assert_eq!(d.proxy_inbound_port, 15006);
        assert!(serde_norway::from_str::<NodeDefaults>("proxyUID: 1").is_err());
        let s = pod_spec(
            &d,
            PodPlace {
                name: "a.b".into(),
                cgroup: "/x".into(),
                netns: "/y".into(),
                pod_ips: vec![],
                kube: None,
            },
            &ann(&[(EXCLUDE_OUTBOUND_IP_RANGES, "198.18.8.0/24")]),
        )
        .unwrap();
        assert_eq!(s.proxy_uid, 1500);
        assert_eq!(s.exclude_outbound_cidrs.len(), 2);
        assert_eq!(s.inbound_policy, InboundPolicy::Localhost);
    }
}
