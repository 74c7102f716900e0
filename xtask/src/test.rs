//! `cargo xtask test [-- extra cargo test args]`: setup, build the workspace binaries (integration
//! tests run sibling binaries from target/debug), then fmt, clippy and tests, failing fast.

use std::time::Instant;

use anyhow::{Context as _, Result};

use crate::util::{self, header};

#[derive(clap::Args)]
pub struct Args {
    /// Skip the kernel matrix (`cargo xtask kernels`, about 17 minutes under qemu), for quick
    /// local iterations. CI runs it.
    #[arg(long)]
    pub no_kernels: bool,
    /// Extra arguments appended to `cargo test --workspace` (after `--`).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    // Workspace-wide, less the bpf-only crate (see util::HOST_EXCLUDE).
    let ws = |cmd: &[&'static str]| [cmd, &["--workspace"], util::HOST_EXCLUDE].concat();
    let mut build = ws(&["build"]);
    build.push("--bins");
    let mut clippy = ws(&["clippy", "--all-targets"]);
    clippy.extend(["--", "-D", "warnings"]);
    // --no-fail-fast: one failing test binary must not hide the others' results.
    let mut test = ws(&["test", "--no-fail-fast"]);
    test.extend(args.cargo_test_args.iter().map(String::as_str));
    let steps: [(&str, Vec<&str>); 4] = [
        ("build binaries", build),
        ("rustfmt", vec!["fmt", "--all", "--", "--check"]),
        ("clippy", clippy),
        ("tests", test),
    ];
    let total = steps.len() + 3 + usize::from(!args.no_kernels);

    header(&format!("[1/{total}] setup"));
    crate::setup::run().context("step 'setup' failed")?;

    for (i, (name, cargo_args)) in steps.iter().enumerate() {
        let mut cmd = util::cargo();
        cmd.args(cargo_args);
        header(&format!(
            "[{}/{total}] {name}: {}",
            i + 2,
            util::display(&cmd)
        ));
        let step_start = Instant::now();
        util::run(&mut cmd).with_context(|| format!("step '{name}' failed"))?;
        println!("  ok ({:.1}s)", step_start.elapsed().as_secs_f64());
    }
    // The kernel programs only build for the bpf target, so the host clippy above cannot see
    // them: lint them on their own target with the nightly toolchain aya-build uses.
    let mut ebpf = std::process::Command::new("rustup");
    ebpf.current_dir(util::workspace_root())
        .args(["run", "nightly", "cargo", "clippy", "-p", "redirect-ebpf"])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
        ])
        .args(["--", "-D", "warnings"])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO");
    header(&format!(
        "[{}/{total}] clippy (eBPF): {}",
        steps.len() + 2,
        util::display(&ebpf)
    ));
    let step_start = Instant::now();
    util::run(&mut ebpf).context("step 'clippy (eBPF)' failed")?;
    println!("  ok ({:.1}s)", step_start.elapsed().as_secs_f64());

    // Keeps the data-path benchmark harness working: one repetition, small counts, no timing
    // assertion, but it fails if a mode does not take the path it claims.
    let mut bench = std::process::Command::new(std::env::current_exe()?);
    bench
        .current_dir(util::workspace_root())
        .args(["bench", "--quick"]);
    header(&format!(
        "[{total}/{total}] bench --quick: cargo xtask bench --quick"
    ));
    let step_start = Instant::now();
    util::run(&mut bench).context("step 'bench --quick' failed")?;
    println!("  ok ({:.1}s)", step_start.elapsed().as_secs_f64());

    if !args.no_kernels {
        // The datapath and probe tests on 5.10, 6.1, 6.12 and 7.x under qemu, and the host.
        // The report goes under target/ so a test run never rewrites the committed KERNELS.md.
        let report = util::workspace_root().join("target/kernels/KERNELS.md");
        let mut kernels = std::process::Command::new(std::env::current_exe()?);
        kernels
            .current_dir(util::workspace_root())
            .args(["kernels", "--markdown"])
            .arg(&report);
        header(&format!(
            "[{total}/{total}] kernels: cargo xtask kernels --markdown {}",
            report.display()
        ));
        let step_start = Instant::now();
        util::run(&mut kernels).context("step 'kernels' failed")?;
        println!("  ok ({:.1}s)", step_start.elapsed().as_secs_f64());
    }

    header(&format!(
        "all {total} steps passed in {:.0}s",
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}
