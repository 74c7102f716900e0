//! The report: one verdict per listening socket, grouped by network namespace. Its JSON form is
//! the stable schema documented in the module docs and `docs/detect.md`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
};

use serde::Serialize;

use super::{
    procs::{Owner, Owners},
    sockdiag::{DiagSocket, Protocol},
};
use redirect_common::{
    matrix::{self, AppBind},
    InboundPolicy,
};

use crate::state::PodRecord;

/// Version of the JSON schema; bumped only on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// Ports of the proxy and its agent: never captured inbound, never the application's.
pub use redirect_common::PROXY_PORTS;

/// How serious a finding is. Ordered: `ok` < `info` < `warning` < `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Info,
    Warning,
    Error,
}

/// Which addresses a socket accepts connections on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// 127.0.0.0/8, `::1`, `::ffff:127.0.0.0/104`.
    Loopback,
    /// One specific non-loopback address: the pod IP.
    PodIp,
    /// `0.0.0.0` or `::`.
    Wildcard,
}

/// The finding, as a stable identifier (the JSON `verdict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Loopback-only listener on an exposed port (Istio's IST0143): error.
    LoopbackExposed,
    /// Loopback-only listener on a port not known to be exposed: warning.
    LoopbackOnly,
    /// Pod-IP-only listener: unreachable through a proxy that dials 127.0.0.1, fixed by
    /// passthrough delivery: info.
    PodIpOnly,
    /// Pod-IP-only listener on a captured port of an enrolled pod whose policy for it is
    /// `localhost`: redirect delivers to 127.0.0.1, which nothing listens on: error.
    PodIpUnreachable,
    /// Loopback-only listener that an enrolled pod's `localhost` policy serves: ok.
    LoopbackDelivered,
    /// Pod-IP-only listener that an enrolled pod's `passthrough` policy serves: ok.
    PodIpDelivered,
    /// Wildcard listener: reachable under either policy: ok.
    Wildcard,
    /// A port of the proxy itself: ok.
    ProxyPort,
    /// A port an enrolled pod excludes from inbound capture: redirect does not touch it: ok.
    NotCaptured,
    /// A bound UDP socket; UDP is not redirected: info.
    Udp,
    /// An exposed port that nothing in the namespace listens on (TCP): warning.
    NotListening,
}

/// The IST0143 wording, kept so that people who know Istio's check recognise it.
pub fn ist0143(port: u16) -> String {
    format!("Port {port} is exposed in a Service but listens on localhost. It will not be exposed to other pods.")
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub namespaces: Vec<NamespaceReport>,
    /// Findings about the inputs rather than a namespace (unresolved named `targetPort`s).
    pub problems: Vec<Problem>,
    pub summary: Summary,
}

/// A finding that belongs to no namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub level: Level,
    pub message: String,
}

/// Counts over the whole report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub namespaces: usize,
    /// Namespaces that could not be scanned because they disappeared first.
    pub vanished: usize,
    /// Namespaces that could not be scanned for another reason (permission, kernel error).
    pub failed: usize,
    pub errors: usize,
    pub warnings: usize,
    pub infos: usize,
}

/// Outcome of scanning one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Scanned,
    /// The namespace was gone (all its processes exited, its name was deleted) by scan time.
    Vanished,
    /// Entering it or reading it was refused.
    Denied,
    /// Another failure; `error` says which.
    Failed,
}

/// The enrolled pod that owns a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodRef {
    pub name: String,
    pub policy: InboundPolicy,
}

/// One network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceReport {
    /// nsfs inode: the namespace's identity.
    pub inode: u64,
    /// The path it was read through (`/var/run/netns/NAME` when it has a name).
    pub path: PathBuf,
    pub pod: Option<PodRef>,
    pub status: Status,
    pub error: Option<String>,
    /// Sorted by protocol, port, address.
    pub listeners: Vec<Listener>,
    /// Exposed ports (from `--ports`/`--manifest`) with no TCP listener, sorted by port.
    pub not_listening: Vec<MissingPort>,
}

