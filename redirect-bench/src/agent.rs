//! `cargo xtask bench agent`: the node agent (`redirect-agent run`) against the CLI path.
//!
//! N cheap pods (a namespace with an address on `lo`, an empty cgroup: [`Crowd`]) are enrolled
//! and unenrolled one after the other, first with one `redirect-agent enroll` process each
//! (the CLI path, process start included, as an operator or a script pays it), then through a
//! running agent's socket (one request per connection, as the CLI sends it, without the
//! process start). With the N pods enrolled: the agent's RSS, its CPU while idle, the time to
//! render `/metrics`, and the time from a new agent's start (after SIGKILL) to `/readyz` 200.
//! Results: `bench/agent.json` and the "Node agent" section of BENCHMARKS.md.
//!
//! The state directory is on tmpfs (`/dev/shm`), as the default `/run/redirect` is on a node
//! (systemd mounts `/run` as tmpfs). The intent record of every change is fsynced; this
//! machine's `/tmp` is on its disk (ext4), where each fsync waits for the journal (about 9 ms):
//! the agent's enroll and unenroll are measured there too, as a separate row.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use redirect_devtools as dev;
use serde_json::json;

use crate::crowd::Crowd;

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Pods enrolled (default 1000; 50 with --quick).
    #[arg(long)]
    pub pods: Option<usize>,
    /// Few pods, debug binaries, results under target/bench-quick/ (BENCHMARKS.md untouched).
    #[arg(long)]
    pub quick: bool,
}

/// Latencies in seconds, sorted.
struct Samples(Vec<f64>);

impl Samples {
    fn new(mut v: Vec<f64>) -> Samples {
        v.sort_by(f64::total_cmp);
        Samples(v)
    }

    fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i]
    }

    fn json(&self, total_s: f64) -> serde_json::Value {
        json!({
            "n": self.0.len(),
            "total_s": total_s,
            "p50_ms": self.pct(0.5) * 1e3,
            "p99_ms": self.pct(0.99) * 1e3,
            "max_ms": self.pct(1.0) * 1e3,
        })
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    Ok(redirect_testbed::http::get(addr, path)?)
}

/// A running `redirect-agent run` of this benchmark.
pub(crate) struct AgentProcess {
    child: Child,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone)]
pub(crate) struct Setup {
    pub agent_bin: PathBuf,
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub http: SocketAddr,
    pub log: PathBuf,
}

impl Setup {
    pub fn cli(&self) -> Command {
        let mut c = Command::new(&self.agent_bin);
        c.env("REDIRECT_PIN_ROOT", &self.pin_root)
            .env("REDIRECT_STATE_DIR", &self.state_dir)
            // The CLI path: no agent on this socket.
            .env(
                "REDIRECT_SOCKET",
                self.state_dir.with_extension("no-agent.sock"),
            )
            .env_remove("RUST_LOG");
        c
    }

    fn start_agent(&self) -> Result<AgentProcess> {
        self.start_agent_with(&[])
    }

    /// `redirect-agent run` with more arguments of `run`.
    pub fn start_agent_with(&self, extra: &[&std::ffi::OsStr]) -> Result<AgentProcess> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.agent_bin)
            .env("REDIRECT_PIN_ROOT", &self.pin_root)
            .env("REDIRECT_STATE_DIR", &self.state_dir)
            .env("RUST_LOG", "warn")
            .arg("run")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--http-address")
            .arg(self.http.to_string())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting redirect-agent run")?;
        Ok(AgentProcess { child })
    }

    /// Waits for `/readyz` 200; the time it took.
    pub fn wait_ready(&self, agent: &mut AgentProcess) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "the agent exited ({status}); its log: {}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if let Ok((200, _)) = http_get(self.http, "/readyz") {
                return Ok(start.elapsed());
            }
            ensure!(
                start.elapsed() < Duration::from_secs(120),
                "the agent is not ready after 120 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// One request on its own connection, as the CLI sends it; fails unless it succeeded.
    fn request(&self, req: &serde_json::Value) -> Result<()> {
        let s = UnixStream::connect(&self.socket)?;
        let mut line = req.to_string();
        line.push('\n');
        (&s).write_all(line.as_bytes())?;
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer)?;
        let v: serde_json::Value =
            serde_json::from_str(&answer).with_context(|| format!("agent answered {answer:?}"))?;
        ensure!(v["result"] != "error", "agent: {}", v["value"]["message"]);
        Ok(())
    }
}

