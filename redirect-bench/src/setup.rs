//! `cargo xtask bench setup`: where the connection-setup time goes (issue 14), on its own.
//!
//! The smallest run that produces the data-path report's "Where the setup time goes" figures:
//! only `explicit`, `explicit+enrolled` and `ebpf`, only crr-1B, measured in interleaved rounds
//! as the full benchmark measures them, then one pass with the kernel's BPF statistics on
//! (`explicit+enrolled` and `ebpf`). It writes `bench/setup.json` and its own marked section of
//! BENCHMARKS.md (which a full data-path report keeps), a few minutes instead of twenty.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{ensure, Context as _, Result};
use redirect_devtools as dev;
use serde_json::{json, Value};

use crate::bed::{Bed, NGINX_STREAM_MODULE};
use crate::datapath::{stats_pass, Progress, PACKAGES};
use crate::modes::{Config, Mode, ProxyKind, Scale, Timing, CRR};
use crate::report::Groups;

const BEGIN: &str = "<!-- bench setup: begin -->";
const END: &str = "<!-- bench setup: end -->";

/// The modes of the setup steps, in their order.
const STEPS: [Mode; 3] = [Mode::Explicit, Mode::ExplicitEnrolled, Mode::Ebpf];

#[derive(Clone, clap::Args)]
pub struct Opts {
    /// Interleaved rounds of the three steps (default 8).
    #[arg(long)]
    pub reps: Option<usize>,
    /// CPU that every benchmark process is pinned to (default: the last one).
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Leave out the nginx proxy.
    #[arg(long)]
    pub no_nginx: bool,
    /// Leave out the HAProxy proxy.
    #[arg(long)]
    pub no_haproxy: bool,
    /// Directory for the JSON (default `bench/`). BENCHMARKS.md's section is rewritten only
    /// for `bench/`; elsewhere the section goes to `setup.md` beside the JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only rewrite the section from the results of an earlier run (its `setup.json`), with
    /// the `setup-notes.md` beside it.
    #[arg(long)]
    pub from: Option<PathBuf>,
}

/// This section of a BENCHMARKS.md, markers included, if it has one.
pub fn section_of(md: &str) -> Option<&str> {
    crate::agent::marked_section(md, BEGIN, END)
}

