//! `redirect-agent detect`: find the applications that pod-IP delivery affects, on every pod of a
//! node, through the kernel and without entering containers.
//!
//! For each network namespace it reads the listening TCP sockets and the bound UDP sockets with
//! sock_diag netlink (on a thread that has joined the namespace, see [`crate::netns`]), maps them
//! to processes by socket inode through `/proc/PID/fd`, and judges each socket:
//!
//! | listener bound to | not enrolled, port exposed | not enrolled, not exposed | enrolled, `passthrough` | enrolled, `localhost` |
//! |---|---|---|---|---|
//! | loopback (`127/8`, `::1`, `::ffff:127.x`) | error `loopback_exposed` (IST0143) | warning `loopback_only` | error `loopback_exposed` | ok `loopback_delivered` |
//! | pod IP only | info `pod_ip_only` | info `pod_ip_only` | ok `pod_ip_delivered` | error `pod_ip_unreachable` |
//! | wildcard (`0.0.0.0`, `::`) | ok `wildcard` | ok `wildcard` | ok `wildcard` | ok `wildcard` |
//!
//! For an enrolled pod (matched to the namespace by inode) the exposed ports are the ports its
//! datapath captures: all but `exclude_inbound_ports` (ok `not_captured`) and the proxy's ports
//! ([`report::PROXY_PORTS`] and the record's own, ok `proxy_port`); the policy is the pod's
//! `policy_for(port)`. `--ports` or `--manifest` narrows the exposed ports for every namespace.
//! Bound UDP sockets are info `udp`. An exposed port with no TCP listener in a namespace is
//! a warning `not_listening` (only for ports given with `--ports` or `--manifest`).
//!
//! # JSON schema (`--output json`, `schema_version` 1)
//! Stable: fields are only added, never renamed or removed, within one `schema_version`.
//! ```text
//! {
//!   "schema_version": 1,
//!   "namespaces": [{                       // sorted by inode
//!     "inode": u64,                        // nsfs inode, the namespace's identity
//!     "path": string,                      // /var/run/netns/NAME if named, else /proc/PID/ns/net
//!     "pod": null | {"name": string, "policy": "passthrough" | "localhost"},
//!     "status": "scanned" | "vanished" | "denied" | "failed",
//!     "error": null | string,
//!     "listeners": [{                      // sorted by protocol, port, address
//!       "protocol": "tcp" | "udp",
//!       "address": string, "port": u16, "v6only": bool,
//!       "scope": "loopback" | "pod_ip" | "wildcard",
//!       "families": ["ipv4"] | ["ipv6"] | ["ipv4", "ipv6"],
//!       "exposed": bool, "exposed_by": [string],
//!       "policy": null | "passthrough" | "localhost",   // enrolled pods only
//!       "level": "ok" | "info" | "warning" | "error",
//!       "verdict": "loopback_exposed" | "loopback_only" | "pod_ip_only" | "pod_ip_unreachable"
//!                | "loopback_delivered" | "pod_ip_delivered" | "wildcard" | "proxy_port"
//!                | "not_captured" | "udp",
//!       "message": string,
//!       "socket_inode": u64, "socket_uid": u32,
//!       "owners": [{"pid": u32, "comm": string|null, "uid": u32|null, "cgroup": string|null}],
//!       "note": null | string              // set when no owner was found
//!     }],
//!     "not_listening": [{"port": u16, "exposed_by": [string], "level": "warning",
//!                        "verdict": "not_listening", "message": string}]
//!   }],
//!   "problems": [{"level": ..., "message": string}],   // e.g. unresolved named targetPort
//!   "summary": {"namespaces", "vanished", "failed", "errors", "warnings", "infos": usize}
//! }
//! ```
//!
//! # Exit status
//! 0: nothing at error level; 1: at least one error; 2: usage or permission problem (including a
//! namespace that could not be entered or read). A namespace that vanished during the scan is
//! reported with status `vanished` and does not change the exit status.

pub mod manifest;
pub mod procs;
pub mod report;
pub mod sockdiag;

use std::{
    collections::{BTreeMap, HashSet},
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{atomic::AtomicUsize, Mutex},
};

use crate::{netns, state::PodRecord};
pub use report::{Exposed, Level, Report, Status};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// Readable table grouped by namespace.
    #[default]
    Table,
    /// The stable JSON schema (see `docs/detect.md`).
    Json,
}

/// Arguments of `redirect-agent detect`.
#[derive(Debug, Clone, Default)]
pub struct DetectArgs {
    /// Scan the network namespace at PATH (repeatable).
    pub netns: Vec<PathBuf>,
    /// Scan the network namespace of process PID (repeatable).
    pub pid: Vec<u32>,
    /// Scan every pod enrolled with redirect.
    pub enrolled: bool,
    /// Scan every network namespace on the node (the default when no target is given).
    pub all: bool,
    /// Exposed TCP ports, e.g. `80,8080,9000-9010`.
    pub ports: Option<PortList>,
    /// Kubernetes YAML with Pods and Services whose targetPorts are the exposed ports.
    pub manifest: Option<PathBuf>,
    /// Output format.
    pub output: Output,
}

