//! Tools from PyPI, each pinned and installed into a virtual environment of its own under
//! `~/.cache/redirect/pypi/NAME-VERSION` (outside the target directory, so `cargo clean` keeps
//! it; outside the system Python, which Debian marks externally managed). Debian's
//! `/usr/bin/python3` with `python3-venv` makes the environment.

use std::path::PathBuf;
use std::process::Command;

use crate::{installed, output_if_success, present, run, Result};

/// A pinned PyPI package and the executable it installs.
#[derive(Debug, Clone, Copy)]
pub struct PypiTool {
    pub package: &'static str,
    pub version: &'static str,
    pub executable: &'static str,
}

/// Validates manifests against the bundled schemas of each Kubernetes minor
/// (`deploy/` tests: `xtask/tests/deploy.rs`).
pub const KUBERNETES_VALIDATE: PypiTool = PypiTool {
    package: "kubernetes-validate",
    version: "1.37.0",
    executable: "kubernetes-validate",
};

impl PypiTool {
    /// The virtual environment holding this version.
    pub fn venv(&self) -> PathBuf {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home)
            .join(".cache/redirect/pypi")
            .join(format!("{}-{}", self.package, self.version))
    }

    /// Its executable (present once [`PypiTool::install`] ran).
    pub fn bin(&self) -> PathBuf {
        self.venv().join("bin").join(self.executable)
    }

    fn is_installed(&self) -> bool {
        let pinned = format!("{}=={}", self.package, self.version);
        self.bin().is_file()
            && output_if_success(
                Command::new(self.venv().join("bin/pip"))
                    .args(["freeze", "--disable-pip-version-check"]),
            )
            .is_some_and(|f| f.lines().any(|l| l.eq_ignore_ascii_case(&pinned)))
    }

    /// Installs it unless this exact version is there (idempotent, fast when present).
    pub fn install(&self) -> Result<()> {
        let item = format!("pypi {}=={}", self.package, self.version);
        if self.is_installed() {
            present(&item);
            return Ok(());
        }
        let venv = self.venv();
        // A half-made environment from an interrupted run is made again.
        let _ = std::fs::remove_dir_all(&venv);
        run(Command::new("/usr/bin/python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv))?;
        run(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("{}=={}", self.package, self.version),
        ]))?;
        installed(&item);
        Ok(())
    }
}
