//! Enrolling and unenrolling pods: the maps rows, the links and the pod-side preparation.

use std::{
    collections::BTreeSet,
    fs, io,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::maps::PerCpuValues;
use redirect_common::{
    port_rule, AddrKey, CidrKey4, CidrKey6, Counter, InboundPolicy, ListenerKey, PodConfig, PortKey,
    AF_INET, AF_INET6, COUNTERS_PER_POD, DEFAULT_EXCLUDED_INBOUND_PORTS, MAX_PODS,
};

use crate::{
    cgroup::{self, CgroupError},
    datapath::{Datapath, DatapathError, Hook},
    listener, netns,
    spec::{Cidr, PodSpec, SpecError},
    state::{PodRecord, StateError, StateStore},
};

/// Why enrolling or unenrolling failed. Whatever the variant, nothing was left half-applied.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// Changing the datapath needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).
    #[error("must run as root (eBPF programs, cgroup and netns attachments need it)")]
    NotRoot,
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    /// The path opens but is not a network namespace.
    #[error("{0} is not a network namespace")]
    NotNetns(PathBuf),
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
    /// Preparing the pod's namespace (`::6` on lo) failed.
    #[error("preparing network namespace {netns}: {detail}")]
    Prepare { netns: PathBuf, detail: String },
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

pub fn require_root() -> Result<(), PodError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(PodError::NotRoot)
    }
}

/// Enrolls a pod, or updates it in place when `spec.name` is enrolled already.
pub fn enroll(store: &StateStore, pin_root: &Path, spec: &PodSpec) -> Result<Enrolled, PodError> {
    require_root()?;
    spec.check()?;
    let cgroup_id = cgroup::cgroup_id(&spec.cgroup)?;
    let netns_inode = check_netns(&spec.netns)?;
    check_ips_assigned(&spec.netns, &spec.pod_ips)?;

    let existing = store.get(&spec.name)?;
    let others: Vec<PodRecord> = store
        .list()?
        .into_iter()
        .filter(|r| r.name != spec.name)
        .collect();
    if let Some(old) = &existing {
        if old.cgroup_id != cgroup_id {
            return Err(PodError::NameCgroupMismatch {
                name: old.name.clone(),
                existing: old.cgroup.clone(),
            });
        }
    }
    for other in &others {
        if other.cgroup_id == cgroup_id {
            return Err(PodError::CgroupInUse {
                cgroup: spec.cgroup.clone(),
                other: other.name.clone(),
            });
        }
        if let Some(ip) = spec.pod_ips.iter().find(|ip| other.pod_ips.contains(ip)) {
            return Err(PodError::IpInUse {
                ip: *ip,
                other: other.name.clone(),
            });
        }
    }
    let slot = match &existing {
        Some(old) => old.slot,
        None => {
            let used: BTreeSet<u32> = others.iter().map(|r| r.slot).collect();
            (0..MAX_PODS)
                .find(|s| !used.contains(s))
                .ok_or(PodError::NoSlot)?
        }
    };
    let record = PodRecord {
        name: spec.name.clone(),
        cgroup: spec.cgroup.clone(),
        cgroup_id,
        netns: spec.netns.clone(),
        netns_inode,
        pod_ips: spec.pod_ips.clone(),
        proxy_uid: spec.proxy_uid,
        inbound_policy: spec.inbound_policy,
        port_policies: spec.port_policies.clone(),
        exclude_inbound_ports: spec.exclude_inbound_ports.clone(),
        exclude_outbound_ports: spec.exclude_outbound_ports.clone(),
        exclude_outbound_cidrs: spec
            .exclude_outbound_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect(),
        proxy_inbound_port: spec.proxy_inbound_port,
        proxy_outbound_port: spec.proxy_outbound_port,
        slot,
        added_lo6: existing.as_ref().is_some_and(|o| o.added_lo6),
    };

    if !pin_root.join("progs").exists() {
        // First pod on this node: check the kernel before loading anything, so a missing
        // feature is named with the kernel that brings it instead of surfacing as a verifier log.
        crate::probe::require_mandatory()?;
    }
    let mut dp = match Datapath::open(pin_root) {
        Ok(dp) => dp,
        Err(e) => {
            // A node with no pods keeps no pins, even after a failed first enroll.
            if others.is_empty() && existing.is_none() {
                let _ = Datapath::remove_shared_pins(pin_root);
            }
            return Err(e.into());
        }
    };
    // What a rollback must undo: the rows this attempt wrote (the ::6 on lo is undone by
    // `apply` itself when it added it).
    let attempted = PodRecord {
        added_lo6: false,
        ..record.clone()
    };
    let result = apply(&mut dp, store, existing.as_ref(), record);
    if result.is_err() {
        // Put back exactly what was there: the old pod, or nothing.
        match &existing {
            Some(old) => {
                let _ = write_maps(&mut dp, Some(&attempted), old);
                let _ = store.put(old);
            }
            None => {
                let _ = teardown(&mut dp, &attempted);
                if store.list().map(|l| l.is_empty()).unwrap_or(false) {
                    drop(dp);
                    let _ = Datapath::remove_shared_pins(pin_root);
                }
            }
        }
    }
    let (record, adopted_listeners) = result?;
    Ok(Enrolled {
        record,
        updated: existing.is_some(),
        adopted_listeners,
    })
}

