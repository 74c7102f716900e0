//! `cargo xtask demo`: setup, build the workspace binaries, then exec `redirect-testbed demo`.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::util::{self, header};

#[derive(clap::Args)]
pub struct Args {
    /// Extra arguments passed on to `redirect-testbed demo` (after `--`).
    #[arg(last = true)]
    pub demo_args: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    header("[1/3] setup");
    crate::setup::run().context("step 'setup' failed")?;
    header("[2/3] build binaries");
    util::build_workspace_bins().context("step 'build binaries' failed")?;

    let testbed = util::target_dir()?.join("debug/redirect-testbed");
    if !testbed.is_file() {
        bail!("{} was not built", testbed.display());
    }
    let mut cmd = Command::new(&testbed);
    cmd.arg("demo")
        .args(&args.demo_args)
        .current_dir(util::workspace_root());
    header(&format!("[3/3] demo: {}", util::display(&cmd)));
    // exec: the demo replaces us, so its exit status (and signals) are the caller's.
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec {}", testbed.display()))
}
