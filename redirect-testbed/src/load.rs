//! `redirect-testbed load`: the benchmark's load generator.
//!
//! One client connection at a time (latency, not concurrency, is what interception changes),
//! every thread pinned to one CPU with `sched_setaffinity`, latencies in an HDR histogram.
//! Prints one JSON line ([`LoadReport`]) on stdout.
//!
//! Workloads:
//! - `rr`: request/response of `--size` bytes on one kept connection;
//! - `crr`: connect, request/response of `--size` bytes, close, per operation;
//! - `bulk`: one connection, a writer thread streams 64 KiB writes, a reader thread counts the
//!   echoed bytes; an "operation" is one echoed byte.
//!
//! CPU: the delta of `usage_usec` in each `--cpu-stat` file (cgroup v2 `cpu.stat` of the pods
//! involved) over the measured window, so the proxies, the application and the kernel work
//! charged to them are all counted; plus this process's own `getrusage`.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Rr,
    Crr,
    Bulk,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to connect.
    #[arg(long)]
    to: SocketAddr,
    #[arg(long, value_enum)]
    workload: Workload,
    /// Request (and response) size in bytes for rr and crr.
    #[arg(long, default_value_t = 1)]
    size: usize,
    /// Measured window.
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
    /// Unmeasured run before the window (caches, first connections).
    #[arg(long, default_value_t = 300)]
    warmup_ms: u64,
    /// CPU to pin every thread to (none: not pinned).
    #[arg(long)]
    cpu: Option<usize>,
    /// cgroup v2 `cpu.stat` files whose `usage_usec` delta is reported (repeatable).
    #[arg(long)]
    cpu_stat: Vec<PathBuf>,
    /// Give up on one operation after this long.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

/// What `load` prints.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub workload: String,
    pub size: usize,
    /// Operations completed in the window (bytes for bulk).
    pub ops: u64,
    pub errors: u64,
    /// Operations of the warm-up before the window (bytes for bulk).
    pub warmup_ops: u64,
    pub secs: f64,
    /// ops / secs.
    pub rate: f64,
    /// Latency percentiles in microseconds (absent for bulk).
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub max_us: Option<f64>,
    /// Sum of the `usage_usec` deltas of the `--cpu-stat` files over the window.
    pub cgroup_cpu_us: u64,
    /// This process's user + system time over the window.
    pub self_cpu_us: u64,
    pub first_error: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    pin(args.cpu)?;
    let report = match args.workload {
        Workload::Rr => rr(&args)?,
        Workload::Crr => crr(&args)?,
        Workload::Bulk => bulk(&args)?,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn pin(cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).context("CPU number out of range")?;
    // Pid 0 is the calling thread.
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning to CPU {cpu}"))
}

/// CPU counters read at the edges of the measured window.
struct CpuMark {
    cgroup_us: u64,
    self_us: u64,
}

fn cpu_mark(files: &[PathBuf]) -> Result<CpuMark> {
    let mut cgroup_us = 0;
    for f in files {
        let text = fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        cgroup_us += text
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .with_context(|| format!("no usage_usec in {}", f.display()))?;
    }
    let ru = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    let us = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
    Ok(CpuMark {
        cgroup_us,
        self_us: us(ru.user_time()) + us(ru.system_time()),
    })
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static bounds")
}

struct Window {
    start: Instant,
    mark: CpuMark,
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    hist: Option<&Histogram<u64>>,
    warmup_ops: u64,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    window: Window,
) -> Result<LoadReport> {
    let secs = window.start.elapsed().as_secs_f64();
    let end = cpu_mark(&args.cpu_stat)?;
    let pct = |q: f64| {
        hist.filter(|h| !h.is_empty())
            .map(|h| h.value_at_quantile(q) as f64 / 1e3)
    };
    Ok(LoadReport {
        workload: format!("{:?}", args.workload).to_lowercase(),
        size: args.size,
        ops,
        errors,
        warmup_ops,
        secs,
        rate: ops as f64 / secs,
        p50_us: pct(0.50),
        p90_us: pct(0.90),
        p99_us: pct(0.99),
        max_us: hist.filter(|h| !h.is_empty()).map(|h| h.max() as f64 / 1e3),
        cgroup_cpu_us: end.cgroup_us.saturating_sub(window.mark.cgroup_us),
        self_cpu_us: end.self_us.saturating_sub(window.mark.self_us),
        first_error,
    })
}

