//! The enroll transaction: check, record the intent, write rows, attach, finish or roll back.
//!
//! Every change follows the same order (docs/DESIGN.md, "State and pins"):
//! 1. [`inspect`] checks the request and the machine **before** the store's lock is taken
//!    (a FIFO given as `--netns` fails there; nothing can block with the lock held);
//! 2. under the lock, [`recover`] finishes whatever a killed command left pending;
//! 3. the record is written with [`Pending`] set, before the kernel is touched;
//! 4. rows are written (the pod becomes findable last), links attached, `::6` added;
//! 5. the record is written again without `pending`.
//!
//! A failure rolls back at once; a kill leaves a pending record that the next command (or
//! `gc`, or the node agent) rolls back. Either way `list` tells the truth meanwhile.

use std::{
    collections::BTreeSet,
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::{MapError, PerCpuValues};
use redirect_common::{
    Counter, ListenerKey, AF_INET, AF_INET6, MAX_CIDR_RULES, MAX_PODS, MAX_PORT_RULES,
};

use crate::{
    cgroup::{self, CgroupError},
    datapath::{Datapath, DatapathError, Handles, Hook},
    listener, netns,
    rows::{PodRows, FREE_CONFIG},
    spec::{pin_dir_name, PodSpec, SpecError},
    state::{Pending, PodRecord, StateError, StateStore},
};

/// Why enrolling or unenrolling failed. Whatever the variant, nothing was left half-applied:
/// the change was rolled back, or (for [`EnrollError::Teardown`]) the record stays pending
/// and the next command retries.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// Changing the datapath needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).
    #[error("must run as root (eBPF programs, cgroup and netns attachments need it)")]
    NotRoot,
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The root of the cgroup2 hierarchy holds every process of the machine.
    #[error("refusing cgroup {0}: it is the cgroup2 root, every process on the machine would be redirected")]
    CgroupRoot(PathBuf),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    /// A pod IP is not configured on any interface inside the pod's namespace.
    #[error("pod IP {ip} is not assigned to any interface in network namespace {netns}")]
    IpNotInNetns { ip: IpAddr, netns: PathBuf },
    /// Another pod already has this name with a different cgroup.
    #[error("pod {name} is already enrolled with cgroup {existing}; unenroll it first")]
    NameCgroupMismatch { name: String, existing: PathBuf },
    /// Two pods cannot share an address: sk_lookup finds pods by address.
    #[error("pod IP {ip} already belongs to enrolled pod {other}")]
    IpInUse { ip: IpAddr, other: String },
    /// Two pods cannot share a cgroup: the cgroup hooks find pods by cgroup.
    #[error("cgroup {cgroup} already belongs to enrolled pod {other}")]
    CgroupInUse { cgroup: PathBuf, other: String },
    /// Two pods cannot share a network namespace: sk_lookup is attached per namespace.
    #[error("network namespace {netns} already belongs to enrolled pod {other}")]
    NetnsInUse { netns: PathBuf, other: String },
    #[error("no such enrolled pod: {0}")]
    Unknown(String),
    #[error("all {MAX_PODS} pod slots are in use")]
    NoSlot,
    #[error(transparent)]
    State(#[from] StateError),
    /// The kernel lacks a feature the datapath cannot work without.
    #[error(transparent)]
    Kernel(#[from] crate::probe::ProbeError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The per-connection maps could not be swept for the pod's slot.
    #[error(transparent)]
    Conntrack(#[from] crate::conntrack::ConntrackError),
    /// A shared map refused a row: full over all pods, or another kernel error.
    #[error("pod {pod}: writing {map} failed ({errno}); {map} holds {capacity} rows over all pods (docs/DESIGN.md, \"Capacity\")")]
    MapWrite {
        pod: String,
        map: &'static str,
        errno: String,
        capacity: u32,
        #[source]
        source: Box<MapError>,
    },
    /// Preparing the pod's namespace (`::6` on lo) failed.
    #[error("preparing network namespace {netns}: {detail}")]
    Prepare { netns: PathBuf, detail: String },
    /// Removing a pod left something behind; the record stays (pending) so a re-run retries.
    #[error("pod {name}: could not remove everything: {}", .failures.join("; "))]
    Teardown { name: String, failures: Vec<String> },
}

/// What `enroll` did, for the CLI to report.
#[derive(Debug)]
pub struct Enrolled {
    pub record: PodRecord,
    /// True when the name was enrolled before and was updated in place.
    pub updated: bool,
    /// Inbound listeners of an already running proxy adopted for capture, or why none could be.
    pub adopted_listeners: Result<usize, String>,
}

/// The one root check of the agent.
pub fn require_root() -> Result<(), EnrollError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(EnrollError::NotRoot)
    }
}

/// A checked request and what the machine says about it, made by [`inspect`] only.
#[derive(Debug)]
pub struct Checked {
    spec: PodSpec,
    cgroup_id: u64,
    netns_inode: u64,
}

impl Checked {
    pub fn spec(&self) -> &PodSpec {
        &self.spec
    }
}

/// The cgroup2 root directory's inode: cgroup id 1 is the root of every cgroup2 hierarchy.
const CGROUP2_ROOT_ID: u64 = 1;

/// Checks a request against itself and the machine, without the store's lock: the cgroup is a
/// cgroup v2 directory and not the root, the namespace file is a network namespace (opened
/// without blocking) and not the host's, and every pod IP is assigned inside it.
pub fn inspect(mut spec: PodSpec) -> Result<Checked, EnrollError> {
    require_root()?;
    spec.check()?;
    let cgroup_id = cgroup::cgroup_id(&spec.cgroup)?;
    if cgroup_id == CGROUP2_ROOT_ID {
        return Err(EnrollError::CgroupRoot(spec.cgroup.clone()));
    }
    let ns = netns::NetnsHandle::open(&spec.netns)?;
    let assigned = netns::assigned_addrs(&ns)?;
    if let Some(ip) = spec.pod_ips.iter().find(|ip| !assigned.contains(ip)) {
        return Err(EnrollError::IpNotInNetns {
            ip: *ip,
            netns: spec.netns.clone(),
        });
    }
    Ok(Checked {
        netns_inode: ns.inode(),
        spec,
        cgroup_id,
    })
}

use netns::passthrough_src6;

/// Enrolls a pod, or updates it in place when its name is enrolled already. The caller holds
/// the store's lock; `handles` are the datapath's, opened here if they are not already.
pub fn enroll(
    store: &mut StateStore,
    handles: &mut Handles,
    req: Checked,
) -> Result<Enrolled, EnrollError> {
    require_root()?;
    recover(store, handles)?;
    let Checked {
        spec,
        cgroup_id,
        netns_inode,
    } = req;
    let existing = store.get(&spec.name)?;
    if let Some(old) = &existing {
        if old.cgroup_id != cgroup_id {
            return Err(EnrollError::NameCgroupMismatch {
                name: spec.name.clone(),
                existing: old.spec.cgroup.clone(),
            });
        }
    }
    for other in store.pods().filter(|r| r.name() != spec.name) {
        if other.cgroup_id == cgroup_id {
            return Err(EnrollError::CgroupInUse {
                cgroup: spec.cgroup.clone(),
                other: other.name().to_owned(),
            });
        }
        if other.netns_inode == netns_inode {
            return Err(EnrollError::NetnsInUse {
                netns: spec.netns.clone(),
                other: other.name().to_owned(),
            });
        }
        if let Some(ip) = spec
            .pod_ips
            .iter()
            .find(|ip| other.spec.pod_ips.contains(ip))
        {
            return Err(EnrollError::IpInUse {
                ip: *ip,
                other: other.name().to_owned(),
            });
        }
    }

    if !handles.root().join("progs").exists() {
        // First pod on this node: check the kernel before loading anything, so a missing
        // feature is named with the kernel that brings it instead of surfacing as a verifier log.
        // With --dns-capture the DNS hooks are checked first, so that a kernel without one
        // is refused naming it (every hook loads with the one datapath object).
        crate::probe::require(spec.dns_capture)?;
    }
    let dp = handles.build()?;
    let slot = match &existing {
        Some(old) => old.slot,
        None => free_slot(dp, store)?,
    };
    let same_netns = existing
        .as_ref()
        .is_some_and(|o| o.netns_inode == netns_inode);
    let mut record = PodRecord {
        spec,
        cgroup_id,
        netns_inode,
        slot,
        added_lo6: existing.as_ref().is_some_and(|o| o.added_lo6 && same_netns),
        pending: Some(match &existing {
            Some(old) => Pending::Update {
                previous: Box::new(old.clone()),
            },
            None => Pending::Enroll,
        }),
    };
    // Whether this change adds ::6: decided before the intent is written, so a rollback after
    // a kill removes it only if it was ours.
    let needs_lo6 = record.spec.ip6().is_some() && !record.added_lo6;
    if needs_lo6 {
        let ns = netns::NetnsHandle::open(&record.spec.netns)?;
        record.added_lo6 = !netns::assigned_addrs(&ns)?.contains(&passthrough_src6().into());
    }
    store.put(&record)?;

    let result = apply(dp, existing.as_ref(), &record);
    match result {
        Ok(adopted) => {
            record.pending = None;
            store.put_done(&record)?;
            if let Some(old) = &existing {
                // A namespace recreated at the same path: the path now names the new one, whose
                // ::6, route and addresses were just made; the old one's went with it.
                let moved =
                    old.netns_inode != record.netns_inode && old.spec.netns != record.spec.netns;
                if old.added_lo6 && moved {
                    // The pod moved: the old namespace's ::6 was ours. Best effort: the old
                    // sandbox is usually gone already, and its lo with it.
                    if let Err(e) = remove_passthrough_src6(&old.spec.netns) {
                        log::warn!("removing ::6 from {}: {e}", old.spec.netns.display());
                    }
                }
                if old.spec.ip6().is_some() && moved {
                    if let Err(e) = remove_spread_route6(&old.spec.netns) {
                        log::warn!("removing 100::/64 from {}: {e}", old.spec.netns.display());
                    }
                }
            }
            Ok(Enrolled {
                record,
                updated: existing.is_some(),
                adopted_listeners: adopted,
            })
        }
        Err(e) => {
            // Roll back now; if even that fails the record stays pending for the next command.
            if let Err(rb) = roll_back(store, handles, &record) {
                log::warn!("rolling back {} failed: {rb}", record.name());
            }
            Err(e)
        }
    }
}

/// The lowest slot no record and no pinned row uses: after a lost state directory, the pins
/// still say which slots orphaned pods hold, and a new pod never takes one of them. Only the
/// slots no record owns are looked up, lowest first, until one is free in the pins too.
fn free_slot(dp: &mut Datapath, store: &StateStore) -> Result<u32, EnrollError> {
    let used: BTreeSet<u32> = store.pods().map(|r| r.slot).collect();
    let pods = dp.pods()?;
    (0..MAX_PODS)
        .filter(|s| !used.contains(s))
        .find(|s| !pods.get(s, 0).is_ok_and(|c| c.enrolled != 0))
        .ok_or(EnrollError::NoSlot)
}

/// The kernel side of an enroll or update; the caller rolls back on error.
fn apply(
    dp: &mut Datapath,
    old: Option<&PodRecord>,
    rec: &PodRecord,
) -> Result<Result<usize, String>, EnrollError> {
    if rec.spec.ip6().is_some() {
        // Captured IPv6 connections go to 100::/64, which must be local on the pod's lo before
        // the pod is findable (issue 13, IPv6 port space). Best effort here, required below
        // after ::6: a namespace without IPv6 on lo then fails where it always did, on ::6,
        // after rows and links (rolled back with the rest).
        let _ = add_spread_route6(&rec.spec.netns);
    }
    if crate::rows::dns_pool6(&rec.spec) {
        // The IPv6 DNS reply addresses, before the row that sends queries to them
        // (`pod_flags::DNS_POOL6`).
        add_dns_pool6(&rec.spec.netns)?;
    }
    let rows = PodRows::new(&rec.spec, rec.slot, rec.cgroup_id);
    let old_rows = old.map(|o| PodRows::new(&o.spec, o.slot, o.cgroup_id));
    if old.is_none() {
        zero_counters(dp, rec.slot)?;
        // A slot starts empty: nothing a previous holder's connections left behind counts
        // against this pod's share of ORIG_DST.
        let (mut orig_dst, mut used) = dp.orig_dst_maps()?;
        crate::conntrack::sweep_slot_if_used(&mut orig_dst, &mut used, rec.slot)?;
    }
    write_rows(dp, rec.name(), old_rows.as_ref(), &rows)?;
    if rec.spec.ip6().is_some() && !crate::rows::dns_pool6(&rec.spec) {
        // DNS capture turned off (or never on: nothing to remove): the row no longer sends
        // queries to the reply addresses. Best effort: left over, they are harmless, and
        // unenroll removes them.
        if let Err(e) = remove_dns_pool6(&rec.spec.netns) {
            log::warn!(
                "removing the DNS reply addresses from {}: {e}",
                rec.spec.netns.display()
            );
        }
    }
    attach_links(dp, old, rec)?;
    if rec.added_lo6 && old.is_none_or(|o| !o.added_lo6 || o.netns_inode != rec.netns_inode) {
        add_passthrough_src6(&rec.spec.netns)?;
    }
    if rec.spec.ip6().is_some() {
        // Required: the attempt before the rows may have failed. Already there is fine.
        add_spread_route6(&rec.spec.netns)?;
    }
    // Optional (pidfd_getfd, 5.6): without it a running proxy is captured from its next
    // listen() on. Reported, never fatal.
    Ok(listener::adopt(dp, rec).map_err(|e| e.to_string()))
}

/// Whether every link of the pod is pinned (root only: bpffs is not readable by others).
pub fn links_complete(pin_root: &Path, rec: &PodRecord) -> bool {
    let dir = link_dir(pin_root, rec.name());
    Hook::ALL.iter().all(|h| dir.join(h.program()).exists())
}

/// Link directories under the pin root that no record owns.
pub fn orphan_link_dirs(pin_root: &Path, records: &[PodRecord]) -> Vec<String> {
    let Ok(entries) = fs::read_dir(pin_root.join("pods")) else {
        return Vec::new();
    };
    let owned: BTreeSet<String> = records.iter().map(|r| pin_dir_name(r.name())).collect();
    let mut out: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !owned.contains(n))
        .collect();
    out.sort();
    out
}

