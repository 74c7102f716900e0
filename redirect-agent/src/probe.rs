//! Kernel feature probing: what the datapath needs, present or missing, and the kernel that
//! brings it.
//!
//! Every program type, map type, helper (per program type), attach/link kind and syscall the
//! datapath uses is checked against the running kernel, the way the kernel itself would judge
//! it: program and map types with aya's probes, helpers with aya's helper probe (sock_addr
//! probes use the connect attach type, where `bpf_bind` is allowed), links by really creating
//! one on a throw-away cgroup or network namespace, and finally every real datapath program is
//! loaded through the verifier (`datapath::verify_programs`). Only the `TCP_LISTEN` sock_ops
//! callback is judged by the kernel version (the datapath tests exercise it).

use std::{
    fs,
    os::fd::{FromRawFd as _, OwnedFd},
    path::PathBuf,
    sync::OnceLock,
};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};
use serde::Serialize;

use crate::{
    bpf_sys::{self, AttachType},
    datapath::{self, Hook},
};

/// What kind of kernel feature a [`Feature`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    ProgramType,
    MapType,
    Helper,
    Callback,
    Link,
    Syscall,
    /// One of the datapath's own programs, loaded through the verifier.
    Program,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::ProgramType => "program type",
            Kind::MapType => "map type",
            Kind::Helper => "helper",
            Kind::Callback => "callback",
            Kind::Link => "link",
            Kind::Syscall => "syscall",
            Kind::Program => "program",
        }
    }
}

/// How a feature is checked.
#[derive(Debug, Clone, Copy)]
enum Check {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// Kernel version at least (major, minor).
    Version(u8, u8),
    CgroupLink,
    NetnsLink,
    PidfdGetfd,
    Load(Hook),
}

/// One kernel feature the datapath uses.
#[derive(Debug, Clone)]
pub struct Feature {
    /// Stable identifier, e.g. `sk_lookup`, `bpf_bind/cgroup_sock_addr`, `program/rd_connect4`.
    pub name: &'static str,
    pub kind: Kind,
    /// Mandatory features make `enroll` refuse; optional ones degrade with a warning.
    pub mandatory: bool,
    /// The upstream kernel version that brings it.
    pub since: &'static str,
    /// What does not work without it.
    pub impact: &'static str,
    /// DNS capture (`enroll --dns-capture`) needs it: an enroll asking for DNS capture names it
    /// first when it is missing.
    pub dns_capture: bool,
    check: Check,
}

/// A feature DNS capture needs (`enroll --dns-capture` refuses without it).
const fn dns(feat: Feature) -> Feature {
    Feature {
        dns_capture: true,
        ..feat
    }
}

const fn f(
    name: &'static str,
    kind: Kind,
    mandatory: bool,
    since: &'static str,
    impact: &'static str,
    check: Check,
) -> Feature {
    Feature {
        name,
        kind,
        mandatory,
        since,
        impact,
        dns_capture: false,
        check,
    }
}

const NO_LOAD: &str = "the datapath object does not load: nothing is redirected";
const SOCK_ADDR: ProgramType = ProgramType::CgroupSockAddr;

