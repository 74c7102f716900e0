//! The commands that change or report enrolled pods, as typed results, and how the CLI prints
//! them.
//!
//! One code path whoever runs a command: the CLI without an agent calls these functions itself;
//! with an agent running it sends the request over the agent's socket ([`crate::agent::proto`])
//! and the agent calls the same functions, under the same state lock. Either way the CLI prints
//! the result with the same `render_*` function, so the output is the same byte for byte.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{Datapath, DatapathError},
    enroll::{self, EnrollError},
    gc,
    output::{table, Format},
    spec::PodSpec,
    state::{self, PodRecord, StateError, StateStore},
    stats,
};

/// Why a command failed; printed as `error: ` and [`crate::error_chain`] of it.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("no such enrolled pod: {0}")]
    NoSuchPod(String),
    #[error("opening the datapath")]
    OpenDatapath(#[source] DatapathError),
    #[error("pods are recorded but no datapath is pinned at {}; `redirect-agent gc` cleans up", .0.display())]
    NoDatapath(PathBuf),
}

/// What `enroll` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollReport {
    pub name: String,
    pub slot: u32,
    pub updated: bool,
    /// Inbound listeners of a running proxy adopted, or why none could be.
    pub adopted_listeners: Result<usize, String>,
}

/// What `unenroll` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnenrollReport {
    pub name: String,
    pub cgroup: PathBuf,
}

/// One pod as `list` shows it: the record and its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedPod {
    #[serde(flatten)]
    pub record: PodRecord,
    pub status: String,
}

/// A record file that is not a usable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unusable {
    pub path: PathBuf,
    pub reason: String,
}

/// What `list` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReport {
    pub pods: Vec<ListedPod>,
    pub unusable: Vec<Unusable>,
    /// Link directories no record owns (root only).
    pub orphans: Vec<String>,
}

/// What `stats` reports: every counter of each pod, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    pub pods: Vec<(String, BTreeMap<String, u64>)>,
}

/// What `gc` removed (see [`gc::Collected`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GcReport {
    pub recovered: Vec<String>,
    pub gone: Vec<String>,
    pub bad_records: Vec<String>,
    pub orphan_links: Vec<String>,
    pub orphan_slots: Vec<u32>,
}

/// What the CLI prints for a result: stdout and stderr, each complete.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Printed {
    pub stdout: String,
    pub stderr: String,
}

impl Printed {
    /// Writes both to the process's stdout and stderr.
    pub fn emit(&self) {
        use std::io::Write as _;
        // A closed pipe (`| head`) is not worth a panic; the exit code says the rest.
        let _ = std::io::stdout().write_all(self.stdout.as_bytes());
        let _ = std::io::stderr().write_all(self.stderr.as_bytes());
    }
}

/// Enrolls (or updates) a pod: [`enroll::inspect`] without the lock, then [`enroll::enroll`]
/// under the store's lock, held only for this call.
pub fn enroll(
    state_dir: &Path,
    pin_root: &Path,
    spec: PodSpec,
) -> Result<EnrollReport, CommandError> {
    enroll::require_root()?;
    // Everything that can be checked without the lock is, so nothing blocks while holding it.
    let checked = enroll::inspect(spec)?;
    let store = StateStore::open(state_dir)?;
    let done = enroll::enroll(&store, pin_root, checked)?;
    Ok(EnrollReport {
        name: done.record.name().to_owned(),
        slot: done.record.slot,
        updated: done.updated,
        adopted_listeners: done.adopted_listeners,
    })
}

pub fn render_enroll(r: &EnrollReport) -> Printed {
    let mut p = Printed::default();
    let verb = if r.updated { "updated" } else { "enrolled" };
    let listener = match &r.adopted_listeners {
        Ok(0) => "proxy not listening yet: it is captured as soon as it listens".to_owned(),
        Ok(n) => format!("adopted {n} running proxy listener(s)"),
        Err(e) => {
            let _ = writeln!(
                p.stderr,
                "warning: could not adopt the running proxy's inbound listener ({e}); \
                 inbound capture starts when the proxy listens again (adoption needs \
                 pidfd_getfd, Linux 5.6)"
            );
            "proxy listener not adopted".to_owned()
        }
    };
    let _ = writeln!(p.stdout, "{verb} {} (slot {}); {listener}", r.name, r.slot);
    p
}

/// Unenrolls a pod under the store's lock.
pub fn unenroll(
    state_dir: &Path,
    pin_root: &Path,
    name: &str,
) -> Result<UnenrollReport, CommandError> {
    enroll::require_root()?;
    let store = StateStore::open(state_dir)?;
    let rec = enroll::unenroll(&store, pin_root, name)?;
    Ok(UnenrollReport {
        name: rec.name().to_owned(),
        cgroup: rec.spec.cgroup.clone(),
    })
}

pub fn render_unenroll(r: &UnenrollReport) -> Printed {
    Printed {
        stdout: format!("unenrolled {} (cgroup {})\n", r.name, r.cgroup.display()),
        stderr: String::new(),
    }
}

/// Lists enrolled pods with their status, without the lock. `is_root`: whether the caller
/// may look at the pins (links complete, orphaned links).
pub fn list(state_dir: &Path, pin_root: &Path, is_root: bool) -> Result<ListReport, CommandError> {
    let records = state::list_records(state_dir)?;
    let status = |r: &PodRecord| -> &'static str {
        let h = gc::health(r);
        if h == gc::Health::Ok && is_root && !enroll::links_complete(pin_root, r) {
            return "incomplete";
        }
        h.name()
    };
    let orphans = if is_root {
        enroll::orphan_link_dirs(pin_root, &records.pods)
    } else {
        Vec::new()
    };
    Ok(ListReport {
        pods: records
            .pods
            .iter()
            .map(|r| ListedPod {
                status: status(r).to_owned(),
                record: r.clone(),
            })
            .collect(),
        unusable: records
            .bad
            .into_iter()
            .map(|b| Unusable {
                path: b.path,
                reason: b.reason,
            })
            .collect(),
        orphans,
    })
}