/// The pod's link directory.
pub fn link_dir(pin_root: &Path, name: &str) -> PathBuf {
    pin_root.join("pods").join(pin_dir_name(name))
}

fn attach_links(
    dp: &Datapath,
    old: Option<&PodRecord>,
    rec: &PodRecord,
) -> Result<(), EnrollError> {
    let dir = link_dir(dp.root(), rec.name());
    fs::create_dir_all(&dir).map_err(|source| DatapathError::Io {
        path: dir.clone(),
        source,
    })?;
    let netns_moved = old.is_some_and(|o| o.netns_inode != rec.netns_inode);
    for hook in Hook::ALL {
        let pin = dir.join(hook.program());
        let target = if hook == Hook::SkLookup {
            &rec.spec.netns
        } else {
            &rec.spec.cgroup
        };
        if hook == Hook::SkLookup && netns_moved {
            // The sandbox was recreated: attach to the new namespace, then swap the pin, so
            // the old link (and its namespace) is released only once the new one holds.
            let next = dir.join(format!("{}_next", hook.program()));
            let _ = fs::remove_file(&next);
            dp.attach(hook, target, &next)?;
            fs::rename(&next, &pin).map_err(|source| DatapathError::Io {
                path: pin.clone(),
                source,
            })?;
            continue;
        }
        if pin.exists() {
            continue; // Re-enrolment: the pod keeps its links, only its rows change.
        }
        dp.attach(hook, target, &pin)?;
    }
    Ok(())
}

