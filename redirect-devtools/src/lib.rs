//! What the developer tools share: xtask (setup, test, demo), `redirect-bench` and
//! `redirect-kernels`. Where the workspace and its target directory are, running commands with
//! errors that name them, section headers, and installing Debian packages.
//!
//! xtask builds on this before anything else on a fresh machine, so it stays small: the
//! standard library, thiserror and serde_json (for `cargo metadata`).

mod debian;
mod pypi;

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

pub use debian::{debian_packages, missing_packages};
pub use pypi::{PypiTool, KUBERNETES_VALIDATE};

/// Why a command (or a step made of commands) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program could not be started (not installed, not executable).
    #[error("cannot start `{command}`")]
    Start {
        command: String,
        #[source]
        source: io::Error,
    },
    /// It ran and exited non-zero; its output went to the terminal.
    #[error("`{command}` failed ({status})")]
    Failed { command: String, status: ExitStatus },
    /// It ran and exited non-zero; what it said on stderr.
    #[error("`{command}` failed ({status}): {stderr}")]
    FailedSaying {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    /// Talking to it (its stdin, waiting for it) failed.
    #[error("`{command}`")]
    Io {
        command: String,
        #[source]
        source: io::Error,
    },
    /// `cargo metadata` said something unexpected.
    #[error("cargo metadata: {0}")]
    Metadata(String),
    /// Installing Debian packages failed.
    #[error("apt-get failed (setup needs root and a working Debian package source)")]
    Apt(#[source] Box<Error>),
    /// apt-get said it installed them, dpkg says they are not.
    #[error("apt-get reported success but these are still not installed: {0:?}")]
    StillMissing(Vec<String>),
    /// No dpkg-query: not a Debian machine.
    #[error("cannot run dpkg-query: `cargo xtask setup` expects a Debian machine")]
    DpkgQuery(#[source] io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The workspace root (the parent of this crate's directory; every tool is one level below it).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("redirect-devtools lives one level below the workspace root")
}

/// The cargo that runs us (`$CARGO`), so nested builds use the same toolchain; in the workspace
/// root.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    // What cargo sets for the crate now running (a test, xtask, a bench) is not the nested
    // build's: inherited, it differs between a test and xtask, and build scripts that watch
    // the environment then rebuild the same binaries each time one follows the other.
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&k)
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// A visible section header.
pub fn header(title: &str) {
    println!("\n==> {title}");
    flush();
}

/// A setup line: `item` was there already.
pub fn present(item: &str) {
    println!("  present    {item}");
}

/// A setup line: `item` was installed now.
pub fn installed(item: &str) {
    println!("  installed  {item}");
}

/// Flushes stdout and stderr, so that a child's output comes after ours.
pub fn flush() {
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
}

/// Host-side cargo steps skip the eBPF crate: its binary only builds for the bpf target
/// (nightly, build-std, bpf-linker), which redirect-agent's build.rs does. It is why the root
/// manifest's default-members leave it out. `cargo fmt --all` still covers it.
pub const HOST_EXCLUDE: &[&str] = &["--exclude", "redirect-ebpf"];

/// Renders a command as a shell-like line for messages (`$CARGO` shown as `cargo`).
pub fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let program = if program.file_name() == Some("cargo".as_ref()) {
        "cargo".into()
    } else {
        program.to_string_lossy()
    };
    let mut parts = vec![program.into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` with inherited stdio; an error names the command and its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    flush();
    let status = cmd.status().map_err(|source| Error::Start {
        command: display(cmd),
        source,
    })?;
    if !status.success() {
        return Err(Error::Failed {
            command: display(cmd),
            status,
        });
    }
    Ok(())
}

/// Runs `cmd` capturing its output: stdout if it exited 0, else an error with its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|source| Error::Start {
        command: display(cmd),
        source,
    })?;
    if !out.status.success() {
        return Err(failed_saying(cmd, out.status, &out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The error of `cmd` that exited with `status` and wrote `stderr`.
pub fn failed_saying(cmd: &Command, status: ExitStatus, stderr: &[u8]) -> Error {
    Error::FailedSaying {
        command: display(cmd),
        status,
        stderr: String::from_utf8_lossy(stderr).trim().to_owned(),
    }
}

/// Runs `cmd` capturing its output; returns stdout if it exited 0, `None` if it did not
/// (or could not be started: a missing tool counts as "not there").
pub fn output_if_success(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Finds an executable on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `cargo metadata`'s target directory (honours CARGO_TARGET_DIR and config).
pub fn target_dir() -> Result<PathBuf> {
    let out = output(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let meta: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| Error::Metadata(format!("parsing its output: {e}")))?;
    let dir = meta["target_directory"]
        .as_str()
        .ok_or_else(|| Error::Metadata("no target_directory".into()))?;
    Ok(PathBuf::from(dir))
}

/// `cargo build --workspace --bins` (less the eBPF crate), so tests and the demo find sibling
/// binaries in target/debug.
pub fn build_workspace_bins() -> Result<()> {
    run(cargo()
        .args(["build", "--workspace", "--bins"])
        .args(HOST_EXCLUDE))
}

/// The target of the static binaries that go into container images: musl, linked statically,
/// so an image needs no base (`rustup target add x86_64-unknown-linux-musl`, which setup does).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

/// The cargo profile of those binaries (the root manifest's `[profile.image]`: release,
/// stripped).
pub const STATIC_PROFILE: &str = "image";

/// Builds the static binaries of `packages` (`cargo build --profile image --target
/// x86_64-unknown-linux-musl -p ...`; fast when they are fresh) and returns the directory that
/// holds them, `<target>/x86_64-unknown-linux-musl/image`. redirect-agent's embedded eBPF object
/// is built by its build script as for a host build.
pub fn build_static(packages: &[&str]) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--profile",
        STATIC_PROFILE,
        "--target",
        STATIC_TARGET,
    ]);
    for p in packages {
        cmd.args(["--package", p]);
    }
    run(&mut cmd)?;
    Ok(target_dir()?.join(STATIC_TARGET).join(STATIC_PROFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_command_and_what_it_said() {
        let err =
            output(Command::new("sh").args(["-c", "echo out; echo oops >&2; exit 3"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`sh -c echo out; echo oops >&2; exit 3` failed (exit status: 3): oops"
        );
        let err = run(&mut Command::new("/nonexistent/redirect-devtools-test")).unwrap_err();
        assert!(matches!(err, Error::Start { .. }), "{err:?}");
        assert_eq!(
            output(Command::new("sh").args(["-c", "echo out"])).unwrap(),
            "out\n"
        );
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }
}