fn connect(args: &Args) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&args.to, Duration::from_millis(args.timeout_ms))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_millis(args.timeout_ms)))?;
    Ok(s)
}

fn exchange(s: &mut TcpStream, req: &[u8], resp: &mut [u8]) -> io::Result<()> {
    s.write_all(req)?;
    s.read_exact(resp)
}

fn rr(args: &Args) -> Result<LoadReport> {
    let req = vec![b'x'; args.size.max(1)];
    let mut resp = vec![0; req.len()];
    let mut s = connect(args).with_context(|| format!("connecting to {}", args.to))?;
    let warm_end = Instant::now() + Duration::from_millis(args.warmup_ms);
    let mut warm = 0;
    while Instant::now() < warm_end {
        exchange(&mut s, &req, &mut resp).context("warm-up exchange")?;
        warm += 1;
    }
    let mut hist = histogram();
    let window = Window {
        mark: cpu_mark(&args.cpu_stat)?,
        start: Instant::now(),
    };
    let end = window.start + Duration::from_millis(args.duration_ms);
    let mut ops = 0;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        exchange(&mut s, &req, &mut resp).context("exchange")?;
        hist.saturating_record(t0.elapsed().as_nanos() as u64);
        ops += 1;
    }
    report(args, Some(&hist), warm, ops, 0, None, window)
}

fn crr_once(args: &Args, req: &[u8], resp: &mut [u8]) -> io::Result<()> {
    let mut s = connect(args)?;
    exchange(&mut s, req, resp)?;
    drop(s);
    Ok(())
}

fn crr(args: &Args) -> Result<LoadReport> {
    let req = vec![b'x'; args.size.max(1)];
    let mut resp = vec![0; req.len()];
    let warm_end = Instant::now() + Duration::from_millis(args.warmup_ms);
    let mut warm = 0;
    while Instant::now() < warm_end {
        crr_once(args, &req, &mut resp)
            .with_context(|| format!("warm-up connection to {}", args.to))?;
        warm += 1;
    }
    let mut hist = histogram();
    let window = Window {
        mark: cpu_mark(&args.cpu_stat)?,
        start: Instant::now(),
    };
    let end = window.start + Duration::from_millis(args.duration_ms);
    let (mut ops, mut errors, mut first_error) = (0, 0, None);
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        match crr_once(args, &req, &mut resp) {
            Ok(()) => {
                hist.saturating_record(t0.elapsed().as_nanos() as u64);
                ops += 1;
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
                if errors > 100 && ops == 0 {
                    bail!("crr to {}: every connection fails: {e}", args.to);
                }
            }
        }
    }
    report(args, Some(&hist), warm, ops, errors, first_error, window)
}

fn bulk(args: &Args) -> Result<LoadReport> {
    const CHUNK: usize = 64 * 1024;
    let s = connect(args).with_context(|| format!("connecting to {}", args.to))?;
    let mut reader = s.try_clone()?;
    let mut writer = s;
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let cpu = args.cpu;
    let w = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || -> io::Result<()> {
            let _ = pin(cpu);
            let buf = vec![b'x'; CHUNK];
            while !stop.load(Ordering::Relaxed) {
                writer.write_all(&buf)?;
            }
            writer.shutdown(Shutdown::Write)
        })
    };
    let r = {
        let received = Arc::clone(&received);
        std::thread::spawn(move || -> io::Result<()> {
            let _ = pin(cpu);
            let mut buf = vec![0; CHUNK];
            loop {
                match reader.read(&mut buf)? {
                    0 => return Ok(()),
                    n => received.fetch_add(n as u64, Ordering::Relaxed),
                };
            }
        })
    };
    std::thread::sleep(Duration::from_millis(args.warmup_ms));
    let window = Window {
        mark: cpu_mark(&args.cpu_stat)?,
        start: Instant::now(),
    };
    let before = received.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(args.duration_ms));
    let bytes = received.load(Ordering::Relaxed) - before;
    let rep = report(args, None, before, bytes, 0, None, window)?;
    stop.store(true, Ordering::Relaxed);
    let werr = w.join().map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let rerr = r.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
    werr.context("bulk writer")?;
    rerr.context("bulk reader")?;
    Ok(rep)
}