/// A parsed `--ports` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

pub fn parse_ports(s: &str) -> Result<PortList, String> {
    let mut ports = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("{part:?} is not a port or a range of ports (1-65535)");
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(bad)
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    return Err(bad());
                }
                ports.extend(a..=b);
            }
            None => ports.push(port(part)?),
        }
    }
    if ports.is_empty() {
        return Err("empty port list".to_owned());
    }
    Ok(PortList(ports))
}

/// Failure of the detection as a whole (as opposed to one namespace, which is reported).
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The caller lacks a capability that the scan needs.
    #[error(
        "detect needs root: {missing} is missing (CAP_SYS_ADMIN enters other network namespaces, \
         CAP_SYS_PTRACE reads other processes' /proc/PID/fd); run it as root"
    )]
    NotPrivileged { missing: &'static str },
    /// A namespace named on the command line cannot be used.
    #[error("cannot use network namespace {path}: {source}")]
    Netns { path: PathBuf, source: io::Error },
    /// A `--pid` process does not exist or its namespace cannot be read.
    #[error("cannot read the network namespace of pid {pid}: {source}")]
    Pid { pid: u32, source: io::Error },
    /// The manifest could not be read or parsed.
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    /// The enrolled pods could not be read.
    #[error(transparent)]
    Enrolled(#[from] crate::state::StateError),
}

/// Failure to scan one namespace.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// Every path to the namespace is gone, or now names another namespace.
    #[error("the network namespace disappeared before it could be scanned")]
    Vanished,
    /// Opening or entering the namespace was refused.
    #[error(transparent)]
    Denied(netns::NetnsError),
    /// Entering failed otherwise.
    #[error(transparent)]
    Netns(netns::NetnsError),
    /// Reading its sockets failed.
    #[error(transparent)]
    SockDiag(#[from] sockdiag::SockDiagError),
}

/// A namespace to scan: its identity, the paths that lead to it, and its pod if enrolled.
#[derive(Debug, Clone)]
pub struct Target {
    pub inode: u64,
    pub paths: Vec<PathBuf>,
    pub pod: Option<PodRecord>,
}

/// Where the scan looks. Fields are public so that tests and the daemon can point elsewhere.
#[derive(Debug, Clone)]
pub struct Sources {
    pub proc_root: PathBuf,
    pub netns_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            proc_root: "/proc".into(),
            netns_dir: "/var/run/netns".into(),
            state_dir: crate::state::state_dir(),
        }
    }
}

/// Checks for the capabilities the scan needs (CAP_SYS_ADMIN, CAP_SYS_PTRACE).
pub fn check_privileges() -> Result<(), DetectError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if eff & (1 << 21) == 0 {
        return Err(DetectError::NotPrivileged {
            missing: "CAP_SYS_ADMIN",
        });
    }
    if eff & (1 << 19) == 0 {
        return Err(DetectError::NotPrivileged {
            missing: "CAP_SYS_PTRACE",
        });
    }
    Ok(())
}

/// Resolves the command line's targets into namespaces, each once by inode, in the order given.
pub fn resolve_targets(args: &DetectArgs, sources: &Sources) -> Result<Vec<Target>, DetectError> {
    let pods = crate::state::list_records(&sources.state_dir)?.pods;
    let pod_of = |inode: u64| pods.iter().find(|p| p.netns_inode == inode).cloned();
    let mut targets: Vec<Target> = Vec::new();
    let mut add = |inode: u64, path: PathBuf, pod: Option<PodRecord>| {
        if let Some(t) = targets.iter_mut().find(|t| t.inode == inode) {
            t.paths.push(path);
        } else {
            targets.push(Target {
                inode,
                paths: vec![path],
                pod: pod.or_else(|| pod_of(inode)),
            });
        }
    };
    let all = args.all || (args.netns.is_empty() && args.pid.is_empty() && !args.enrolled);
    for path in &args.netns {
        let inode = procs::netns_inode(path).map_err(|source| DetectError::Netns {
            path: path.clone(),
            source,
        })?;
        add(inode, path.clone(), None);
    }
    for &pid in &args.pid {
        let path = sources.proc_root.join(pid.to_string()).join("ns/net");
        let inode = procs::netns_inode(&path).map_err(|source| DetectError::Pid { pid, source })?;
        add(inode, path, None);
    }
    if args.enrolled {
        for pod in &pods {
            add(pod.netns_inode, pod.netns.clone(), Some(pod.clone()));
        }
    }
    if all {
        for (_, found) in procs::all_netns(&sources.proc_root, &sources.netns_dir) {
            for path in found.paths {
                add(found.inode, path, None);
            }
        }
    }
    Ok(targets)
}

