//! Pods that disappeared without an unenroll, and state that belongs to no pod.
//!
//! A pod whose cgroup or network namespace is gone (the pod died, nothing unenrolled it) keeps
//! its slot and blocks its addresses until it is collected; `list` marks it `gone` meanwhile.
//! `gc` removes those, finishes interrupted commands, and clears what a lost state directory
//! left: link directories and map rows of slots no record owns (the pins are the truth).

use std::{collections::BTreeSet, fs, io, os::unix::fs::MetadataExt as _, path::Path};

use redirect_common::{ListenerKey, AF_INET, AF_INET6, MAX_PODS};

use crate::{
    datapath::{Datapath, Handles, Hook},
    enroll::{self, EnrollError},
    netns,
    rows::FREE_CONFIG,
    spec::pin_dir_name,
    state::{PodRecord, StateStore},
};

/// What the machine says about an enrolled pod, as `list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Its cgroup and network namespace are there.
    Ok,
    /// Its cgroup or its network namespace is gone; `gc` removes it.
    Gone,
    /// A command changing it was interrupted; the next command (or `gc`) rolls it back.
    Interrupted,
}

impl Health {
    pub const fn name(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Gone => "gone",
            Health::Interrupted => "interrupted",
        }
    }
}

/// Whether the pod's cgroup and network namespace still exist as enrolled (same inodes).
pub fn health(rec: &PodRecord) -> Health {
    if rec.pending.is_some() {
        return Health::Interrupted;
    }
    let cgroup_there =
        fs::metadata(&rec.spec.cgroup).is_ok_and(|m| m.is_dir() && m.ino() == rec.cgroup_id);
    let netns_there = match netns::NetnsHandle::open(&rec.spec.netns) {
        Ok(ns) => ns.inode() == rec.netns_inode,
        Err(_) => false,
    };
    if cgroup_there && netns_there {
        Health::Ok
    } else {
        Health::Gone
    }
}

/// What one `gc` run removed.
#[derive(Debug, Default)]
pub struct Collected {
    /// Interrupted commands rolled back.
    pub recovered: Vec<String>,
    /// Pods removed because their cgroup or namespace is gone.
    pub gone: Vec<String>,
    /// Unusable record files removed, with the reason.
    pub bad_records: Vec<String>,
    /// Slots cleared that no record owned (a lost or damaged state directory).
    pub orphan_slots: Vec<u32>,
    /// Link directories removed that no record owned.
    pub orphan_links: Vec<String>,
}

/// Collects everything that belongs to no live pod.
pub fn gc(store: &mut StateStore, handles: &mut Handles) -> Result<Collected, EnrollError> {
    enroll::require_root()?;
    let mut out = Collected {
        recovered: enroll::recover(store, handles)?,
        ..Collected::default()
    };
    let gone: Vec<String> = store
        .pods()
        .filter(|r| health(r) == Health::Gone)
        .map(|r| r.name().to_owned())
        .collect();
    for name in gone {
        enroll::unenroll(store, handles, &name)?;
        out.gone.push(name);
    }
    let bad = store.bad().to_vec();
    for bad in &bad {
        store.remove_bad(bad)?;
        out.bad_records
            .push(format!("{}: {}", bad.path.display(), bad.reason));
    }
    let live: Vec<&PodRecord> = store.pods().collect();
    let pin_root = handles.root().to_owned();
    if let Some(dp) = handles.existing()? {
        let owned: BTreeSet<u32> = live.iter().map(|r| r.slot).collect();
        let dirs: BTreeSet<String> = live.iter().map(|r| pin_dir_name(r.name())).collect();
        out.orphan_links = remove_orphan_links(&pin_root, &dirs)?;
        out.orphan_slots = clear_orphan_slots(dp, &owned)?;
    }
    if live.is_empty() {
        // The shared pins go with the last pod.
        handles.forget();
        Datapath::remove_shared_pins(&pin_root)?;
    }
    Ok(out)
}