fn map_write(pod: &str, map: &'static str, capacity: u32) -> impl FnOnce(MapError) -> EnrollError {
    let pod = pod.to_owned();
    move |source| {
        let errno = match &source {
            MapError::SyscallError(e) => {
                let code = e.io_error.raw_os_error().unwrap_or(0);
                let name = match code {
                    libc::E2BIG => "E2BIG: the map is full",
                    libc::ENOSPC => "ENOSPC: the map is full",
                    libc::ENOMEM => "ENOMEM",
                    libc::EPERM => "EPERM",
                    _ => "",
                };
                if name.is_empty() {
                    e.io_error.to_string()
                } else {
                    name.to_owned()
                }
            }
            other => other.to_string(),
        };
        EnrollError::MapWrite {
            pod,
            map,
            errno,
            capacity,
            source: Box::new(source),
        }
    }
}

/// Writes `new`, removing what `old` had and `new` has not. Rows the hooks consult after
/// finding the pod go first; the pod becomes findable (cgroup, config) last. A rollback is
/// the same call with the two swapped.
fn write_rows(
    dp: &mut Datapath,
    pod: &str,
    old: Option<&PodRows>,
    new: &PodRows,
) -> Result<(), EnrollError> {
    {
        let mut rules = dp.port_rules()?;
        if let Some(old) = old {
            for (k, _) in &old.port_rules {
                if !new.port_rules.iter().any(|(n, _)| n == k) {
                    remove_quiet(rules.remove(k));
                }
            }
        }
        for (k, bits) in &new.port_rules {
            rules
                .insert(k, bits, 0)
                .map_err(map_write(pod, "PORT_RULES", MAX_PORT_RULES))?;
        }
    }
    sync_trie(
        &mut dp.cidr4()?,
        old.map(|o| &o.cidr4[..]),
        &new.cidr4,
        map_write(pod, "CIDR4", MAX_CIDR_RULES),
    )?;
    sync_trie(
        &mut dp.cidr6()?,
        old.map(|o| &o.cidr6[..]),
        &new.cidr6,
        map_write(pod, "CIDR6", MAX_CIDR_RULES),
    )?;
    {
        let mut addrs = dp.pod_addrs()?;
        if let Some(old) = old {
            for a in &old.addrs {
                if !new.addrs.contains(a) {
                    remove_quiet(addrs.remove(a));
                }
            }
        }
        for a in &new.addrs {
            addrs
                .insert(a, new.slot, 0)
                .map_err(map_write(pod, "POD_ADDRS", MAX_PODS * 4))?;
        }
    }
    dp.pods()?
        .set(new.slot, new.config, 0)
        .map_err(map_write(pod, "PODS", MAX_PODS))?;
    dp.pod_cgroups()?
        .insert(new.cgroup_id, new.slot, 0)
        .map_err(map_write(pod, "POD_CGROUPS", MAX_PODS))?;
    Ok(())
}