/// The record written, and the outcome of adopting a running proxy's listener.
type Applied = (PodRecord, Result<usize, String>);

fn apply(
    dp: &mut Datapath,
    store: &StateStore,
    old: Option<&PodRecord>,
    mut record: PodRecord,
) -> Result<Applied, PodError> {
    let mut added_now = false;
    if record.pod_ips.iter().any(|ip| ip.is_ipv6()) && !record.added_lo6 {
        added_now = add_passthrough_src6(&record.netns)?;
        record.added_lo6 = added_now;
    }
    let netns = record.netns.clone();
    let result = attach_and_write(dp, store, old, record);
    if result.is_err() && added_now {
        // The caller's rollback only knows the old record: undo the ::6 this call added.
        let _ = remove_passthrough_src6(&netns);
    }
    result
}

fn attach_and_write(
    dp: &mut Datapath,
    store: &StateStore,
    old: Option<&PodRecord>,
    record: PodRecord,
) -> Result<Applied, PodError> {
    if old.is_none() {
        zero_counters(dp, record.slot)?;
    }
    write_maps(dp, old, &record)?;
    // Record first: if attaching fails half-way, the rollback finds the record to undo.
    store.put(&record)?;
    let dir = dp.root().join("pods").join(&record.name);
    fs::create_dir_all(&dir).map_err(|source| DatapathError::Io {
        path: dir.clone(),
        source,
    })?;
    for hook in Hook::ALL {
        let pin = dir.join(hook.program());
        if pin.exists() {
            continue; // Re-enrolment: the pod keeps its links, only its maps rows change.
        }
        let target = if hook == Hook::SkLookup {
            &record.netns
        } else {
            &record.cgroup
        };
        dp.attach(hook, target, &pin)?;
    }
    // Optional (pidfd_getfd, 5.6): without it a running proxy is captured from its next
    // listen() on. Reported, never fatal.
    let adopted = listener::adopt(dp, &record).map_err(|e| e.to_string());
    Ok((record, adopted))
}

/// Writes the pod's rows. With `old` (the rows written before), rows `rec` no longer has are
/// removed, and the pod stays visible throughout (its established connections are not
/// touched). A rollback is the same call with the two records swapped.
fn write_maps(dp: &mut Datapath, old: Option<&PodRecord>, rec: &PodRecord) -> Result<(), PodError> {
    let slot = rec.slot;
    // Rows the hooks consult after finding the pod go first; the pod becomes findable last.
    let new_rules = port_rules(rec);
    let mut rules = dp.port_rules()?;
    if let Some(old) = old {
        for (port, _) in port_rules(old) {
            if !new_rules.iter().any(|(p, _)| *p == port) {
                let _ = rules.remove(&PortKey {
                    slot,
                    port,
                    _pad: 0,
                });
            }
        }
    }
    for (port, bits) in &new_rules {
        rules
            .insert(
                PortKey {
                    slot,
                    port: *port,
                    _pad: 0,
                },
                *bits,
                0,
            )
            .map_err(map_err("PORT_RULES"))?;
    }
    let new_cidrs = cidrs(rec);
    if let Some(old) = old {
        for c in cidrs(old) {
            if !new_cidrs.contains(&c) {
                remove_cidr(dp, slot, &c);
            }
        }
    }
    for c in &new_cidrs {
        insert_cidr(dp, slot, c)?;
    }
    let mut addrs = dp.pod_addrs()?;
    if let Some(old) = old {
        for ip in &old.pod_ips {
            if !rec.pod_ips.contains(ip) {
                let _ = addrs.remove(&addr_key(*ip));
            }
        }
    }
    for ip in &rec.pod_ips {
        addrs
            .insert(addr_key(*ip), slot, 0)
            .map_err(map_err("POD_ADDRS"))?;
    }
    let mut pods = dp.pods()?;
    pods.set(slot, pod_config(rec), 0)
        .map_err(map_err("PODS"))?;
    dp.pod_cgroups()?
        .insert(rec.cgroup_id, slot, 0)
        .map_err(map_err("POD_CGROUPS"))?;
    Ok(())
}

