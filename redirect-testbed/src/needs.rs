//! What a test needs of the machine, and the one place that decides to skip.
//!
//! A test states its needs with [`require!`](crate::require) (`require!(Need::Root)`); when one
//! is not met, the test prints one line naming itself and what is missing, and returns:
//!
//! ```text
//! skipping datapath::enroll_twice_is_idempotent: needs root (network namespaces, cgroups, CNI, eBPF)
//! skipping cli::cgroup_v1_directory: needs a cgroup v1 hierarchy (none is mounted here)
//! ```
//!
//! The test's name comes from libtest (the name of the thread it runs on), never typed by hand.
//! Under `CI=true` a missing [`Need::Root`] is a failure, not a skip: CI runs as root, so a
//! root skip there means the test did not run although this machine has what it needs.
//! A [`Need::Kernel`] or [`Need::Machine`] is decided by a probe of this machine, so its skip
//! is the truth about the machine and stays a skip.

use std::fmt;

/// One thing a test needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Running as root: network namespaces, cgroups, CNI, eBPF.
    Root,
    /// A kernel feature, as a probe of the running kernel found it: `missing` is `None` when
    /// present, else what the probe says is missing (feature, kernel release, detail).
    Kernel {
        feature: String,
        missing: Option<String>,
    },
    /// Something of this machine other than the kernel (a cgroup v1 hierarchy, a tool), as a
    /// look at the machine found it.
    Machine {
        what: String,
        missing: Option<String>,
    },
}

impl Need {
    /// A kernel feature that a probe found present (`Ok`) or missing (`Err(why)`).
    pub fn kernel(feature: impl Into<String>, probe: Result<(), String>) -> Need {
        Need::Kernel {
            feature: feature.into(),
            missing: probe.err(),
        }
    }

    /// Something of this machine that is there (`Ok`) or not (`Err(why)`).
    pub fn machine(what: impl Into<String>, found: Result<(), String>) -> Need {
        Need::Machine {
            what: what.into(),
            missing: found.err(),
        }
    }

    /// Why the need is not met on this machine, or `None` when it is.
    pub fn unmet(&self) -> Option<Unmet> {
        match self {
            Need::Root => (!is_root()).then(|| Unmet {
                need: "root (network namespaces, cgroups, CNI, eBPF)".into(),
                why: None,
                fatal_in_ci: true,
            }),
            Need::Kernel { feature, missing } => missing.as_ref().map(|why| Unmet {
                need: format!("kernel feature {feature}"),
                why: Some(why.clone()),
                fatal_in_ci: false,
            }),
            Need::Machine { what, missing } => missing.as_ref().map(|why| Unmet {
                need: what.clone(),
                why: Some(why.clone()),
                fatal_in_ci: false,
            }),
        }
    }
}

/// A need that this machine does not meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmet {
    pub need: String,
    pub why: Option<String>,
    /// Under `CI=true`, failing the test rather than skipping it.
    pub fatal_in_ci: bool,
}

impl fmt::Display for Unmet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "needs {}", self.need)?;
        if let Some(why) = &self.why {
            write!(f, " ({why})")?;
        }
        Ok(())
    }
}

/// Whether the effective uid is 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether the running test may go on: every need met. Otherwise prints one line for the first
/// unmet need (in the order given: `Need::Root` first, so a probe that needs root is not
/// blamed), `skipping TEST: needs ...`, and returns false; under `CI=true` an unmet need that
/// this machine is expected to meet panics instead.
pub fn check(needs: &[Need]) -> bool {
    let Some(unmet) = needs.iter().find_map(Need::unmet) else {
        return true;
    };
    let test = test_name();
    if unmet.fatal_in_ci && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {unmet}; a skip is a failure under CI=true");
    }
    eprintln!("skipping {test}: {unmet}");
    false
}

/// The running test's name, as libtest names the thread it runs on (also with
/// `--test-threads=1`).
pub fn test_name() -> String {
    match std::thread::current().name() {
        Some(n) if n != "main" => n.to_owned(),
        _ => "this test".to_owned(),
    }
}

/// Returns from the calling test, saying why, unless every need is met:
/// `require!(Need::Root);` or `require!(Need::Root, cgroup_v1());`.
#[macro_export]
macro_rules! require {
    ($($need:expr),+ $(,)?) => {
        if !$crate::needs::check(&[$($need),+]) {
            return;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn met_needs_run_and_unmet_ones_say_why() {
        assert!(check(&[]));
        assert!(check(&[Need::machine("a thing", Ok(()))]));
        assert!(!check(&[Need::machine("a thing", Err("not here".into()))]));
        let u = Need::kernel("sk_lookup", Err("Linux 5.9 brings it".into()))
            .unmet()
            .expect("unmet");
        assert_eq!(
            u.to_string(),
            "needs kernel feature sk_lookup (Linux 5.9 brings it)"
        );
        assert!(
            !u.fatal_in_ci,
            "a probed absence is the machine's truth, also in CI"
        );
        assert_eq!(Need::kernel("x", Ok(())).unmet(), None);
    }

    #[test]
    fn root_is_what_the_process_is() {
        let unmet = Need::Root.unmet();
        assert_eq!(unmet.is_none(), is_root());
        if let Some(u) = unmet {
            assert!(u.fatal_in_ci);
            assert!(u.to_string().starts_with("needs root"));
        }
    }

    #[test]
    fn the_test_is_named_by_libtest() {
        assert_eq!(test_name(), "needs::tests::the_test_is_named_by_libtest");
    }
}