/// Every feature the datapath uses, in report order.
#[rustfmt::skip]
pub static FEATURES: &[Feature] = &[
    f("cgroup_sock_addr", Kind::ProgramType, true, "4.17",
      "no connect4/connect6/bind4/bind6 hooks: neither outbound nor inbound redirection",
      Check::Program(ProgramType::CgroupSockAddr)),
    f("sock_ops", Kind::ProgramType, true, "4.13",
      "the proxy's listener is not registered and original destinations are not recorded",
      Check::Program(ProgramType::SockOps)),
    f("cgroup_sockopt", Kind::ProgramType, true, "5.3",
      "getsockopt(SO_ORIGINAL_DST) does not give the proxy the original destination",
      Check::Program(ProgramType::CgroupSockopt)),
    f("sk_lookup", Kind::ProgramType, true, "5.9",
      "inbound connections cannot be handed to the proxy's listener",
      Check::Program(ProgramType::SkLookup)),
    f("hash", Kind::MapType, true, "3.19", NO_LOAD, Check::Map(MapType::Hash)),
    f("lru_hash", Kind::MapType, true, "4.10", NO_LOAD, Check::Map(MapType::LruHash)),
    f("array", Kind::MapType, true, "3.19", NO_LOAD, Check::Map(MapType::Array)),
    f("percpu_array", Kind::MapType, true, "4.6", NO_LOAD, Check::Map(MapType::PerCpuArray)),
    f("lpm_trie", Kind::MapType, true, "4.11", NO_LOAD, Check::Map(MapType::LpmTrie)),
    f("sockhash", Kind::MapType, true, "4.18", NO_LOAD, Check::Map(MapType::SockHash)),
    f("bpf_bind/cgroup_sock_addr", Kind::Helper, true, "4.17",
      "passthrough delivery cannot bind the source to 127.0.0.6",
      Check::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_bind)),
    f("bpf_get_current_uid_gid/cgroup_sock_addr", Kind::Helper, true, "4.17",
      "the proxy's own connections cannot be told from the application's",
      Check::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_get_current_uid_gid)),
    f("bpf_get_current_uid_gid/cgroup_sockopt", Kind::Helper, true, "5.3",
      "SO_ORIGINAL_DST cannot be limited to the proxy",
      Check::Helper(ProgramType::CgroupSockopt, BpfHelper::BPF_FUNC_get_current_uid_gid)),
    f("bpf_get_current_cgroup_id/cgroup_sock_addr", Kind::Helper, true, "5.7",
      "connections cannot be attributed to an enrolled pod",
      Check::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_get_current_cgroup_id)),
    f("bpf_get_current_cgroup_id/cgroup_sockopt", Kind::Helper, true, "5.7",
      "SO_ORIGINAL_DST cannot be attributed to an enrolled pod",
      Check::Helper(ProgramType::CgroupSockopt, BpfHelper::BPF_FUNC_get_current_cgroup_id)),
    f("bpf_get_current_ancestor_cgroup_id/cgroup_sock_addr", Kind::Helper, true, "5.7",
      "processes in a container cgroup below the pod's are not attributed to the pod",
      Check::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id)),
    f("bpf_get_socket_cookie/cgroup_sock_addr", Kind::Helper, true, "5.0",
      "redirected connections and the proxy's listener cannot be tagged",
      Check::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_get_socket_cookie)),
    f("bpf_sk_lookup_udp/cgroup_sock_addr", Kind::Helper, true, "5.0",
      "DNS capture cannot tell a wildcard-bound DNS server from a loopback-bound one",
      Check::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_sk_lookup_udp)),
    f("bpf_get_socket_cookie/sock_ops", Kind::Helper, true, "5.0",
      "sock_ops cannot find the tags set at connect/bind",
      Check::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_socket_cookie)),
    f("bpf_sock_hash_update/sock_ops", Kind::Helper, true, "4.18",
      "the proxy's listener cannot be put into the listener map",
      Check::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sock_hash_update)),
    f("bpf_sock_ops_cb_flags_set/sock_ops", Kind::Helper, true, "4.16",
      "original-destination entries are not removed when connections close",
      Check::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sock_ops_cb_flags_set)),
    f("bpf_sk_assign/sk_lookup", Kind::Helper, true, "5.9",
      "inbound connections cannot be handed to the proxy's listener",
      Check::Helper(ProgramType::SkLookup, BpfHelper::BPF_FUNC_sk_assign)),
    f("BPF_SOCK_OPS_TCP_LISTEN_CB", Kind::Callback, true, "4.19",
      "the proxy's listen() is not seen: inbound capture has no target",
      Check::Version(4, 19)),
    f("cgroup_link", Kind::Link, true, "5.7",
      "hooks cannot be attached to pod cgroups as pinned bpf_links (BPF_LINK_CREATE)",
      Check::CgroupLink),
    f("netns_link/sk_lookup", Kind::Link, true, "5.9",
      "sk_lookup cannot be attached to a pod's network namespace",
      Check::NetnsLink),
    f("pidfd_getfd", Kind::Syscall, false, "5.6",
      "an already running proxy's listener cannot be adopted at enroll; restart the proxy",
      Check::PidfdGetfd),
    f("program/rd_connect4", Kind::Program, true, "5.10",
      "the verifier rejects the connect4 hook: no IPv4 outbound/inbound redirection",
      Check::Load(Hook::Connect4)),
    f("program/rd_connect6", Kind::Program, true, "5.10",
      "the verifier rejects the connect6 hook: no IPv6 redirection",
      Check::Load(Hook::Connect6)),
    f("program/rd_bind4", Kind::Program, true, "5.10",
      "the verifier rejects the bind4 hook: the proxy's IPv4 listener is not tagged",
      Check::Load(Hook::Bind4)),
    f("program/rd_bind6", Kind::Program, true, "5.10",
      "the verifier rejects the bind6 hook: the proxy's IPv6 listener is not tagged",
      Check::Load(Hook::Bind6)),
    f("program/rd_sock_ops", Kind::Program, true, "5.10",
      "the verifier rejects the sock_ops hook: listener registration and original destinations",
      Check::Load(Hook::SockOps)),
    f("program/rd_getsockopt", Kind::Program, true, "5.10",
      "the verifier rejects the getsockopt hook: no SO_ORIGINAL_DST",
      Check::Load(Hook::GetSockopt)),
    f("program/rd_sk_lookup", Kind::Program, true, "5.10",
      "the verifier rejects the sk_lookup hook: no inbound delivery to the proxy",
      Check::Load(Hook::SkLookup)),
    dns(f("program/rd_getpeername4", Kind::Program, true, "5.8",
      "the getpeername4 hook does not load: a redirected IPv4 socket's peer is the proxy's \
       listener, not its original destination",
      Check::Load(Hook::GetPeername4))),
    dns(f("program/rd_getpeername6", Kind::Program, true, "5.8",
      "the getpeername6 hook does not load: a redirected IPv6 socket's peer is the proxy's \
       listener, not its original destination",
      Check::Load(Hook::GetPeername6))),
    dns(f("program/rd_sendmsg4", Kind::Program, true, "4.18",
      "the sendmsg4 hook does not load: no DNS capture of unconnected IPv4 UDP",
      Check::Load(Hook::SendMsg4))),
    dns(f("program/rd_sendmsg6", Kind::Program, true, "4.18",
      "the sendmsg6 hook does not load: no DNS capture of unconnected IPv6 UDP",
      Check::Load(Hook::SendMsg6))),
    dns(f("program/rd_recvmsg4", Kind::Program, true, "5.2",
      "the recvmsg4 hook does not load: captured IPv4 DNS replies come from the proxy's port",
      Check::Load(Hook::RecvMsg4))),
    dns(f("program/rd_recvmsg6", Kind::Program, true, "5.2",
      "the recvmsg6 hook does not load: captured IPv6 DNS replies come from the proxy's port",
      Check::Load(Hook::RecvMsg6))),
];

