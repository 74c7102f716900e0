//! `redirect-agent detect`: find the applications that pod-IP delivery affects.

use std::process::ExitCode;

/// Arguments of `redirect-agent detect`.
#[derive(Debug, clap::Args)]
pub struct DetectArgs {}

/// Runs the detection and returns the process exit code (0 ok, 1 errors found, 2 usage).
pub fn run(_args: &DetectArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("detect is not implemented yet")
}
