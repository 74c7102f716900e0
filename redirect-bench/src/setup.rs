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
}

/// This section of a BENCHMARKS.md, markers included, if it has one.
pub fn section_of(md: &str) -> Option<&str> {
    crate::agent::marked_section(md, BEGIN, END)
}

pub fn run(opts: Opts) -> Result<()> {
    let started = Instant::now();
    crate::sys::ensure_root("bench setup needs root (network namespaces, cgroups, eBPF)")?;
    let reps = opts.reps.unwrap_or(8);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = opts.cpu.unwrap_or(cpus - 1);
    let root = dev::workspace_root();
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
    let mut progress = Progress::new(reps * configs.len() + 2 * proxies.len());
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
    });
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json_path = out.join("setup.json");
    fs::write(&json_path, serde_json::to_string_pretty(&results)?)?;
    println!("\n  wrote {}", json_path.display());
    let section = section(&results, &out)?;
    if out == root.join("bench") {
        let md = root.join("BENCHMARKS.md");
        crate::agent::write_marked_section(&md, BEGIN, END, &section)?;
        println!("  wrote {}", md.display());
    } else {
        fs::write(out.join("setup.md"), &section)?;
        println!("  wrote {}", out.join("setup.md").display());
    }
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
    writeln!(w, "{END}")?;
    Ok(w)
}