/// Looks a feature up by its name.
pub fn feature(name: &str) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| f.name == name)
}

/// The result of checking one feature.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: &'static str,
    pub kind: Kind,
    pub mandatory: bool,
    /// DNS capture needs it ([`Feature::dns_capture`]).
    pub dns_capture: bool,
    pub present: bool,
    pub since: &'static str,
    /// What does not work without it.
    pub impact: &'static str,
    /// How it was checked.
    pub method: &'static str,
    /// Why it counts as missing (an errno, a verifier message), or a note.
    pub detail: Option<String>,
}

/// The whole report, `redirect-agent probe --output json`'s document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `uname -r`.
    pub kernel: String,
    /// True when every mandatory feature is present.
    pub ok: bool,
    /// Names of the missing mandatory features.
    pub missing_mandatory: Vec<&'static str>,
    /// Names of the missing optional features.
    pub missing_optional: Vec<&'static str>,
    pub features: Vec<Status>,
}

/// A mandatory feature is missing: `enroll` refuses.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A mandatory feature is missing, or (`dns_capture`) one that `enroll --dns-capture`
    /// needs. The message names the feature, the running kernel and the version that brings it.
    #[error(fmt = describe_missing)]
    Missing {
        feature: &'static Feature,
        kernel: String,
        /// Why the check failed (an errno, a verifier message), if it said.
        detail: Option<String>,
        /// The enroll asked for DNS capture, and DNS capture needs this feature.
        dns_capture: bool,
    },
}

fn describe_missing(
    feature: &Feature,
    kernel: &str,
    detail: &Option<String>,
    dns_capture: &bool,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    let (name, kind, since, impact) = (
        feature.name,
        feature.kind.as_str(),
        feature.since,
        feature.impact,
    );
    if *dns_capture {
        write!(
            f,
            "DNS capture (--dns-capture) needs {kind} {name}, which kernel {kernel} lacks \
             (Linux {since} or later brings it): {impact}"
        )?;
    } else {
        write!(
            f,
            "kernel {kernel} lacks {kind} {name} (Linux {since} or later brings it): {impact}"
        )?;
    }
    match detail {
        Some(d) => write!(f, " ({d})"),
        None => Ok(()),
    }
}

