//! `cargo xtask bench [datapath|detect|agent|cni|connections|report]` (xtask runs this binary with its
//! arguments).
//!
//! With no sub-command, or with `datapath`, runs the data-path benchmark against Istio's
//! iptables redirection (see datapath.rs); `detect` runs the detection benchmark (detect.rs);
//! `agent` the node agent against the CLI path (agent.rs); `connections` 60 000 short
//! connections to 1 000 destinations under iptables and under redirect (connections.rs);
//! `report` rewrites BENCHMARKS.md
//! from an earlier run's results.
//!
//! Modules: `datapath` the runner (what is measured in which order, the results file),
//! `modes` the configurations and workloads, `bed` the pods and what a configuration starts in
//! them, `measure` one measurement and its path checks, `crowd` the pods of the node-scale
//! measurement, `istio` Istio's capture rules, `report` and `charts` BENCHMARKS.md and its
//! charts, `detect` the detection benchmark, `sys` root, `ip -batch`, BPF statistics.

mod agent;
mod bed;
mod charts;
mod cni;
mod connections;
mod crowd;
mod datapath;
mod detect;
mod istio;
mod measure;
mod modes;
mod report;
mod setup;
mod stats;
mod sys;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "redirect-bench",
    bin_name = "cargo xtask bench",
    about = "Benchmarks: the data path against iptables (default), or `detect`"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    datapath: datapath::Opts,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Detection benchmark (see redirect-bench/src/detect.rs).
    Detect,
    /// Data-path benchmark: direct, explicit proxy, Istio's iptables rules (nft and legacy),
    /// and redirect's eBPF datapath, interleaved in one run (the default).
    Datapath(datapath::Opts),
    /// Node agent benchmark: enroll/unenroll through the agent and the CLI, RSS, idle CPU,
    /// /metrics, restart to ready (see redirect-bench/src/agent.rs).
    Agent(agent::Opts),
    /// The time redirect adds to a pod sandbox: RunPodSandbox through a private containerd
    /// with and without redirect-cni in the chain (see redirect-bench/src/cni.rs).
    Cni(cni::Opts),
    /// 60 000 short connections to 1 000 destinations, under Istio's iptables rules and under
    /// redirect (issue 13's port-space figure; see redirect-bench/src/connections.rs).
    Connections,
    /// Where the connection-setup time goes, on its own: explicit, explicit+enrolled and ebpf,
    /// crr-1B, with the per-program BPF statistics (see redirect-bench/src/setup.rs).
    Setup(setup::Opts),
    /// Rewrite BENCHMARKS.md and the charts from a results JSON of an earlier run.
    Report {
        /// The results file.
        #[arg(long, default_value = "bench/datapath.json")]
        from: std::path::PathBuf,
    },
}

fn run(args: Args) -> Result<()> {
    match args.command {
        Some(Command::Detect) => detect::run(),
        Some(Command::Agent(opts)) => agent::run(opts),
        Some(Command::Connections) => connections::run(),
        Some(Command::Cni(opts)) => cni::run(opts),
        Some(Command::Datapath(opts)) => datapath::run(opts),
        Some(Command::Setup(opts)) => setup::run(opts),
        Some(Command::Report { from }) => report::rewrite(&from),
        None => datapath::run(args.datapath),
    }
}

fn main() {
    if let Err(err) = run(Args::parse()) {
        eprintln!("\nredirect-bench: error: {err:#}");
        std::process::exit(1);
    }
}