/// One listening TCP socket or bound UDP socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub protocol: Protocol,
    pub address: IpAddr,
    pub port: u16,
    /// `IPV6_V6ONLY`; false for IPv4 sockets.
    pub v6only: bool,
    pub scope: Scope,
    /// Address families it accepts: `["ipv4"]`, `["ipv6"]` or both (a dual-stack `::`).
    pub families: Vec<&'static str>,
    /// Whether the port is exposed (a Service port, `--ports`, or a captured port of an
    /// enrolled pod).
    pub exposed: bool,
    /// What exposes it, when a manifest or `--ports` said so.
    pub exposed_by: Vec<String>,
    /// The enrolled pod's policy for this port; `null` for a namespace that is not enrolled.
    pub policy: Option<InboundPolicy>,
    pub level: Level,
    pub verdict: Verdict,
    pub message: String,
    pub socket_inode: u64,
    /// uid that created the socket.
    pub socket_uid: u32,
    /// Processes holding the socket, by pid.
    pub owners: Vec<Owner>,
    /// Set when no owner was found (it exited during the scan).
    pub note: Option<String>,
}

/// An exposed port nothing listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingPort {
    pub port: u16,
    pub exposed_by: Vec<String>,
    pub level: Level,
    pub verdict: Verdict,
    pub message: String,
}

/// Which ports are exposed, for namespaces that are not enrolled (and, when given explicitly, for
/// enrolled ones too).
#[derive(Debug, Clone, Default)]
pub struct Exposed {
    /// Port -> what exposes it. `None`: nothing given, fall back to per-pod knowledge.
    pub explicit: Option<BTreeMap<u16, Vec<String>>>,
}

/// The classification of one address.
pub fn scope(address: IpAddr) -> Scope {
    let canonical = match address {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(address, IpAddr::V4),
        a => a,
    };
    if canonical.is_loopback() {
        Scope::Loopback
    } else if canonical.is_unspecified() {
        Scope::Wildcard
    } else {
        Scope::PodIp
    }
}

fn families(s: &DiagSocket) -> Vec<&'static str> {
    match s.address {
        IpAddr::V4(_) => vec!["ipv4"],
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => vec!["ipv4"],
        IpAddr::V6(a) if a.is_unspecified() && !s.v6only => vec!["ipv4", "ipv6"],
        IpAddr::V6(_) => vec!["ipv6"],
    }
}

fn pod_captures(pod: &PodRecord, port: u16) -> bool {
    pod.captures_inbound(port)
}

