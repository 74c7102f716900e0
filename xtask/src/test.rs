//! `cargo xtask test [-- extra cargo test args]`: everything CI checks, failing fast: setup,
//! build the workspace binaries (integration tests run sibling binaries from target/debug),
//! fmt, clippy (host and eBPF target), the tests, issue 13's 60 000 connections, a
//! one-repetition benchmark, the kernel matrix.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, Result};

use crate::util::{self, header};

#[derive(clap::Args)]
pub struct Args {
    /// Skip the kernel matrix (`cargo xtask kernels`, about 15 minutes under qemu), for quick
    /// local iterations. CI runs it.
    #[arg(long)]
    pub no_kernels: bool,
    /// Extra arguments appended to `cargo test --workspace` (after `--`).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

/// `cargo ARGS` in the workspace root, without incremental compilation: a full run builds
/// every target once, and incremental state (kept per test binary) would only take disk.
fn cargo(args: &[&str]) -> Command {
    let mut cmd = util::cargo();
    cmd.args(args).env("CARGO_INCREMENTAL", "0");
    cmd
}

/// One line after each step: what target/ takes and what is left on its filesystem, so a
/// run that runs out of disk shows which step grew it.
fn disk_report() {
    let target = util::workspace_root().join("target");
    let out = |cmd: &mut Command| {
        cmd.output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    // POSIX formats: `du -sk` prints "KIB\tPATH", `df -Pk` a header line then
    // "FS BLOCKS USED AVAILABLE ...".
    let used = out(Command::new("du").arg("-sk").arg(&target))
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
    let free = out(Command::new("df").arg("-Pk").arg(&target)).and_then(|s| {
        s.lines()
            .nth(1)?
            .split_whitespace()
            .nth(3)?
            .parse::<u64>()
            .ok()
    });
    let gib =
        |k: Option<u64>| k.map_or("?".to_string(), |k| format!("{:.1}", k as f64 / 1048576.0));
    println!("  disk: target/ {} GiB, {} GiB free", gib(used), gib(free));
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

    // The kernel programs only build for the bpf target, so the host clippy cannot see them:
    // lint them on their own target with the nightly toolchain aya-build uses.
    let mut ebpf = Command::new("rustup");
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
        .env_remove("CARGO")
        .env("CARGO_INCREMENTAL", "0");

    // Later steps go through `cargo xtask` again rather than this executable: the build steps
    // above rebuild xtask itself, which replaces the running binary's file.
    let mut steps: Vec<(&str, Command)> = vec![
        ("build binaries", cargo(&build)),
        ("rustfmt", cargo(&["fmt", "--all", "--", "--check"])),
        ("clippy", cargo(&clippy)),
        // The agent's library must build without the CLI's dependencies (clap, anyhow).
        (
            "agent library without the CLI",
            cargo(&[
                "check",
                "-p",
                "redirect-agent",
                "--lib",
                "--no-default-features",
            ]),
        ),
        ("tests", cargo(&test)),
        // Issue 13's full size, ignored by `cargo test` for its length (about 3 minutes here):
        // 60 000 short connections to 1 000 destinations under Istio's iptables rules and
        // under redirect, every one succeeding under both.
        (
            "60 000 connections",
            cargo(&[
                "test",
                "-p",
                "redirect-agent",
                "--test",
                "fidelity",
                "--",
                "--ignored",
                "--exact",
                "sixty_thousand_connections_succeed_as_under_iptables",
            ]),
        ),
        ("clippy (eBPF)", ebpf),
        // Keeps the data-path benchmark harness working: one repetition, small counts, no
        // timing assertion, but it fails if a mode does not take the path it claims.
        ("bench --quick", cargo(&["xtask", "bench", "--quick"])),
    ];
    if !args.no_kernels {
        // The probe and datapath tests on 5.10, 6.1, 6.12 and 7.x under qemu, and the host.
        // The report goes under target/ so a test run never rewrites the committed KERNELS.md.
        let report = util::workspace_root().join("target/kernels/KERNELS.md");
        let mut kernels = cargo(&["xtask", "kernels", "--markdown"]);
        kernels.arg(report);
        steps.push(("kernels", kernels));
    }
    let total = steps.len() + 1;

    header(&format!("[1/{total}] setup"));
    crate::setup::run().context("step 'setup' failed")?;
    for (i, (name, mut cmd)) in steps.into_iter().enumerate() {
        header(&format!(
            "[{}/{total}] {name}: {}",
            i + 2,
            util::display(&cmd)
        ));
        let step_start = Instant::now();
        util::run(&mut cmd).with_context(|| format!("step '{name}' failed"))?;
        println!("  ok ({:.1}s)", step_start.elapsed().as_secs_f64());
        disk_report();
    }
    header(&format!(
        "all {total} steps passed in {:.0}s",
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}
