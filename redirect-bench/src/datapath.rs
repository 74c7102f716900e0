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
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use redirect_devtools as dev;
use serde_json::{json, Value};

use crate::bed::{Bed, NGINX_STREAM_MODULE};
use crate::crowd::Crowd;
use crate::modes::{
    BpfStat, Config, Mode, ProxyKind, Sample, Scale, Timing, Workload, BULK, CRR, RR_1B, RR_1K,
};
use crate::report::{Groups, Key};

/// Debian packages the benchmark needs beyond `cargo xtask setup`'s.
pub(crate) const PACKAGES: &[&str] = &[
    "conntrack",
    "libnginx-mod-stream",
    "nginx-light",
    "fonts-dejavu-core",
    "iptables",
    "nftables",
    "bpftool",
    "util-linux",
    "haproxy",
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
    /// Leave out the HAProxy proxy.
    #[arg(long)]
    pub no_haproxy: bool,
    /// Time budget of the whole run in seconds (default 1140; 0 with --quick): after the fixed
    /// repetitions, more rounds of the comparisons whose interval is too wide to decide are
    /// measured while the budget lasts.
    #[arg(long)]
    pub budget_s: Option<u64>,
}

pub fn run(opts: Opts) -> Result<()> {
    let started = Instant::now();
    crate::sys::ensure_root(
        "bench datapath needs root (network namespaces, cgroups, iptables, eBPF)",
    )?;
    let quick = opts.quick;
    let reps = opts.reps.unwrap_or(if quick { 1 } else { 5 });
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = opts.cpu.unwrap_or(cpus - 1);
    let debug = opts.debug || quick;
    let extra_pods = opts
        .pods
        .unwrap_or(if quick { 20 } else { 1000 })
        .saturating_sub(2);
    let root = dev::workspace_root();
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
        // Shorter windows and more rounds: the intervals come from the spread between rounds,
        // which more rounds narrow and longer windows do not.
        Timing {
            warmup_ms: 200,
            duration_ms: 1000,
            bulk_ms: 700,
        }
    };
    let budget = Duration::from_secs(opts.budget_s.unwrap_or(if quick { 0 } else { 1140 }));
    let rule_counts: Vec<usize> = if quick {
        vec![1, 100]
    } else {
        vec![1, 100, 1000, 10000]
    };

    dev::header("bench datapath: packages and binaries");
    dev::debian_packages(PACKAGES)?;
    let nginx = !opts.no_nginx && Path::new(NGINX_STREAM_MODULE).exists();
    if !nginx && !opts.no_nginx {
        println!("  nginx stream module not found at {NGINX_STREAM_MODULE}: nginx left out");
    }
    let mut build = dev::cargo();
    build.args(["build", "--workspace", "--bins"]);
    build.args(dev::HOST_EXCLUDE);
    if !debug {
        build.arg("--release");
    }
    dev::run(&mut build)?;
    let bin_dir = dev::target_dir()?.join(if debug { "debug" } else { "release" });

    dev::header("bench datapath: test bed");
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
    let haproxy =
        !opts.no_haproxy && dev::output_if_success(Command::new("haproxy").arg("-v")).is_some();
    if haproxy {
        proxies.push(ProxyKind::Haproxy);
    } else if !opts.no_haproxy {
        println!("  haproxy not found: HAProxy left out");
    }
    for proxy in &proxies {
        for mode in [
            Mode::Explicit,
            Mode::ExplicitEnrolled,
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

    let per_round: usize = configs
        .iter()
        .map(|c| {
            if c.mode == Mode::ExplicitEnrolled {
                1
            } else {
                workloads.len()
            }
        })
        .sum();
    let total = reps * per_round
        + reps * rule_counts.len() * scale_modes.len()
        + 3 * proxies.len()
        + reps * pods_modes.len() * 2;
    let mut progress = Progress::new(total);
    let mut samples = Vec::new();

    dev::header(&format!(
        "bench datapath: {} configurations x {} workloads x {reps} repetitions, interleaved",
        configs.len(),
        workloads.len()
    ));
    for rep in 0..reps {
        for cfg in &configs {
            let running = bed.start(*cfg, Scale::default())?;
            for wl in &workloads {
                if cfg.mode == Mode::ExplicitEnrolled && wl.kind != "crr" {
                    continue;
                }
                let s = bed.measure("main", *cfg, *wl, rep, Scale::default(), timing, &running)?;
                progress.tick(rep, reps, &s);
                samples.push(s);
            }
            bed.stop(running)?;
        }
    }

    dev::header("bench datapath: scale sweep (excluded CIDRs and ports), crr-1B, test proxy");
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

    dev::header("bench datapath: kernel BPF statistics (ebpf mode, one pass, stats on)");
    // rr-1B shows that kept connections run no program; crr-1B what setup costs, also with the
    // programs attached but nothing redirected (explicit+enrolled).
    let bpf = stats_pass(
        &bed,
        &proxies,
        &[
            (Mode::Ebpf, &[RR_1B, CRR][..]),
            (Mode::ExplicitEnrolled, &[CRR][..]),
        ],
        timing,
        &mut progress,
        &mut samples,
    )?;

    dev::header(&format!(
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

    let extra_rounds = more_rounds(&bed, &proxies, reps, timing, started, budget, &mut samples)?;

    let bad: Vec<String> = samples
        .iter()
        .filter(|s| !s.path_ok)
        .map(|s| format!("{} {} rep {}: {}", s.config, s.workload, s.rep, s.path))
        .collect();

    let results = json!({
        "meta": meta(&opts, reps, cpu, timing, nginx, started.elapsed().as_secs_f64())?,
        "extra_rounds": extra_rounds,
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
    crate::report::write(&results, &out, &md_path)?;
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

/// One measurement of each (mode, workloads) of `plan` per proxy with the kernel's BPF
/// statistics on (`BPF_ENABLE_STATS`, for this pass only: they add two clock reads to every
/// program run), and each program's runs and run time over it.
pub(crate) fn stats_pass(
    bed: &Bed,
    proxies: &[ProxyKind],
    plan: &[(Mode, &[Workload])],
    timing: Timing,
    progress: &mut Progress,
    samples: &mut Vec<Sample>,
) -> Result<Vec<BpfStat>> {
    let mut bpf = Vec::new();
    let _stats = crate::sys::enable_bpf_stats()?;
    for proxy in proxies {
        for (mode, wls) in plan {
            let cfg = Config {
                mode: *mode,
                proxy: Some(*proxy),
            };
            let running = bed.start(cfg, Scale::default())?;
            for wl in *wls {
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
    Ok(bpf)
}

/// The comparisons the adaptive rounds try to decide: `ebpf` against `explicit` and
/// `iptables-nft` (the issue's targets), per proxy, for latency and CPU of rr-1B and crr-1B.
const DECIDE_BASES: &[Mode] = &[Mode::Explicit, Mode::IptablesNft];
const DECIDE_WORKLOADS: &[Workload] = &[RR_1B, CRR];
const DECIDE_METRICS: &[&str] = &["p50", "cpu_per_op"];

/// The (proxy, workload) pairs with a comparison whose interval is too wide to decide.
fn undecided(samples: &[Sample], proxies: &[ProxyKind]) -> Result<Vec<(ProxyKind, Workload)>> {
    let results = json!({ "samples": samples });
    let g = Groups::new(&results);
    let mut out = Vec::new();
    for proxy in proxies {
        for wl in DECIDE_WORKLOADS {
            let e = Key::main(&format!("ebpf/{}", proxy.name()), wl.name);
            let open = DECIDE_BASES.iter().any(|base| {
                let b = Key::main(&format!("{}/{}", base.name(), proxy.name()), wl.name);
                DECIDE_METRICS
                    .iter()
                    .any(|m| !g.ratio(&e, &b, m).decided(1.0))
            });
            if open {
                out.push((*proxy, *wl));
            }
        }
    }
    Ok(out)
}

/// More interleaved rounds (numbered after the fixed ones, so they pair like them) of the
/// configurations in undecided comparisons, while the time budget lasts. Returns how many.
fn more_rounds(
    bed: &Bed,
    proxies: &[ProxyKind],
    reps: usize,
    timing: Timing,
    started: Instant,
    budget: Duration,
    samples: &mut Vec<Sample>,
) -> Result<usize> {
    let mut rounds = 0;
    // Kept for the report and the shutdown: a round must fit with this much to spare.
    let reserve = Duration::from_secs(20);
    let mut last_round = Duration::ZERO;
    loop {
        let open = undecided(samples, proxies)?;
        if open.is_empty() {
            println!("  every compared interval is decided");
            break;
        }
        if started.elapsed() + last_round + reserve > budget {
            println!(
                "  {} (proxy, workload) comparisons still undecided; time budget of {} s used",
                open.len(),
                budget.as_secs()
            );
            break;
        }
        if rounds == 0 {
            dev::header("bench datapath: more rounds of the undecided comparisons");
        }
        let t = Instant::now();
        let rep = reps + rounds;
        let mut progress = Progress::new(open.len() * (DECIDE_BASES.len() + 1));
        for proxy in proxies {
            let wls: Vec<Workload> = open
                .iter()
                .filter(|(p, _)| p == proxy)
                .map(|(_, w)| *w)
                .collect();
            if wls.is_empty() {
                continue;
            }
            for mode in DECIDE_BASES.iter().copied().chain([Mode::Ebpf]) {
                let cfg = Config {
                    mode,
                    proxy: Some(*proxy),
                };
                let running = bed.start(cfg, Scale::default())?;
                for wl in &wls {
                    let s =
                        bed.measure("main", cfg, *wl, rep, Scale::default(), timing, &running)?;
                    progress.tick(rep, rep + 1, &s);
                    samples.push(s);
                }
                bed.stop(running)?;
            }
        }
        rounds += 1;
        last_round = t.elapsed();
    }
    Ok(rounds)
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
        dev::output_if_success(Command::new(prog).args(args))
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
        "haproxy": sh("sh", &["-c", "haproxy -v 2>/dev/null | head -1"]),
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

pub(crate) struct Progress {
    total: usize,
    done: usize,
    start: Instant,
}

impl Progress {
    pub(crate) fn new(total: usize) -> Self {
        Progress {
            total,
            done: 0,
            start: Instant::now(),
        }
    }

    pub(crate) fn tick(&mut self, rep: usize, reps: usize, s: &Sample) {
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
        dev::flush();
    }
}