/// Judges one socket.
pub fn judge(
    s: &DiagSocket,
    pod: Option<&PodRecord>,
    exposed: &Exposed,
    owners: Vec<Owner>,
) -> Listener {
    let port = s.port;
    let scope = scope(s.address);
    let explicit = exposed.explicit.as_ref().and_then(|m| m.get(&port));
    let exposed_by = explicit.cloned().unwrap_or_default();
    let is_exposed = match (pod, &exposed.explicit) {
        (Some(pod), None) => pod_captures(pod, port),
        (Some(pod), Some(_)) => pod_captures(pod, port) && explicit.is_some(),
        (None, _) => explicit.is_some(),
    };
    let policy = pod.map(|p| p.policy_for(port));
    let addr = s.address;
    let proxy_port = match pod {
        Some(p) => {
            PROXY_PORTS.contains(&port)
                || port == p.proxy_inbound_port
                || port == p.proxy_outbound_port
        }
        None => PROXY_PORTS.contains(&port) && explicit.is_none(),
    };
    use {Level::*, Verdict::*};
    let (level, verdict, message) = if s.protocol == Protocol::Udp {
        (Info, Udp, format!("UDP port {port} is bound to {addr}. Inbound UDP is not redirected; listed for information."))
    } else if proxy_port {
        (
            Ok,
            ProxyPort,
            format!("Port {port} is a port of the proxy; it is never captured."),
        )
    } else if pod.is_some_and(|p| !pod_captures(p, port)) {
        (Ok, NotCaptured, format!("Port {port} is excluded from inbound capture; redirect does not change how it is reached."))
    } else if scope == Scope::Wildcard {
        (Ok, Wildcard, format!("Port {port} listens on all addresses ({addr}); it is reachable under either policy."))
    } else {
        // Whether the pod's policy delivers to this bind: the conformance matrix's one
        // prediction (redirect_common::matrix), as the datapath tests and the demo use it.
        let bind = match scope {
            Scope::Loopback => AppBind::Loopback,
            Scope::PodIp => AppBind::PodIp,
            Scope::Wildcard => AppBind::Wildcard,
        };
        let reachable = policy.map(|p| matrix::reachable(p, bind).is_some());
        match (scope, reachable) {
            (Scope::Loopback, Some(true)) => (
                Ok,
                LoopbackDelivered,
                format!("Port {port} listens on localhost ({addr}) only; the pod's localhost policy delivers to it, but it becomes unreachable if the policy changes to passthrough."),
            ),
            (Scope::Loopback, _) if is_exposed => (Error, LoopbackExposed, ist0143(port)),
            (Scope::Loopback, _) => (
                Warning,
                LoopbackOnly,
                format!("Port {port} listens on localhost ({addr}) only. If it is exposed in a Service, it will not be reachable from other pods once inbound traffic is delivered to the pod IP."),
            ),
            (_, Some(true)) => (
                Ok,
                PodIpDelivered,
                format!("Port {port} listens on the pod IP ({addr}) only; the pod's passthrough policy delivers to it."),
            ),
            (_, Some(false)) if is_exposed => (
                Error,
                PodIpUnreachable,
                format!("Port {port} listens on the pod IP ({addr}) only, but the pod's inbound policy for it is localhost: inbound traffic is delivered to localhost and will not reach it."),
            ),
            _ => (
                Info,
                PodIpOnly,
                format!("Port {port} listens on the pod IP ({addr}) only. A proxy that delivers to 127.0.0.1 cannot reach it; passthrough delivery to the pod IP fixes that."),
            ),
        }
    };
    let note = owners.is_empty().then(|| {
        "no process holds this socket any more: its owner exited during the scan".to_owned()
    });
    Listener {
        protocol: s.protocol,
        address: s.address,
        port,
        v6only: s.v6only,
        scope,
        families: families(s),
        exposed: is_exposed,
        exposed_by,
        policy,
        level,
        verdict,
        message,
        socket_inode: s.inode,
        socket_uid: s.uid,
        owners,
        note,
    }
}

/// Builds a namespace's report from its sockets.
pub fn namespace_report(
    inode: u64,
    path: PathBuf,
    pod: Option<&PodRecord>,
    sockets: &[DiagSocket],
    exposed: &Exposed,
    owners: &Owners,
) -> NamespaceReport {
    let mut listeners: Vec<Listener> = sockets
        .iter()
        .filter(|s| s.port != 0)
        .map(|s| {
            judge(
                s,
                pod,
                exposed,
                owners.get(&s.inode).cloned().unwrap_or_default(),
            )
        })
        .collect();
    listeners.sort_by(|a, b| {
        (a.protocol, a.port, a.address, a.socket_inode).cmp(&(
            b.protocol,
            b.port,
            b.address,
            b.socket_inode,
        ))
    });
    let listened: BTreeSet<u16> = listeners
        .iter()
        .filter(|l| l.protocol == Protocol::Tcp)
        .map(|l| l.port)
        .collect();
    let not_listening = exposed
        .explicit
        .iter()
        .flatten()
        .filter(|(port, _)| !listened.contains(port))
        .map(|(&port, by)| MissingPort {
            port,
            exposed_by: by.clone(),
            level: Level::Warning,
            verdict: Verdict::NotListening,
            message: format!("Port {port} is exposed but nothing in this namespace listens on it."),
        })
        .collect();
    NamespaceReport {
        inode,
        path,
        pod: pod.map(|p| PodRef {
            name: p.name.clone(),
            policy: p.inbound_policy,
        }),
        status: Status::Scanned,
        error: None,
        listeners,
        not_listening,
    }
}

