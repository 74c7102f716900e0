//! Collecting pods that disappear while the agent runs, without polling.
//!
//! Each enrolled pod's cgroup directory is watched with inotify (`IN_DELETE_SELF` when it is
//! removed, `IN_MODIFY` of its `cgroup.events` when it empties), and so is the directory of its
//! network namespace file (`ip netns delete` unlinks it there). A namespace named
//! `/proc/PID/ns/net` goes when its process exits: the agent holds a pidfd of that process
//! (Linux 5.3), which turns readable then. An event that concerns an enrolled pod makes the
//! agent look at the enrolled pods at once. A look is two `stat`s per pod, nothing more.
//!
//! Timers only where no event exists: every pod is looked at every [`REREAD`] (a namespace
//! file unmounted but left in place, say), and a `/proc/PID/ns/net` pod every [`BACKSTOP`]
//! only where no pidfd could be had. An idle agent with a thousand pods wakes up for a few
//! milliseconds every [`REREAD`], and for nothing else.

use std::{
    collections::BTreeSet,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Component, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures_util::StreamExt as _;
use inotify::{Inotify, WatchMask, Watches};
use tokio::{io::unix::AsyncFd, sync::watch};

use super::{pod_log_name, Shared};
use crate::{enroll, gc, state::PodRecord};

/// How often pods whose namespace neither inotify nor a pidfd tells of are looked at.
const BACKSTOP: Duration = Duration::from_secs(2);
/// How often the records are read again without a change made through the agent, and every
/// pod looked at without an event.
const REREAD: Duration = Duration::from_secs(30);
/// Changes made through the agent are read this long after the first of them: a burst of
/// enrolls is read once, not once per request.
const COALESCE: Duration = Duration::from_millis(500);

/// What woke the watch up.
enum Wake {
    /// An inotify event; whether it may concern an enrolled pod.
    Inotify(bool),
    /// A pod's process exited.
    Exited,
    Backstop,
    Coalesced,
    Reread,
    Changed,
    Stop,
}

pub(super) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let stream = Inotify::init().and_then(|i| i.into_event_stream([0u8; 4096]));
    let mut stream = match stream {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("inotify unavailable ({e}): gone pods are found every {REREAD:?}");
            None
        }
    };
    let mut watches = stream.as_ref().map(|s| s.watches());
    let mut pods = reread(&shared, watches.as_mut());
    let mut exits = Exits::of(&pods);
    let mut backstop = tokio::time::interval(BACKSTOP);
    let mut reread_tick = tokio::time::interval(REREAD);
    // Armed by the first change made through the agent since the records were last read.
    let mut coalesce: Option<tokio::time::Instant> = None;
    loop {
        let event = async {
            match stream.as_mut() {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        let coalesced = async {
            match coalesce {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let wake = tokio::select! {
            ev = event => match ev {
                Some(Ok(ev)) => Wake::Inotify(relevant(&pods, ev.name.as_deref())),
                Some(Err(e)) => {
                    log::warn!("inotify: {e}");
                    Wake::Inotify(false)
                }
                None => Wake::Inotify(false),
            },
            () = exits.any_exited() => Wake::Exited,
            _ = backstop.tick(), if exits.unwatched => Wake::Backstop,
            () = coalesced => Wake::Coalesced,
            _ = reread_tick.tick() => Wake::Reread,
            _ = shared.pods_changed.notified() => Wake::Changed,
            _ = stop.changed() => Wake::Stop,
        };
        let look = match wake {
            Wake::Stop => return,
            Wake::Changed => {
                coalesce.get_or_insert_with(|| tokio::time::Instant::now() + COALESCE);
                Look::None
            }
            Wake::Coalesced => {
                coalesce = None;
                pods = reread(&shared, watches.as_mut());
                exits = Exits::of(&pods);
                // What went before its watch was added has no event to come: look once.
                Look::All
            }
            Wake::Reread => {
                pods = reread(&shared, watches.as_mut());
                exits = Exits::of(&pods);
                Look::All
            }
            Wake::Inotify(relevant) => Look::All.when(relevant),
            Wake::Exited => Look::Unwatchable,
            Wake::Backstop => Look::Unwatchable,
        };
        let gone: Vec<String> = pods
            .iter()
            .filter(|r| match look {
                Look::None => false,
                Look::Unwatchable => !watchable(r) && looks_gone(r),
                Look::All => looks_gone(r),
            })
            .map(|r| r.name().to_owned())
            .collect();
        let collected = !gone.is_empty();
        if collected {
            collect(&shared, gone).await;
        }
        if collected || matches!(wake, Wake::Exited) {
            // An exited process's pidfd stays readable: the pidfds are taken again.
            pods = reread(&shared, watches.as_mut());
            exits = Exits::of(&pods);
        }
    }
}

/// Pidfds of the processes whose `/proc/PID/ns/net` pods are enrolled by.
struct Exits {
    fds: Vec<AsyncFd<OwnedFd>>,
    /// Some such pod has no pidfd (no pidfd_open before Linux 5.3, or its process is gone
    /// already and the pod not yet collected): the backstop timer looks at them.
    unwatched: bool,
}

impl Exits {
    fn of(pods: &[PodRecord]) -> Exits {
        let mut exits = Exits {
            fds: Vec::new(),
            unwatched: false,
        };
        for r in pods.iter().filter(|r| !watchable(r)) {
            // SAFETY: the pidfd is owned by the AsyncFd, which neither the agent nor anyone
            // else closes or replaces while it is registered.
            match pidfd_of(r).and_then(|fd| unsafe { AsyncFd::register(fd) }.ok()) {
                Some(fd) => exits.fds.push(fd),
                None => exits.unwatched = true,
            }
        }
        log::debug!(
            "watching {} pod processes' exits (without a pidfd: {})",
            exits.fds.len(),
            exits.unwatched
        );
        exits
    }

    /// Returns once one of the processes has exited; never without pidfds.
    async fn any_exited(&self) {
        if self.fds.is_empty() {
            return std::future::pending().await;
        }
        let waits = self.fds.iter().map(|fd| Box::pin(fd.readable()));
        let _ = futures_util::future::select_all(waits).await;
    }
}

/// A pidfd of the process whose namespace the pod was enrolled with, if that process is
/// still the one: its pid may have been reused since, so the namespace is compared once the
/// pidfd is held (from then on the pid cannot be reused).
fn pidfd_of(r: &PodRecord) -> Option<OwnedFd> {
    let mut c = r.spec.netns.strip_prefix("/proc").ok()?.components();
    let pid: libc::pid_t = match c.next()? {
        Component::Normal(p) => p.to_str()?.parse().ok()?,
        _ => return None,
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
    // is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor was just returned to us and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let ns = std::fs::metadata(&r.spec.netns).ok()?;
    (ns.ino() == r.netns_inode).then_some(fd)
}

/// Which pods to look at.
#[derive(Debug, Clone, Copy)]
enum Look {
    None,
    /// Those whose namespace file inotify cannot watch.
    Unwatchable,
    All,
}

impl Look {
    fn when(self, yes: bool) -> Look {
        if yes {
            self
        } else {
            Look::None
        }
    }
}

/// Whether inotify tells of the pod's namespace going: a namespace file in a directory
/// (`ip netns`, the container runtime's bind mounts), not a process's `/proc/PID/ns/net`.
fn watchable(r: &PodRecord) -> bool {
    !r.spec.netns.starts_with("/proc")
}

/// Whether an inotify event may concern an enrolled pod: events on a pod's own cgroup come
/// without a name; in a namespace directory only the pods' namespace files count (other
/// namespaces come and go there all the time).
fn relevant(pods: &[PodRecord], name: Option<&std::ffi::OsStr>) -> bool {
    match name {
        None => true,
        Some(n) => pods.iter().any(|p| p.spec.netns.file_name() == Some(n)),
    }
}

/// A cheap look (one `stat` each of the cgroup and the namespace file): whether the pod's
/// cgroup or namespace is no longer the enrolled one. [`collect`] confirms with
/// [`gc::health`] under the lock before it unenrolls anything.
fn looks_gone(r: &PodRecord) -> bool {
    let cgroup =
        std::fs::metadata(&r.spec.cgroup).is_ok_and(|m| m.is_dir() && m.ino() == r.cgroup_id);
    // A namespace file (a bind mount of nsfs, or /proc/PID/ns/net) stats as the namespace.
    let netns = std::fs::metadata(&r.spec.netns).is_ok_and(|m| m.ino() == r.netns_inode);
    !(cgroup && netns)
}

/// Unenrolls the pods that are still gone once the lock is held (another request may have
/// unenrolled or enrolled them again meanwhile).
async fn collect(shared: &Arc<Shared>, names: Vec<String>) {
    let done = super::write(shared, move |w| {
        w.locked(|store, handles| {
            let mut done = Vec::new();
            for name in names {
                let Some(rec) = store.get(&name).ok().flatten() else {
                    continue;
                };
                if gc::health(&rec) != gc::Health::Gone {
                    continue;
                }
                let who = pod_log_name(&rec.spec);
                match enroll::unenroll(store, handles, &name) {
                    Ok(_) => done.push(Ok(who)),
                    Err(e) => done.push(Err((who, crate::error_chain(&e)))),
                }
            }
            Ok::<_, crate::state::StateError>(done)
        })
        .map_err(|e| crate::error_chain(&e))
    })
    .await;
    match done {
        Ok(done) => {
            for d in done {
                match d {
                    Ok(who) => {
                        shared.metrics.pod_collected();
                        log::info!("{who}: gone (cgroup or network namespace removed), unenrolled");
                    }
                    Err((who, e)) => log::warn!("{who}: gone, but unenrolling it failed: {e}"),
                }
            }
        }
        Err(e) => log::warn!("collecting gone pods: opening the state: {e}"),
    }
}

/// The enrolled pods, and inotify watches on what tells of their disappearance.
fn reread(shared: &Shared, watches: Option<&mut Watches>) -> Vec<PodRecord> {
    let pods = match shared.pods.pods() {
        Ok(p) => p,
        Err(e) => {
            log::warn!("reading records: {}", crate::error_chain(&e));
            return Vec::new();
        }
    };
    if let Some(w) = watches {
        // Adding a watch on a path already watched returns the same descriptor: watches are
        // never duplicated. Old ones of unenrolled pods are dropped by the kernel when their
        // directory goes; a stale one only causes an extra look.
        let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
        for p in &pods {
            let _ = w.add(&p.spec.cgroup, WatchMask::DELETE_SELF | WatchMask::ONLYDIR);
            let _ = w.add(p.spec.cgroup.join("cgroup.events"), WatchMask::MODIFY);
            if let Some(d) = p.spec.netns.parent() {
                dirs.insert(d.to_owned());
            }
        }
        for d in dirs {
            let _ = w.add(
                &d,
                WatchMask::DELETE | WatchMask::MOVED_FROM | WatchMask::ONLYDIR,
            );
        }
    }
    pods
}
