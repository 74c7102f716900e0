//! `cargo xtask bench detect`: how long `redirect-agent detect --all` takes on a node with N
//! pod network namespaces of 10 listeners each (N = 10, 100, 1000; override with
//! `BENCH_DETECT_N=10,100`). Target: under 2 s for 1000.
//!
//! Each namespace gets `lo` up and one process (`sleep`) that holds its 10 sockets: loopback
//! (127.0.0.1, 127.0.0.53, ::1), pod IPs (198.18/15 and 2001:db8::/32, bound with
//! IP_FREEBIND so that no interface is needed), wildcards (0.0.0.0, dual-stack ::, v6only ::)
//! and a bound UDP socket, so the scan does the same work per namespace as on a node: a
//! setns, four sock_diag dumps, and the owners found among every process's descriptors.
//! Nothing is sent anywhere. Namespaces are named `rdt-bench-detect-<pid>-<i>` and removed at
//! the end, also on error; leftovers of a killed run are removed by the next one.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};

use redirect_devtools as dev;

use crate::sys::{ensure_root, ip_batch};

const PREFIX: &str = "rdt-bench-detect-";
const LISTENERS: usize = 10;
const RUNS: usize = 5;

/// Creates the sockets in every namespace named on stdin's first line (JSON list), hands each
/// namespace's sockets to a `sleep` started inside it, prints `ready`, and on EOF of stdin
/// kills the sleeps.
const HOLDER_PY: &str = r#"
import ctypes, fcntl, json, os, signal, socket, struct, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
names = json.loads(sys.stdin.readline())
children = []
for i, name in enumerate(names):
    fd = os.open("/var/run/netns/" + name, os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns " + name)
    os.close(fd)
    ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fcntl.ioctl(ctl, 0x8914, struct.pack("16sH", b"lo", 0x1 | 0x8 | 0x40))  # SIOCSIFFLAGS up
    ctl.close()
    ip4 = "198.%d.%d.%d" % (18 + (i >> 16), (i >> 8) & 255, (i & 255) or 1)
    ip6 = "2001:db8::%x:2" % (i + 1)
    socks = []
    for fam, typ, addr, port, v6only in [
        (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 8080, 0),
        (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.53", 8053, 0),
        (socket.AF_INET6, socket.SOCK_STREAM, "::1", 8081, 1),
        (socket.AF_INET, socket.SOCK_STREAM, ip4, 8082, 0),
        (socket.AF_INET6, socket.SOCK_STREAM, ip6, 8083, 1),
        (socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", 8084, 0),
        (socket.AF_INET6, socket.SOCK_STREAM, "::", 8085, 0),
        (socket.AF_INET6, socket.SOCK_STREAM, "::", 8086, 1),
        (socket.AF_INET6, socket.SOCK_STREAM, "::ffff:127.0.0.1", 8087, 0),
        (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0", 8088, 0),
    ]:
        k = socket.socket(fam, typ)
        if fam == socket.AF_INET6:
            k.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        k.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: pod IPs with no interface
        k.bind((addr, port))
        if typ == socket.SOCK_STREAM:
            k.listen(16)
        socks.append(k)
    # The child is started from this (the only) thread, so it lives in the namespace.
    children.append(subprocess.Popen(["sleep", "infinity"], pass_fds=[k.fileno() for k in socks],
                                     stdin=subprocess.DEVNULL))
    for k in socks:
        k.close()
print("ready", flush=True)
sys.stdin.read()
for c in children:
    c.kill()
for c in children:
    c.wait()
"#;

pub fn run() -> Result<()> {
    ensure_root("bench detect needs root: it creates network namespaces and detect enters them")?;
    let sizes: Vec<usize> = match std::env::var("BENCH_DETECT_N") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()
            .with_context(|| format!("BENCH_DETECT_N={v:?} is not a list of numbers"))?,
        Err(_) => vec![10, 100, 1000],
    };
    remove_stale();

    dev::header("build redirect-agent (release)");
    let mut build = dev::cargo();
    build.args(["build", "--release", "-p", "redirect-agent"]);
    dev::run(&mut build)?;
    let agent = dev::target_dir()?.join("release/redirect-agent");

    let mut rows = Vec::new();
    for &n in &sizes {
        dev::header(&format!("{n} namespaces x {LISTENERS} listeners"));
        let setup = Instant::now();
        let bed = Bed::new(n)?;
        println!("set up in {:.1} s", setup.elapsed().as_secs_f64());
        // One warm-up run, then the timed ones.
        let mut times = Vec::new();
        for i in 0..=RUNS {
            let start = Instant::now();
            let out = Command::new(&agent)
                .args(["detect", "--all", "--output", "json"])
                .stderr(Stdio::inherit())
                .output()
                .context("running redirect-agent detect")?;
            let elapsed = start.elapsed();
            ensure!(
                matches!(out.status.code(), Some(0 | 1)),
                "redirect-agent detect exited with {}",
                out.status
            );
            let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            check(&report, &bed)?;
            if i > 0 {
                times.push(elapsed);
            }
        }
        times.sort();
        let total = report_namespaces(&agent)?;
        println!(
            "detect --all: median {:.0} ms, min {:.0} ms, max {:.0} ms ({total} namespaces scanned in all)",
            ms(times[RUNS / 2]),
            ms(times[0]),
            ms(times[RUNS - 1])
        );
        rows.push((n, times[RUNS / 2], times[0], total));
        drop(bed);
    }
    dev::header("summary: redirect-agent detect --all");
    println!(
        "{:>6} {:>12} {:>12} {:>12}",
        "pods", "median ms", "min ms", "namespaces"
    );
    for (n, median, min, total) in &rows {
        println!(
            "{n:>6} {:>12.0} {:>12.0} {total:>12}",
            ms(*median),
            ms(*min)
        );
    }
    if let Some((_, median, _, _)) = rows.iter().find(|(n, ..)| *n == 1000) {
        let verdict = if *median < Duration::from_secs(2) {
            "met"
        } else {
            "MISSED"
        };
        println!("target < 2 s for 1000 pods: {verdict}");
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Every bench namespace is in the report, with its 10 listeners, each owned by its `sleep`.
fn check(report: &serde_json::Value, bed: &Bed) -> Result<()> {
    let namespaces = report["namespaces"]
        .as_array()
        .context("no namespaces in report")?;
    let mut seen = 0;
    for ns in namespaces {
        let Some(path) = ns["path"].as_str() else {
            continue;
        };
        if !bed.names.iter().any(|n| path.ends_with(&format!("/{n}"))) {
            continue;
        }
        seen += 1;
        let listeners = ns["listeners"].as_array().context("no listeners")?;
        ensure!(
            listeners.len() == LISTENERS,
            "{path}: {} listeners",
            listeners.len()
        );
        ensure!(
            listeners.iter().all(|l| l["owners"][0]["comm"] == "sleep"),
            "{path}: a listener without its owner"
        );
    }
    ensure!(
        seen == bed.names.len(),
        "{seen} of {} bench namespaces reported",
        bed.names.len()
    );
    Ok(())
}

fn report_namespaces(agent: &std::path::Path) -> Result<u64> {
    let out = Command::new(agent)
        .args(["detect", "--all", "--output", "json"])
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(report["summary"]["namespaces"].as_u64().unwrap_or(0))
}

/// N namespaces and the process that holds their sockets; all removed on drop.
struct Bed {
    names: Vec<String>,
    holder: Option<Child>,
}

impl Bed {
    fn new(n: usize) -> Result<Bed> {
        let pid = std::process::id();
        let mut bed = Bed {
            names: Vec::new(),
            holder: None,
        };
        let names: Vec<String> = (0..n).map(|i| format!("{PREFIX}{pid}-{i}")).collect();
        let batch: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
        // Record the names first, so that a failure halfway still removes what was made.
        bed.names = names;
        ip_batch(&batch)?;
        let mut holder = Command::new("python3")
            .args(["-c", HOLDER_PY])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting python3")?;
        let mut stdin = holder.stdin.take().context("holder stdin")?;
        let stdout = holder.stdout.take().context("holder stdout")?;
        bed.holder = Some(holder);
        writeln!(stdin, "{}", serde_json::to_string(&bed.names)?)?;
        // Keep stdin open: its EOF tells the holder to stop.
        bed.holder.as_mut().unwrap().stdin = Some(stdin);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        ensure!(
            line.trim() == "ready",
            "socket holder failed (said {line:?})"
        );
        Ok(bed)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut holder) = self.holder.take() {
            drop(holder.stdin.take());
            let _ = holder.wait();
        }
        let batch: String = self
            .names
            .iter()
            .map(|n| format!("netns del {n}\n"))
            .collect();
        if let Err(e) = ip_batch(&batch) {
            eprintln!("bench detect: removing namespaces: {e:#}");
        }
    }
}

/// Removes namespaces that a killed run of this benchmark left behind.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    let stale: String = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            n.strip_prefix(PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        })
        .map(|n| format!("netns del {n}\n"))
        .collect();
    let _ = ip_batch(&stale);
}
