//! The commands that change or report enrolled pods, as typed results.
//!
//! One code path whoever runs a command: the CLI without an agent calls these functions itself;
//! with an agent running it sends the request over the agent's socket ([`crate::agent::proto`])
//! and the agent calls the same functions, under the same state lock. Either way the CLI prints
//! the result with the same function of its own, so the output is the same byte for byte.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{Datapath, DatapathError, Handles},
    enroll::{self, EnrollError},
    gc,
    spec::PodSpec,
    state::{self, PodRecord, Snapshot, StateError, StateStore},
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

/// Whoever changes the datapath and its records: takes the store's lock for each change and
/// keeps, between changes, the records it read ([`Snapshot`]) and the datapath handles it
/// opened ([`Handles`]). The CLI makes one per command; the node agent keeps one for its
/// whole life, so a change through it is map updates and link creation, nothing reloaded.
/// Both run every change through these same functions under the same lock.
pub struct Writer {
    state_dir: PathBuf,
    snapshot: Option<Snapshot>,
    handles: Handles,
    /// The generation written when the lock was last taken (see [`Writer::taken`]).
    taken: Arc<AtomicU64>,
}

impl Writer {
    pub fn new(state_dir: &Path, pin_root: &Path) -> Writer {
        Writer {
            state_dir: state_dir.to_owned(),
            snapshot: None,
            handles: Handles::new(pin_root),
            taken: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Runs `f` with the store's lock held. What was kept from the last change is reused
    /// unless another process has held the lock since; then the records are read again and
    /// the datapath handles opened again.
    pub fn locked<T, E: From<StateError>>(
        &mut self,
        f: impl FnOnce(&mut StateStore, &mut Handles) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut store = StateStore::open_with(&self.state_dir, self.snapshot.take())?;
        self.taken.store(store.generation(), Ordering::Release);
        if store.reloaded() {
            self.handles.forget();
        }
        let r = f(&mut store, &mut self.handles);
        self.snapshot = Some(store.release());
        r
    }

    /// The generation this writer wrote in the lock file when it last took the lock, kept up
    /// to date: while the file holds it or the [`Writer::snapshot`]'s, no other process has
    /// changed the records since, and a reader may use the snapshot instead of the files.
    pub fn taken(&self) -> Arc<AtomicU64> {
        self.taken.clone()
    }

    /// The records as the last change left them (`None` before the first).
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// Enrolls (or updates) a pod: [`enroll::inspect`] without the lock, then
    /// [`enroll::enroll`] under it.
    pub fn enroll(&mut self, spec: PodSpec) -> Result<EnrollReport, CommandError> {
        enroll::require_root()?;
        // Everything that can be checked without the lock is, so nothing blocks while holding it.
        let checked = enroll::inspect(spec)?;
        self.enroll_checked(checked)
    }

    /// [`Writer::enroll`] of a request [`enroll::inspect`] has checked already (the agent
    /// checks requests before they wait for their turn).
    pub fn enroll_checked(
        &mut self,
        checked: enroll::Checked,
    ) -> Result<EnrollReport, CommandError> {
        enroll::require_root()?;
        let done =
            self.locked(|store, h| enroll::enroll(store, h, checked).map_err(CommandError::from))?;
        Ok(EnrollReport {
            name: done.record.name().to_owned(),
            slot: done.record.slot,
            updated: done.updated,
            adopted_listeners: done.adopted_listeners,
        })
    }

    /// Unenrolls a pod under the store's lock.
    pub fn unenroll(&mut self, name: &str) -> Result<UnenrollReport, CommandError> {
        enroll::require_root()?;
        let rec =
            self.locked(|store, h| enroll::unenroll(store, h, name).map_err(CommandError::from))?;
        Ok(UnenrollReport {
            name: rec.name().to_owned(),
            cgroup: rec.spec.cgroup.clone(),
        })
    }

    /// `gc` under the store's lock.
    pub fn gc(&mut self) -> Result<GcReport, CommandError> {
        enroll::require_root()?;
        self.locked(|store, h| gc_locked(store, h).map_err(CommandError::from))
    }
}

/// Enrolls (or updates) a pod, as one command: [`Writer::enroll`] of a new writer.
pub fn enroll(
    state_dir: &Path,
    pin_root: &Path,
    spec: PodSpec,
) -> Result<EnrollReport, CommandError> {
    Writer::new(state_dir, pin_root).enroll(spec)
}

/// Unenrolls a pod, as one command.
pub fn unenroll(
    state_dir: &Path,
    pin_root: &Path,
    name: &str,
) -> Result<UnenrollReport, CommandError> {
    Writer::new(state_dir, pin_root).unenroll(name)
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

/// `gc`, as one command.
pub fn gc(state_dir: &Path, pin_root: &Path) -> Result<GcReport, CommandError> {
    Writer::new(state_dir, pin_root).gc()
}

/// `gc` for a caller that holds the lock already.
pub fn gc_locked(store: &mut StateStore, handles: &mut Handles) -> Result<GcReport, EnrollError> {
    let done = gc::gc(store, handles)?;
    Ok(GcReport {
        recovered: done.recovered,
        gone: done.gone,
        bad_records: done.bad_records,
        orphan_links: done.orphan_links,
        orphan_slots: done.orphan_slots,
    })
}
