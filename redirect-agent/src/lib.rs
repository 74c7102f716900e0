//! redirect's control plane: enrolls pods into the eBPF datapath, reports what it did.
//!
//! The CLI (`src/main.rs`) is a thin layer over this library; the node daemon and the tests
//! use the same functions.

pub mod agent;
pub mod annotations;
pub mod bpf_sys;
pub mod caps;
pub mod cgroup;
pub mod cni_install;
pub mod commands;
pub mod conntrack;
pub mod cri;
pub mod datapath;
pub mod detect;
pub mod enroll;
pub mod gc;
pub mod kube;
pub mod kubepods;
pub mod listener;
pub mod netns;
pub mod paths;
pub mod probe;
pub mod rows;
pub mod spec;
pub mod state;
pub mod stats;

/// An error and its causes on one line, `outer: cause: root cause`, as `{:#}` prints an
/// `anyhow::Error`. Error types here keep their cause in `source()` rather than in their
/// message, so it is printed once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        cur = cause.source();
    }
    out
}
