//! deploy/: the kustomize bases render to the committed manifests, and those manifests are
//! valid against the schemas of every Kubernetes minor redirect supports.
//!
//! `UPDATE_DEPLOY=1 cargo test -p xtask --test deploy` rewrites the rendered files.
//! kubectl (Debian `kubernetes-client`) and the pinned `kubernetes-validate` come from
//! `cargo xtask setup`.

use std::path::{Path, PathBuf};
use std::process::Command;

use redirect_devtools::KUBERNETES_VALIDATE;

/// The Kubernetes minors redirect supports: those of kube-rs 5 / k8s-openapi 0.29, which the
/// agent's API client is built with (its types are 1.37's).
const SUPPORTED_MINORS: &[&str] = &["1.33", "1.34", "1.35", "1.36", "1.37"];

/// Each kustomize directory and the file it renders to.
const RENDERED: &[(&str, &str)] = &[
    ("deploy", "deploy/redirect.yaml"),
    ("deploy/uninstall", "deploy/redirect-uninstall.yaml"),
];

fn root() -> &'static Path {
    redirect_devtools::workspace_root()
}

fn kustomize(dir: &str) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join(dir))
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl ({e}); `cargo xtask setup` installs it"));
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kustomize prints UTF-8")
}

#[test]
fn rendered_manifests_are_what_kustomize_renders() {
    let update = std::env::var_os("UPDATE_DEPLOY").is_some();
    let mut stale = Vec::new();
    for (dir, file) in RENDERED {
        let rendered = kustomize(dir);
        let path = root().join(file);
        if update {
            std::fs::write(&path, &rendered).expect("write the rendered manifest");
            continue;
        }
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_DEPLOY=1 writes it)", path.display()));
        if committed != rendered {
            stale.push(format!("`kubectl kustomize {dir}` differs from {file}"));
        }
    }
    assert!(
        stale.is_empty(),
        "{}\nUPDATE_DEPLOY=1 cargo test -p xtask --test deploy rewrites them",
        stale.join("\n")
    );
}

fn validate(version: &str, files: &[PathBuf]) -> (bool, String) {
    let bin = KUBERNETES_VALIDATE.bin();
    let out = Command::new(&bin)
        .args(["--strict", "--kubernetes-version"])
        .arg(format!("{version}.0"))
        .args(files)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); `cargo xtask setup` installs it",
                bin.display()
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn manifests_are_valid_for_every_supported_minor() {
    let files: Vec<PathBuf> = RENDERED.iter().map(|(_, f)| root().join(f)).collect();
    let mut failures = Vec::new();
    for minor in SUPPORTED_MINORS {
        let (ok, text) = validate(minor, &files);
        println!("Kubernetes {minor}:\n{text}");
        // Every object is reported: one the validator skipped would not be listed.
        let validated = text.matches(" passed for resource ").count();
        if !ok || text.contains("WARN") || text.contains("ERROR") {
            failures.push(format!("Kubernetes {minor}: {text}"));
        }
        assert!(
            validated == 7,
            "Kubernetes {minor}: {validated} objects passed, not the 7 of both files:\n{text}"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The validator is not vacuous: a DaemonSet with a misspelt field and one with a wrong type
/// are both refused by every supported minor's strict schema.
#[test]
fn the_validator_refuses_an_invalid_daemonset() {
    let dir = std::env::temp_dir().join(format!("redirect-deploy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read_to_string(root().join("deploy/redirect.yaml")).unwrap();
    let cases = [
        (
            "misspelt",
            good.replacen("hostNetwork: true", "hostNetwrok: true", 1),
        ),
        (
            "wrong-type",
            good.replacen("maxUnavailable: 1", "maxUnavailable: [1]", 1),
        ),
    ];
    for (name, text) in cases {
        assert_ne!(text, good, "{name}: the edit must change the manifest");
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, text).unwrap();
        for minor in SUPPORTED_MINORS {
            let (ok, out) = validate(minor, std::slice::from_ref(&path));
            assert!(
                !ok,
                "Kubernetes {minor} accepted the {name} DaemonSet:\n{out}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
