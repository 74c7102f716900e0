//! The machine: the root check both benchmarks make, `ip -batch`, commands fed on stdin, and
//! the kernel's BPF statistics switch (aya's).

use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};
use redirect_devtools::{display, failed_saying};

/// Fails unless we run as root; `what` says what needs it.
pub fn ensure_root(what: &str) -> Result<()> {
    if !redirect_testbed::needs::is_root() {
        bail!("{what}");
    }
    Ok(())
}

/// Runs `cmd` with `input` on its stdin; fails with its stderr when it exits non-zero.
pub fn run_with_input(cmd: &mut Command, input: &str) -> Result<()> {
    let what = display(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{what}`"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(failed_saying(cmd, out.status, &out.stderr).into());
    }
    Ok(())
}

/// `ip -force -batch -`: many namespace and link commands in one process.
pub fn ip_batch(commands: &str) -> Result<()> {
    if commands.is_empty() {
        return Ok(());
    }
    run_with_input(Command::new("ip").args(["-force", "-batch", "-"]), commands)
}

/// Turns on the kernel's BPF run-time statistics for as long as the returned fd is open
/// (`BPF_ENABLE_STATS`, kernel >= 5.8), instead of the machine-wide sysctl.
pub fn enable_bpf_stats() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The switch is the kernel's: the fd is the `bpf-stats` anonymous inode that keeps the
    /// run-time statistics on while it is open (the sysctl shows only its own setting).
    #[test]
    fn bpf_stats_switch_is_the_kernels() {
        use std::os::fd::AsRawFd as _;
        redirect_testbed::require!(redirect_testbed::Need::Root);
        let fd = enable_bpf_stats().unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert_eq!(link.to_string_lossy(), "anon_inode:bpf-stats");
    }
}