pub fn run(opts: Opts) -> Result<()> {
    let root = dev::workspace_root();
    if let Some(from) = &opts.from {
        let text =
            fs::read_to_string(from).with_context(|| format!("reading {}", from.display()))?;
        let results: Value = serde_json::from_str(&text)?;
        let dir = from.parent().unwrap_or(Path::new("."));
        return write(&results, dir, root);
    }
    let started = Instant::now();
    crate::sys::ensure_root("bench setup needs root (network namespaces, cgroups, eBPF)")?;
    let reps = opts.reps.unwrap_or(8);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = opts.cpu.unwrap_or(cpus - 1);
    let out = opts.out.clone().unwrap_or_else(|| root.join("bench"));
    // The full benchmark's windows, so that the figures compare with its own.
    let timing = Timing {
        warmup_ms: 200,
        duration_ms: 1000,
        bulk_ms: 700,
    };
    let loadavg = || {
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let loadavg_start = loadavg();

    dev::header("bench setup: packages and binaries");
    dev::debian_packages(PACKAGES)?;
    let mut build = dev::cargo();
    build.args(["build", "--workspace", "--bins", "--release"]);
    build.args(dev::HOST_EXCLUDE);
    dev::run(&mut build)?;
    let bin_dir = dev::target_dir()?.join("release");

    let mut proxies = vec![ProxyKind::TestProxy];
    if !opts.no_nginx && Path::new(NGINX_STREAM_MODULE).exists() {
        proxies.push(ProxyKind::Nginx);
    }
    if !opts.no_haproxy && dev::output_if_success(Command::new("haproxy").arg("-v")).is_some() {
        proxies.push(ProxyKind::Haproxy);
    }

    dev::header("bench setup: test bed");
    let bed = Bed::new(&bin_dir, cpu)?;
    let configs: Vec<Config> = proxies
        .iter()
        .flat_map(|p| {
            STEPS.iter().map(|mode| Config {
                mode: *mode,
                proxy: Some(*p),
            })
        })
        .collect();
    let mut progress = Progress::new(reps * configs.len() + 5 * proxies.len());
    let mut samples = Vec::new();
    dev::header(&format!(
        "bench setup: {} configurations x crr-1B x {reps} rounds, interleaved",
        configs.len()
    ));
    for rep in 0..reps {
        for cfg in &configs {
            let running = bed.start(*cfg, Scale::default())?;
            let s = bed.measure("main", *cfg, CRR, rep, Scale::default(), timing, &running)?;
            progress.tick(rep, reps, &s);
            samples.push(s);
            bed.stop(running)?;
        }
    }
    dev::header("bench setup: kernel BPF statistics (one pass, stats on)");
    let bpf = stats_pass(
        &bed,
        &proxies,
        &[
            (Mode::ExplicitEnrolled, &[CRR][..]),
            (Mode::Ebpf, &[CRR][..]),
        ],
        timing,
        &mut progress,
        &mut samples,
    )?;
    let perf = if crate::sys::perf_available() {
        dev::header("bench setup: kernel paths (perf cpu-clock samples of the bench CPU)");
        perf_pass(&bed, &proxies, cpu, timing, &mut progress, &mut samples)?
    } else {
        println!("  perf not found (Debian's linux-perf): the kernel paths are left out");
        Vec::new()
    };
    drop(bed);

    let bad: Vec<String> = samples
        .iter()
        .filter(|s| !s.path_ok)
        .map(|s| format!("{} {} rep {}: {}", s.config, s.workload, s.rep, s.path))
        .collect();
    let sh = |prog: &str, args: &[&str]| {
        dev::output_if_success(Command::new(prog).args(args))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let mut command = String::from("cargo xtask bench setup");
    if let Some(r) = opts.reps {
        command.push_str(&format!(" --reps {r}"));
    }
    let results = json!({
        "meta": {
            "command": command,
            "date": sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            "kernel": sh("uname", &["-r"]),
            "cpus": cpus,
            "pinned_cpu": cpu,
            "reps": reps,
            "timing": timing,
            "elapsed_s": started.elapsed().as_secs_f64(),
            "loadavg_start": loadavg_start,
            "loadavg_end": loadavg(),
        },
        "samples": samples,
        "bpf_stats": bpf,
        "perf": perf,
    });
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json_path = out.join("setup.json");
    fs::write(&json_path, serde_json::to_string_pretty(&results)?)?;
    println!("\n  wrote {}", json_path.display());
    write(&results, &out, root)?;
    ensure!(
        bad.is_empty(),
        "{} measurement(s) did not take the path their mode claims:\n  {}",
        bad.len(),
        bad.join("\n  ")
    );
    println!(
        "\nbench setup done in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes the section: into BENCHMARKS.md for results in the workspace's `bench/`, else to
/// `setup.md` beside them.
fn write(results: &Value, dir: &Path, root: &Path) -> Result<()> {
    let section = section(results, dir)?;
    if dir.canonicalize().ok() == root.join("bench").canonicalize().ok() {
        let md = root.join("BENCHMARKS.md");
        crate::agent::write_marked_section(&md, BEGIN, END, &section)?;
        println!("  wrote {}", md.display());
    } else {
        fs::write(dir.join("setup.md"), &section)?;
        println!("  wrote {}", dir.join("setup.md").display());
    }
    Ok(())
}

/// The section, markers included. A hand-written reading of the figures in `setup-notes.md`
/// beside the JSON is kept in it, as the data-path report keeps `notes.md`.
fn section(results: &Value, out: &Path) -> Result<String> {
    use std::fmt::Write as _;
    let meta = &results["meta"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let mut w = String::new();
    writeln!(w, "{BEGIN}")?;
    writeln!(w, "## Connection setup, hook by hook (issue 14)\n")?;
    writeln!(
        w,
        "Generated by `{}` on {} (release binaries, kernel {}, {:.0} s; load average at the \
         start `{}`, at the end `{}`). Raw results: [`bench/setup.json`](bench/setup.json). \
         The data-path benchmark's setup steps alone: `explicit`, `explicit+enrolled` and \
         `ebpf` with each proxy, crr-1B only, {} interleaved rounds with the full run's \
         windows, then one pass with the kernel's BPF statistics on. The machine is shared \
         (2 vCPUs, other builds and tests running): differences and ratios come from this one \
         interleaved run, where drift falls on every configuration alike; absolute figures \
         move with the load.\n",
        s(&meta["command"]),
        s(&meta["date"]),
        s(&meta["kernel"]),
        meta["elapsed_s"].as_f64().unwrap_or(0.0),
        s(&meta["loadavg_start"]),
        s(&meta["loadavg_end"]),
        meta["reps"],
    )?;
    if let Ok(notes) = fs::read_to_string(out.join("setup-notes.md")) {
        writeln!(w, "{}\n", notes.trim())?;
    }
    let g = Groups::new(results);
    crate::report::setup_cost(&mut w, results, &g, "### Steps")?;
    kernel_paths(&mut w, results)?;
    writeln!(w, "{END}")?;
    Ok(w)
}

/// Processes of the benchmark whose samples count (comm, as the kernel truncates it): the
/// load generator, the test proxy and the echo application, nginx, HAProxy.
const COMMS: &[&str] = &["redirect-testbe", "nginx", "haproxy"];

/// Measured window of the perf pass.
const PERF_WINDOW_MS: u64 = 4000;

/// Whether a kernel symbol is one of the paths redirect's programs take: the hooks' entry
/// points, redirect's programs (`rd_*`), the helpers they call that do real work (socket
/// storage and its allocations, `bpf_bind`, the socket map), and the socket-map side of the
/// proxy's listener. Tracing programs of other tools on the machine (`bpf_trace_run*`,
/// `__bpf_prog_enter*`) are not redirect's and are left out.
fn bpf_path(sym: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "__cgroup_bpf_run_filter_",
        "bpf_sk_storage",
        "bpf_local_storage",
        "bpf_selem",
        "bpf_map_kzalloc",
        "bpf_bind",
        "bpf_sk_assign",
        "bpf_sk_lookup",
        "bpf_sock_ops",
        "bpf_skops",
        "sock_hash",
        "sock_map",
        "sk_psock",
        "tcp_bpf",
    ];
    let program = sym
        .strip_prefix("bpf_prog_")
        .is_some_and(|rest| rest.get(16..).is_some_and(|n| n.starts_with("_rd_")));
    program || PREFIXES.iter().any(|p| sym.starts_with(p))
}

/// One crr-1B measurement per step and proxy with `perf record` sampling the benchmark's CPU
/// (stats off): the inclusive kernel time of each BPF path per operation.
fn perf_pass(
    bed: &Bed,
    proxies: &[ProxyKind],
    cpu: usize,
    timing: Timing,
    progress: &mut Progress,
    samples: &mut Vec<crate::modes::Sample>,
) -> Result<Vec<Value>> {
    let dir = TempDir::new()?;
    let mut out = Vec::new();
    // A longer window than the others: one sample is 200 µs of CPU, so the resolution per
    // operation is 200 µs over the operations of the window.
    let timing = Timing {
        duration_ms: PERF_WINDOW_MS,
        ..timing
    };
    for proxy in proxies {
        for mode in STEPS {
            let cfg = Config {
                mode,
                proxy: Some(*proxy),
            };
            let running = bed.start(cfg, Scale::default())?;
            let data = dir.0.join("perf.data");
            let rec = crate::sys::PerfRecord::start(cpu, &data)?;
            let s = bed.measure("perf", cfg, CRR, 0, Scale::default(), timing, &running);
            rec.finish()?;
            let s = s?;
            // Read while the programs are loaded, so that their JIT symbols resolve.
            let ns = crate::sys::perf_children_ns(&data, COMMS)?;
            bed.stop(running)?;
            let ops =
                s.load["ops"].as_u64().unwrap_or(0) + s.load["warmup_ops"].as_u64().unwrap_or(0);
            let kept: serde_json::Map<String, Value> = ns
                .into_iter()
                .filter(|(sym, _)| sym == crate::sys::PERF_ALL || bpf_path(sym))
                .map(|(sym, v)| (sym, json!(v)))
                .collect();
            out.push(json!({
                "config": cfg.label(),
                "workload": CRR.name,
                "ops": ops,
                "hz": crate::sys::PERF_HZ,
                "ns": kept,
            }));
            progress.tick(0, 1, &s);
            samples.push(s);
        }
    }
    Ok(out)
}

/// A directory of our own under the system's temporary one, removed with everything in it.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let p = std::env::temp_dir().join(format!("redirect-bench-perf-{}", std::process::id()));
        fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// How a symbol is shown: a JIT-compiled program (`bpf_prog_<tag>_<name>`) by its name.
fn path_label(sym: &str) -> String {
    match sym.strip_prefix("bpf_prog_") {
        Some(rest) if rest.len() > 17 && rest.as_bytes()[16] == b'_' => {
            format!("program `{}`", &rest[17..])
        }
        _ => format!("`{sym}`"),
    }
}

/// The perf pass's table: inclusive kernel time per operation of every BPF path, per step.
fn kernel_paths(w: &mut String, results: &Value) -> Result<()> {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    let runs = results["perf"].as_array().cloned().unwrap_or_default();
    if runs.is_empty() {
        return Ok(());
    }
    writeln!(w, "### Kernel paths (perf)\n")?;
    writeln!(
        w,
        "One more crr-1B measurement per step and proxy, statistics off, with `perf record -e \
         cpu-clock -g -F {}` on the benchmark's CPU: the samples of the benchmark's processes \
         (load generator, proxies, application, and the kernel work done in their context), \
         each kernel path's **inclusive** time (`perf report --children`: the function and \
         everything it calls, so a hook's entry point includes its program, and a program \
         the helpers it calls) per operation, in ns. `__cgroup_bpf_run_filter_sock_ops` is the \
         sock_ops hook (every callback: the kernel's dispatch and the program), \
         `__cgroup_bpf_run_filter_sock_addr` the connect, bind and getpeername hooks, \
         `__cgroup_bpf_run_filter_getsockopt` the getsockopt hook with its copies of the \
         caller's buffer; sk_lookup's dispatch is inlined into the listener lookup, so only \
         its program shows. One sample is {:.0} µs of CPU: over the {:.1} s of a cell \
         (warm-up included) and its operations, a row's resolution is a few tens of ns per \
         operation, and rows under 50 ns/op in every step are left out. `(all)` is every \
         sample of those processes, user and kernel: the CPU time per operation on this CPU \
         while sampled (sampling with call chains makes it larger than in the rounds).\n",
        crate::sys::PERF_HZ,
        1e6 / crate::sys::PERF_HZ as f64,
        (results["meta"]["timing"]["warmup_ms"]
            .as_f64()
            .unwrap_or(0.0)
            + PERF_WINDOW_MS as f64)
            / 1e3,
    )?;
    let mut proxies: Vec<String> = Vec::new();
    // proxy -> label -> step -> ns/op
    let mut by: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>> = BTreeMap::new();
    for r in &runs {
        let cfg = r["config"].as_str().unwrap_or("");
        let Some((step, proxy)) = cfg.split_once('/') else {
            continue;
        };
        if !proxies.iter().any(|p| p == proxy) {
            proxies.push(proxy.to_owned());
        }
        let ops = r["ops"].as_f64().unwrap_or(f64::NAN);
        for (sym, ns) in r["ns"].as_object().into_iter().flatten() {
            let label = if sym == crate::sys::PERF_ALL {
                sym.clone()
            } else if bpf_path(sym) {
                path_label(sym)
            } else {
                continue;
            };
            *by.entry(proxy.to_owned())
                .or_default()
                .entry(label)
                .or_default()
                .entry(step.to_owned())
                .or_default() += ns.as_f64().unwrap_or(0.0) / ops;
        }
    }
    let steps: Vec<&str> = STEPS.iter().map(|m| m.name()).collect();
    writeln!(
        w,
        "| proxy | kernel path | {} |",
        steps
            .iter()
            .map(|s| format!("`{s}` ns/op"))
            .collect::<Vec<_>>()
            .join(" | ")
    )?;
    writeln!(w, "|---|---|{}", "---|".repeat(steps.len()))?;
    for proxy in &proxies {
        let Some(rows) = by.get(proxy) else {
            continue;
        };
        let mut rows: Vec<(&String, &BTreeMap<String, f64>)> = rows
            .iter()
            .filter(|(_, v)| v.values().any(|ns| *ns >= 50.0))
            .collect();
        let ebpf = |v: &BTreeMap<String, f64>| v.get("ebpf").copied().unwrap_or(0.0);
        rows.sort_by(|a, b| ebpf(b.1).total_cmp(&ebpf(a.1)));
        for (label, v) in rows {
            let cells: Vec<String> = steps
                .iter()
                .map(|s| format!("{:.0}", v.get(*s).copied().unwrap_or(0.0)))
                .collect();
            writeln!(w, "| {proxy} | {label} | {} |", cells.join(" | "))?;
        }
    }
    writeln!(w)?;
    Ok(())
}
