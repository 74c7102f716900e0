//! The Linux capabilities the node agent needs, checked at start so that an agent deployed with
//! one missing fails at once with a line naming it, instead of failing later on a pod (or,
//! worse, half-working: without `CAP_SYS_PTRACE` a proxy already listening is silently not
//! adopted).
//!
//! The set was found by running the agent on Linux 6.18 with its bounding set reduced to every
//! subset missing one capability (`setpriv --bounding-set -all,+...`), enrolling a pod with an
//! IPv4 and an IPv6 address and a proxy listening before enroll, then unenrolling it
//! (`tests/caps.rs` does the same for each capability). What each is for:
//!
//! - `CAP_SYS_ADMIN`: `setns(2)` into a pod's network namespace, mounting bpffs at the pin root,
//!   and, through `bpf_capable()`/`bpf_net_capable()`, loading the programs and creating maps
//!   (so `CAP_BPF` and `CAP_PERFMON` add nothing once it is held: both were tested absent).
//! - `CAP_NET_ADMIN`: adding and removing `::6` on the pod's `lo` over netlink (the IPv6
//!   passthrough source), which `CAP_SYS_ADMIN` does not cover.
//! - `CAP_SYS_PTRACE`: `pidfd_getfd(2)` on a proxy (another uid) that listened before its pod
//!   was enrolled, and reading other users' `/proc/PID/{fd,ns}`.
//! - `CAP_DAC_OVERRIDE`: the probe creates a scratch cgroup at the cgroup2 root, which may be
//!   mode 0555 (as on this project's machines); root without it gets `EACCES`.
//! - `CAP_SYS_RESOURCE`, only before Linux 5.11 (programs and maps are charged to
//!   `RLIMIT_MEMLOCK` there, memcg accounting came with 5.11) and only when the hard limit is
//!   not already unlimited: raising it.

use std::{fmt, io};

/// One capability the agent checks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// Its bit in the capability sets (`linux/capability.h`).
    pub bit: u8,
    /// Its name as the kernel and `capsh` spell it.
    pub name: &'static str,
    /// What the agent does with it, for the error message.
    pub needed_for: &'static str,
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.needed_for)
    }
}

pub const CAP_DAC_OVERRIDE: Capability = Capability {
    bit: 1,
    name: "CAP_DAC_OVERRIDE",
    needed_for: "creating the probe's scratch cgroup at a read-only cgroup2 root",
};
pub const CAP_NET_ADMIN: Capability = Capability {
    bit: 12,
    name: "CAP_NET_ADMIN",
    needed_for: "adding ::6 to a pod's lo over netlink",
};
pub const CAP_SYS_PTRACE: Capability = Capability {
    bit: 19,
    name: "CAP_SYS_PTRACE",
    needed_for: "adopting a proxy already listening in a pod with pidfd_getfd",
};
pub const CAP_SYS_ADMIN: Capability = Capability {
    bit: 21,
    name: "CAP_SYS_ADMIN",
    needed_for: "setns into pod network namespaces, mounting bpffs, loading the eBPF programs",
};
pub const CAP_SYS_RESOURCE: Capability = Capability {
    bit: 24,
    name: "CAP_SYS_RESOURCE",
    needed_for: "raising RLIMIT_MEMLOCK for eBPF maps before Linux 5.11",
};

/// What the agent needs on every kernel, in the order the DaemonSet lists them.
pub const REQUIRED: [Capability; 4] = [
    CAP_NET_ADMIN,
    CAP_SYS_ADMIN,
    CAP_SYS_PTRACE,
    CAP_DAC_OVERRIDE,
];

/// The agent lacks capabilities it needs.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("reading the effective capabilities from /proc/self/status")]
    Read(#[source] io::Error),
    #[error("{}", missing_message(.0))]
    Missing(Vec<Capability>),
}

fn missing_message(missing: &[Capability]) -> String {
    let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
    format!(
        "missing capabilit{} {}; the agent needs {} (the DaemonSet's securityContext grants them)",
        if missing.len() == 1 { "y" } else { "ies" },
        names.join(", "),
        REQUIRED.map(|c| c.name).join(", ")
    )
}

/// The `CapEff:` mask of a `/proc/PID/status` text.
pub fn effective_from_status(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// This process's effective capabilities.
pub fn effective() -> Result<u64, CapsError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(CapsError::Read)?;
    effective_from_status(&status).ok_or_else(|| {
        CapsError::Read(io::Error::new(io::ErrorKind::InvalidData, "no CapEff line"))
    })
}

/// What of `REQUIRED` (and `CAP_SYS_RESOURCE` when `memlock_needs_raising`) `effective` lacks.
pub fn missing(effective: u64, memlock_needs_raising: bool) -> Vec<Capability> {
    let extra = memlock_needs_raising.then_some(CAP_SYS_RESOURCE);
    REQUIRED
        .into_iter()
        .chain(extra)
        .filter(|c| effective & (1u64 << c.bit) == 0)
        .collect()
}

/// Before 5.11 eBPF memory is charged to `RLIMIT_MEMLOCK`; raising it past a finite hard limit
/// needs `CAP_SYS_RESOURCE`.
fn memlock_needs_raising() -> bool {
    let old_kernel = aya::util::KernelVersion::current()
        .map(|v| v < aya::util::KernelVersion::new(5, 11, 0))
        .unwrap_or(false);
    if !old_kernel {
        return false;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0;
    !(ok && lim.rlim_max == libc::RLIM_INFINITY)
}

/// Fails, naming each one, unless this process holds every capability the agent needs here.
pub fn require() -> Result<(), CapsError> {
    let missing = missing(effective()?, memlock_needs_raising());
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CapsError::Missing(missing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cap_eff() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\n\
                      CapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\n";
        assert_eq!(effective_from_status(status), Some(0x1fffeffffff));
        assert_eq!(effective_from_status("Name:\tx\n"), None);
    }

    #[test]
    fn names_exactly_what_is_missing() {
        // This project's machines: everything but CAP_SYS_RESOURCE.
        let all_but_resource = 0x1fffeffffffu64;
        assert!(missing(all_but_resource, false).is_empty());
        assert_eq!(missing(all_but_resource, true), vec![CAP_SYS_RESOURCE]);
        for c in REQUIRED {
            let without = all_but_resource & !(1 << c.bit);
            assert_eq!(missing(without, false), vec![c]);
            let msg = CapsError::Missing(missing(without, false)).to_string();
            assert!(
                msg.starts_with(&format!("missing capability {}", c.name)),
                "{msg}"
            );
        }
        let msg = CapsError::Missing(missing(0, false)).to_string();
        assert!(
            msg.starts_with("missing capabilities CAP_NET_ADMIN"),
            "{msg}"
        );
    }
}
