//! Collecting pods that disappear while the agent runs.
//!
//! Each enrolled pod's cgroup directory is watched with inotify (`IN_DELETE_SELF` when it is
//! removed, `IN_MODIFY` of its `cgroup.events` when it empties), and so is the directory of its
//! network namespace file (`ip netns delete` unlinks it there). An event that concerns an
//! enrolled pod makes the agent look at the enrolled pods at once. What inotify cannot see is
//! looked at on a timer: a namespace named `/proc/PID/ns/net` (its process exits) every
//! [`BACKSTOP`], those pods only; every pod every [`REREAD`] (a namespace file unmounted but
//! left in place, say). A look is two `stat`s per pod, nothing more: an idle agent with a
//! thousand pods wakes up for a few milliseconds every half minute.

use std::{
    collections::BTreeSet, os::unix::fs::MetadataExt as _, path::PathBuf, sync::Arc, time::Duration,
};

use futures_util::StreamExt as _;
use inotify::{Inotify, WatchMask, Watches};
use tokio::sync::watch;

use super::{pod_log_name, Shared};
use crate::{enroll, gc, state::PodRecord};

/// How often pods whose namespace inotify cannot watch (`/proc/PID/ns/net`) are looked at.
const BACKSTOP: Duration = Duration::from_secs(2);
/// How often the records are read again without a change made through the agent, and every
/// pod looked at without an inotify event.
const REREAD: Duration = Duration::from_secs(30);
/// Changes made through the agent are read at most this often.
const COALESCE: Duration = Duration::from_millis(500);

pub(super) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let stream = Inotify::init().and_then(|i| i.into_event_stream([0u8; 4096]));
    let mut stream = match stream {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("inotify unavailable ({e}): gone pods are found every {BACKSTOP:?}");
            None
        }
    };
    let mut watches = stream.as_ref().map(|s| s.watches());
    let mut pods = reread(&shared, watches.as_mut());
    let mut tick = tokio::time::interval(BACKSTOP);
    let mut reread_tick = tokio::time::interval(REREAD);
    let mut coalesce = tokio::time::interval(COALESCE);
    // Changes made through the agent since the records were last read: a burst of enrolls
    // is read once, not once per request.
    let mut changed = false;
    loop {
        let event = async {
            match stream.as_mut() {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        let look = tokio::select! {
            ev = event => match ev {
                Some(Ok(ev)) => Look::All.when(relevant(&pods, ev.name.as_deref())),
                Some(Err(e)) => {
                    log::warn!("inotify: {e}");
                    Look::None
                }
                None => Look::None,
            },
            _ = tick.tick() => Look::Unwatchable,
            _ = coalesce.tick() => {
                if changed {
                    changed = false;
                    pods = reread(&shared, watches.as_mut());
                }
                Look::None
            }
            _ = reread_tick.tick() => {
                pods = reread(&shared, watches.as_mut());
                Look::All
            }
            _ = shared.pods_changed.notified() => {
                changed = true;
                Look::None
            }
            _ = stop.changed() => return,
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
        if gone.is_empty() {
            continue;
        }
        collect(&shared, gone).await;
        pods = reread(&shared, watches.as_mut());
    }
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