/// Writes the `new` CIDR rows of one trie, removing those of `old` that `new` has not.
fn sync_trie<K: aya::Pod + PartialEq>(
    t: &mut aya::maps::lpm_trie::LpmTrie<&mut aya::maps::MapData, K, u32>,
    old: Option<&[(u32, K, u32)]>,
    new: &[(u32, K, u32)],
    err: impl FnOnce(MapError) -> EnrollError,
) -> Result<(), EnrollError> {
    for (len, k, _) in old.unwrap_or_default() {
        if !new.iter().any(|(l, n, _)| l == len && n == k) {
            remove_quiet(t.remove(&aya::maps::lpm_trie::Key::new(*len, *k)));
        }
    }
    for (len, k, rule) in new {
        if let Err(e) = t.insert(&aya::maps::lpm_trie::Key::new(*len, *k), rule, 0) {
            return Err(err(e));
        }
    }
    Ok(())
}

/// A removal during an update: a row already gone is what we wanted.
fn remove_quiet(r: Result<(), MapError>) {
    if let Err(e) = r {
        if !is_not_found(&e) {
            log::warn!("removing a stale row: {e}");
        }
    }
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Removes everything of the pod: links first (no hook runs for it any more), then rows, then
/// `::6`. Every failure is collected; nothing is skipped because an earlier step failed.
fn teardown(dp: &mut Datapath, rec: &PodRecord) -> Vec<String> {
    let mut failures = Vec::new();
    let mut note = |what: String, e: &dyn std::fmt::Display| failures.push(format!("{what}: {e}"));
    let dir = link_dir(dp.root(), rec.name());
    for hook in Hook::ALL {
        for pin in [
            dir.join(hook.program()),
            dir.join(format!("{}_next", hook.program())),
        ] {
            match fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => note(format!("removing link pin {}", pin.display()), &e),
            }
        }
    }
    match fs::remove_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => note(format!("removing {}", dir.display()), &e),
    }
    let rows = PodRows::new(&rec.spec, rec.slot, rec.cgroup_id);
    let mut failures_open = Vec::new();
    let mut check = |what: &str, r: Result<(), MapError>| {
        if let Err(e) = r {
            if !is_not_found(&e) {
                failures.push(format!("{what}: {e}"));
            }
        }
    };
    match dp.pod_cgroups() {
        Ok(mut m) => {
            // Only if the row is still this pod's (a recovered, never-written enroll).
            if m.get(&rec.cgroup_id, 0).is_ok_and(|s| s == rec.slot) {
                check("POD_CGROUPS", m.remove(&rec.cgroup_id));
            }
        }
        Err(e) if e.is_not_pinned() => {} // A map that is not pinned holds no rows.
        Err(e) => failures_open.push(format!("opening POD_CGROUPS: {}", crate::error_chain(&e))),
    }
    match dp.pods() {
        Ok(mut m) => check("PODS", m.set(rec.slot, FREE_CONFIG, 0)),
        Err(e) if e.is_not_pinned() => {} // A map that is not pinned holds no rows.
        Err(e) => failures_open.push(format!("opening PODS: {}", crate::error_chain(&e))),
    }
    match dp.pod_addrs() {
        Ok(mut m) => {
            for a in &rows.addrs {
                if m.get(a, 0).is_ok_and(|s| s == rec.slot) {
                    check("POD_ADDRS", m.remove(a));
                }
            }
        }
        Err(e) if e.is_not_pinned() => {} // A map that is not pinned holds no rows.
        Err(e) => failures_open.push(format!("opening POD_ADDRS: {}", crate::error_chain(&e))),
    }
    match dp.port_rules() {
        Ok(mut m) => {
            for (k, _) in &rows.port_rules {
                check("PORT_RULES", m.remove(k));
            }
        }
        Err(e) if e.is_not_pinned() => {} // A map that is not pinned holds no rows.
        Err(e) => failures_open.push(format!("opening PORT_RULES: {}", crate::error_chain(&e))),
    }
    match dp.cidr4() {
        Ok(mut t) => {
            for (len, k, _) in &rows.cidr4 {
                check("CIDR4", t.remove(&aya::maps::lpm_trie::Key::new(*len, *k)));
            }
        }
        Err(e) if e.is_not_pinned() => {} // A map that is not pinned holds no rows.
        Err(e) => failures_open.push(format!("opening CIDR4: {}", crate::error_chain(&e))),
    }
    match dp.cidr6() {
        Ok(mut t) => {
            for (len, k, _) in &rows.cidr6 {
                check("CIDR6", t.remove(&aya::maps::lpm_trie::Key::new(*len, *k)));
            }
        }
        Err(e) if e.is_not_pinned() => {} // A map that is not pinned holds no rows.
        Err(e) => failures_open.push(format!("opening CIDR6: {}", crate::error_chain(&e))),
    }
    match dp.listeners() {
        Ok(mut l) => {
            for family in [AF_INET, AF_INET6] {
                check(
                    "LISTENERS",
                    l.remove(&ListenerKey {
                        slot: rec.slot,
                        family: u32::from(family),
                    }),
                );
            }
        }
        Err(e) if e.is_not_pinned() => {} // A map that is not pinned holds no rows.
        Err(e) => failures_open.push(format!("opening LISTENERS: {}", crate::error_chain(&e))),
    }
    failures.extend(failures_open);
    // With the links gone no close callback runs for the pod's connections any more: what
    // they hold in ORIG_DST is removed here (docs/DESIGN.md, "Per-connection state").
    match dp.orig_dst_maps() {
        Ok((mut orig_dst, mut used)) => {
            if let Err(e) = crate::conntrack::sweep_slot_if_used(&mut orig_dst, &mut used, rec.slot)
            {
                failures.push(format!("sweeping ORIG_DST: {}", crate::error_chain(&e)));
            }
        }
        Err(e) if e.is_not_pinned() => {}
        Err(e) => failures.push(format!("opening ORIG_DST: {}", crate::error_chain(&e))),
    }
    if rec.added_lo6 {
        if let Err(e) = remove_passthrough_src6(&rec.spec.netns) {
            failures.push(format!(
                "removing ::6 from lo in {}: {e}",
                rec.spec.netns.display()
            ));
        }
    }
    if rec.spec.ip6().is_some() {
        if let Err(e) = remove_spread_route6(&rec.spec.netns) {
            failures.push(format!(
                "removing the local route of 100::/64 (and the DNS reply addresses) in {}: {e}",
                rec.spec.netns.display()
            ));
        }
    }
    failures
}

