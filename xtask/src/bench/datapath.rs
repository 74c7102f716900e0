//! `cargo xtask bench [datapath]`: redirect's eBPF datapath against Istio's iptables
//! redirection, on the same test-bed pods, with the same proxy and application, in one run.
//!
//! Topology (one node, two pods, as a mesh has them): the **client** pod runs the load
//! generator as the application (uid 1000) beside its sidecar proxy (uid 1337); the **server**
//! pod runs the echo application (uid 1000, `0.0.0.0:8080`) beside its sidecar proxy. In every
//! proxied mode a request goes load generator -> client proxy -> server proxy -> echo, three
//! TCP connections, as in a sidecar-to-sidecar mesh call; only *how* traffic reaches the
//! proxies changes:
//! - `direct`: load generator -> echo, no proxy: the floor;
//! - `explicit`: the load generator dials its proxy at 127.0.0.1:15001, which dials the server
//!   proxy at POD_IP:15006, which dials the application: no interception, the proxies' own cost;
//! - `iptables-nft`, `iptables-legacy`: Istio's 1.10+ rules (see istio.rs) in both pods, the
//!   server proxy delivering to POD_IP:8080 from 127.0.0.6;
//! - `iptables-localhost`: the pre-1.10 rules (nft), the proxy delivering to 127.0.0.1:8080;
//! - `ebpf`: both pods enrolled with redirect-agent, no rule at all.
//!
//! Configurations are measured interleaved (A B C ... A B C ...) so that drift of the machine
//! falls on all of them alike; reported figures are medians over repetitions with min and max.
//! Every process of the benchmark (load generator, proxies, application) is pinned to one CPU:
//! on this 2-vCPU VM, cross-CPU wake-ups triple latency and make p99 meaningless.

use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use redirect_testbed::{Node, Pod, PodProcess};
use serde::Serialize;
use serde_json::{json, Value};

use super::istio::{self, Exclusions, Generation};
use crate::util;

const APP_UID: u32 = 1000;
const PROXY_UID: u32 = 1337;
const APP_PORT: u16 = 8080;
const INBOUND_PORT: u16 = 15006;
const OUTBOUND_PORT: u16 = 15001;
/// First port of the excluded inbound ports of the scale sweep.
const EXCLUDED_PORTS_BASE: u16 = 20000;
/// Debian packages the benchmark needs beyond `cargo xtask setup`'s.
const PACKAGES: &[&str] = &[
    "conntrack",
    "libnginx-mod-stream",
    "nginx-light",
    "fonts-dejavu-core",
    "iptables",
    "nftables",
    "bpftool",
    "util-linux",
];
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// redirect's programs, as pinned under `<pin root>/progs/`.
const PROGRAMS: &[&str] = &[
    "rd_connect4",
    "rd_connect6",
    "rd_bind4",
    "rd_bind6",
    "rd_sock_ops",
    "rd_getsockopt",
    "rd_sk_lookup",
];

#[derive(Clone, clap::Args)]
pub struct Opts {
    /// One repetition, short windows, small sweeps, debug binaries: checks the harness (CI).
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of every measurement (default 5; 1 with --quick).
    #[arg(long)]
    pub reps: Option<usize>,
    /// CPU that every benchmark process is pinned to (default: the last one).
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Pods enrolled for the node-scale measurement (default 1000; 20 with --quick).
    #[arg(long)]
    pub pods: Option<usize>,
    /// Directory for the JSON and charts (default `bench/`; `target/bench-quick/` with --quick).
    /// BENCHMARKS.md is written at the workspace root only for a full run into `bench/`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Use target/debug binaries (default with --quick) instead of release.
    #[arg(long)]
    pub debug: bool,
    /// Leave out the nginx proxy.
    #[arg(long)]
    pub no_nginx: bool,
}

/// How traffic reaches the proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Direct,
    Explicit,
    IptablesNft,
    IptablesLegacy,
    IptablesLocalhost,
    Ebpf,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Explicit => "explicit",
            Mode::IptablesNft => "iptables-nft",
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::IptablesLocalhost => "iptables-localhost",
            Mode::Ebpf => "ebpf",
        }
    }

    fn iptables(self) -> Option<(&'static str, Generation)> {
        match self {
            Mode::IptablesNft => Some(("nft", Generation::Passthrough)),
            Mode::IptablesLegacy => Some(("legacy", Generation::Passthrough)),
            Mode::IptablesLocalhost => Some(("nft", Generation::Localhost)),
            _ => None,
        }
    }

    /// Whether the server proxy delivers to 127.0.0.1:P (else POD_IP:P from 127.0.0.6).
    fn loopback_delivery(self) -> bool {
        self == Mode::IptablesLocalhost
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyKind {
    /// `redirect-testbed proxy`: thread per connection, SO_ORIGINAL_DST else getsockname.
    TestProxy,
    /// nginx stream module.
    Nginx,
}

impl ProxyKind {
    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::TestProxy => "test-proxy",
            ProxyKind::Nginx => "nginx",
        }
    }
}

/// One way of running the path: a mode and, except for `direct`, a proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Config {
    mode: Mode,
    proxy: Option<ProxyKind>,
}