pub fn render_list(r: &ListReport, output: Format) -> Printed {
    let mut p = Printed::default();
    match output {
        Format::Json => {
            let mut doc = serde_json::json!({ "pods": r.pods });
            if !r.unusable.is_empty() {
                doc["unusable_records"] = serde_json::json!(r.unusable);
            }
            if !r.orphans.is_empty() {
                doc["orphaned_links"] = serde_json::json!(r.orphans);
            }
            let _ = writeln!(
                p.stdout,
                "{}",
                serde_json::to_string_pretty(&doc).expect("JSON values serialize")
            );
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = r
                .pods
                .iter()
                .map(|p| {
                    let r = &p.record;
                    vec![
                        r.name().to_owned(),
                        r.pod_ips
                            .iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        r.inbound_policy.to_string(),
                        r.proxy_uid.to_string(),
                        p.status.clone(),
                        r.cgroup.display().to_string(),
                        r.netns.display().to_string(),
                    ]
                })
                .collect();
            p.stdout.push_str(&table(
                &[
                    "NAME",
                    "POD IPS",
                    "POLICY",
                    "PROXY UID",
                    "STATUS",
                    "CGROUP",
                    "NETNS",
                ],
                &rows,
            ));
            for b in &r.unusable {
                let _ = writeln!(
                    p.stderr,
                    "warning: unusable record {}: {}",
                    b.path.display(),
                    b.reason
                );
            }
            for o in &r.orphans {
                let _ = writeln!(
                    p.stderr,
                    "warning: links {o} belong to no record; `redirect-agent gc` removes them"
                );
            }
        }
    }
    p
}

/// Every counter of every enrolled pod (or of `name` only), read from the pinned maps
/// read-only.
pub fn stats(
    state_dir: &Path,
    pin_root: &Path,
    name: Option<&str>,
) -> Result<StatsReport, CommandError> {
    enroll::require_root()?;
    let mut pods = state::list_records(state_dir)?.pods;
    if let Some(name) = name {
        pods.retain(|p| p.name == name);
        if pods.is_empty() {
            return Err(CommandError::NoSuchPod(name.to_owned()));
        }
    }
    let mut rows = Vec::new();
    if !pods.is_empty() {
        // Read-only: a reader never creates, loads or pins anything (a reader racing the last
        // unenroll must not resurrect programs bound to orphaned maps).
        let mut dp = Datapath::open_read_only(pin_root)
            .map_err(CommandError::OpenDatapath)?
            .ok_or_else(|| CommandError::NoDatapath(pin_root.to_owned()))?;
        for p in &pods {
            let counters = stats::pod_counters(&mut dp, p.slot)?
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            rows.push((p.name.clone(), counters));
        }
    }
    Ok(StatsReport { pods: rows })
}

pub fn render_stats(r: &StatsReport, output: Format) -> Printed {
    let mut p = Printed::default();
    match output {
        Format::Json => {
            let pods: Vec<_> = r
                .pods
                .iter()
                .map(|(n, c)| serde_json::json!({ "name": n, "counters": c }))
                .collect();
            let _ = writeln!(
                p.stdout,
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "pods": pods }))
                    .expect("JSON values serialize")
            );
        }
        Format::Table => {
            // One column per pod, one row per counter: 14 counters fit a terminal's height
            // better than its width.
            let mut header = vec!["COUNTER"];
            header.extend(r.pods.iter().map(|(n, _)| n.as_str()));
            let rows: Vec<Vec<String>> = redirect_common::Counter::ALL
                .iter()
                .map(|k| {
                    let mut row = vec![k.name().to_owned()];
                    row.extend(
                        r.pods
                            .iter()
                            .map(|(_, c)| c.get(k.name()).copied().unwrap_or(0).to_string()),
                    );
                    row
                })
                .collect();
            p.stdout.push_str(&table(&header, &rows));
        }
    }
    p
}

/// `gc` under the store's lock.
pub fn gc(state_dir: &Path, pin_root: &Path) -> Result<GcReport, CommandError> {
    enroll::require_root()?;
    let store = StateStore::open(state_dir)?;
    Ok(gc_locked(&store, pin_root)?)
}

/// `gc` for a caller that holds the lock already.
pub fn gc_locked(store: &StateStore, pin_root: &Path) -> Result<GcReport, EnrollError> {
    let done = gc::gc(store, pin_root)?;
    Ok(GcReport {
        recovered: done.recovered,
        gone: done.gone,
        bad_records: done.bad_records,
        orphan_links: done.orphan_links,
        orphan_slots: done.orphan_slots,
    })
}

pub fn render_gc(r: &GcReport) -> Printed {
    let mut p = Printed::default();
    for n in &r.recovered {
        let _ = writeln!(p.stdout, "rolled back an interrupted change of {n}");
    }
    for n in &r.gone {
        let _ = writeln!(
            p.stdout,
            "removed {n}: its cgroup or network namespace is gone"
        );
    }
    for b in &r.bad_records {
        let _ = writeln!(p.stdout, "removed unusable record {b}");
    }
    for d in &r.orphan_links {
        let _ = writeln!(p.stdout, "removed links of {d}: no record owns them");
    }
    for s in &r.orphan_slots {
        let _ = writeln!(p.stdout, "cleared slot {s}: no record owns it");
    }
    p
}
