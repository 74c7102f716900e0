//! The kernels' packages: apt with a private sources list and private state (the machine's apt
//! configuration is never touched), cached under `/var/cache/redirect-kernels`.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use redirect_devtools as dev;

/// The kernels of the matrix: label, Debian suite, version prefix of `linux-image-cloud-amd64`.
pub const KERNELS: &[(&str, &str, &str)] = &[
    ("5.10", "bullseye", "5.10."),
    ("6.1", "bookworm", "6.1."),
    ("6.12", "trixie", "6.12."),
    ("7.x", "sid", "7."),
];

pub fn cache_root() -> PathBuf {
    std::env::var_os("REDIRECT_KERNELS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/redirect-kernels"))
}

pub struct Apt {
    pub root: PathBuf,
}

impl Apt {
    pub fn new(root: &Path) -> Result<Self> {
        let apt = root.join("apt");
        for d in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(apt.join(d))?;
        }
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let mut list = String::new();
        for (_, suite, _) in KERNELS {
            writeln!(
                list,
                "deb [signed-by={keyring}] http://deb.debian.org/debian {suite} main"
            )?;
        }
        fs::write(apt.join("sources.list"), list)?;
        if !apt.join("status").exists() {
            fs::write(apt.join("status"), "")?;
        }
        Ok(Apt { root: apt })
    }

    fn cmd(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        let r = &self.root;
        for (k, v) in [
            ("Dir::Etc::SourceList", r.join("sources.list")),
            ("Dir::Etc::SourceParts", PathBuf::from("/dev/null")),
            ("Dir::State::Lists", r.join("lists")),
            ("Dir::State::Status", r.join("status")),
            ("Dir::Cache", r.join("cache")),
        ] {
            c.arg("-o").arg(format!("{k}={}", v.display()));
        }
        for o in [
            "APT::Architecture=amd64",
            "Debug::NoLocking=1",
            "APT::Sandbox::User=root",
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false",
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false",
            "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false",
        ] {
            c.args(["-o", o]);
        }
        c
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(self.root.join("lists")).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
    }

    fn update(&self) -> Result<()> {
        let mut c = self.cmd("apt-get");
        c.args(["-q", "update"]);
        Ok(dev::run(&mut c)?)
    }

    fn output(&self, tool: &str, args: &[&str]) -> Result<String> {
        let mut c = self.cmd(tool);
        c.args(args);
        let out = c.output().with_context(|| format!("cannot start {tool}"))?;
        if !out.status.success() {
            bail!(
                "`{tool} {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The version of `pkg` in `suite` whose version starts with `prefix`.
    fn version_in(&self, pkg: &str, suite: &str, prefix: &str) -> Result<String> {
        let out = self.output("apt-cache", &["madison", pkg])?;
        out.lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split('|').map(str::trim).collect();
                (cols.len() >= 3
                    && cols[2].contains(&format!(" {suite}/"))
                    && cols[1].starts_with(prefix))
                .then(|| cols[1].to_string())
            })
            .next()
            .with_context(|| format!("no {pkg} {prefix}* in {suite}"))
    }

    fn depends(&self, pkg: &str, version: &str) -> Result<Vec<String>> {
        let out = self.output("apt-cache", &["show", &format!("{pkg}={version}")])?;
        let line = out
            .lines()
            .find(|l| l.starts_with("Depends:"))
            .unwrap_or("Depends:");
        Ok(line["Depends:".len()..]
            .split([',', '|'])
            .filter_map(|d| d.split_whitespace().next().map(str::to_string))
            .collect())
    }

    fn download(&self, dir: &Path, pkg: &str, version: &str) -> Result<PathBuf> {
        let find = || -> Option<PathBuf> {
            fs::read_dir(dir)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .map(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
                        .unwrap_or(false)
                        && p.extension().is_some_and(|e| e == "deb")
                })
        };
        if let Some(p) = find() {
            return Ok(p);
        }
        let mut c = self.cmd("apt-get");
        c.current_dir(dir)
            .args(["-q", "download", &format!("{pkg}={version}")]);
        dev::run(&mut c)?;
        find().with_context(|| format!("apt-get download {pkg} left no .deb"))
    }
}

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub label: String,
    pub packages: Vec<String>,
    pub version: String,
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
}