impl Config {
    fn label(&self) -> String {
        match self.proxy {
            None => self.mode.name().to_owned(),
            Some(p) => format!("{}/{}", self.mode.name(), p.name()),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    kind: &'static str,
    size: usize,
}

const RR_1B: Workload = Workload {
    name: "rr-1B",
    kind: "rr",
    size: 1,
};
const RR_1K: Workload = Workload {
    name: "rr-1KiB",
    kind: "rr",
    size: 1024,
};
const CRR: Workload = Workload {
    name: "crr-1B",
    kind: "crr",
    size: 1,
};
const BULK: Workload = Workload {
    name: "bulk",
    kind: "bulk",
    size: 0,
};

/// Windows of one measurement.
#[derive(Clone, Copy, Debug, Serialize)]
struct Timing {
    warmup_ms: u64,
    duration_ms: u64,
    bulk_ms: u64,
}

/// The scale dimension of one measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
struct Scale {
    /// Excluded outbound CIDRs and excluded inbound ports, each (0: Istio's defaults only).
    rules: usize,
    /// Pods enrolled with redirect on the node besides the two measured ones.
    extra_pods: usize,
}

/// One measurement, as written to the JSON.
#[derive(Debug, Serialize)]
pub struct Sample {
    phase: &'static str,
    config: String,
    mode: Mode,
    proxy: Option<ProxyKind>,
    workload: &'static str,
    rep: usize,
    rules: usize,
    extra_pods: usize,
    /// The load generator's report (rate, percentiles, CPU).
    load: Value,
    /// Conntrack entries in the two pods after the window (tables flushed before).
    conntrack: u64,
    /// Packets that hit the capture rules during the measurement (iptables modes).
    iptables: Option<BTreeMap<&'static str, u64>>,
    /// redirect's per-pod counter deltas (ebpf mode).
    redirect: Option<BTreeMap<String, u64>>,
    /// Whether the traffic took the path the mode claims, and the evidence.
    path_ok: bool,
    path: String,
}

/// Kernel BPF statistics of one program over one measurement.
#[derive(Debug, Serialize)]
pub struct BpfStat {
    config: String,
    workload: &'static str,
    program: &'static str,
    run_cnt: u64,
    run_time_ns: u64,
    ops: u64,
}

pub fn run(opts: Opts) -> Result<()> {
    let started = Instant::now();
    ensure_root()?;
    let quick = opts.quick;
    let reps = opts.reps.unwrap_or(if quick { 1 } else { 5 });
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = opts.cpu.unwrap_or(cpus - 1);
    let debug = opts.debug || quick;
    let extra_pods = opts
        .pods
        .unwrap_or(if quick { 20 } else { 1000 })
        .saturating_sub(2);
    let root = util::workspace_root();
    let out = opts.out.clone().unwrap_or_else(|| {
        if quick {
            root.join("target/bench-quick")
        } else {
            root.join("bench")
        }
    });
    let timing = if quick {
        Timing {
            warmup_ms: 50,
            duration_ms: 200,
            bulk_ms: 200,
        }
    } else {
        Timing {
            warmup_ms: 200,
            duration_ms: 1500,
            bulk_ms: 1000,
        }
    };
    let rule_counts: Vec<usize> = if quick {
        vec![1, 100]
    } else {
        vec![1, 100, 1000, 10000]
    };

    util::header("bench datapath: packages and binaries");
    packages()?;
    let nginx = !opts.no_nginx && Path::new(NGINX_STREAM_MODULE).exists();
    if !nginx && !opts.no_nginx {
        println!("  nginx stream module not found at {NGINX_STREAM_MODULE}: nginx left out");
    }
    let mut build = util::cargo();
    build.args(["build", "--workspace", "--bins"]);
    build.args(util::HOST_EXCLUDE);
    if !debug {
        build.arg("--release");
    }
    util::run(&mut build)?;
    let bin_dir = util::target_dir()?.join(if debug { "debug" } else { "release" });

    util::header("bench datapath: test bed");
    let bed = Bed::new(&bin_dir, cpu)?;
    println!(
        "  node {} client {} ({}) server {} ({}), everything pinned to CPU {cpu}",
        bed.node.name(),
        bed.client.name,
        bed.client.ip4,
        bed.server.name,
        bed.server.ip4
    );

    let mut configs = vec![Config {
        mode: Mode::Direct,
        proxy: None,
    }];
    let mut proxies = vec![ProxyKind::TestProxy];
    if nginx {
        proxies.push(ProxyKind::Nginx);
    }
    for proxy in &proxies {
        for mode in [
            Mode::Explicit,
            Mode::IptablesNft,
            Mode::IptablesLegacy,
            Mode::IptablesLocalhost,
            Mode::Ebpf,
        ] {
            configs.push(Config {
                mode,
                proxy: Some(*proxy),
            });
        }
    }
    let workloads = [RR_1B, RR_1K, CRR, BULK];
    let scale_modes = [Mode::IptablesNft, Mode::IptablesLegacy, Mode::Ebpf];
    let pods_modes = [Mode::Explicit, Mode::IptablesNft, Mode::Ebpf];

    let total = reps * configs.len() * workloads.len()
        + reps * rule_counts.len() * scale_modes.len()
        + workloads.len() * proxies.len()
        + reps * pods_modes.len() * 2;
    let mut progress = Progress::new(total);
    let mut samples = Vec::new();

    util::header(&format!(
        "bench datapath: {} configurations x {} workloads x {reps} repetitions, interleaved",
        configs.len(),
        workloads.len()
    ));
    for rep in 0..reps {
        for cfg in &configs {
            let running = bed.start(*cfg, Scale::default())?;
            for wl in &workloads {
                let s = bed.measure("main", *cfg, *wl, rep, Scale::default(), timing, &running)?;
                progress.tick(rep, reps, &s);
                samples.push(s);
            }
            bed.stop(running)?;
        }
    }

    util::header("bench datapath: scale sweep (excluded CIDRs and ports), crr-1B, test proxy");
    for rep in 0..reps {
        for &rules in &rule_counts {
            for mode in scale_modes {
                let cfg = Config {
                    mode,
                    proxy: Some(ProxyKind::TestProxy),
                };
                let scale = Scale {
                    rules,
                    extra_pods: 0,
                };
                let t = Instant::now();
                let running = bed.start(cfg, scale)?;
                let setup_ms = t.elapsed().as_secs_f64() * 1e3;
                let mut s = bed.measure("rules", cfg, CRR, rep, scale, timing, &running)?;
                if let Value::Object(m) = &mut s.load {
                    m.insert("setup_ms".into(), json!(setup_ms));
                }
                progress.tick(rep, reps, &s);
                samples.push(s);
                bed.stop(running)?;
            }
        }
    }

    util::header("bench datapath: kernel BPF statistics (ebpf mode, one pass, stats on)");
    let mut bpf = Vec::new();
    {
        let _stats = enable_bpf_stats()?;
        for proxy in &proxies {
            let cfg = Config {
                mode: Mode::Ebpf,
                proxy: Some(*proxy),
            };
            let running = bed.start(cfg, Scale::default())?;
            for wl in &workloads {
                let before = bed.bpf_stats()?;
                let s =
                    bed.measure("bpf-stats", cfg, *wl, 0, Scale::default(), timing, &running)?;
                let after = bed.bpf_stats()?;
                // The statistics also count the warm-up, so divide by every operation.
                let ops = s.load["ops"].as_u64().unwrap_or(0)
                    + s.load["warmup_ops"].as_u64().unwrap_or(0);
                for (prog, (cnt, ns)) in &after {
                    let (c0, n0) = before.get(prog).copied().unwrap_or_default();
                    bpf.push(BpfStat {
                        config: cfg.label(),
                        workload: wl.name,
                        program: prog,
                        run_cnt: cnt - c0,
                        run_time_ns: ns - n0,
                        ops,
                    });
                }
                progress.tick(0, 1, &s);
                samples.push(s);
            }
            bed.stop(running)?;
        }
    }

    util::header(&format!(
        "bench datapath: node scale, {} more pods enrolled",
        extra_pods
    ));
    let t = Instant::now();
    let crowd = Crowd::new(&bed, extra_pods)?;
    let crowd_create_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    crowd.enroll(&bed)?;
    let crowd_enroll_s = t.elapsed().as_secs_f64();
    println!(
        "  created {extra_pods} netns+cgroup pods in {crowd_create_s:.1}s, enrolled them in \
         {crowd_enroll_s:.1}s ({:.1} ms per pod)",
        crowd_enroll_s * 1e3 / extra_pods.max(1) as f64
    );
    let scale = Scale {
        rules: 0,
        extra_pods,
    };
    for rep in 0..reps {
        for mode in pods_modes {
            let cfg = Config {
                mode,
                proxy: Some(ProxyKind::TestProxy),
            };
            let running = bed.start(cfg, scale)?;
            for wl in [RR_1B, CRR] {
                let s = bed.measure("pods", cfg, wl, rep, scale, timing, &running)?;
                progress.tick(rep, reps, &s);
                samples.push(s);
            }
            bed.stop(running)?;
        }
    }
    let t = Instant::now();
    crowd.unenroll(&bed)?;
    let crowd_unenroll_s = t.elapsed().as_secs_f64();
    drop(crowd);

    let bad: Vec<String> = samples
        .iter()
        .filter(|s| !s.path_ok)
        .map(|s| format!("{} {} rep {}: {}", s.config, s.workload, s.rep, s.path))
        .collect();

    let results = json!({
        "meta": meta(&opts, reps, cpu, timing, nginx, started.elapsed().as_secs_f64())?,
        "crowd": {
            "extra_pods": extra_pods,
            "create_s": crowd_create_s,
            "enroll_s": crowd_enroll_s,
            "unenroll_s": crowd_unenroll_s,
        },
        "samples": samples,
        "bpf_stats": bpf,
    });
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json_path = out.join("datapath.json");
    fs::write(&json_path, serde_json::to_string_pretty(&results)?)?;
    println!("\n  wrote {}", json_path.display());
    let md_path = if out == root.join("bench") {
        root.join("BENCHMARKS.md")
    } else {
        out.join("BENCHMARKS.md")
    };
    super::report::write(&results, &out, &md_path)?;
    println!("  wrote {}", md_path.display());
    ensure!(
        bad.is_empty(),
        "{} measurement(s) did not take the path their mode claims:\n  {}",
        bad.len(),
        bad.join("\n  ")
    );
    println!(
        "\nbench datapath done in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn ensure_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "bench datapath needs root (network namespaces, cgroups, iptables, eBPF)"
    );
    Ok(())
}

fn packages() -> Result<()> {
    crate::setup::debian_packages(PACKAGES)
}

fn meta(
    opts: &Opts,
    reps: usize,
    cpu: usize,
    timing: Timing,
    nginx: bool,
    elapsed_s: f64,
) -> Result<Value> {
    let sh = |prog: &str, args: &[&str]| {
        util::output_if_success(Command::new(prog).args(args))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem_kb = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .unwrap_or(0);
    let mut command = String::from("cargo xtask bench");
    if opts.quick {
        command.push_str(" --quick");
    }
    if let Some(r) = opts.reps {
        command.push_str(&format!(" --reps {r}"));
    }
    Ok(json!({
        "command": command,
        "date": sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "kernel": sh("uname", &["-r"]),
        "cpu_model": model,
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "mem_gib": mem_kb as f64 / 1024.0 / 1024.0,
        "os": sh("sh", &["-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "iptables": sh("iptables", &["--version"]),
        "nginx": if nginx { sh("sh", &["-c", "nginx -v 2>&1"]) } else { String::new() },
        "quick": opts.quick,
        "reps": reps,
        "pinned_cpu": cpu,
        "timing": timing,
        "elapsed_s": elapsed_s,
        // Other work on the machine during the run (the benchmark's own CPU is one of them).
        "loadavg_end": fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "profile": if opts.debug || opts.quick { "debug" } else { "release" },
    }))
}

struct Progress {
    total: usize,
    done: usize,
    start: Instant,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress {
            total,
            done: 0,
            start: Instant::now(),
        }
    }

    fn tick(&mut self, rep: usize, reps: usize, s: &Sample) {
        self.done += 1;
        let el = self.start.elapsed().as_secs_f64();
        let eta = el / self.done as f64 * (self.total.saturating_sub(self.done)) as f64;
        let l = &s.load;
        let f = |k: &str| l[k].as_f64().unwrap_or(f64::NAN);
        let ops = f("ops");
        let figures = if s.workload == "bulk" {
            format!(
                "{:7.2} GiB/s  cpu {:6.2} s/GiB",
                f("rate") / (1u64 << 30) as f64,
                f("cgroup_cpu_us") / 1e6 / (ops / (1u64 << 30) as f64)
            )
        } else {
            format!(
                "{:8.0}/s p50 {:7.1}us p99 {:7.1}us cpu {:6.1}us/op",
                f("rate"),
                f("p50_us"),
                f("p99_us"),
                f("cgroup_cpu_us") / ops
            )
        };
        let scale = match (s.rules, s.extra_pods) {
            (0, 0) => String::new(),
            (0, p) => format!(" +{p} pods"),
            (r, _) => format!(" N={r}"),
        };
        println!(
            "[{:4}/{:4} {:4.0}s eta {:4.0}s] rep {}/{} {:<28} {:<8}{:<8} {figures} ct {:5} {}",
            self.done,
            self.total,
            el,
            eta,
            rep + 1,
            reps,
            s.config,
            s.workload,
            scale,
            s.conntrack,
            if s.path_ok { "ok" } else { "PATH?" }
        );
        util::flush();
    }
}

// ---------------------------------------------------------------------------------------------
// The test bed

struct Bed {
    node: Node,
    client: Pod,
    server: Pod,
    testbed: PathBuf,
    agent: PathBuf,
    pin_root: PathBuf,
    state_dir: PathBuf,
    cpu: usize,
    _echo: PodProcess,
}

/// What one configuration started; undone by [`Bed::stop`] (or, best effort, on drop).
struct Running {
    cfg: Config,
    proxies: Vec<PodProcess>,
    enrolled: Vec<String>,
    iptables: Option<&'static str>,
    pods: Vec<String>,
    agent: PathBuf,
    pin_root: PathBuf,
    state_dir: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        for p in &mut self.proxies {
            let _ = p.kill();
        }
        for name in std::mem::take(&mut self.enrolled) {
            let _ = agent_cmd(&self.agent, &self.pin_root, &self.state_dir)
                .args(["unenroll", "--name", &name])
                .output();
        }
        if let Some(backend) = self.iptables.take() {
            for pod in &self.pods {
                let _ = remove_rules(pod, backend);
            }
        }
    }
}

fn agent_cmd(agent: &Path, pin_root: &Path, state_dir: &Path) -> Command {
    let mut c = Command::new(agent);
    c.env("REDIRECT_PIN_ROOT", pin_root)
        .env("REDIRECT_STATE_DIR", state_dir)
        .stdin(Stdio::null());
    c
}

/// Runs `cmd`, returning stdout; a failure carries stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", util::display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            util::display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn in_netns(pod: &str, prog: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", pod, prog]);
    c
}

fn remove_rules(pod: &str, backend: &str) -> Result<()> {
    match backend {
        // Deleting the table (not only flushing it) unregisters its hooks, and with them
        // conntrack, so the next mode in this namespace starts clean.
        "nft" => {
            let _ = output(in_netns(pod, "nft").args(["delete", "table", "ip", "nat"]));
        }
        _ => {
            output(in_netns(pod, "iptables-legacy").args(["-t", "nat", "-F"]))?;
            output(in_netns(pod, "iptables-legacy").args(["-t", "nat", "-X"]))?;
        }
    }
    Ok(())
}

impl Bed {
    fn new(bin_dir: &Path, cpu: usize) -> Result<Bed> {
        let testbed = bin_dir.join("redirect-testbed");
        let agent = bin_dir.join("redirect-agent");
        for b in [&testbed, &agent] {
            ensure!(b.exists(), "{} is missing", b.display());
        }
        sweep_stale();
        let pid = std::process::id();
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/redirect-bench-{pid}"));
        let state_dir = PathBuf::from(format!("/tmp/redirect-bench-{pid}"));
        let node = Node::new()?;
        let client = node.add_pod("bench-client")?;
        let server = node.add_pod("bench-server")?;
        for pod in [&client, &server] {
            // Inside the pods' own namespaces only: a wide ephemeral range, and no TIME_WAIT
            // pile-up, so that connect-request-close runs do not run out of ports (the
            // 127.0.0.6 delivery binds its source port before connecting).
            output(in_netns(&pod.name, "sysctl").args([
                "-qw",
                "net.ipv4.ip_local_port_range=1024 65000",
                "net.ipv4.tcp_max_tw_buckets=0",
            ]))?;
        }
        let mut echo = Command::new("taskset");
        echo.arg("-c")
            .arg(cpu.to_string())
            .arg(&testbed)
            .args(["echo", "--plain", "--listen"])
            .arg(format!("0.0.0.0:{APP_PORT}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut echo = server.spawn(APP_UID, echo)?;
        echo.wait_for_listen(
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), APP_PORT),
            Duration::from_secs(5),
        )?;
        Ok(Bed {
            node,
            client,
            server,
            testbed,
            agent,
            pin_root,
            state_dir,
            cpu,
            _echo: echo,
        })
    }

    fn agent(&self) -> Command {
        agent_cmd(&self.agent, &self.pin_root, &self.state_dir)
    }

    fn server_app(&self) -> SocketAddr {
        SocketAddr::new(self.server.ip4.into(), APP_PORT)
    }

    /// The exclusions of the scale sweep: N /32s of 198.18.0.0/15 outside the node's /24,
    /// and N ports from 20000.
    fn exclusions(&self, n: usize) -> Exclusions {
        let (net, _) = self.node.subnet4();
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
        let node_net = u32::from(net);
        let cidrs = (1u32..)
            .map(|i| base + i)
            .filter(|a| a & 0xffff_ff00 != node_net && a & 0xff != 0)
            .take(n)
            .map(|a| format!("{}/32", Ipv4Addr::from(a)))
            .collect();
        Exclusions {
            inbound_ports: (0..n).map(|i| EXCLUDED_PORTS_BASE + i as u16).collect(),
            outbound_cidrs: cidrs,
        }
    }

    fn start(&self, cfg: Config, scale: Scale) -> Result<Running> {
        let mut running = Running {
            cfg,
            proxies: Vec::new(),
            enrolled: Vec::new(),
            iptables: None,
            pods: vec![self.client.name.clone(), self.server.name.clone()],
            agent: self.agent.clone(),
            pin_root: self.pin_root.clone(),
            state_dir: self.state_dir.clone(),
        };
        let excl = self.exclusions(scale.rules);
        if let Some((backend, generation)) = cfg.mode.iptables() {
            running.iptables = Some(backend);
            let input = istio::restore_input(generation, &excl);
            for pod in [&self.client, &self.server] {
                util::run_with_input(
                    in_netns(&pod.name, &format!("iptables-{backend}-restore")).arg("--noflush"),
                    &input,
                )
                .with_context(|| format!("installing the iptables rules in {}", pod.name))?;
            }
        }
        if cfg.mode == Mode::Ebpf {
            for (name, pod) in [
                ("bench-client", &self.client),
                ("bench-server", &self.server),
            ] {
                let mut cmd = self.agent();
                cmd.args(["enroll", "--name", name, "--cgroup"])
                    .arg(&pod.cgroup)
                    .arg("--netns")
                    .arg(&pod.netns_path)
                    .arg("--pod-ip")
                    .arg(pod.ip4.to_string());
                for chunk in excl.outbound_cidrs.chunks(500) {
                    cmd.arg("--exclude-outbound-cidrs").arg(chunk.join(","));
                }
                for chunk in excl.inbound_ports.chunks(1000) {
                    let ports: Vec<String> = chunk.iter().map(u16::to_string).collect();
                    cmd.arg("--exclude-inbound-ports").arg(ports.join(","));
                }
                output(&mut cmd).context("enrolling a bench pod")?;
                running.enrolled.push(name.to_owned());
            }
        }
        if let Some(kind) = cfg.proxy {
            for (side, pod) in [("client", &self.client), ("server", &self.server)] {
                let p = match kind {
                    ProxyKind::TestProxy => self.spawn_test_proxy(cfg.mode, side, pod)?,
                    ProxyKind::Nginx => self.spawn_nginx(cfg.mode, side, pod)?,
                };
                running.proxies.push(p);
            }
            for p in &mut running.proxies {
                for port in [INBOUND_PORT, OUTBOUND_PORT] {
                    p.wait_for_listen(
                        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
                        Duration::from_secs(5),
                    )?;
                }
            }
        }
        Ok(running)
    }

    fn stop(&self, mut running: Running) -> Result<()> {
        for p in &mut running.proxies {
            // nginx's master stops its workers on SIGTERM; SIGKILL would orphan them.
            // SAFETY: kill has no memory preconditions; the pid is our own child.
            unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while p.child_mut().try_wait()?.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            p.kill()?;
        }
        running.proxies.clear();
        // Whatever a proxy left behind (it is all uid 1337: the application is never stopped).
        for pod in [&self.client, &self.server] {
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let strays = pids_of_uid(&pod.cgroup, PROXY_UID);
                if strays.is_empty() {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "proxy processes {strays:?} in {} do not go away",
                    pod.name
                );
                for pid in strays {
                    // SAFETY: as above; the pid is in a cgroup that only this run uses.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for name in std::mem::take(&mut running.enrolled) {
            output(self.agent().args(["unenroll", "--name", &name]))?;
        }
        if let Some(backend) = running.iptables.take() {
            for pod in [&self.client, &self.server] {
                remove_rules(&pod.name, backend)?;
            }
        }
        Ok(())
    }

    fn pinned(&self, cmd: &mut Command) -> Command {
        let mut t = Command::new("taskset");
        t.arg("-c").arg(self.cpu.to_string()).arg(cmd.get_program());
        t.args(cmd.get_args());
        t
    }

    fn spawn_test_proxy(&self, mode: Mode, side: &str, pod: &Pod) -> Result<PodProcess> {
        let mut cmd = Command::new(&self.testbed);
        cmd.arg("proxy").args([
            "--delivery",
            if mode.loopback_delivery() {
                "loopback"
            } else {
                "pod-ip"
            },
        ]);
        if mode == Mode::Explicit {
            let upstream = match side {
                "client" => SocketAddr::new(self.server.ip4.into(), INBOUND_PORT),
                _ => self.server_app(),
            };
            cmd.arg("--upstream").arg(upstream.to_string());
        }
        let mut cmd = self.pinned(&mut cmd);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        pod.spawn(PROXY_UID, cmd)
    }

    /// nginx's stream module as the sidecar. It cannot read SO_ORIGINAL_DST, so outbound it
    /// always goes to the server's application; inbound it goes to `$server_addr:$server_port`
    /// (the original destination when capture keeps it, as sk_lookup does) and to the
    /// application's fixed address when the local port is the capture port (REDIRECT).
    fn spawn_nginx(&self, mode: Mode, side: &str, pod: &Pod) -> Result<PodProcess> {
        let dir = self
            .node
            .scratch_dir()
            .join(format!("nginx-{side}-{}", mode.name()));
        fs::create_dir_all(dir.join("logs"))?;
        let app = self.server_app();
        let server_block = match (side, mode) {
            ("client", Mode::Explicit) => format!(
                "server {{ listen {OUTBOUND_PORT}; proxy_pass {}:{INBOUND_PORT}; }}\n\
                 server {{ listen {INBOUND_PORT}; proxy_pass {app}; }}",
                self.server.ip4
            ),
            ("client", _) => format!(
                "server {{ listen {OUTBOUND_PORT}; proxy_pass {app}; }}\n\
                 server {{ listen {INBOUND_PORT}; proxy_pass {app}; }}"
            ),
            (_, Mode::IptablesLocalhost) => format!(
                "server {{ listen {INBOUND_PORT}; proxy_pass 127.0.0.1:{APP_PORT}; }}\n\
                 server {{ listen {OUTBOUND_PORT}; proxy_pass {app}; }}"
            ),
            _ => format!(
                "map $server_port $inbound_upstream {{ {INBOUND_PORT} {app}; \
                 default $server_addr:$server_port; }}\n\
                 server {{ listen {INBOUND_PORT}; proxy_bind 127.0.0.6; \
                 proxy_pass $inbound_upstream; }}\n\
                 server {{ listen {OUTBOUND_PORT}; proxy_pass {app}; }}"
            ),
        };
        let conf = format!(
            "load_module {NGINX_STREAM_MODULE};\n\
             daemon off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
             error_log {dir}/logs/error.log error;\n\
             events {{ worker_connections 8192; }}\n\
             stream {{\n{server_block}\n}}\n",
            dir = dir.display()
        );
        fs::write(dir.join("nginx.conf"), conf)?;
        chown_r(&dir, PROXY_UID)?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"));
        let mut cmd = self.pinned(&mut cmd);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        pod.spawn(PROXY_UID, cmd)
    }

    fn conntrack(&self) -> Result<u64> {
        let mut n = 0;
        for pod in [&self.client, &self.server] {
            let out = in_netns(&pod.name, "conntrack")
                .arg("-C")
                .output()
                .context("running conntrack -C")?;
            n += String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
        Ok(n)
    }

    fn flush_conntrack(&self) {
        for pod in [&self.client, &self.server] {
            let _ = in_netns(&pod.name, "conntrack")
                .arg("-F")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    fn iptables_counts(&self, backend: &str) -> Result<[Vec<(String, u64)>; 2]> {
        let save = |pod: &Pod| -> Result<Vec<(String, u64)>> {
            let out = output(
                in_netns(&pod.name, &format!("iptables-{backend}-save")).args(["-c", "-t", "nat"]),
            )?;
            Ok(istio::packet_counts(&out))
        };
        Ok([save(&self.client)?, save(&self.server)?])
    }

    /// `name -> counters` of the enrolled bench pods.
    fn redirect_counters(&self) -> Result<BTreeMap<String, BTreeMap<String, u64>>> {
        let out = output(self.agent().args(["stats", "--output", "json"]))?;
        let v: Value = serde_json::from_str(&out)?;
        let mut m = BTreeMap::new();
        for p in v["pods"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or_default();
            if !name.starts_with("bench-") {
                continue;
            }
            let counters = p["counters"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect();
            m.insert(name.to_owned(), counters);
        }
        Ok(m)
    }

    /// `program -> (run_cnt, run_time_ns)` of redirect's pinned programs.
    fn bpf_stats(&self) -> Result<BTreeMap<&'static str, (u64, u64)>> {
        let mut m = BTreeMap::new();
        for prog in PROGRAMS {
            let path = self.pin_root.join("progs").join(prog);
            if !path.exists() {
                continue;
            }
            let out = output(
                Command::new("bpftool")
                    .args(["-j", "prog", "show", "pinned"])
                    .arg(&path),
            )?;
            let v: Value = serde_json::from_str(&out)?;
            m.insert(
                *prog,
                (
                    v["run_cnt"].as_u64().unwrap_or(0),
                    v["run_time_ns"].as_u64().unwrap_or(0),
                ),
            );
        }
        Ok(m)
    }

    #[allow(clippy::too_many_arguments)]
    fn measure(
        &self,
        phase: &'static str,
        cfg: Config,
        wl: Workload,
        rep: usize,
        scale: Scale,
        timing: Timing,
        running: &Running,
    ) -> Result<Sample> {
        debug_assert_eq!(running.cfg, cfg);
        let to = match cfg.mode {
            Mode::Explicit => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
            _ => self.server_app(),
        };
        self.flush_conntrack();
        let ipt_before = match cfg.mode.iptables() {
            Some((b, _)) => Some(self.iptables_counts(b)?),
            None => None,
        };
        let rd_before = match cfg.mode {
            Mode::Ebpf => Some(self.redirect_counters()?),
            _ => None,
        };
        let duration = if wl.kind == "bulk" {
            timing.bulk_ms
        } else {
            timing.duration_ms
        };
        let mut cmd = Command::new(&self.testbed);
        cmd.arg("load")
            .args(["--to", &to.to_string()])
            .args(["--workload", wl.kind])
            .args(["--size", &wl.size.to_string()])
            .args(["--duration-ms", &duration.to_string()])
            .args(["--warmup-ms", &timing.warmup_ms.to_string()])
            .args(["--cpu", &self.cpu.to_string()])
            .args(["--timeout-ms", "10000"])
            .arg("--cpu-stat")
            .arg(self.client.cgroup.join("cpu.stat"))
            .arg("--cpu-stat")
            .arg(self.server.cgroup.join("cpu.stat"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut p = self.client.spawn(APP_UID, cmd)?;
        let child = p.child_mut();
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut out)?;
        let mut err = String::new();
        child
            .stderr
            .take()
            .expect("piped")
            .read_to_string(&mut err)?;
        let status = child.wait()?;
        let load: Value = match serde_json::from_str(out.trim()) {
            Ok(v) if status.success() => v,
            // Recorded, not fatal: one stalled measurement must not lose the whole run.
            _ => {
                let why = err.lines().take(3).collect::<Vec<_>>().join(" / ");
                json!({ "error": format!("load generator failed ({status}): {why}") })
            }
        };
        if let Some(e) = load["error"].as_str() {
            return Ok(Sample {
                phase,
                config: cfg.label(),
                mode: cfg.mode,
                proxy: cfg.proxy,
                workload: wl.name,
                rep,
                rules: scale.rules,
                extra_pods: scale.extra_pods,
                conntrack: self.conntrack()?,
                load: load.clone(),
                iptables: None,
                redirect: None,
                path_ok: false,
                path: e.to_owned(),
            });
        }
        let conntrack = self.conntrack()?;
        let ops = load["ops"].as_u64().unwrap_or(0);

        let mut iptables = None;
        let mut redirect = None;
        let mut checks: Vec<(bool, String)> = Vec::new();
        if let (Some(before), Some((backend, generation))) = (&ipt_before, cfg.mode.iptables()) {
            let after = self.iptables_counts(backend)?;
            let d = |i: usize, rule: &[&str]| {
                istio::packets_of(&after[i], rule)
                    .saturating_sub(istio::packets_of(&before[i], rule))
            };
            let m = BTreeMap::from([
                ("client_outbound_redirect", d(0, istio::OUTBOUND_REDIRECT)),
                ("server_inbound_redirect", d(1, istio::INBOUND_REDIRECT)),
                ("server_passthrough_return", d(1, istio::PASSTHROUGH_RETURN)),
            ]);
            let want_conns = if wl.kind == "crr" { ops } else { 1 };
            checks.push((
                m["client_outbound_redirect"] >= want_conns,
                format!(
                    "client REDIRECT 15001 pkts {}",
                    m["client_outbound_redirect"]
                ),
            ));
            checks.push((
                m["server_inbound_redirect"] >= want_conns,
                format!(
                    "server REDIRECT 15006 pkts {}",
                    m["server_inbound_redirect"]
                ),
            ));
            if generation == Generation::Passthrough {
                checks.push((
                    m["server_passthrough_return"] >= want_conns,
                    format!("127.0.0.6 RETURN pkts {}", m["server_passthrough_return"]),
                ));
            }
            checks.push((conntrack > 0, format!("conntrack {conntrack}")));
            iptables = Some(m);
        }
        if let Some(before) = &rd_before {
            let after = self.redirect_counters()?;
            let d = |pod: &str, c: &str| {
                let get = |m: &BTreeMap<String, BTreeMap<String, u64>>| {
                    m.get(pod).and_then(|x| x.get(c)).copied().unwrap_or(0)
                };
                get(&after).saturating_sub(get(before))
            };
            let m = BTreeMap::from([
                (
                    "client_outbound_captured".to_owned(),
                    d("bench-client", "outbound_captured"),
                ),
                (
                    "server_inbound_captured".to_owned(),
                    d("bench-server", "inbound_captured"),
                ),
                (
                    "server_delivered_pod_ip".to_owned(),
                    d("bench-server", "delivered_pod_ip"),
                ),
                (
                    "server_delivered_loopback".to_owned(),
                    d("bench-server", "delivered_loopback"),
                ),
                (
                    "map_full".to_owned(),
                    d("bench-client", "map_full") + d("bench-server", "map_full"),
                ),
            ]);
            let want_conns = if wl.kind == "crr" { ops } else { 1 };
            for k in [
                "client_outbound_captured",
                "server_inbound_captured",
                "server_delivered_pod_ip",
            ] {
                checks.push((m[k] >= want_conns, format!("{k} {}", m[k])));
            }
            checks.push((conntrack == 0, format!("conntrack {conntrack}")));
            redirect = Some(m);
        }
        if matches!(cfg.mode, Mode::Direct | Mode::Explicit) {
            checks.push((conntrack == 0, format!("conntrack {conntrack}")));
        }
        checks.push((ops > 0, format!("ops {ops}")));
        Ok(Sample {
            phase,
            config: cfg.label(),
            mode: cfg.mode,
            proxy: cfg.proxy,
            workload: wl.name,
            rep,
            rules: scale.rules,
            extra_pods: scale.extra_pods,
            load,
            conntrack,
            iptables,
            redirect,
            path_ok: checks.iter().all(|(ok, _)| *ok),
            path: checks
                .iter()
                .map(|(ok, s)| format!("{}{s}", if *ok { "" } else { "FAILED " }))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.pin_root);
        let _ = fs::remove_dir_all(&self.state_dir);
    }
}

/// Processes of `uid` in a cgroup.
fn pids_of_uid(cgroup: &Path, uid: u32) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt as _;
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|pid| fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == uid))
        .collect()
}

fn chown_r(dir: &Path, uid: u32) -> Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            chown_r(&p, uid)?;
        } else {
            std::os::unix::fs::chown(&p, Some(uid), Some(uid))?;
        }
    }
    Ok(())
}

/// Turns on the kernel's BPF run-time statistics for as long as the returned fd is open
/// (`BPF_ENABLE_STATS`, kernel >= 5.8), instead of the machine-wide sysctl.
fn enable_bpf_stats() -> Result<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr { struct { __u32 type; } enable_stats; }, BPF_STATS_RUN_TIME = 0.
    let attr = [0u32; 4];
    // SAFETY: the attribute buffer is valid for its size for the duration of the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    ensure!(
        fd >= 0,
        "BPF_ENABLE_STATS failed: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

// ---------------------------------------------------------------------------------------------
// Many pods, for the node-scale measurement

/// Cheap pods: a bare network namespace with an address on `lo`, and an empty cgroup, named
/// `rdb-<pid>-<i>`. Their addresses come from /24s leased by extra test-bed nodes, so no
/// other live test on the machine has them.
struct Crowd {
    pid: u32,
    names: Vec<(String, Ipv4Addr)>,
    cgroup_root: PathBuf,
    _nodes: Vec<Node>,
}

const CROWD_PREFIX: &str = "rdb-";

impl Crowd {
    fn new(_bed: &Bed, n: usize) -> Result<Crowd> {
        let pid = std::process::id();
        let cgroup_root = redirect_testbed::cgroup2_mount()?.join(format!("redirect-bench-{pid}"));
        fs::create_dir_all(&cgroup_root)?;
        let mut nodes = Vec::new();
        let mut addrs = Vec::new();
        while addrs.len() < n {
            let node = Node::new()?;
            let (net, _) = node.subnet4();
            let base = u32::from(net);
            addrs.extend((2..255).map(|h| Ipv4Addr::from(base + h)));
            nodes.push(node);
        }
        addrs.truncate(n);
        let names: Vec<(String, Ipv4Addr)> = addrs
            .into_iter()
            .enumerate()
            .map(|(i, a)| (format!("{CROWD_PREFIX}{pid}-{i}"), a))
            .collect();
        let crowd = Crowd {
            pid,
            names,
            cgroup_root,
            _nodes: nodes,
        };
        let mut batch = String::new();
        for (name, _) in &crowd.names {
            batch.push_str(&format!("netns add {name}\n"));
            fs::create_dir_all(crowd.cgroup_root.join(name))?;
        }
        util::ip_batch(&batch)?;
        let chunks: Vec<_> = crowd
            .names
            .chunks(crowd.names.len().div_ceil(4).max(1))
            .collect();
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = chunks
                .iter()
                .map(|chunk| {
                    s.spawn(move || -> Result<()> {
                        for (name, ip) in chunk.iter() {
                            output(Command::new("ip").args([
                                "-n",
                                name,
                                "addr",
                                "add",
                                &format!("{ip}/32"),
                                "dev",
                                "lo",
                            ]))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
            }
            Ok(())
        })?;
        Ok(crowd)
    }

    fn enroll(&self, bed: &Bed) -> Result<()> {
        for (i, (name, ip)) in self.names.iter().enumerate() {
            output(
                bed.agent()
                    .args(["enroll", "--name", name, "--cgroup"])
                    .arg(self.cgroup_root.join(name))
                    .args(["--netns", &format!("/var/run/netns/{name}")])
                    .args(["--pod-ip", &ip.to_string()]),
            )
            .with_context(|| format!("enrolling crowd pod {name}"))?;
            if (i + 1) % 100 == 0 {
                println!("  enrolled {}/{}", i + 1, self.names.len());
                util::flush();
            }
        }
        Ok(())
    }

    fn unenroll(&self, bed: &Bed) -> Result<()> {
        for (name, _) in &self.names {
            output(bed.agent().args(["unenroll", "--name", name]))?;
        }
        Ok(())
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        remove_crowd(self.pid);
    }
}

/// Removes the crowd pods, cgroups, pins and state of benchmark process `pid`.
fn remove_crowd(pid: u32) {
    let prefix = format!("{CROWD_PREFIX}{pid}-");
    let batch: String = fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .map(|n| format!("netns del {n}\n"))
        .collect();
    if !batch.is_empty() {
        let _ = util::ip_batch(&batch);
    }
    if let Ok(cg) = redirect_testbed::cgroup2_mount() {
        let root = cg.join(format!("redirect-bench-{pid}"));
        for e in fs::read_dir(&root).into_iter().flatten().flatten() {
            let _ = fs::remove_dir(e.path());
        }
        let _ = fs::remove_dir(&root);
    }
}

/// Leftovers of benchmark runs whose process is gone.
fn sweep_stale() {
    let dead = |pid: &str| !Path::new(&format!("/proc/{pid}")).exists();
    let mut pids: Vec<u32> = Vec::new();
    for e in fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(rest) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix(CROWD_PREFIX))
        {
            if let Some(pid) = rest.split('-').next().and_then(|p| p.parse().ok()) {
                pids.push(pid);
            }
        }
    }
    for dir in ["/sys/fs/bpf", "/tmp"] {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Some(pid) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("redirect-bench-"))
                .and_then(|p| p.parse::<u32>().ok())
            {
                if dead(&pid.to_string()) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
    if let Ok(cg) = redirect_testbed::cgroup2_mount() {
        for e in fs::read_dir(&cg).into_iter().flatten().flatten() {
            if let Some(pid) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("redirect-bench-"))
                .and_then(|p| p.parse::<u32>().ok())
            {
                pids.push(pid);
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        if dead(&pid.to_string()) {
            remove_crowd(pid);
        }
    }
}
