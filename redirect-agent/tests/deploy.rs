//! The DaemonSet (deploy/redirect.yaml, rendered from deploy/) asks the agent only for what
//! this agent understands: its command line and its ConfigMap's config file parse, and the
//! result is what the manifest means.

use std::{path::Path, process::Command};

use serde_json::Value;

fn manifest(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} {name}"))
}

/// The container's command with the agent's path replaced by the binary under test, run from
/// a directory holding the ConfigMap's files where the pod mounts them.
fn command_of(c: &Value, config_dir: &Path) -> Command {
    let argv: Vec<String> = c["command"]
        .as_array()
        .unwrap()
        .iter()
        .chain(c["args"].as_array().into_iter().flatten())
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("/etc/redirect", &config_dir.display().to_string())
        })
        .collect();
    assert_eq!(argv[0], "/usr/local/bin/redirect-agent", "{argv:?}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_redirect-agent"));
    cmd.args(&argv[1..]);
    cmd
}

#[test]
fn the_agent_reads_the_daemonsets_command_and_config() {
    let docs = manifest("redirect.yaml");
    let ds = find(&docs, "DaemonSet", "redirect-agent");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = container(pod, "containers", "agent");
    // The ConfigMap, mounted at /etc/redirect.
    let cm = find(&docs, "ConfigMap", "redirect-agent");
    let mount = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .unwrap();
    assert_eq!(mount["mountPath"], "/etc/redirect");
    let dir = std::env::temp_dir().join(format!("redirect-deploy-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (file, text) in cm["data"].as_object().unwrap() {
        std::fs::write(dir.join(file), text.as_str().unwrap()).unwrap();
    }
    let out = command_of(agent, &dir)
        .arg("--check-config")
        .env("NODE_NAME", "node-7")
        .env_remove("KUBECONFIG")
        .env_remove("REDIRECT_SOCKET")
        .env_remove("REDIRECT_PIN_ROOT")
        .env_remove("REDIRECT_STATE_DIR")
        .env_remove("REDIRECT_HTTP_ADDRESS")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the DaemonSet's command: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the manifest means: NODE_NAME from the downward API, the HTTP port the probes and
    // the Prometheus annotation name, the paths the hostPath volumes provide.
    assert!(text.contains(r#"node_name: "node-7""#), "{text}");
    let port = &pod["containers"][0]["readinessProbe"]["httpGet"]["port"];
    assert!(
        text.contains(&format!("http_address: 0.0.0.0:{port}")),
        "{text}"
    );
    assert_eq!(
        ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        port.to_string()
    );
    assert!(
        text.contains(r#"socket: "/run/redirect/agent.sock""#),
        "{text}"
    );
    assert!(
        text.contains(r#"pin_root: "/sys/fs/bpf/redirect""#),
        "{text}"
    );
    assert!(
        text.contains(r#"state_dir: "/run/redirect/state""#),
        "{text}"
    );
    let mounted: Vec<&str> = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for needed in [
        "/sys/fs/bpf",
        "/run/redirect",
        "/sys/fs/cgroup",
        "/var/run/netns",
    ] {
        assert!(
            mounted.contains(&needed),
            "{needed} not mounted: {mounted:?}"
        );
    }
}

/// The ClusterRole is exactly what the API watch uses: pods get/list/watch, events create.
#[test]
fn the_cluster_role_grants_only_what_the_watch_uses() {
    let docs = manifest("redirect.yaml");
    let role = find(&docs, "ClusterRole", "redirect-agent");
    assert_eq!(
        role["rules"],
        serde_json::json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        ])
    );
}

fn is_bpffs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// The init container's command: `mount-bpffs` makes the pin root ready (bpffs at it when its
/// parent is not bpffs, a directory when it is), and does nothing the second time.
#[test]
fn mount_bpffs_prepares_the_pin_root() {
    redirect_testbed::require!(redirect_testbed::Need::Root);
    let id = format!("redirect-mount-bpffs-{}", std::process::id());
    let on_bpffs = Path::new("/sys/fs/bpf").join(&id);
    let elsewhere = std::env::temp_dir().join(&id);
    /// Unmounts and removes both, also when the test fails.
    struct Cleanup(Vec<std::path::PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_dir(p);
            }
        }
    }
    let cleanup = Cleanup(vec![on_bpffs.clone(), elsewhere.clone()]);
    for root in [&on_bpffs, &elsewhere] {
        for _ in 0..2 {
            let out = Command::new(env!("CARGO_BIN_EXE_redirect-agent"))
                .arg("--pin-root")
                .arg(root)
                .arg("mount-bpffs")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "mount-bpffs {}: {}",
                root.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(is_bpffs(root), "{} is not on bpffs", root.display());
        }
    }
    drop(cleanup);
    assert!(!on_bpffs.exists() && !elsewhere.exists());
}

/// The uninstall DaemonSet's init container command parses and runs (as root, as in the pod):
/// with the agent's config naming this test's socket, state and pins, against a node's CNI
/// directories where the plugin was installed, it leaves them as they were before.
#[test]
fn the_uninstall_daemonsets_command_runs() {
    redirect_testbed::require!(redirect_testbed::Need::Root);
    let docs = manifest("redirect-uninstall.yaml");
    let ds = find(&docs, "DaemonSet", "redirect-uninstall");
    let init = container(
        &ds["spec"]["template"]["spec"],
        "initContainers",
        "uninstall",
    );
    let dir =
        std::env::temp_dir().join(format!("redirect-deploy-uninstall-{}", std::process::id()));
    let (bin, conf) = (dir.join("opt/cni/bin"), dir.join("etc/cni/net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    let primary = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#;
    std::fs::write(conf.join("10-k8s.conflist"), primary).unwrap();
    let plugin = dir.join("redirect-cni");
    std::fs::write(&plugin, "#!/bin/sh\n").unwrap();
    let agent = Command::new(env!("CARGO_BIN_EXE_redirect-agent"))
        .args(["install-cni", "--cni-bin-dir"])
        .arg(&bin)
        .arg("--cni-conf-dir")
        .arg(&conf)
        .arg("--cni-plugin")
        .arg(&plugin)
        .output()
        .unwrap();
    assert!(
        agent.status.success(),
        "{}",
        String::from_utf8_lossy(&agent.stderr)
    );
    assert_ne!(
        std::fs::read_to_string(conf.join("10-k8s.conflist")).unwrap(),
        primary
    );
    // The ConfigMap's paths, moved into this test's directory.
    let install = manifest("redirect.yaml");
    let cm = find(&install, "ConfigMap", "redirect-agent");
    let config = cm["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .replace("/run/redirect", &dir.join("run").display().to_string())
        .replace(
            "/run/containerd",
            &dir.join("containerd").display().to_string(),
        )
        .replace(
            "/sys/fs/bpf/redirect",
            &dir.join("pins").display().to_string(),
        );
    assert!(
        !config.contains(" /run/") && !config.contains(" /sys/"),
        "{config}"
    );
    std::fs::write(dir.join("config.yaml"), config).unwrap();
    let cmd = command_of(init, &dir);
    let argv: Vec<String> = cmd
        .get_args()
        .map(|a| {
            a.to_string_lossy()
                .replace("/host/opt/cni/bin", &bin.display().to_string())
                .replace("/host/etc/cni/net.d", &conf.display().to_string())
        })
        .collect();
    let mut cmd = Command::new(cmd.get_program());
    cmd.args(argv);
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "the uninstall command: {text}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("removed the CNI plugin"), "{said}");
    assert_eq!(
        std::fs::read_to_string(conf.join("10-k8s.conflist")).unwrap(),
        primary
    );
    assert!(!bin.join("redirect-cni").exists());
    assert_eq!(
        std::fs::read_dir(&conf).unwrap().count(),
        1,
        "only the primary's file is left"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
