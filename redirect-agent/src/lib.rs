//! redirect's control plane: enrolls pods into the eBPF datapath, reports what it did.
//!
//! The CLI (`src/main.rs`) is a thin layer over this library; the node daemon and the tests
//! use the same functions.

pub mod detect;
pub mod netns;
pub mod state;