/// Removes everything of the pod: links first (no hook runs for it any more), then rows.
fn teardown(dp: &mut Datapath, rec: &PodRecord) -> Result<(), PodError> {
    let dir = dp.root().join("pods").join(&rec.name);
    for hook in Hook::ALL {
        let _ = fs::remove_file(dir.join(hook.program()));
    }
    let _ = fs::remove_dir(&dir);
    let slot = rec.slot;
    if let Ok(mut c) = dp.pod_cgroups() {
        let _ = c.remove(&rec.cgroup_id);
    }
    if let Ok(mut pods) = dp.pods() {
        let _ = pods.set(
            slot,
            PodConfig {
                enrolled: 0,
                ..zero_config()
            },
            0,
        );
    }
    if let Ok(mut addrs) = dp.pod_addrs() {
        for ip in &rec.pod_ips {
            let _ = addrs.remove(&addr_key(*ip));
        }
    }
    if let Ok(mut rules) = dp.port_rules() {
        for (port, _) in port_rules(rec) {
            let _ = rules.remove(&PortKey {
                slot,
                port,
                _pad: 0,
            });
        }
    }
    for c in cidrs(rec) {
        remove_cidr(dp, slot, &c);
    }
    if let Ok(mut l) = dp.listeners() {
        for family in [AF_INET, AF_INET6] {
            let _ = l.remove(&ListenerKey {
                slot,
                family: family as u32,
            });
        }
    }
    if rec.added_lo6 {
        let _ = remove_passthrough_src6(&rec.netns);
    }
    Ok(())
}

/// Unenrolls a pod: removes exactly its state; the shared programs and maps go with the last pod.
pub fn unenroll(store: &StateStore, pin_root: &Path, name: &str) -> Result<PodRecord, PodError> {
    require_root()?;
    let rec = store
        .get(name)?
        .ok_or_else(|| PodError::Unknown(name.to_owned()))?;
    let mut dp = Datapath::open(pin_root)?;
    teardown(&mut dp, &rec)?;
    store.remove(name)?;
    if store.list()?.is_empty() {
        drop(dp);
        Datapath::remove_shared_pins(pin_root)?;
    }
    Ok(rec)
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> PodError {
    move |e| {
        PodError::Datapath(DatapathError::Map {
            name,
            detail: e.to_string(),
        })
    }
}

fn zero_config() -> PodConfig {
    PodConfig {
        enrolled: 0,
        proxy_uid: 0,
        ip4: 0,
        ip6: [0; 4],
        proxy_inbound_port: 0,
        proxy_outbound_port: 0,
        policy: InboundPolicy::Passthrough,
        _pad: [0; 3],
    }
}

fn pod_config(rec: &PodRecord) -> PodConfig {
    let ip4 = rec.pod_ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(_) => None,
    });
    let ip6 = rec.pod_ips.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(words6(&v6.octets())),
        IpAddr::V4(_) => None,
    });
    PodConfig {
        enrolled: 1,
        proxy_uid: rec.proxy_uid,
        ip4: ip4.unwrap_or(0),
        ip6: ip6.unwrap_or([0; 4]),
        proxy_inbound_port: rec.proxy_inbound_port,
        proxy_outbound_port: rec.proxy_outbound_port,
        policy: rec.inbound_policy,
        _pad: [0; 3],
    }
}


/// The kernel's view of an address: network-order words, IPv4 in word 0.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => words6(&v6.octets()),
    }
}

fn words6(b: &[u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| {
        u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    })
}

fn addr_key(ip: IpAddr) -> AddrKey {
    let family = if ip.is_ipv4() { AF_INET } else { AF_INET6 };
    AddrKey {
        addr: addr_words(ip),
        family: family as u32,
    }
}

/// Every port rule of the pod, Istio's default inbound exclusions included.
fn port_rules(rec: &PodRecord) -> Vec<(u16, u32)> {
    let mut ports: std::collections::BTreeMap<u16, u32> = Default::default();
    for p in DEFAULT_EXCLUDED_INBOUND_PORTS
        .iter()
        .chain(&rec.exclude_inbound_ports)
    {
        *ports.entry(*p).or_default() |= port_rule::EXCLUDE_INBOUND;
    }
    for p in &rec.exclude_outbound_ports {
        *ports.entry(*p).or_default() |= port_rule::EXCLUDE_OUTBOUND;
    }
    for (p, policy) in &rec.port_policies {
        let bits = match policy {
            InboundPolicy::Passthrough => port_rule::DELIVERY_OVERRIDE,
            InboundPolicy::Localhost => port_rule::DELIVERY_OVERRIDE | port_rule::DELIVERY_LOCALHOST,
        };
        *ports.entry(*p).or_default() |= bits;
    }
    ports.into_iter().collect()
}

fn cidrs(rec: &PodRecord) -> Vec<Cidr> {
    rec.exclude_outbound_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect()
}