/// Checks every mandatory feature and fails on the first one missing, naming it and the
/// kernel version that brings it.
pub fn require_mandatory() -> Result<(), ProbeError> {
    require(false)
}

/// What enroll needs of the kernel: every mandatory feature, and with `dns_capture` the DNS
/// hooks, checked first so that the refusal names what DNS capture lacks. Stops at the first
/// feature missing.
pub fn require(dns_capture: bool) -> Result<(), ProbeError> {
    let kernel = kernel_release();
    let dns_first = FEATURES.iter().filter(|f| dns_capture && f.dns_capture);
    let rest = FEATURES
        .iter()
        .filter(|f| f.mandatory && !(dns_capture && f.dns_capture));
    for feat in dns_first.chain(rest) {
        if let Some(e) = refusal(&check(feat), dns_capture, &kernel) {
            return Err(e);
        }
    }
    Ok(())
}

/// The refusal a probe [`Report`] means for an enroll (with `dns_capture` or without), if any:
/// the first missing DNS feature when DNS capture is asked, else the first missing mandatory
/// one. What [`require`] decides, for a report read elsewhere (or made up, in tests).
pub fn refusal_of(report: &Report, dns_capture: bool) -> Option<ProbeError> {
    let dns = report
        .features
        .iter()
        .filter(|s| dns_capture && s.dns_capture);
    let rest = report
        .features
        .iter()
        .filter(|s| s.mandatory && !(dns_capture && s.dns_capture));
    dns.chain(rest)
        .find_map(|s| refusal(s, dns_capture, &report.kernel))
}

/// The refusal one checked feature means, `None` when it is present or not needed.
fn refusal(st: &Status, dns_capture: bool, kernel: &str) -> Option<ProbeError> {
    if st.present {
        return None;
    }
    let for_dns = dns_capture && st.dns_capture;
    if !for_dns && !st.mandatory {
        return None;
    }
    Some(ProbeError::Missing {
        feature: feature(st.name)?,
        kernel: kernel.to_owned(),
        detail: st.detail.clone(),
        dns_capture: for_dns,
    })
}

/// Checks every feature.
pub fn probe() -> Report {
    let features: Vec<Status> = FEATURES.iter().map(check).collect();
    let missing = |mandatory: bool| {
        features
            .iter()
            .filter(|s| s.mandatory == mandatory && !s.present)
            .map(|s| s.name)
            .collect::<Vec<_>>()
    };
    let missing_mandatory = missing(true);
    let missing_optional = missing(false);
    Report {
        kernel: kernel_release(),
        ok: missing_mandatory.is_empty(),
        missing_mandatory,
        missing_optional,
        features,
    }
}

