//! `cargo xtask kernels [VERSION...]`: the datapath's integration tests on real kernels (xtask
//! runs this binary with its arguments unchanged).
//!
//! For each kernel (Debian cloud kernels: 5.10 bullseye, 6.1 bookworm, 6.12 trixie, the newest
//! 7.x in sid) this fetches the packages with apt through a private sources list and private
//! state directories (the machine's apt configuration is never touched), caches them under
//! `/var/cache/redirect-kernels` (`$REDIRECT_KERNELS_CACHE`), extracts vmlinuz and the modules,
//! packs an initramfs (newc cpio, written here) holding busybox, a shell init, the modules the
//! test bed needs (in dependency order, from the same package), the test binaries and the
//! programs they run with every shared library they link, boots it under qemu (TCG) and runs the
//! tests inside. The host kernel is a column too (run natively). It prints a matrix
//! kernel x test, writes JSON (`target/kernels/kernels.json`) and `KERNELS.md`.
//!
//! A test failing in a guest, a guest that panics and one that hangs past its timeout are all
//! failed cells and make the command exit non-zero.
//!
//! Modules, in the order a run uses them: `apt` (the packages), `modules` (which to insmod),
//! `payload` (test binaries, programs, libraries, init, initramfs), `cpio` (the archive),
//! `qemu` (boot with a timeout), `console` (what the console says), `matrix` (all runs),
//! `report` (terminal, JSON, KERNELS.md).

mod apt;
mod console;
mod cpio;
mod matrix;
mod modules;
mod payload;
mod qemu;
mod report;

use std::path::PathBuf;

use clap::Parser;

/// The test bed's own tests (`redirect-testbed:testbed`) also run in the guests, but cost about
/// a minute per kernel under TCG: add them with `--test` when the test bed changes. The DNS
/// capture tests (issue 13: sendmsg/recvmsg/getpeername hooks with real dnsmasq, dig, glibc)
/// cost about three minutes per kernel.
const DEFAULT_TESTS: &[&str] = &[
    "redirect-agent:probe",
    "redirect-agent:datapath",
    "redirect-agent:dns",
];

const DEFAULT_MODULES: &str = "veth,bridge,br_netfilter,nf_tables,nft_compat,nft_chain_nat,\
nft_nat,nft_redir,nft_counter,nft_ct,xt_REDIRECT,xt_tcpudp,xt_owner,xt_conntrack,xt_addrtype,\
xt_comment,xt_mark,xt_multiport,nf_conntrack,nf_nat,inet_diag,tcp_diag,udp_diag";

#[derive(Parser)]
#[command(
    name = "redirect-kernels",
    bin_name = "cargo xtask kernels",
    about = "Boot Debian kernels (5.10, 6.1, 6.12, 7.x) under qemu and run the integration tests in each, plus the host kernel natively; prints a kernel x test matrix, writes KERNELS.md"
)]
pub struct Args {
    /// Kernels to run: 5.10, 6.1, 6.12, 7.x (prefixes work: 7), host. Default: all and host.
    pub versions: Vec<String>,
    /// Test binaries, PACKAGE:TARGET[:FILTER...] (repeatable; FILTERs are passed to the test
    /// harness, separated by ':'). Targets that do not exist are left out with a note.
    #[arg(long = "test")]
    pub tests: Vec<String>,
    /// Modules to load in each guest (with their dependencies), comma-separated.
    #[arg(long, default_value = DEFAULT_MODULES)]
    pub modules: String,
    /// Seconds a guest may run before it is killed and its cells fail.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Guests booted at once.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Refresh the package lists and re-resolve the newest package of each suite.
    #[arg(long)]
    pub refresh: bool,
    /// Leave out the host kernel column.
    #[arg(long)]
    pub no_host: bool,
    /// Where KERNELS.md goes (default: the workspace root); `-` to skip it.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

fn main() {
    if let Err(err) = matrix::run(Args::parse()) {
        eprintln!("\nredirect-kernels: error: {err:#}");
        std::process::exit(1);
    }
}
