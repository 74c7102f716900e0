//! `cargo xtask bench <benchmark>`.

use anyhow::{bail, Result};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Detection benchmark (see bench_detect.rs).
    Detect,
    /// Data-path benchmark (not yet written).
    Datapath,
}

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Detect => crate::bench_detect::run(),
        Command::Datapath => datapath(),
    }
}

fn datapath() -> Result<()> {
    bail!("bench datapath: not yet")
}