/// A state directory on this machine's disk (`/tmp` is on ext4 here).
fn disk_state_dir(setup: &Setup) -> PathBuf {
    PathBuf::from(format!(
        "/tmp/{}-disk",
        setup.state_dir.file_name().unwrap().to_string_lossy()
    ))
}

fn spec(name: &str, cgroup: &Path, netns: &Path, ip: std::net::Ipv4Addr) -> serde_json::Value {
    json!({
        "name": name,
        "cgroup": cgroup,
        "netns": netns,
        "pod_ips": [ip.to_string()],
        "proxy_uid": 1337,
        "inbound_policy": "passthrough",
        "proxy_inbound_port": 15006,
        "proxy_outbound_port": 15001,
    })
}

/// The process's resident set (kB).
fn rss_kb(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

/// The CPU time (seconds, nanosecond resolution) and the context switches of all of a
/// process's threads, from `/proc/PID/task/*/schedstat` and `status`: `/proc/PID/stat` counts
/// in clock ticks of 10 ms, which over an idle window of seconds is the whole figure.
fn cpu_and_switches(pid: u32) -> Result<(f64, u64)> {
    let (mut ns, mut switches) = (0u64, 0u64);
    for t in fs::read_dir(format!("/proc/{pid}/task"))? {
        let t = t?.path();
        // A thread that exits meanwhile is skipped (tokio's idle blocking threads do).
        let Ok(sched) = fs::read_to_string(t.join("schedstat")) else {
            continue;
        };
        ns += sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .context("schedstat")?;
        let Ok(status) = fs::read_to_string(t.join("status")) else {
            continue;
        };
        for l in status.lines() {
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>().context("ctxt_switches")?;
            }
        }
    }
    Ok((ns as f64 / 1e9, switches))
}