/// Checks one feature against the running kernel.
pub fn check(feat: &Feature) -> Status {
    let (method, outcome): (&'static str, Result<bool, String>) = match feat.check {
        Check::Program(t) => (
            "aya is_program_supported",
            is_program_supported(t).map_err(|e| e.to_string()),
        ),
        Check::Map(t) => (
            "aya is_map_supported",
            is_map_supported(t).map_err(|e| e.to_string()),
        ),
        Check::Helper(t, h) => (
            "aya is_helper_supported",
            is_helper_supported(t, h).map_err(|e| e.to_string()),
        ),
        Check::Version(maj, min) => ("kernel version", Ok(kernel_at_least(maj, min))),
        Check::CgroupLink => ("BPF_LINK_CREATE on a new cgroup", cgroup_link()),
        Check::NetnsLink => ("BPF_LINK_CREATE on a new netns", netns_link()),
        Check::PidfdGetfd => ("pidfd_getfd(-1) errno", pidfd_getfd()),
        Check::Load(hook) => ("load the real program", program_loads(hook)),
    };
    let (present, detail) = match outcome {
        Ok(true) => (true, None),
        Ok(false) => (false, None),
        Err(e) => (false, Some(e)),
    };
    Status {
        name: feat.name,
        kind: feat.kind,
        mandatory: feat.mandatory,
        dns_capture: feat.dns_capture,
        present,
        since: feat.since,
        impact: feat.impact,
        method,
        detail,
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether the running kernel is at least `major.minor`, by aya's reading of the version
/// (which knows Ubuntu's and Debian's version strings). An unreadable version counts as
/// older.
fn kernel_at_least(major: u8, minor: u8) -> bool {
    aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(major, minor, 0))
}

/// The real datapath programs are loaded once per process.
fn program_loads(hook: Hook) -> Result<bool, String> {
    static LOADED: OnceLock<Vec<(&'static str, Result<(), String>)>> = OnceLock::new();
    let all = LOADED.get_or_init(datapath::verify_programs);
    match all.iter().find(|(name, _)| *name == hook.program()) {
        Some((_, Ok(()))) => Ok(true),
        Some((_, Err(e))) => Err(e.clone()),
        None => Err("not checked".into()),
    }
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;

/// Loads `r0 = 1; exit`, the smallest program of a type, for the link probes.
fn trivial_program(prog_type: u32, attach: AttachType) -> Result<OwnedFd, String> {
    let load = |retried: bool| trivial_program_once(prog_type, attach, retried);
    load(false)
}

fn trivial_program_once(
    prog_type: u32,
    attach: AttachType,
    retried: bool,
) -> Result<OwnedFd, String> {
    let load = |retried: bool| trivial_program_once(prog_type, attach, retried);
    // mov64 r0, 1 ; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    #[repr(C, align(8))]
    struct Attr([u8; 128]);
    let mut attr = Attr([0; 128]);
    let mut put = |off: usize, bytes: &[u8]| attr.0[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &prog_type.to_ne_bytes());
    put(4, &(insns.len() as u32).to_ne_bytes());
    put(8, &(insns.as_ptr() as u64).to_ne_bytes());
    put(16, &(license.as_ptr() as u64).to_ne_bytes());
    put(68, &(attach as u32).to_ne_bytes());
    // SAFETY: attr is a zero-padded bpf_attr for BPF_PROG_LOAD whose pointers outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &mut attr as *mut Attr,
            size_of::<Attr>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        // Before 5.11 programs are charged to RLIMIT_MEMLOCK: raise it and retry, as aya does.
        if err.raw_os_error() == Some(libc::EPERM) && !kernel_at_least(5, 11) && !retried {
            let inf = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            // SAFETY: a valid rlimit.
            if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) } == 0 {
                return load(true);
            }
        }
        return Err(format!("program load: {err}"));
    }
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The cgroup2 mount point, from /proc/self/mounts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let (_, dir, fstype) = (it.next()?, it.next()?, it.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// Creates a cgroup link for a trivial connect4 program on an empty, new cgroup.
fn cgroup_link() -> Result<bool, String> {
    let prog = trivial_program(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, AttachType::Inet4Connect)?;
    let mnt = cgroup2_mount().ok_or("no cgroup2 file system mounted")?;
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = mnt.join(format!("redirect-probe-{}-{seq}", std::process::id()));
    fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = fs::File::open(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))
        .and_then(|cg| link_result(bpf_sys::link_create(&prog, &cg, AttachType::Inet4Connect)));
    let _ = fs::remove_dir(&dir);
    result
}

/// Creates an sk_lookup link on a new network namespace, made by a short-lived thread.
fn netns_link() -> Result<bool, String> {
    let prog = trivial_program(BPF_PROG_TYPE_SK_LOOKUP, AttachType::SkLookup)?;
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
        let ns = fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| format!("/proc/thread-self/ns/net: {e}"))?;
        link_result(bpf_sys::link_create(&prog, &ns, AttachType::SkLookup))
    })
    .join()
    .map_err(|_| "probe thread panicked".to_string())?
}

/// A link was made: present. EINVAL: the kernel does not know this link. Other errors: report.
fn link_result(r: std::io::Result<OwnedFd>) -> Result<bool, String> {
    match r {
        Ok(_link) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(format!("BPF_LINK_CREATE: {e}")),
    }
}

