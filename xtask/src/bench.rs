//! `cargo xtask bench [datapath|detect]`.
//!
//! With no sub-command, or with `datapath`, runs the data-path benchmark against Istio's
//! iptables redirection (see bench/datapath.rs); `detect` runs the detection benchmark.

mod charts;
mod datapath;
mod istio;
mod report;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    datapath: datapath::Opts,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Detection benchmark (see bench_detect.rs).
    Detect,
    /// Data-path benchmark: direct, explicit proxy, Istio's iptables rules (nft and legacy),
    /// and redirect's eBPF datapath, interleaved in one run (the default).
    Datapath(datapath::Opts),
    /// Rewrite BENCHMARKS.md and the charts from a results JSON of an earlier run.
    Report {
        /// The results file.
        #[arg(long, default_value = "bench/datapath.json")]
        from: std::path::PathBuf,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Some(Command::Detect) => crate::bench_detect::run(),
        Some(Command::Datapath(opts)) => datapath::run(opts),
        Some(Command::Report { from }) => report::rewrite(&from),
        None => datapath::run(args.datapath),
    }
}