/// Undoes the change `rec` describes (its `pending`): an enroll or unenroll is removed
/// completely, an update goes back to its previous record.
fn roll_back(
    store: &mut StateStore,
    handles: &mut Handles,
    rec: &PodRecord,
) -> Result<(), EnrollError> {
    let Some(pending) = &rec.pending else {
        return Ok(());
    };
    let Some(dp) = handles.existing()? else {
        // No pins at all: nothing of this change reached the kernel (but ::6 might have).
        if matches!(pending, Pending::Enroll | Pending::Unenroll) {
            if rec.added_lo6 {
                let _ = remove_passthrough_src6(&rec.spec.netns);
            }
            if rec.spec.ip6().is_some() {
                let _ = remove_spread_route6(&rec.spec.netns);
            }
            store.remove(rec.name())?;
        }
        return Ok(());
    };
    match pending {
        Pending::Enroll | Pending::Unenroll => {
            let failures = teardown(dp, rec);
            if !failures.is_empty() {
                let mut stuck = rec.clone();
                stuck.pending = Some(Pending::Unenroll);
                store.put(&stuck)?;
                return Err(EnrollError::Teardown {
                    name: rec.name().to_owned(),
                    failures,
                });
            }
            store.remove(rec.name())?;
        }
        Pending::Update { previous } => {
            let rows = PodRows::new(&rec.spec, rec.slot, rec.cgroup_id);
            let old = PodRows::new(&previous.spec, previous.slot, previous.cgroup_id);
            if crate::rows::dns_pool6(&previous.spec) {
                // The update may have removed them (capture turned off) before it failed: the
                // previous row sends IPv6 queries to them again.
                add_dns_pool6(&previous.spec.netns)?;
            }
            write_rows(dp, rec.name(), Some(&rows), &old)?;
            if previous.netns_inode != rec.netns_inode {
                // Back to the previous namespace if it still exists; else the pod has no
                // sk_lookup link and `list` says so.
                let mut back = (**previous).clone();
                back.pending = None;
                let _ = attach_links(dp, Some(rec), &back);
            }
            if rec.added_lo6 && !(previous.added_lo6 && previous.netns_inode == rec.netns_inode) {
                let _ = remove_passthrough_src6(&rec.spec.netns);
            }
            store.put_done(previous)?;
        }
    }
    remove_idle_pins(store, handles)
}

