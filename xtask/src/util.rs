//! Helpers of the subcommands: the shared ones from `redirect-devtools`, and handing a
//! subcommand over to the workspace crate that implements it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use anyhow::{Context as _, Result};

pub use redirect_devtools::{
    build_workspace_bins, cargo, debian_packages, display, find_on_path, header, installed,
    output_if_success, present, run, target_dir, workspace_root, HOST_EXCLUDE,
};

/// Replaces this process with `cargo run -p PACKAGE -- ARGS` (same profile as xtask, quiet like
/// the `cargo xtask` alias): the tool's exit status and signals are the caller's, and `args`
/// reach it unchanged. The working directory stays the caller's, so relative paths in `args`
/// mean what they meant.
pub fn exec_tool(package: &str, args: &[OsString]) -> Result<()> {
    let manifest = workspace_root().join("Cargo.toml");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["run", "--quiet", "--manifest-path"])
        .arg(&manifest)
        .args(["--package", package, "--"])
        .args(args);
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec `{}`", display(&cmd)))
}
