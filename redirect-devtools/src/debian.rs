//! Debian packages: which are missing, and installing them with apt-get (setup and the
//! benchmark both need some).

use std::collections::HashSet;
use std::process::Command;

use crate::{installed, present, run, Error, Result};

/// Installs those of `packages` that are not installed, printing a line for each.
pub fn debian_packages(packages: &[&str]) -> Result<()> {
    let missing = missing_packages(packages)?;
    for p in packages.iter().filter(|p| !missing.contains(*p)) {
        present(&format!("apt {p}"));
    }
    if missing.is_empty() {
        return Ok(());
    }
    println!("  installing {} ...", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        run(Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .map_err(|e| Error::Apt(Box::new(e)))
    };
    apt(&["update"])?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(missing.iter().copied());
    apt(&install)?;
    let still = missing_packages(&missing)?;
    if !still.is_empty() {
        return Err(Error::StillMissing(
            still.iter().map(|s| s.to_string()).collect(),
        ));
    }
    for p in &missing {
        installed(&format!("apt {p}"));
    }
    Ok(())
}

/// The subset of `packages` that dpkg does not report as installed.
pub fn missing_packages<'a>(packages: &[&'a str]) -> Result<Vec<&'a str>> {
    // dpkg-query exits 1 when some name is unknown, but still prints the known ones.
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package}\\t${Status}\\n")
        .args(packages)
        .output()
        .map_err(Error::DpkgQuery)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed = installed_from_dpkg_query(&stdout);
    Ok(packages
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

/// Parses `dpkg-query -W -f='${Package}\t${Status}\n'` output into the installed package names.
/// Status is "want flag state"; only state "installed" counts (not "config-files", "half-installed", ...).
fn installed_from_dpkg_query(output: &str) -> HashSet<&str> {
    output
        .lines()
        .filter_map(|line| {
            let (name, status) = line.split_once('\t')?;
            let state = status.split_whitespace().nth(2)?;
            (state == "installed").then_some(name.trim())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_query_output_parsing() {
        let out = "iproute2\tinstall ok installed\n\
                   nginx-light\tdeinstall ok config-files\n\
                   socat\tinstall ok half-installed\n\
                   zstd\tinstall ok installed\n";
        let got = installed_from_dpkg_query(out);
        assert_eq!(got, HashSet::from(["iproute2", "zstd"]));
    }

    /// The real detection path against this machine's dpkg: a package that cannot exist is
    /// reported missing (dpkg-query exits 1 for it), an essential one is not.
    #[test]
    fn missing_package_is_detected() {
        if crate::find_on_path("dpkg-query").is_none() {
            eprintln!("skipped: no dpkg-query");
            return;
        }
        let missing = missing_packages(&["dpkg", "redirect-xtask-no-such-package"]).unwrap();
        assert_eq!(missing, ["redirect-xtask-no-such-package"]);
        assert!(missing_packages(&["dpkg"]).unwrap().is_empty());
    }
}
