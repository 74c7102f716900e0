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

/// Whether `perf` (Debian's `linux-perf`) is there to sample the kernel's paths.
pub fn perf_available() -> bool {
    redirect_devtools::output_if_success(Command::new("perf").arg("--version")).is_some()
}

/// `perf record` of one CPU (software `cpu-clock` samples with kernel call chains) for as long
/// as this lives: stopped with SIGINT, as perf expects, by [`PerfRecord::finish`].
pub struct PerfRecord {
    child: std::process::Child,
}

/// Samples per second of [`PerfRecord`].
pub const PERF_HZ: u32 = 4999;

impl PerfRecord {
    pub fn start(cpu: usize, data: &std::path::Path) -> Result<Self> {
        let child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-g", "-F"])
            .arg(PERF_HZ.to_string())
            .arg("-C")
            .arg(cpu.to_string())
            .arg("-o")
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        // perf needs a moment to open its events before the window starts.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(PerfRecord { child })
    }

    /// Stops the recording and waits for perf to write it.
    pub fn finish(mut self) -> Result<()> {
        // SAFETY: kill(2) on the pid of our own child, not yet waited for (so not reused).
        if unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) } != 0 {
            return Err(std::io::Error::last_os_error()).context("stopping perf record");
        }
        self.child.wait().context("waiting for perf record")?;
        Ok(())
    }
}

impl Drop for PerfRecord {
    fn drop(&mut self) {
        // Not finished (an error on the way): stop it anyway; the data is not used.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Inclusive time (the symbol and everything it calls) per kernel symbol of `data`, in ns,
/// for the samples of the processes named `comms`: `perf report --children`, whose absolute
/// percentages times the event count (cpu-clock counts nanoseconds) are the time.
pub fn perf_children_ns(
    data: &std::path::Path,
    comms: &[&str],
) -> Result<std::collections::BTreeMap<String, f64>> {
    let out = redirect_devtools::output(
        Command::new("perf")
            .args(["report", "-i"])
            .arg(data)
            .args([
                "--children",
                "--stdio",
                "-g",
                "none",
                "--sort",
                "sym",
                "--percentage",
                "absolute",
                "--comms",
            ])
            .arg(comms.join(",")),
    )?;
    Ok(parse_perf_children(&out))
}

/// Key of [`parse_perf_children`]'s map for the time of every sample of the processes, user
/// and kernel, inside redirect's programs or not.
pub const PERF_ALL: &str = "(all)";

/// `perf report --children --stdio -g none --sort sym` output -> kernel symbol -> ns, and
/// [`PERF_ALL`] -> the time of every sample shown (the sum of the self column).
pub fn parse_perf_children(out: &str) -> std::collections::BTreeMap<String, f64> {
    let mut total = 0.0;
    let mut all = 0.0;
    let mut m = std::collections::BTreeMap::new();
    for line in out.lines() {
        if let Some(n) = line.strip_prefix("# Event count (approx.): ") {
            total = n.trim().parse().unwrap_or(0.0);
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(children), Some(own), Some(kind), Some(sym)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let pct = |s: &str| s.strip_suffix('%').and_then(|p| p.parse::<f64>().ok());
        let (Some(children), Some(own)) = (pct(children), pct(own)) else {
            continue;
        };
        all += own / 100.0 * total;
        if kind == "[k]" {
            m.insert(sym.to_owned(), children / 100.0 * total);
        }
    }
    m.insert(PERF_ALL.to_owned(), all);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The switch is the kernel's: the fd is the `bpf-stats` anonymous inode that keeps the
    /// run-time statistics on while it is open (the sysctl shows only its own setting).
    #[test]
    fn perf_children_are_read_as_nanoseconds() {
        let out = "# Samples: 5K of event 'cpu-clock'\n\
                   # Event count (approx.): 2000000000\n\
                   #\n\
                   \x20   10.00%     0.50%  [k] __cgroup_bpf_run_filter_sock_ops\n\
                   \x20    1.00%     1.00%  [.] main\n\
                   \x20    0.25%     0.25%  [k] bpf_prog_6deef7357e7b4530_rd_sock_ops\n";
        let m = parse_perf_children(out);
        assert_eq!(m.len(), 3);
        assert_eq!(m["__cgroup_bpf_run_filter_sock_ops"], 200_000_000.0);
        assert_eq!(m["bpf_prog_6deef7357e7b4530_rd_sock_ops"], 5_000_000.0);
        assert_eq!(m[PERF_ALL], 35_000_000.0);
    }

    #[test]
    fn bpf_stats_switch_is_the_kernels() {
        use std::os::fd::AsRawFd as _;
        redirect_testbed::require!(redirect_testbed::Need::Root);
        let fd = enable_bpf_stats().unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert_eq!(link.to_string_lossy(), "anon_inode:bpf-stats");
    }
}
