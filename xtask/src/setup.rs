//! `cargo xtask setup`: installs what a fresh Debian 12 machine (root, rustup with stable)
//! lacks to build, test and demo redirect. Idempotent and fast when everything is there.
//! The agent mounts bpffs itself, so setup does not.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::util::{self, debian_packages, header, installed, output_if_success, present};

/// LLVM major version shared by the nightly rustc and bpf-linker (they must match).
const LLVM_MAJOR: u32 = 22;
/// Where Debian's llvm-22-dev lives; bpf-linker's build looks for libLLVM there.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_FEATURE: &str = "llvm-22";

/// Every Debian package the project needs, in one place.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev", // to build bpf-linker (LLVM_PREFIX above)
    "containernetworking-plugins",
    "iproute2",
    "iptables",
    "nftables",
    "nginx-light",
    "socat",
    "bpftool",
    "iperf3",
    "qemu-system-x86",
    "zstd",
    "cpio",
    // bench datapath: conntrack counts, nginx's stream proxy, the charts' font
    "conntrack",
    "libnginx-mod-stream",
    "fonts-dejavu-core",
    // the third real proxy of the benchmark and of the conformance matrix (tests/datapath.rs)
    "haproxy",
    // DNS capture tests (redirect-agent/tests/dns.rs): the servers and the client
    "dnsmasq-base",
    "bind9-dnsutils",
    // tests/agent.rs: a real Prometheus scrapes the node agent; promtool checks /metrics
    "prometheus",
    // The runtime test bed (redirect-testbed containerd/cri, tests/runtime.rs): Debian's
    // containerd and runc; protoc builds the CRI API bindings (k8s-cri) of the agent and the bed.
    "containerd",
    "runc",
    "protobuf-compiler",
    // static (musl) builds of the agent for its image: the C parts of its dependencies (ring,
    // under kube's rustls) need a musl C compiler (musl-gcc)
    "musl-tools",
    // deploy/: a venv holds the pinned PyPI validator (kubectl: see `kubectl()` below)
    "python3-venv",
];

/// Static binaries for container images (`cargo xtask image`, the runtime test bed).
const MUSL_TARGET: &str = redirect_devtools::STATIC_TARGET;

/// Pinned PyPI tools (each in its own venv, see redirect_devtools::PypiTool).
pub const PYPI_TOOLS: &[redirect_devtools::PypiTool] = &[redirect_devtools::KUBERNETES_VALIDATE];

