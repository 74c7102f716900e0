//! Kernel modules: the ones the test bed needs, dependencies first (from each module's
//! .modinfo), decompressed.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// Reads a module file, decompressing .xz / .zst.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => Ok(fs::read(path)?),
        Some(t) => {
            let out = Command::new(t)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("cannot run {t}"))?;
            if !out.status.success() {
                bail!(
                    "{t} -dc {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(out.stdout)
        }
    }
}

fn module_name(path: &Path) -> String {
    let n = path.file_name().unwrap_or_default().to_string_lossy();
    n.split(".ko").next().unwrap_or("").replace('-', "_")
}

/// The `depends=` field of a module's .modinfo.
pub fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(pos) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[pos + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// Module names with their (decompressed) contents, in insmod order.
type Modules = Vec<(String, Vec<u8>)>;

/// The modules to insmod, dependencies first, with their (decompressed) contents; and the
/// requested ones that are neither modules nor built in.
pub fn module_plan(modules_dir: &Path, wanted: &[String]) -> Result<(Modules, Vec<String>)> {
    let mut files: HashMap<String, PathBuf> = HashMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().contains(".ko") {
                files.insert(module_name(&p), p);
            }
        }
    }
    let builtin: BTreeSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(|l| module_name(Path::new(l)))
        .collect();
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut missing = Vec::new();
    fn visit(
        name: &str,
        files: &HashMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
        missing: &mut Vec<String>,
    ) -> Result<()> {
        if !done.insert(name.to_string()) {
            return Ok(());
        }
        let Some(path) = files.get(name) else {
            if !builtin.contains(name) {
                missing.push(name.to_string());
            }
            return Ok(());
        };
        let data = read_module(path)?;
        for dep in modinfo_depends(&data) {
            visit(&dep, files, builtin, done, order, missing)?;
        }
        order.push((name.to_string(), data));
        Ok(())
    }
    for w in wanted {
        visit(
            &w.replace('-', "_"),
            &files,
            &builtin,
            &mut done,
            &mut order,
            &mut missing,
        )?;
    }
    Ok((order, missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_dependencies() {
        let ko = b"\x7fELF....\0license=GPL\0depends=stp,llc\0intree=Y\0";
        assert_eq!(modinfo_depends(ko), vec!["stp", "llc"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert_eq!(module_name(Path::new("/x/nf-nat.ko.xz")), "nf_nat");
    }
}
