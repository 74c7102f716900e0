//! Kernel feature probing: what the datapath needs, present or missing, and the kernel that
//! brings it.

use std::process::ExitCode;

/// Arguments of `redirect-agent probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = crate::output::Format::Table)]
    pub output: crate::output::Format,
}

/// Runs `probe` and prints its report.
pub fn run(_args: &ProbeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("probe is not implemented yet")
}
