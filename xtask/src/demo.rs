//! `cargo xtask demo [node]`: setup, build the workspace binaries, then exec
//! `redirect-testbed demo` (the quick demo: pods made by the test bed, the agent as a
//! process) or `redirect-testbed demo-node` (this machine as a node: a private containerd, the
//! agent's DaemonSet pod from its image, pods through CRI, the uninstall).

use std::os::unix::process::CommandExt as _;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::util::{self, header};

#[derive(clap::Args)]
pub struct Args {
    /// `node`: run the node demo (containerd, the DaemonSet's pod, CRI pods, uninstall; about a
    /// minute after the images are built) instead of the quick one.
    #[arg(value_parser = ["node"])]
    pub which: Option<String>,
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
    cmd.arg(if args.which.as_deref() == Some("node") {
        "demo-node"
    } else {
        "demo"
    })
    .args(&args.demo_args)
    .current_dir(util::workspace_root());
    header(&format!("[3/3] demo: {}", util::display(&cmd)));
    // exec: the demo replaces us, so its exit status (and signals) are the caller's.
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec {}", testbed.display()))
}