/// Reads the sockets of one namespace. Tries each of its paths until one opens and still is the
/// namespace with the expected inode: `/proc/PID/ns/net` of a process that exited, or a name that
/// was deleted, falls through to the next path.
pub fn scan_one(target: &Target) -> (PathBuf, Result<Vec<sockdiag::DiagSocket>, ScanError>) {
    let mut denied = None;
    for path in &target.paths {
        let file = match netns::open(path) {
            Ok(f) => f,
            Err(e @ netns::NetnsError::Open { .. }) if is_denied(&e) => {
                denied.get_or_insert((path.clone(), e));
                continue;
            }
            Err(_) => continue,
        };
        if file.metadata().map(|m| m.ino()).ok() != Some(target.inode) {
            continue;
        }
        return match netns::run_in(&file, path, sockdiag::dump_listeners) {
            Ok(Ok(sockets)) => (path.clone(), Ok(sockets)),
            Ok(Err(e)) => (path.clone(), Err(e.into())),
            Err(e) if is_denied(&e) => (path.clone(), Err(ScanError::Denied(e))),
            Err(e) => (path.clone(), Err(ScanError::Netns(e))),
        };
    }
    match denied {
        Some((path, e)) => (path, Err(ScanError::Denied(e))),
        None => (target.paths[0].clone(), Err(ScanError::Vanished)),
    }
}

fn is_denied(e: &netns::NetnsError) -> bool {
    e.io_source()
        .is_some_and(|source| source.kind() == io::ErrorKind::PermissionDenied)
}

/// Scans every target, a few namespaces at a time, and returns the results in target order.
pub fn scan(targets: &[Target]) -> Vec<(PathBuf, Result<Vec<sockdiag::DiagSocket>, ScanError>)> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(targets.len()));
    std::thread::scope(|s| {
        for _ in 0..workers.min(targets.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(t) = targets.get(i) else { break };
                let r = scan_one(t);
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Exposed ports from `--ports` and `--manifest`, and the problems found in the manifest.
pub fn exposure(args: &DetectArgs) -> Result<(Exposed, Vec<report::Problem>), DetectError> {
    let mut problems = Vec::new();
    if args.ports.is_none() && args.manifest.is_none() {
        return Ok((Exposed::default(), problems));
    }
    let mut ports: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    if let Some(list) = &args.ports {
        for &p in &list.0 {
            ports.entry(p).or_default().push("--ports".to_owned());
        }
    }
    if let Some(path) = &args.manifest {
        let m = manifest::load(path)?;
        for (p, by) in m.ports {
            ports.entry(p).or_default().extend(by);
        }
        problems.extend(m.unresolved.into_iter().map(|message| report::Problem {
            level: Level::Warning,
            message,
        }));
    }
    Ok((
        Exposed {
            explicit: Some(ports),
        },
        problems,
    ))
}

/// Turns scan results into the report: resolves owners once for all namespaces, then judges.
pub fn build_report(
    targets: &[Target],
    scans: Vec<(PathBuf, Result<Vec<sockdiag::DiagSocket>, ScanError>)>,
    exposed: &Exposed,
    problems: Vec<report::Problem>,
    proc_root: &Path,
) -> Report {
    let wanted: HashSet<u64> = scans
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .flatten()
        .map(|s| s.inode)
        .collect();
    let owners = procs::socket_owners(proc_root, &wanted);
    let namespaces = targets
        .iter()
        .zip(scans)
        .map(|(t, (path, result))| match result {
            Ok(sockets) => {
                report::namespace_report(t.inode, path, t.pod.as_ref(), &sockets, exposed, &owners)
            }
            Err(e) => report::NamespaceReport {
                inode: t.inode,
                path,
                pod: t.pod.as_ref().map(|p| report::PodRef {
                    name: p.name.clone(),
                    policy: p.inbound_policy,
                }),
                status: match e {
                    ScanError::Vanished => Status::Vanished,
                    ScanError::Denied(_) => Status::Denied,
                    _ => Status::Failed,
                },
                error: Some(crate::error_chain(&e)),
                listeners: Vec::new(),
                not_listening: Vec::new(),
            },
        })
        .collect();
    Report::new(namespaces, problems)
}

/// The whole detection, as the CLI runs it, without printing.
pub fn detect(args: &DetectArgs, sources: &Sources) -> Result<Report, DetectError> {
    let (exposed, problems) = exposure(args)?;
    let targets = resolve_targets(args, sources)?;
    let scans = scan(&targets);
    Ok(build_report(
        &targets,
        scans,
        &exposed,
        problems,
        &sources.proc_root,
    ))
}

/// The exit status a report calls for.
pub fn exit_status(report: &Report) -> u8 {
    if report.summary.failed > 0 {
        2
    } else if report.summary.errors > 0 {
        1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists() {
        assert_eq!(
            parse_ports("80, 8080,9000-9002").unwrap().0,
            vec![80, 8080, 9000, 9001, 9002]
        );
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("9-8").is_err());
        assert!(parse_ports("http").is_err());
    }
}