impl Report {
    /// Assembles the report and its summary.
    pub fn new(mut namespaces: Vec<NamespaceReport>, problems: Vec<Problem>) -> Report {
        namespaces.sort_by_key(|n| n.inode);
        let mut summary = Summary {
            namespaces: namespaces.len(),
            ..Summary::default()
        };
        let levels = namespaces
            .iter()
            .flat_map(|n| {
                n.listeners
                    .iter()
                    .map(|l| l.level)
                    .chain(n.not_listening.iter().map(|m| m.level))
            })
            .chain(problems.iter().map(|p| p.level));
        for level in levels {
            match level {
                Level::Error => summary.errors += 1,
                Level::Warning => summary.warnings += 1,
                Level::Info => summary.infos += 1,
                Level::Ok => {}
            }
        }
        for n in &namespaces {
            match n.status {
                Status::Scanned => {}
                Status::Vanished => summary.vanished += 1,
                Status::Denied | Status::Failed => summary.failed += 1,
            }
        }
        Report {
            schema_version: SCHEMA_VERSION,
            namespaces,
            problems,
            summary,
        }
    }

    /// The readable table, grouped by namespace.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for n in &self.namespaces {
            let _ = write!(out, "netns {} (inode {})", n.path.display(), n.inode);
            if let Some(pod) = &n.pod {
                let _ = write!(out, "  pod {} (policy {:?})", pod.name, pod.policy);
            }
            out.push('\n');
            if n.status != Status::Scanned {
                let _ = writeln!(
                    out,
                    "  {:?}: {}\n",
                    n.status,
                    n.error.as_deref().unwrap_or("")
                );
                continue;
            }
            if n.listeners.is_empty() && n.not_listening.is_empty() {
                out.push_str("  no listeners\n\n");
                continue;
            }
            let _ = writeln!(
                out,
                "  {:<8} {:<5} {:<28} {:>5}  {:<9} {:<30} MESSAGE",
                "LEVEL", "PROTO", "ADDRESS", "PORT", "SCOPE", "OWNERS"
            );
            for l in &n.listeners {
                let owners = if l.owners.is_empty() {
                    "-".to_owned()
                } else {
                    l.owners
                        .iter()
                        .map(|o| format!("{}[{}]", o.comm.as_deref().unwrap_or("?"), o.pid))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                let addr = if l.v6only {
                    format!("{} v6only", l.address)
                } else {
                    l.address.to_string()
                };
                let _ = writeln!(
                    out,
                    "  {:<8} {:<5} {:<28} {:>5}  {:<9} {:<30} {}",
                    format!("{:?}", l.level).to_lowercase(),
                    format!("{:?}", l.protocol).to_lowercase(),
                    addr,
                    l.port,
                    serde_json::to_value(l.scope)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    owners,
                    l.message
                );
            }
            for m in &n.not_listening {
                let _ = writeln!(
                    out,
                    "  {:<8} {:<5} {:<28} {:>5}  {:<9} {:<30} {}",
                    "warning", "tcp", "-", m.port, "-", "-", m.message
                );
            }
            out.push('\n');
        }
        for p in &self.problems {
            let _ = writeln!(
                out,
                "{}: {}",
                format!("{:?}", p.level).to_lowercase(),
                p.message
            );
        }
        let s = &self.summary;
        let _ = writeln!(
            out,
            "{} namespaces ({} vanished, {} failed): {} errors, {} warnings, {} infos",
            s.namespaces, s.vanished, s.failed, s.errors, s.warnings, s.infos
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        for (a, s) in [
            ("127.0.0.53", Scope::Loopback),
            ("::1", Scope::Loopback),
            ("::ffff:127.0.0.1", Scope::Loopback),
            ("0.0.0.0", Scope::Wildcard),
            ("::", Scope::Wildcard),
            ("198.18.0.2", Scope::PodIp),
            ("2001:db8::2", Scope::PodIp),
        ] {
            assert_eq!(scope(a.parse().unwrap()), s, "{a}");
        }
    }
}