fn timed(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

pub fn run(opts: Opts) -> Result<()> {
    crate::sys::ensure_root("bench agent needs root (network namespaces, cgroups, eBPF)")?;
    let n = opts.pods.unwrap_or(if opts.quick { 50 } else { 1000 });
    let root = dev::workspace_root();
    dev::header("bench agent: binaries");
    let mut build = dev::cargo();
    build.args(["build", "-p", "redirect-agent", "--bins"]);
    if !opts.quick {
        build.arg("--release");
    }
    dev::run(&mut build)?;
    let bin_dir = dev::target_dir()?.join(if opts.quick { "debug" } else { "release" });
    crate::crowd::sweep_stale();
    let pid = std::process::id();
    let setup = Setup {
        agent_bin: bin_dir.join("redirect-agent"),
        pin_root: PathBuf::from(format!("/sys/fs/bpf/redirect-bench-{pid}")),
        state_dir: PathBuf::from(format!("/dev/shm/redirect-bench-{pid}")),
        socket: PathBuf::from(format!("/tmp/redirect-bench-{pid}.sock")),
        http: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        log: PathBuf::from(format!("/tmp/redirect-bench-{pid}.agent.log")),
    };
    let started = Instant::now();
    let load_before = fs::read_to_string("/proc/loadavg")?.trim().to_owned();
    // Long enough that a timer of the agent's shows; the quick run only checks the path.
    let idle = Duration::from_secs(if opts.quick { 5 } else { 60 });
    let result = measure(&setup, n, idle);
    // Whatever happened: nothing of this run stays.
    for p in [&setup.socket, &setup.log] {
        let _ = fs::remove_file(p);
    }
    let _ = fs::remove_dir_all(&setup.pin_root);
    let _ = fs::remove_dir_all(&setup.state_dir);
    let _ = fs::remove_dir_all(disk_state_dir(&setup));
    let mut results = result?;
    results["elapsed_s"] = json!(started.elapsed().as_secs_f64());
    results["load_average_before"] = json!(load_before);
    publish(&mut results, opts.quick, "agent", report, |section| {
        write_section(&root.join("BENCHMARKS.md"), section)?;
        Ok("the node agent section")
    })?;
    Ok(())
}

fn measure(setup: &Setup, n: usize, idle: Duration) -> Result<serde_json::Value> {
    dev::header(&format!("bench agent: {n} pods"));
    let crowd = Crowd::create(n)?;
    let pods: Vec<_> = crowd.pods().collect();

    // The CLI path.
    let mut lat = Vec::new();
    let total = timed(|| {
        for (name, cg, ns, ip) in &pods {
            let t = Instant::now();
            let out = setup
                .cli()
                .args(["enroll", "--name", name, "--cgroup"])
                .arg(cg)
                .arg("--netns")
                .arg(ns)
                .args(["--pod-ip", &ip.to_string()])
                .output()?;
            ensure!(out.status.success(), "CLI enroll {name}: {out:?}");
            lat.push(t.elapsed().as_secs_f64());
        }
        Ok(())
    })?;
    let cli_enroll = Samples::new(std::mem::take(&mut lat)).json(total);
    println!("  CLI enroll: {cli_enroll}");
    let total = timed(|| {
        for (name, ..) in &pods {
            let t = Instant::now();
            let out = setup.cli().args(["unenroll", "--name", name]).output()?;
            ensure!(out.status.success(), "CLI unenroll {name}: {out:?}");
            lat.push(t.elapsed().as_secs_f64());
        }
        Ok(())
    })?;
    let cli_unenroll = Samples::new(std::mem::take(&mut lat)).json(total);
    println!("  CLI unenroll: {cli_unenroll}");

    // Through the agent.
    let mut agent = setup.start_agent()?;
    setup.wait_ready(&mut agent)?;
    let total = timed(|| {
        for (name, cg, ns, ip) in &pods {
            let t = Instant::now();
            setup.request(&json!({"op": "enroll", "args": {"spec": spec(name, cg, ns, *ip)}}))?;
            lat.push(t.elapsed().as_secs_f64());
        }
        Ok(())
    })?;
    let agent_enroll = Samples::new(std::mem::take(&mut lat)).json(total);
    println!("  agent enroll: {agent_enroll}");

    let pid = agent.child.id();
    let rss_kb = rss_kb(pid)?;
    // Past the watch's coalescing of the enrolls (0.5 s) and tokio's blocking threads'
    // keep-alive (10 s): what is left is the agent idling.
    std::thread::sleep(Duration::from_secs(11));
    let (cpu0, sw0) = cpu_and_switches(pid)?;

    std::thread::sleep(idle);
    let (cpu1, sw1) = cpu_and_switches(pid)?;
    let idle_cpu_pct = (cpu1 - cpu0) / idle.as_secs_f64() * 100.0;
    let idle_wakeups = sw1.saturating_sub(sw0) as f64 / idle.as_secs_f64();
    println!(
        "  agent RSS {rss_kb} kB, idle CPU {idle_cpu_pct:.4} % and {idle_wakeups:.2} context switches/s over {idle:?}"
    );
    let mut renders = Vec::new();
    let mut metrics_bytes = 0;
    for _ in 0..10 {
        let t = Instant::now();
        let (status, body) = http_get(setup.http, "/metrics")?;
        renders.push(t.elapsed().as_secs_f64());
        ensure!(status == 200, "/metrics: {status}");
        metrics_bytes = body.len();
    }
    let metrics = Samples::new(renders);
    println!(
        "  /metrics: p50 {:.1} ms, {metrics_bytes} bytes",
        metrics.pct(0.5) * 1e3
    );

    // Restart: SIGKILL, then a new agent adopts the N pinned pods.
    drop(agent);
    let _ = fs::remove_file(&setup.socket);
    let mut restarts = Vec::new();
    let mut agent = setup.start_agent()?;
    restarts.push(setup.wait_ready(&mut agent)?.as_secs_f64());
    for _ in 0..2 {
        drop(agent);
        agent = setup.start_agent()?;
        restarts.push(setup.wait_ready(&mut agent)?.as_secs_f64());
    }
    let restart = Samples::new(restarts);
    println!(
        "  restart to ready with {n} pods: median {:.3} s",
        restart.pct(0.5)
    );

    let total = timed(|| {
        for (name, ..) in &pods {
            let t = Instant::now();
            setup.request(&json!({"op": "unenroll", "args": {"name": name}}))?;
            lat.push(t.elapsed().as_secs_f64());
        }
        Ok(())
    })?;
    let agent_unenroll = Samples::new(std::mem::take(&mut lat)).json(total);
    println!("  agent unenroll: {agent_unenroll}");
    drop(agent);

    // The same through an agent whose state directory is on this machine's disk.
    let disk = Setup {
        state_dir: disk_state_dir(setup),
        ..setup.clone()
    };
    let _ = fs::remove_file(&disk.socket);
    let mut agent = disk.start_agent()?;
    disk.wait_ready(&mut agent)?;
    let total = timed(|| {
        for (name, cg, ns, ip) in &pods {
            let t = Instant::now();
            disk.request(&json!({"op": "enroll", "args": {"spec": spec(name, cg, ns, *ip)}}))?;
            lat.push(t.elapsed().as_secs_f64());
        }
        Ok(())
    })?;
    let disk_enroll = Samples::new(std::mem::take(&mut lat)).json(total);
    println!("  agent enroll, state on disk: {disk_enroll}");
    let total = timed(|| {
        for (name, ..) in &pods {
            let t = Instant::now();
            disk.request(&json!({"op": "unenroll", "args": {"name": name}}))?;
            lat.push(t.elapsed().as_secs_f64());
        }
        Ok(())
    })?;
    let disk_unenroll = Samples::new(std::mem::take(&mut lat)).json(total);
    println!("  agent unenroll, state on disk: {disk_unenroll}");
    drop(agent);
    drop(crowd);
    Ok(json!({
        "pods": n,
        "cli_enroll": cli_enroll,
        "cli_unenroll": cli_unenroll,
        "agent_enroll": agent_enroll,
        "agent_unenroll": agent_unenroll,
        "agent_enroll_disk_state": disk_enroll,
        "agent_unenroll_disk_state": disk_unenroll,
        "agent_rss_kib": rss_kb,
        "agent_idle_cpu_pct": idle_cpu_pct,
        "agent_idle_window_s": idle.as_secs_f64(),
        "agent_idle_switches_per_s": idle_wakeups,
        "metrics_render_p50_ms": metrics.pct(0.5) * 1e3,
        "metrics_bytes": metrics_bytes,
        "restart_to_ready_s": restart.0,
    }))
}

const BEGIN: &str = "<!-- bench agent: begin -->";
const END: &str = "<!-- bench agent: end -->";

fn report(r: &serde_json::Value) -> String {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let row = |what: &str, k: &str| {
        let v = &r[k];
        format!(
            "| {what} | {:.2} ms | {:.2} ms | {:.2} s |",
            f(&v["p50_ms"]),
            f(&v["p99_ms"]),
            f(&v["total_s"])
        )
    };
    let restarts: Vec<f64> = r["restart_to_ready_s"]
        .as_array()
        .into_iter()
        .flatten()
        .map(f)
        .collect();
    let worst_restart = restarts.iter().copied().fold(f64::NAN, f64::max);
    let rss_mib = f(&r["agent_rss_kib"]) / 1024.0;
    // (figure, target, measured, met)
    let targets = [
        (
            "enroll through the agent, p50".to_string(),
            "< 2 ms",
            format!("{:.2} ms", f(&r["agent_enroll"]["p50_ms"])),
            f(&r["agent_enroll"]["p50_ms"]) < 2.0,
        ),
        (
            "enroll through the agent, p99".into(),
            "< 10 ms",
            format!("{:.2} ms", f(&r["agent_enroll"]["p99_ms"])),
            f(&r["agent_enroll"]["p99_ms"]) < 10.0,
        ),
        (
            format!("{} pods enrolled through the agent", r["pods"]),
            "< 3 s",
            format!("{:.2} s", f(&r["agent_enroll"]["total_s"])),
            f(&r["agent_enroll"]["total_s"]) < 3.0,
        ),
        (
            format!("{} pods unenrolled through the agent", r["pods"]),
            "< 3 s",
            format!("{:.2} s", f(&r["agent_unenroll"]["total_s"])),
            f(&r["agent_unenroll"]["total_s"]) < 3.0,
        ),
        (
            format!("agent RSS with {} pods", r["pods"]),
            "< 40 MiB",
            format!("{rss_mib:.1} MiB"),
            rss_mib < 40.0,
        ),
        (
            format!(
                "agent idle CPU with {} pods ({} s, all threads)",
                r["pods"], r["agent_idle_window_s"]
            ),
            "< 0.1 %",
            format!(
                "{:.4} % ({:.2} context switches/s)",
                f(&r["agent_idle_cpu_pct"]),
                f(&r["agent_idle_switches_per_s"])
            ),
            f(&r["agent_idle_cpu_pct"]) < 0.1,
        ),
        (
            format!("`/metrics` with {} pods (p50 of 10)", r["pods"]),
            "< 50 ms",
            format!(
                "{:.1} ms ({} bytes)",
                f(&r["metrics_render_p50_ms"]),
                r["metrics_bytes"]
            ),
            f(&r["metrics_render_p50_ms"]) < 50.0,
        ),
        (
            format!(
                "restart to `/readyz` 200 with {} pods (worst of 3)",
                r["pods"]
            ),
            "< 1 s",
            restarts
                .iter()
                .map(|s| format!("{s:.3} s"))
                .collect::<Vec<_>>()
                .join(", "),
            worst_restart < 1.0,
        ),
    ];
    let target_rows: Vec<String> = targets
        .iter()
        .map(|(what, target, got, met)| {
            format!(
                "| {what} | {target} | {got} | {} |",
                if *met { "yes" } else { "**no**" }
            )
        })
        .collect();
    format!(
        "{BEGIN}\n## Node agent\n\nGenerated by `cargo xtask bench agent` ({} binaries, kernel {}, {:.0} s). \
         Raw results: [`bench/agent.json`](bench/agent.json). {} pods (a namespace with an address \
         on `lo`, an empty cgroup) enrolled then unenrolled one after the other: with one \
         `redirect-agent` process per command (the CLI path, process start included), and through \
         a running agent's socket (one request per connection). The agent keeps one writer for its \
         life: the datapath loaded once and its handles kept, the records in memory; the CLI \
         makes the same writer for each command (same functions, same lock). The state \
         directory is on tmpfs, as `/run/redirect` is on a node; every change's intent record \
         is fsynced, which costs nothing there. The last two rows put the agent's state \
         directory on this machine's disk (ext4), where each fsync of the intent waits for the \
         journal.\n\n\
         | | p50 | p99 | all {} pods |\n|---|---|---|---|\n{}\n{}\n{}\n{}\n{}\n{}\n\n\
         The issue's targets:\n\n| figure | target | measured | met |\n|---|---|---|---|\n{}\n\n\
         The machine: {} vCPUs; `/proc/loadavg` before the run `{}`, after it `{}` (the \
         run's own load included).\n{END}\n",
        r["profile"].as_str().unwrap_or("?"),
        r["kernel"].as_str().unwrap_or("?"),
        r["elapsed_s"].as_f64().unwrap_or(0.0),
        r["pods"],
        r["pods"],
        row("enroll, CLI", "cli_enroll"),
        row("enroll, agent", "agent_enroll"),
        row("unenroll, CLI", "cli_unenroll"),
        row("unenroll, agent", "agent_unenroll"),
        row("enroll, agent, state on disk", "agent_enroll_disk_state"),
        row("unenroll, agent, state on disk", "agent_unenroll_disk_state"),
        target_rows.join("\n"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        r["load_average_before"].as_str().unwrap_or("?"),
        r["load_average_after"].as_str().unwrap_or("?"),
    )
}

/// The node agent's section of a BENCHMARKS.md, markers included, if it has one.
pub fn section_of(md: &str) -> Option<&str> {
    marked_section(md, BEGIN, END)
}

/// The end of a benchmark run shared by `bench agent` and `bench cni`: adds what the run ran
/// on (profile, kernel, load average after) to `results`, writes them to `bench/NAME.json`
/// (`target/bench-quick/` for a quick run), prints the report section and, for a full run,
/// puts it into BENCHMARKS.md with `write` (which names what it wrote).
pub fn publish(
    results: &mut serde_json::Value,
    quick: bool,
    name: &str,
    report: fn(&serde_json::Value) -> String,
    write: impl FnOnce(&str) -> Result<&'static str>,
) -> Result<()> {
    let root = dev::workspace_root();
    results["profile"] = json!(if quick { "debug" } else { "release" });
    results["kernel"] = json!(fs::read_to_string("/proc/sys/kernel/osrelease")?.trim());
    results["load_average_after"] = json!(fs::read_to_string("/proc/loadavg")?.trim());
    let out = if quick {
        root.join("target/bench-quick")
    } else {
        root.join("bench")
    };
    fs::create_dir_all(&out)?;
    let file = out.join(format!("{name}.json"));
    fs::write(&file, serde_json::to_string_pretty(results)?)?;
    let section = report(results);
    println!("\n{section}");
    if quick {
        println!("wrote {}", file.display());
    } else {
        let what = write(&section)?;
        println!("wrote bench/{name}.json and {what} of BENCHMARKS.md");
    }
    Ok(())
}

/// The section between `begin` and `end` of a BENCHMARKS.md, markers included, if it has one.
pub fn marked_section<'a>(md: &'a str, begin: &str, end: &str) -> Option<&'a str> {
    let b = md.find(begin)?;
    let e = md[b..].find(end)? + b + end.len();
    Some(&md[b..e])
}

/// Replaces the section between the markers in BENCHMARKS.md, or appends it.
fn write_section(path: &Path, section: &str) -> Result<()> {
    write_marked_section(path, BEGIN, END, section)
}

/// Replaces the section between `begin` and `end` in the file at `path`, or appends it.
pub fn write_marked_section(path: &Path, begin: &str, end: &str, section: &str) -> Result<()> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let new = match (text.find(begin), text.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!(
                "{}{section}{}",
                &text[..b],
                &text[e + end.len()..].trim_start_matches('\n')
            )
        }
        _ => format!("{}\n{section}", text.trim_end()),
    };
    fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}