/// Removes the rows of `t` whose slot (`slot_be` of the key, big-endian) no record owns.
fn clear_trie<K: aya::Pod>(
    t: &mut aya::maps::lpm_trie::LpmTrie<&mut aya::maps::MapData, K, u32>,
    slot_be: impl Fn(&K) -> u32,
    orphan: &impl Fn(u32) -> bool,
    found: &mut BTreeSet<u32>,
) {
    let stale: Vec<_> = t
        .keys()
        .flatten()
        .filter(|k| orphan(u32::from_be(slot_be(&k.data()))))
        .collect();
    for k in stale {
        found.insert(u32::from_be(slot_be(&k.data())));
        let _ = t.remove(&k);
    }
}

fn remove_orphan_links(
    pin_root: &Path,
    live: &BTreeSet<String>,
) -> Result<Vec<String>, EnrollError> {
    let pods = pin_root.join("pods");
    let entries = match fs::read_dir(&pods) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(crate::datapath::DatapathError::Io { path: pods, source }.into()),
    };
    let mut removed = Vec::new();
    let mut failures = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if live.contains(&name) {
            continue;
        }
        for hook in Hook::ALL {
            for pin in [
                e.path().join(hook.program()),
                e.path().join(format!("{}_next", hook.program())),
            ] {
                match fs::remove_file(&pin) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => failures.push(format!("{}: {err}", pin.display())),
                }
            }
        }
        match fs::remove_dir(e.path()) {
            Ok(()) => removed.push(name),
            Err(err) => failures.push(format!("{}: {err}", e.path().display())),
        }
    }
    if failures.is_empty() {
        Ok(removed)
    } else {
        Err(EnrollError::Teardown {
            name: "orphaned links".into(),
            failures,
        })
    }
}

/// Clears every row of every slot that is in use in the maps but owned by no record.
fn clear_orphan_slots(dp: &mut Datapath, owned: &BTreeSet<u32>) -> Result<Vec<u32>, EnrollError> {
    let mut orphans = BTreeSet::new();
    {
        let pods = dp.pods()?;
        for s in 0..MAX_PODS {
            if !owned.contains(&s) && pods.get(&s, 0).is_ok_and(|c| c.enrolled != 0) {
                orphans.insert(s);
            }
        }
    }
    // Rows pointing at a slot nobody owns, whether or not its PODS row was written.
    let orphan = |s: u32| !owned.contains(&s);
    {
        let mut m = dp.pod_cgroups()?;
        let stale: Vec<(u64, u32)> = m.iter().flatten().filter(|(_, s)| orphan(*s)).collect();
        for (k, s) in stale {
            orphans.insert(s);
            let _ = m.remove(&k);
        }
    }
    {
        let mut m = dp.pod_addrs()?;
        let stale: Vec<_> = m.iter().flatten().filter(|(_, s)| orphan(*s)).collect();
        for (k, s) in stale {
            orphans.insert(s);
            let _ = m.remove(&k);
        }
    }
    {
        let mut m = dp.port_rules()?;
        let stale: Vec<_> = m.keys().flatten().filter(|k| orphan(k.slot)).collect();
        for k in stale {
            orphans.insert(k.slot);
            let _ = m.remove(&k);
        }
    }
    clear_trie(&mut dp.cidr4()?, |k| k.slot_be, &orphan, &mut orphans);
    clear_trie(&mut dp.cidr6()?, |k| k.slot_be, &orphan, &mut orphans);
    {
        let mut pods = dp.pods()?;
        for s in &orphans {
            let _ = pods.set(*s, FREE_CONFIG, 0);
        }
    }
    if let Ok(mut l) = dp.listeners() {
        for s in &orphans {
            for family in [AF_INET, AF_INET6] {
                let _ = l.remove(&ListenerKey {
                    slot: *s,
                    family: u32::from(family),
                });
            }
        }
    }
    Ok(orphans.into_iter().collect())
}
