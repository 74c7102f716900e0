//! `cargo xtask`: developer tasks for the redirect workspace.
//!
//! One module per subcommand. This crate must build with plain stable cargo and no
//! bpf-linker (`setup` is what installs it), so it never depends on the eBPF crates.

mod bench;
mod bench_detect;
mod demo;
mod kernels;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for the redirect workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what this machine lacks (Debian packages, nightly + rust-src, bpf-linker). Idempotent.
    Setup,
    /// Everything CI checks: setup, build, fmt, clippy (host and eBPF), every test, bench --quick, the kernel matrix.
    Test(test::Args),
    /// setup, build the workspace binaries, then run `redirect-testbed demo`.
    Demo(demo::Args),
    /// Benchmarks: the data path against iptables (default), or `detect`.
    Bench(bench::Args),
    /// Boot Debian kernels (5.10, 6.1, 6.12, 7.x) under qemu and run the integration tests in
    /// each, plus the host kernel natively; prints a kernel x test matrix, writes KERNELS.md.
    Kernels(kernels::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Test(args) => test::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Kernels(args) => kernels::run(args),
    };
    if let Err(err) = result {
        eprintln!("\nxtask: error: {err:#}");
        std::process::exit(1);
    }
}
