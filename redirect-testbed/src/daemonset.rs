//! The node agent's DaemonSet on the runtime test bed, from the rendered manifests of
//! `deploy/` (`redirect.yaml`, `redirect-uninstall.yaml`) through [`crate::kubelet`]: what the
//! node has that the pods mount (made for the run, never the machine's own), the agent's pod
//! run as a kubelet runs it, a rolling update of its container, and the uninstall
//! DaemonSet's pod. Used by the DaemonSet test and `cargo xtask demo node`.

use std::{
    collections::HashMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{
    kubelet::{self, PodRun, Probe},
    Containerd, CriPod,
};

/// Mounts made shared, as systemd makes every mount of a node: containerd refuses
/// `Bidirectional` and `HostToContainer` propagation from a private mount. Bind mounts of
/// the run's own directories, and a bpffs of its own; unmounted when dropped, in reverse.
#[derive(Debug, Default)]
pub struct SharedMounts(Vec<PathBuf>);

impl SharedMounts {
    fn make(&mut self, src: Option<&Path>, fstype: Option<&str>, at: &Path) -> Result<()> {
        use nix::mount::{mount, MsFlags};
        fs::create_dir_all(at)?;
        let flags = if src.is_some() {
            MsFlags::MS_BIND
        } else {
            MsFlags::empty()
        };
        mount(
            src.or(Some(Path::new("none"))),
            at,
            fstype,
            flags,
            None::<&str>,
        )
        .with_context(|| format!("mounting {}", at.display()))?;
        self.0.push(at.to_owned());
        mount(
            None::<&str>,
            at,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .with_context(|| format!("making {} shared", at.display()))?;
        Ok(())
    }

    /// `dir` bound on itself, shared.
    pub fn bind_shared(&mut self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir)?;
        self.make(Some(dir), None, dir)
    }
}

impl Drop for SharedMounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// What a node has that the DaemonSet mounts, made for one run below `base`: the agent's run
/// dir (`/run/redirect`), a scratch dir for the kubelet mapping, cgroup2 and a bpffs of its
/// own as shared mounts. The agent in its container and the test's CLI on the host see each
/// at the same path. Removed when dropped.
#[derive(Debug)]
pub struct NodeDirs {
    pub run_dir: PathBuf,
    pub scratch: PathBuf,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    base: PathBuf,
    // Unmounted before the directories go.
    mounts: SharedMounts,
}

impl NodeDirs {
    pub fn new(base: &Path) -> Result<NodeDirs> {
        let _ = fs::remove_dir_all(base);
        let mut d = NodeDirs {
            run_dir: base.join("run"),
            scratch: base.join("kubelet"),
            cgroup: base.join("cgroup"),
            bpffs: base.join("bpffs"),
            base: base.to_owned(),
            mounts: SharedMounts::default(),
        };
        d.mounts
            .make(Some(&crate::cgroup2_mount()?), None, &d.cgroup)?;
        d.mounts.make(None, Some("bpf"), &d.bpffs)?;
        fs::create_dir_all(&d.run_dir)?;
        Ok(d)
    }

    /// The agent's state directory and pin root as the test's ConfigMap names them.
    pub fn state_dir(&self) -> PathBuf {
        self.run_dir.join("state")
    }

    pub fn pin_root(&self) -> PathBuf {
        self.bpffs.join("redirect")
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    /// The bed's kubelet cgroup root, as seen through [`NodeDirs::cgroup`].
    pub fn kubelet_root(&self, bed: &Containerd) -> Result<PathBuf> {
        Ok(self.cgroup.join(
            bed.kubelet_cgroup_root()
                .strip_prefix(crate::cgroup2_mount()?)?,
        ))
    }

    /// The ConfigMap `redirect-agent` of `deploy/redirect.yaml` with this node's socket,
    /// state, pins and kubelet cgroup root; every key it moves must be there.
    pub fn config_map(&self, bed: &Containerd) -> Result<Value> {
        let docs = manifest("redirect.yaml")?;
        let mut cm = kubelet::find_doc(&docs, "ConfigMap", "redirect-agent")?.clone();
        let text = cm["data"]["config.yaml"]
            .as_str()
            .context("config.yaml in the ConfigMap")?;
        let mut config: Value = serde_norway::from_str(text)?;
        for (key, value) in [
            ("socket", self.socket()),
            ("stateDir", self.state_dir()),
            ("pinRoot", self.pin_root()),
        ] {
            if config.get(key).is_none() {
                bail!("{key} not in the ConfigMap: {text}");
            }
            config[key] = value.display().to_string().into();
        }
        config["kubeletCgroupRoots"] = serde_json::json!([self.kubelet_root(bed)?]);
        // JSON is YAML: the agent reads it as its config file.
        cm["data"]["config.yaml"] = serde_json::to_string_pretty(&config)?.into();
        Ok(cm)
    }

    /// The pod of the DaemonSet `name` of `file`, as a kubelet on this bed runs it: the host
    /// paths the manifests name moved to this node's and the bed's, the ConfigMap `cm`.
    pub fn pod(&self, bed: &Containerd, file: &str, name: &str, cm: &Value) -> Result<PodRun> {
        let docs = manifest(file)?;
        let ds = kubelet::find_doc(&docs, "DaemonSet", name)?;
        let paths = kubelet::HostPaths::new()
            .moved_same_inside("/sys/fs/cgroup", "/sys/fs/cgroup", &self.cgroup)
            .moved_same_inside("/sys/fs/bpf", "/sys/fs/bpf", &self.bpffs)
            // The plugin on the host dials the socket the agent names: the same path both
            // sides, as on a node.
            .moved_same_inside("/run/redirect", "/run/redirect", &self.run_dir)
            // The plugin hands the agent the runtime's netns path: the same on both sides.
            .moved_same_inside("/run/netns", "/var/run/netns", bed.netns_dir())
            .moved("/opt/cni/bin", bed.cni_bin_dir())
            .moved("/etc/cni/net.d", bed.cni_conf_dir())
            .moved(
                "/run/containerd",
                bed.socket().parent().context("the bed's socket dir")?,
            );
        let sandbox =
            bed.sandbox_spec("redirect-system", &format!("{name}-node"), HashMap::new())?;
        let config_maps = HashMap::from([("redirect-agent".to_owned(), cm.clone())]);
        kubelet::pod_run(
            &ds["spec"]["template"],
            sandbox,
            "test-node",
            &paths,
            &config_maps,
            &self.scratch,
        )
    }
}

impl Drop for NodeDirs {
    fn drop(&mut self) {
        self.mounts = SharedMounts::default();
        let _ = fs::remove_dir_all(&self.base);
    }
}

/// A manifest of `deploy/`, its documents.
pub fn manifest(file: &str) -> Result<Vec<Value>> {
    let path = redirect_devtools::workspace_root()
        .join("deploy")
        .join(file);
    kubelet::manifest_docs(
        &fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )
}

/// The agent's DaemonSet pod on the bed: its sandbox, the init containers run, the agent's
/// container started.
#[derive(Debug)]
pub struct AgentPod {
    pub pod: CriPod,
    pub run: PodRun,
    /// The running agent container.
    pub container: String,
    pub readiness: Probe,
}

impl AgentPod {
    /// Runs `run` (its init containers to their end, then its first container) and waits for
    /// the readiness probe to say 200.
    pub fn start(bed: &Containerd, run: PodRun) -> Result<AgentPod> {
        let readiness = run.containers[0]
            .readiness
            .clone()
            .context("the agent has no readiness probe")?;
        let pod = bed.run_pod(&run.sandbox)?;
        for init in &run.init {
            bed.run_to_completion(&pod, &init.spec, Duration::from_secs(60))?;
        }
        let container = bed.start_container(&pod, &run.containers[0].spec)?;
        let a = AgentPod {
            pod,
            run,
            container,
            readiness,
        };
        a.wait_ready(bed)?;
        Ok(a)
    }

    pub fn wait_ready(&self, bed: &Containerd) -> Result<()> {
        let start = Instant::now();
        loop {
            match node_http_get(bed, self.readiness.port, &self.readiness.path) {
                Some((200, _)) => return Ok(()),
                other if start.elapsed() > Duration::from_secs(60) => bail!(
                    "{} says {other:?}; the agent's log:\n{}",
                    self.readiness.path,
                    self.log(bed)
                ),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn log(&self, bed: &Containerd) -> String {
        bed.container_log(&self.pod, &self.run.containers[0].spec.name)
    }

    /// `GET path` on the agent's probe port: the body of a 200.
    pub fn get(&self, bed: &Containerd, path: &str) -> Result<String> {
        match node_http_get(bed, self.readiness.port, path) {
            Some((200, body)) => Ok(body),
            other => bail!("GET {path}: {other:?}"),
        }
    }

    /// Stops the agent's container (SIGTERM, as kubelet for a deleted or updated pod) and
    /// removes it.
    pub fn stop(&self, bed: &Containerd) -> Result<()> {
        bed.cri().stop_container(&self.container, 10)?;
        bed.cri().remove_container(&self.container)
    }

    /// A rolling update: the container replaced by one of `image`, ready again.
    pub fn update(&mut self, bed: &Containerd, image: &str) -> Result<()> {
        self.stop(bed)?;
        let mut next = self.run.containers[0].spec.clone();
        next.image = image.to_owned();
        self.container = bed.start_container(&self.pod, &next)?;
        self.run.containers[0].spec = next;
        self.wait_ready(bed)
    }
}

/// Runs the uninstall DaemonSet's pod (`deploy/redirect-uninstall.yaml`) on `node`: its init
/// container, which does the work; its main container (the runtime's pause image from a
/// registry) is not run, there is no registry here. Returns what the uninstall printed.
pub fn uninstall(bed: &Containerd, node: &NodeDirs, cm: &Value) -> Result<String> {
    let run = node.pod(bed, "redirect-uninstall.yaml", "redirect-uninstall", cm)?;
    let pod = bed.run_pod(&run.sandbox)?;
    let mut said = String::new();
    let r = (|| {
        for init in &run.init {
            bed.run_to_completion(&pod, &init.spec, Duration::from_secs(60))?;
            said.push_str(&bed.container_log(&pod, &init.spec.name));
        }
        Ok::<_, anyhow::Error>(())
    })();
    bed.remove_pod(&pod)?;
    r.map(|()| said)
}

/// `GET path` on `127.0.0.1:port` in the node's network namespace (a host-network pod's
/// port, as kubelet's probe reaches it): the status code and the body.
pub fn node_http_get(bed: &Containerd, port: u16, path: &str) -> Option<(u16, String)> {
    bed.node()
        .in_netns(|| crate::http::get(SocketAddr::from(([127, 0, 0, 1], port)), path).ok())
        .ok()
        .flatten()
}

/// The effective capabilities of a container's first process (`CapEff` of its status).
pub fn cap_eff(bed: &Containerd, container: &str) -> Result<u64> {
    let st = bed.cri().container_status(container)?;
    let pid = crate::cri::info_pid(&st.info).context("the container's pid")?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("CapEff")?
        .trim();
    Ok(u64::from_str_radix(hex, 16)?)
}