/// The shared pins go with the last pod: an idle node carries no residue. "Last" is what the
/// pins say too: links of a pod no record knows (a lost state directory) keep the maps they
/// use, until `gc` removes them.
fn remove_idle_pins(store: &StateStore, handles: &mut Handles) -> Result<(), EnrollError> {
    if !store.is_empty() {
        return Ok(());
    }
    let pin_root = handles.root().to_owned();
    let has_links = fs::read_dir(pin_root.join("pods"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if !has_links {
        handles.forget();
        Datapath::remove_shared_pins(&pin_root)?;
    }
    Ok(())
}

/// Finishes what killed commands left: every pending record is rolled back (an interrupted
/// unenroll is completed). Returns the names it repaired.
pub fn recover(store: &mut StateStore, handles: &mut Handles) -> Result<Vec<String>, EnrollError> {
    let pending: Vec<PodRecord> = store
        .pods()
        .filter(|r| r.pending.is_some())
        .cloned()
        .collect();
    let mut repaired = Vec::new();
    for rec in pending {
        roll_back(store, handles, &rec)?;
        repaired.push(rec.name().to_owned());
    }
    if repaired.is_empty() {
        // A kill between the last record's removal and the pins' removal leaves pins alone.
        remove_idle_pins(store, handles)?;
    }
    Ok(repaired)
}

/// Unenrolls a pod: removes exactly its state; the shared programs and maps go with the last pod.
pub fn unenroll(
    store: &mut StateStore,
    handles: &mut Handles,
    name: &str,
) -> Result<PodRecord, EnrollError> {
    require_root()?;
    recover(store, handles)?;
    let mut rec = store
        .get(name)?
        .ok_or_else(|| EnrollError::Unknown(name.to_owned()))?;
    rec.pending = Some(Pending::Unenroll);
    store.put(&rec)?;
    roll_back(store, handles, &rec)?;
    rec.pending = None;
    Ok(rec)
}

fn zero_counters(dp: &mut Datapath, slot: u32) -> Result<(), EnrollError> {
    let ncpu = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Io {
        path: "/sys/devices/system/cpu/possible".into(),
        source: e,
    })?;
    let mut counters = dp.counters()?;
    for c in Counter::ALL {
        let zeros = PerCpuValues::try_from(vec![0u64; ncpu]).expect("one value per CPU");
        counters
            .set(c.index(slot), zeros, 0)
            .map_err(map_write("-", "COUNTERS", 0))?;
    }
    Ok(())
}

/// Adds `::6/128` to the pod's `lo`, so the proxy (or the connect hook for it) can bind the
/// IPv6 passthrough source. Already there is fine (istio-init and others leave it).
fn add_passthrough_src6(netns_path: &Path) -> Result<(), EnrollError> {
    let ns = netns::NetnsHandle::open(netns_path)?;
    netns::add_lo_addr6(&ns, passthrough_src6())
        .map(drop)
        .map_err(|e| EnrollError::Prepare {
            netns: netns_path.to_owned(),
            detail: crate::error_chain(&e),
        })
}

/// Makes the IPv6 spread prefix local on the pod's `lo` (`netns::add_spread_route6`); already
/// there is fine. The prefix is the datapath's own (RFC 6666's discard-only /64, which nothing
/// else routes), so unenroll removes it whoever added it.
fn add_spread_route6(netns_path: &Path) -> Result<(), EnrollError> {
    let ns = netns::NetnsHandle::open(netns_path)?;
    netns::add_spread_route6(&ns)
        .map(drop)
        .map_err(|e| EnrollError::Prepare {
            netns: netns_path.to_owned(),
            detail: crate::error_chain(&e),
        })
}

/// Removes the spread prefix's local route and the DNS reply addresses inside it (both the
/// datapath's own) from the pod's `lo`.
fn remove_spread_route6(netns_path: &Path) -> Result<(), netns::NetnsError> {
    let ns = match netns::NetnsHandle::open(netns_path) {
        Ok(ns) => ns,
        // The namespace is gone, and its routes with it.
        Err(netns::NetnsError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    let pool = netns::remove_dns_pool6(&ns).map(drop);
    netns::remove_spread_route6(&ns).map(drop).and(pool)
}

/// Assigns the IPv6 DNS reply addresses to the pod's `lo` (`netns::add_dns_pool6`).
fn add_dns_pool6(netns_path: &Path) -> Result<(), EnrollError> {
    let ns = netns::NetnsHandle::open(netns_path)?;
    netns::add_dns_pool6(&ns).map_err(|e| EnrollError::Prepare {
        netns: netns_path.to_owned(),
        detail: crate::error_chain(&e),
    })
}

/// Removes the IPv6 DNS reply addresses from the pod's `lo`; a namespace gone has none.
fn remove_dns_pool6(netns_path: &Path) -> Result<(), netns::NetnsError> {
    let ns = match netns::NetnsHandle::open(netns_path) {
        Ok(ns) => ns,
        Err(netns::NetnsError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    netns::remove_dns_pool6(&ns).map(drop)
}

fn remove_passthrough_src6(netns_path: &Path) -> Result<(), netns::NetnsError> {
    let ns = match netns::NetnsHandle::open(netns_path) {
        Ok(ns) => ns,
        // The namespace is gone, and its lo with it.
        Err(netns::NetnsError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    netns::remove_lo_addr6(&ns, passthrough_src6()).map(drop)
}
