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

/// Something else redirect installed on the node, that `uninstall` removes: the CNI plugin's
/// entry in the runtime's CNI configuration and its binary (issue 11) are the first. Removed
/// before the pods, so that nothing enrolls a new pod meanwhile.
pub trait Installed {
    /// What it is, as the report names it.
    fn what(&self) -> String;
    /// Removes it; `Ok(false)` when it was not there (uninstall runs again harmlessly).
    fn remove(&self) -> Result<bool, String>;
}

/// What `uninstall` removed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UninstallReport {
    /// [`Installed`] things removed.
    pub removed: Vec<String>,
    /// Pods unenrolled (their links, rows and `::6` removed).
    pub unenrolled: Vec<String>,
    /// What the final `gc` cleared (unusable records, orphaned links and slots).
    pub collected: GcReport,
    /// The pin root, if there was one to remove (its bpffs mount with it, when redirect
    /// mounted bpffs on the pin root itself).
    pub pin_root: Option<PathBuf>,
    /// The state directory, if there was one.
    pub state_dir: Option<PathBuf>,
    /// A stale socket file of a killed agent, removed.
    pub socket: Option<PathBuf>,
}

/// Why `uninstall` did not finish.
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    /// A running agent would take over again what is removed (and the DaemonSet restarts
    /// it): it must be stopped first.
    #[error("a node agent is running on {}; stop it first (SIGTERM; on Kubernetes delete the agent's DaemonSet), then run uninstall again", .0.display())]
    AgentRunning(PathBuf),
    #[error("removing {what}: {why}")]
    Installed { what: String, why: String },
    #[error(transparent)]
    Command(Box<CommandError>),
    #[error("removing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<CommandError> for UninstallError {
    fn from(e: CommandError) -> Self {
        UninstallError::Command(Box::new(e))
    }
}

impl From<StateError> for UninstallError {
    fn from(e: StateError) -> Self {
        CommandError::from(e).into()
    }
}

/// Removes everything redirect put on the node: `extra` (the CNI plugin's entry), every pod
/// (links, rows, `::6`; established connections are left as they are), everything `gc`
/// finds, the shared pins and the pin root (and bpffs, where redirect mounted it on the pin
/// root itself), the state directory, a stale socket. Refuses while an agent answers on
/// `socket`: it would re-create what is removed. Running it again finds nothing to remove.
///
/// The kernel's bpffs mount point `/sys/fs/bpf` stays mounted: redirect mounts it only where
/// nothing was, as systemd usually has, and cannot tell afterwards who did; other programs
/// pin there too.
pub fn uninstall(
    state_dir: &Path,
    pin_root: &Path,
    socket: &Path,
    extra: &[&dyn Installed],
) -> Result<UninstallReport, UninstallError> {
    enroll::require_root().map_err(CommandError::from)?;
    let mut report = UninstallReport::default();
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => return Err(UninstallError::AgentRunning(socket.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            // The file of a killed agent.
            std::fs::remove_file(socket).map_err(|source| UninstallError::Io {
                path: socket.to_owned(),
                source,
            })?;
            report.socket = Some(socket.to_owned());
        }
        Err(_) => {}
    }
    for x in extra {
        match x.remove() {
            Ok(true) => report.removed.push(x.what()),
            Ok(false) => {}
            Err(why) => {
                return Err(UninstallError::Installed {
                    what: x.what(),
                    why,
                })
            }
        }
    }
    let had_pins = std::fs::symlink_metadata(pin_root).is_ok();
    let had_state = std::fs::symlink_metadata(state_dir).is_ok();
    if had_state || had_pins {
        let mut w = Writer::new(state_dir, pin_root);
        let (unenrolled, collected) = w.locked(|store, h| {
            enroll::recover(store, h)?;
            let names: Vec<String> = store.pods().map(|r| r.name().to_owned()).collect();
            for n in &names {
                enroll::unenroll(store, h, n)?;
            }
            // Unusable records, links and rows no record owns, and the shared pins.
            let collected = gc_locked(store, h)?;
            Ok::<_, CommandError>((names, collected))
        })?;
        report.unenrolled = unenrolled;
        report.collected = collected;
        // gc removed the shared pins with the last pod; an empty pin root goes too.
        Datapath::remove_shared_pins(pin_root).map_err(CommandError::Datapath)?;
        remove_state_dir(state_dir)?;
    }
    report.pin_root = had_pins.then(|| pin_root.to_owned());
    report.state_dir = had_state.then(|| state_dir.to_owned());
    Ok(report)
}

/// Removes the state directory: the (empty) records directory, the lock, the directory.
fn remove_state_dir(dir: &Path) -> Result<(), UninstallError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| UninstallError::Io { path, source }
    };
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    let pods = dir.join("pods");
    gone(std::fs::remove_dir(&pods)).map_err(io(&pods))?;
    let lock = dir.join("lock");
    gone(std::fs::remove_file(&lock)).map_err(io(&lock))?;
    gone(std::fs::remove_dir(dir)).map_err(io(dir))
}
