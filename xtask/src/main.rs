//! `cargo xtask`: developer tasks for the redirect workspace.
//!
//! One module per subcommand. This crate must build with plain stable cargo and no
//! bpf-linker (`setup` is what installs it), so it never depends on the eBPF crates, and it
//! builds fast: `bench` and `kernels` are workspace crates of their own (`redirect-bench`,
//! `redirect-kernels`) that xtask only starts, with their arguments unchanged.

mod demo;
mod image;
mod setup;
mod test;
mod util;

use std::ffi::OsString;

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
    /// The node agent's OCI image (static binaries, no base image): prints its digest.
    Image(image::Args),
    /// setup, build the workspace binaries, then run `redirect-testbed demo`.
    Demo(demo::Args),
    /// Benchmarks: the data path against iptables (default), or `detect`.
    #[command(disable_help_flag = true)]
    Bench(Passthrough),
    /// Boot Debian kernels (5.10, 6.1, 6.12, 7.x) under qemu and run the integration tests in
    /// each, plus the host kernel natively; prints a kernel x test matrix, writes KERNELS.md.
    #[command(disable_help_flag = true)]
    Kernels(Passthrough),
}

/// Arguments handed to the tool as they are (its own `--help` lists them).
#[derive(clap::Args)]
struct Passthrough {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Test(args) => test::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Image(args) => image::run(args),
        Command::Bench(p) => util::exec_tool("redirect-bench", &p.args),
        Command::Kernels(p) => util::exec_tool("redirect-kernels", &p.args),
    };
    if let Err(err) = result {
        eprintln!("\nxtask: error: {err:#}");
        std::process::exit(1);
    }
}