fn extract(deb: &Path, into: &Path) -> Result<()> {
    Ok(dev::run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(into),
    )?)
}

/// Resolves, downloads and extracts one kernel; the extracted tree is reused.
pub fn fetch_kernel(apt: &Apt, cache: &Path, label: &str, refresh: bool) -> Result<Kernel> {
    let (_, suite, prefix) = KERNELS
        .iter()
        .find(|k| k.0 == label)
        .context("unknown kernel")?;
    let dir = cache.join("kernels").join(label);
    let meta_path = dir.join("kernel.json");
    if !refresh {
        if let Ok(meta) = fs::read_to_string(&meta_path) {
            let v: serde_json::Value = serde_json::from_str(&meta)?;
            if let Some(k) = kernel_from_tree(label, &dir, &v) {
                return Ok(k);
            }
        }
    }
    if refresh || !apt.has_lists() {
        apt.update()?;
    }
    let version = apt.version_in("linux-image-cloud-amd64", suite, prefix)?;
    let image = apt
        .depends("linux-image-cloud-amd64", &version)?
        .into_iter()
        .find(|d| d.starts_with("linux-image-") && d != "linux-image-cloud-amd64")
        .context("the meta package names no image")?;
    let mut packages = vec![image.clone()];
    for d in apt.depends(&image, &version)? {
        if d.starts_with("linux-binary-") || d.starts_with("linux-modules-") {
            packages.push(d);
        }
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let _ = fs::remove_dir_all(dir.join("root"));
    fs::create_dir_all(dir.join("root"))?;
    for p in &packages {
        let deb = apt.download(&debs, p, &version)?;
        extract(&deb, &dir.join("root"))?;
    }
    let meta = serde_json::json!({"packages": packages, "version": version});
    fs::write(&meta_path, serde_json::to_string_pretty(&meta)?)?;
    kernel_from_tree(label, &dir, &meta).context("no vmlinuz or modules in the packages")
}

fn kernel_from_tree(label: &str, dir: &Path, meta: &serde_json::Value) -> Option<Kernel> {
    let root = dir.join("root");
    let mut modules_dir = None;
    for base in ["lib/modules", "usr/lib/modules"] {
        if let Ok(rd) = fs::read_dir(root.join(base)) {
            if let Some(e) = rd.flatten().find(|e| e.path().join("kernel").is_dir()) {
                modules_dir = Some(e.path());
            }
        }
    }
    let modules_dir = modules_dir?;
    let release = modules_dir.file_name()?.to_string_lossy().into_owned();
    let vmlinuz = [
        root.join("boot").join(format!("vmlinuz-{release}")),
        modules_dir.join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())?;
    Some(Kernel {
        label: label.to_string(),
        packages: meta["packages"]
            .as_array()?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        version: meta["version"].as_str()?.to_string(),
        release,
        vmlinuz,
        modules_dir,
    })
}

/// busybox from bookworm's busybox-static, for the init's shell and tools.
pub fn fetch_busybox(apt: &Apt, cache: &Path) -> Result<PathBuf> {
    let bb = cache.join("busybox");
    if bb.is_file() {
        return Ok(bb);
    }
    if !apt.has_lists() {
        apt.update()?;
    }
    let version = apt.version_in("busybox-static", "bookworm", "")?;
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let deb = apt.download(&debs, "busybox-static", &version)?;
    let tmp = cache.join("busybox-x");
    let _ = fs::remove_dir_all(&tmp);
    extract(&deb, &tmp)?;
    fs::copy(tmp.join("bin/busybox"), &bb)?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(bb)
}
