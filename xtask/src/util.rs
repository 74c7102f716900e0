//! Small helpers shared by the subcommands: step headers and running commands.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// The cargo that runs us (`$CARGO`), so nested builds use the same toolchain.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// A visible section header.
pub fn header(title: &str) {
    println!("\n==> {title}");
    flush();
}

pub fn flush() {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
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
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
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
    let mut cmd = cargo();
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            display(&cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// `cargo build --workspace --bins` (less the eBPF crate), so tests and the demo find sibling
/// binaries in target/debug.
pub fn build_workspace_bins() -> Result<()> {
    run(cargo()
        .args(["build", "--workspace", "--bins"])
        .args(HOST_EXCLUDE))
}

/// Runs `cmd` with `input` on its stdin; fails with its stderr when it exits non-zero.
pub fn run_with_input(cmd: &mut Command, input: &str) -> Result<()> {
    use std::process::Stdio;
    let what = display(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{what}`"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip -force -batch -`: many namespace and link commands in one process.
pub fn ip_batch(commands: &str) -> Result<()> {
    if commands.is_empty() {
        return Ok(());
    }
    run_with_input(Command::new("ip").args(["-force", "-batch", "-"]), commands)
}
