//! redirect's control plane: enrolls pods into the eBPF datapath, reports what it did.
//!
//! The CLI (`src/main.rs`) is a thin layer over this library; the node daemon and the tests
//! use the same functions.

pub mod bpf_sys;
pub mod cgroup;
pub mod datapath;
pub mod detect;
pub mod listener;
pub mod netns;
pub mod output;
pub mod pod;
pub mod probe;
pub mod spec;
pub mod state;
pub mod stats;