fn cidr_key4(slot: u32, c: &Cidr) -> aya::maps::lpm_trie::Key<CidrKey4> {
    aya::maps::lpm_trie::Key::new(
        32 + c.len as u32,
        CidrKey4 {
            slot_be: slot.to_be(),
            addr: addr_words(c.addr)[0],
        },
    )
}

fn cidr_key6(slot: u32, c: &Cidr) -> aya::maps::lpm_trie::Key<CidrKey6> {
    aya::maps::lpm_trie::Key::new(
        32 + c.len as u32,
        CidrKey6 {
            slot_be: slot.to_be(),
            addr: addr_words(c.addr),
        },
    )
}

fn insert_cidr(dp: &mut Datapath, slot: u32, c: &Cidr) -> Result<(), PodError> {
    if c.addr.is_ipv4() {
        dp.cidr4()?
            .insert(&cidr_key4(slot, c), 1, 0)
            .map_err(map_err("CIDR4"))
    } else {
        dp.cidr6()?
            .insert(&cidr_key6(slot, c), 1, 0)
            .map_err(map_err("CIDR6"))
    }
}

fn remove_cidr(dp: &mut Datapath, slot: u32, c: &Cidr) {
    if c.addr.is_ipv4() {
        if let Ok(mut t) = dp.cidr4() {
            let _ = t.remove(&cidr_key4(slot, c));
        }
    } else if let Ok(mut t) = dp.cidr6() {
        let _ = t.remove(&cidr_key6(slot, c));
    }
}

fn zero_counters(dp: &mut Datapath, slot: u32) -> Result<(), PodError> {
    let ncpu = aya::util::nr_cpus().map_err(|(_, e)| {
        PodError::Datapath(DatapathError::Io {
            path: "/sys/devices/system/cpu/possible".into(),
            source: e,
        })
    })?;
    let mut counters = dp.counters()?;
    for c in Counter::ALL {
        let zeros = PerCpuValues::try_from(vec![0u64; ncpu]).expect("one value per CPU");
        counters
            .set(c.index(slot), zeros, 0)
            .map_err(map_err("COUNTERS"))?;
    }
    debug_assert_eq!(Counter::ALL.len() as u32, COUNTERS_PER_POD);
    Ok(())
}

/// The inode of a network namespace file, refusing anything else.
fn check_netns(path: &Path) -> Result<u64, PodError> {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let file = netns::open(path)?;
    let st = nix::sys::statfs::fstatfs(&file).map_err(|e| netns::NetnsError::Open {
        path: path.to_owned(),
        source: e.into(),
    })?;
    if st.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(PodError::NotNetns(path.to_owned()));
    }
    // setns with CLONE_NEWNET refuses other namespace types; it is the definitive check.
    netns::run_in(&file, path, || ())?;
    Ok(file.metadata().map(|m| m.ino()).unwrap_or(0))
}

fn check_ips_assigned(path: &Path, ips: &[IpAddr]) -> Result<(), PodError> {
    let assigned: Vec<IpAddr> = netns::run_at(path, || {
        nix::ifaddrs::getifaddrs()
            .map(|addrs| {
                addrs
                    .filter_map(|a| a.address)
                    .filter_map(|a| {
                        a.as_sockaddr_in()
                            .map(|s| IpAddr::V4(s.ip()))
                            .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
                    })
                    .collect()
            })
            .unwrap_or_default()
    })?;
    match ips.iter().find(|ip| !assigned.contains(ip)) {
        Some(ip) => Err(PodError::IpNotInNetns {
            ip: *ip,
            netns: path.to_owned(),
        }),
        None => Ok(()),
    }
}

/// Adds `::6/128` to the pod's `lo`, so the proxy (or the connect hook for it) can bind the
/// IPv6 passthrough source. Returns whether it was added by us.
fn add_passthrough_src6(netns_path: &Path) -> Result<bool, PodError> {
    let out = netns::run_at(netns_path, || {
        std::process::Command::new("ip")
            .args(["-6", "addr", "add", "::6/128", "dev", "lo", "nodad"])
            .output()
    })?;
    let prep = |detail: String| PodError::Prepare {
        netns: netns_path.to_owned(),
        detail,
    };
    let out = out.map_err(|e| prep(format!("running ip: {e}")))?;
    if out.status.success() {
        let _ = netns::run_at(netns_path, || {
            std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
        });
        return Ok(true);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("File exists") {
        return Ok(false); // Someone else's ::6: leave it to them.
    }
    Err(prep(format!(
        "ip -6 addr add ::6/128 dev lo: {}",
        err.trim()
    )))
}

fn remove_passthrough_src6(netns_path: &Path) -> io::Result<()> {
    netns::run_at(netns_path, || {
        std::process::Command::new("ip")
            .args(["-6", "addr", "del", "::6/128", "dev", "lo"])
            .status()
    })
    .map_err(io::Error::other)?
    .map(drop)
}