/// `pidfd_getfd(-1, 0, 0)`: EBADF when the syscall exists, ENOSYS when it does not.
fn pidfd_getfd() -> Result<bool, String> {
    // SAFETY: no pointers; an invalid pidfd is rejected.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, -1, 0, 0) };
    let e = std::io::Error::last_os_error();
    match (r, e.raw_os_error()) {
        (r, _) if r >= 0 => Ok(true),
        (_, Some(libc::ENOSYS)) => Ok(false),
        (_, Some(libc::EBADF)) => Ok(true),
        _ => Err(format!("pidfd_getfd: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_version_is_read() {
        // Every kernel this runs on is newer than 3.0 and older than 255.0.
        assert!(kernel_at_least(3, 0));
        assert!(!kernel_at_least(255, 0));
    }

    /// The program names are the datapath's (`Hook::program`), one feature per hook: the
    /// table cannot drift from the programs that are really loaded.
    #[test]
    fn every_hook_is_probed_under_its_program_name() {
        for hook in Hook::ALL {
            let name = format!("program/{}", hook.program());
            let f = feature(&name).unwrap_or_else(|| panic!("no feature {name}"));
            assert!(
                matches!(f.check, Check::Load(h) if h == hook),
                "{name} does not load {hook:?}"
            );
        }
        let programs = FEATURES
            .iter()
            .filter(|f| matches!(f.check, Check::Load(_)));
        assert_eq!(programs.count(), Hook::ALL.len());
    }

    /// A report of a kernel whose features are all present except `missing`.
    fn report_without(kernel: &str, missing: &[&str]) -> Report {
        let features: Vec<Status> = FEATURES
            .iter()
            .map(|f| Status {
                name: f.name,
                kind: f.kind,
                mandatory: f.mandatory,
                dns_capture: f.dns_capture,
                present: !missing.contains(&f.name),
                since: f.since,
                impact: f.impact,
                method: "made up",
                detail: None,
            })
            .collect();
        Report {
            kernel: kernel.into(),
            ok: false,
            missing_mandatory: Vec::new(),
            missing_optional: Vec::new(),
            features,
        }
    }

    /// Golden text: a kernel without the recvmsg4 hook (and without sk_lookup, listed before
    /// it): `enroll --dns-capture` names the DNS hook, the running kernel and the version that
    /// brings it; enroll without the flag names the first mandatory feature missing.
    #[test]
    fn dns_capture_refusal_names_the_hook_and_kernel() {
        let report = report_without("5.1.0-test", &["sk_lookup", "program/rd_recvmsg4"]);
        assert_eq!(
            refusal_of(&report, true).unwrap().to_string(),
            "DNS capture (--dns-capture) needs program program/rd_recvmsg4, which kernel \
             5.1.0-test lacks (Linux 5.2 or later brings it): the recvmsg4 hook does not load: \
             captured IPv4 DNS replies come from the proxy's port"
        );
        assert_eq!(
            refusal_of(&report, false).unwrap().to_string(),
            "kernel 5.1.0-test lacks program type sk_lookup (Linux 5.9 or later brings it): \
             inbound connections cannot be handed to the proxy's listener"
        );
        let only_dns = report_without("5.1.0-test", &["program/rd_getpeername6"]);
        assert_eq!(
            refusal_of(&only_dns, true).unwrap().to_string(),
            "DNS capture (--dns-capture) needs program program/rd_getpeername6, which kernel \
             5.1.0-test lacks (Linux 5.8 or later brings it): the getpeername6 hook does not \
             load: a redirected IPv6 socket's peer is the proxy's listener, not its original \
             destination"
        );
        assert!(refusal_of(&report_without("6.1.0", &[]), true).is_none());
        // An optional feature missing refuses nothing.
        assert!(refusal_of(&report_without("5.5.0", &["pidfd_getfd"]), true).is_none());
    }

    /// The hooks issue 13 added are listed with the kernel that brings each.
    #[test]
    fn new_hooks_are_listed_with_their_kernel() {
        for (name, since, dns) in [
            ("program/rd_getpeername4", "5.8", true),
            ("program/rd_getpeername6", "5.8", true),
            ("program/rd_sendmsg4", "4.18", true),
            ("program/rd_sendmsg6", "4.18", true),
            ("program/rd_recvmsg4", "5.2", true),
            ("program/rd_recvmsg6", "5.2", true),
            ("program/rd_connect4", "5.10", false),
        ] {
            let f = feature(name).unwrap_or_else(|| panic!("no feature {name}"));
            assert_eq!((f.since, f.dns_capture), (since, dns), "{name}");
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in FEATURES.iter().enumerate() {
            assert!(
                FEATURES[i + 1..].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
        }
    }
}