pub fn run() -> Result<()> {
    header("setup: toolchain and system packages");
    let start = Instant::now();
    debian_packages(DEBIAN_PACKAGES)?;
    kubectl()?;
    for tool in PYPI_TOOLS {
        tool.install()?;
    }
    nightly_rust_src()?;
    musl_target()?;
    bpf_linker()?;
    println!("setup done in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// kubectl (kustomize renders deploy/; a real client for the fake API server's test)

/// Debian's `kubernetes-client` only when no kubectl is on PATH: these machines ship a newer
/// one (1.32, kustomize v5, which deploy/redirect.yaml is rendered with) under the package
/// name `kubectl`, and Debian 12's 1.20 cannot be installed beside it (both own
/// /usr/bin/kubectl). The deploy test names the kustomize version it needs if it is older.
fn kubectl() -> Result<()> {
    match output_if_success(Command::new("kubectl").args(["version", "--client"])) {
        Some(v) => present(&format!(
            "kubectl ({})",
            v.lines().next().unwrap_or("").trim()
        )),
        None => {
            debian_packages(&["kubernetes-client"])?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// nightly + rust-src (for -Z build-std=core on the bpf target)

fn nightly_rust_src() -> Result<()> {
    const ITEM: &str = "rustup nightly + rust-src";
    // RUSTUP_AUTO_INSTALL=0: asking about a missing toolchain must fail, not install it.
    let components = output_if_success(
        Command::new("rustup")
            .args(["component", "list", "--toolchain", "nightly", "--installed"])
            .env("RUSTUP_AUTO_INSTALL", "0"),
    );
    match components {
        Some(list) if has_rust_src(&list) => present(ITEM),
        Some(_) => {
            // Toolchain is there: only add the component, do not update nightly (its LLVM
            // major must keep matching bpf-linker's).
            util::run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))?;
            installed(ITEM);
        }
        None => {
            util::run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
            installed(ITEM);
        }
    }
    Ok(())
}

fn musl_target() -> Result<()> {
    let item = format!("rustup target {MUSL_TARGET}");
    let targets = output_if_success(Command::new("rustup").args(["target", "list", "--installed"]))
        .unwrap_or_default();
    if targets.lines().any(|l| l.trim() == MUSL_TARGET) {
        present(&item);
    } else {
        util::run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
        installed(&item);
    }
    Ok(())
}

fn has_rust_src(component_list: &str) -> bool {
    component_list
        .lines()
        .any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src-"))
}

// ---------------------------------------------------------------------------------------------
// bpf-linker built against LLVM 22

#[derive(Debug, PartialEq)]
enum LinkerState {
    Missing,
    WrongVersion(String),
    WrongLlvm(String),
    /// Right version, right LLVM (or LLVM not determinable: static build not from cargo install).
    Ok {
        llvm_known: bool,
    },
}

fn bpf_linker() -> Result<()> {
    let item = format!("bpf-linker {BPF_LINKER_VERSION} (LLVM {LLVM_MAJOR})");
    let (path, state) = bpf_linker_state();
    match state {
        LinkerState::Ok { llvm_known: true } => {
            present(&item);
            return Ok(());
        }
        LinkerState::Ok { llvm_known: false } => {
            present(&format!("{item} (LLVM version not determinable, assumed)"));
            return Ok(());
        }
        LinkerState::Missing => {
            println!("  bpf-linker not found, building it (about 2 minutes) ...")
        }
        LinkerState::WrongVersion(v) => {
            println!("  bpf-linker is {v:?}, want {BPF_LINKER_VERSION}: rebuilding ...")
        }
        LinkerState::WrongLlvm(why) => {
            println!("  bpf-linker: {why}, want LLVM {LLVM_MAJOR}: rebuilding ...")
        }
    }
    if !PathBuf::from(LLVM_PREFIX).join("lib").is_dir() {
        bail!("{LLVM_PREFIX} is missing: install llvm-{LLVM_MAJOR}-dev first");
    }
    let mut cmd = util::cargo();
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        BPF_LINKER_FEATURE,
    ]);
    if path.is_some() {
        cmd.arg("--force");
    }
    // Out of the workspace, so its .cargo/config.toml does not apply.
    cmd.current_dir(std::env::temp_dir())
        .env("LLVM_PREFIX", LLVM_PREFIX);
    util::run(&mut cmd)?;
    match bpf_linker_state() {
        (_, LinkerState::Ok { .. }) => installed(&item),
        (path, state) => bail!(
            "bpf-linker installed but still not right ({state:?} at {path:?}); is $CARGO_HOME/bin on PATH?"
        ),
    }
    Ok(())
}

fn bpf_linker_path() -> Option<PathBuf> {
    util::find_on_path("bpf-linker").or_else(|| {
        let p = cargo_home()?.join("bin/bpf-linker");
        p.is_file().then_some(p)
    })
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

fn bpf_linker_state() -> (Option<PathBuf>, LinkerState) {
    let Some(path) = bpf_linker_path() else {
        return (None, LinkerState::Missing);
    };
    // `bpf-linker --version` prints only "bpf-linker 0.13.0", not the LLVM it links.
    let version = output_if_success(Command::new(&path).arg("--version")).unwrap_or_default();
    let version = version.lines().next().unwrap_or("").trim().to_owned();
    if version != format!("bpf-linker {BPF_LINKER_VERSION}") {
        return (Some(path), LinkerState::WrongVersion(version));
    }
    // Built with LLVM_PREFIX it links libLLVM dynamically: ldd shows which one.
    let ldd = output_if_success(Command::new("ldd").arg(&path)).unwrap_or_default();
    let llvm = match llvm_from_ldd(&ldd) {
        Some(Ok(major)) => Some(major),
        Some(Err(why)) => return (Some(path), LinkerState::WrongLlvm(why)),
        // Static build: fall back to the features cargo install recorded.
        None => llvm_from_crates2(),
    };
    let state = match llvm {
        Some(major) if major == LLVM_MAJOR => LinkerState::Ok { llvm_known: true },
        Some(major) => LinkerState::WrongLlvm(format!("built against LLVM {major}")),
        None => LinkerState::Ok { llvm_known: false },
    };
    (Some(path), state)
}

/// From `ldd bpf-linker`: `None` if no libLLVM is linked dynamically, `Err` if it is linked but
/// not found, else the LLVM major (`libLLVM.so.22.1` or `libLLVM-22.so`).
fn llvm_from_ldd(ldd: &str) -> Option<Result<u32, String>> {
    let line = ldd
        .lines()
        .find(|l| l.trim_start().starts_with("libLLVM"))?;
    let lib = line.split_whitespace().next()?;
    if line.contains("not found") {
        return Some(Err(format!("{lib} not found (LLVM package removed?)")));
    }
    let rest = lib.trim_start_matches("libLLVM");
    let rest = rest
        .strip_prefix(".so.")
        .or_else(|| rest.strip_prefix('-'))
        .unwrap_or(rest);
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some(
        digits
            .parse()
            .map_err(|_| format!("cannot read the LLVM version of {lib}")),
    )
}

/// The `llvm-NN` feature that `cargo install` recorded for bpf-linker, if any.
fn llvm_from_crates2() -> Option<u32> {
    let text = std::fs::read_to_string(cargo_home()?.join(".crates2.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let (_, install) = json["installs"]
        .as_object()?
        .iter()
        .find(|(k, _)| k.starts_with("bpf-linker "))?;
    install["features"]
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str()?.strip_prefix("llvm-")?.parse().ok())
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_src_detection() {
        assert!(has_rust_src(
            "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustc-x86_64-unknown-linux-gnu\n"
        ));
        assert!(!has_rust_src(
            "cargo-x86_64-unknown-linux-gnu\nrust-std-x86_64-unknown-linux-gnu\n"
        ));
    }

    #[test]
    fn ldd_llvm_version() {
        let ok = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f7c)\n";
        assert_eq!(llvm_from_ldd(ok), Some(Ok(22)));
        let older = "\tlibLLVM-19.so => /usr/lib/llvm-19/lib/libLLVM-19.so (0x1)\n";
        assert_eq!(llvm_from_ldd(older), Some(Ok(19)));
        let gone = "\tlibLLVM.so.22.1 => not found\n";
        assert!(matches!(llvm_from_ldd(gone), Some(Err(_))));
        assert_eq!(
            llvm_from_ldd("\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6\n"),
            None
        );
    }
}
