//! A real container runtime for tests: Debian's containerd (1.6) with the CRI plugin, started
//! with everything private to the test, inside a test-created node network namespace, with a
//! kubelet's share of the work (the pod cgroups) done by the test.
//!
//! Private: root, state, gRPC and ttrpc sockets, runc's root, the CRI plugin's CNI bin and conf
//! dirs (`bridge` + `host-local` over the node's 198.18.0.0/15 and 2001:db8::/32 subnets, from
//! [`Node`]), sandbox network namespaces (`netns_mounts_under_state_dir`), the streaming server
//! (loopback, a free port), the kubelet cgroup root
//! (`<cgroup2>/redirect-testbed/rdt-<run>-kubelet`, kubelet's `--cgroup-root`). Nothing of the
//! machine's own containerd, CNI config or `/opt/cni/bin` is read or written. Only containerd's
//! shims put their sockets in `/run/containerd/s/` (hard-wired in 1.6, named by a hash of our
//! socket's path).
//!
//! What this machine needs (found the hard way, see docs/DESIGN.md "Runtime test bed"):
//! `restrict_oom_score_adj` (CAP_SYS_RESOURCE is missing here, runc cannot lower
//! `oom_score_adj`), containerd joins the node's network namespace by `setns` only (`ip netns
//! exec` would also remount `/sys`, after which runc finds no cgroup mount), and runc's root is
//! private (its default is `/run/containerd/runc`).
//!
//! Dropping a [`Containerd`] removes every sandbox through CRI, stops containerd, kills what is
//! left in its cgroup (the shims) and in the kubelet cgroup root, unmounts whatever is still
//! mounted under its directory and removes it; the [`Node`] goes last.

use std::{
    collections::HashMap,
    ffi::CString,
    fs::{self, File},
    io,
    net::SocketAddr,
    os::{
        fd::AsRawFd as _,
        unix::{ffi::OsStrExt as _, fs::PermissionsExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    cgroup,
    cri::{ContainerSpec, Cri, SandboxSpec},
    node::cni_plugin_dir,
    state, Node, Outcome, ProxyDial,
};

/// The CNI plugins of Debian's `containernetworking-plugins` the bed's chain uses (`loopback`
/// is run by containerd itself for the pod's `lo`).
const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];

/// The CNI config file the bed writes (`10-` sorts first, as a primary CNI's would).
pub const CNI_CONF_FILE: &str = "10-redirect-testbed.conflist";

/// A running private containerd. See the module's doc.
pub struct Containerd {
    /// Everything of this containerd: root, state, sockets, CNI dirs, logs.
    dir: PathBuf,
    socket: PathBuf,
    cni_bin_dir: PathBuf,
    cni_conf_dir: PathBuf,
    log: PathBuf,
    pod_logs: PathBuf,
    /// containerd's own cgroup (v2): it and its shims.
    cgroup: PathBuf,
    kubelet_root: PathBuf,
    kubelet_root_rel: String,
    child: Option<Child>,
    cri: OnceLock<Cri>,
    /// The node's namespace and subnets: dropped after the teardown (last field).
    node: Node,
}

impl Containerd {
    /// Starts containerd for `node` with the sandbox image [`redirect_image::images::PAUSE`]
    /// (import it with [`Containerd::import`] before the first sandbox: [`crate::images`]).
    /// Returns once CRI answers.
    pub fn start(node: Node) -> Result<Containerd> {
        which("containerd")?;
        which("containerd-shim-runc-v2")?;
        which("runc")?;
        which("ctr")?;
        let dir = node.scratch_dir().join("containerd");
        let cni_bin_dir = dir.join("cni/bin");
        let cni_conf_dir = dir.join("cni/net.d");
        let pod_logs = dir.join("pod-logs");
        for d in [&dir, &cni_bin_dir, &cni_conf_dir, &pod_logs] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let plugins = cni_plugin_dir()?;
        for p in CNI_PLUGINS {
            std::os::unix::fs::symlink(plugins.join(p), cni_bin_dir.join(p))
                .with_context(|| format!("linking CNI plugin {p}"))?;
        }
        let name = format!("{}{}", state::PREFIX, node.run_id());
        let (net4, len4) = node.subnet4();
        let (net6, len6) = node.subnet6();
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                // The gateway lives in the node namespace, which has no route anywhere.
                "isGateway": true,
                "isDefaultGateway": false,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": dir.join("ipam"),
                    "ranges": [
                        [{ "subnet": format!("{net4}/{len4}") }],
                        [{ "subnet": format!("{net6}/{len6}") }],
                    ],
                },
            }],
        });
        fs::write(
            cni_conf_dir.join(CNI_CONF_FILE),
            serde_json::to_vec_pretty(&conflist)?,
        )?;

        let kubelet_root_rel = format!("/redirect-testbed/{name}-kubelet");
        let kubelet_root = cgroup::cgroup2_mount()?.join(kubelet_root_rel.trim_start_matches('/'));
        let cgroup = cgroup::testbed_root()?.join(format!("{name}-containerd"));
        // A directory of its own, as /run/containerd on a node: a pod mounting the socket's
        // directory (the agent's DaemonSet) gets the sockets and nothing else of the bed.
        let socket = dir.join("run/containerd.sock");
        fs::create_dir_all(dir.join("run"))?;
        let log = dir.join("containerd.log");
        let mut bed = Containerd {
            socket,
            cni_bin_dir,
            cni_conf_dir,
            log,
            pod_logs,
            cgroup,
            kubelet_root,
            kubelet_root_rel,
            child: None,
            cri: OnceLock::new(),
            node,
            dir,
        };
        // From here on, Drop cleans up whatever was made.
        fs::create_dir_all(&bed.cgroup)?;
        fs::create_dir_all(&bed.kubelet_root)?;
        let config = bed.dir.join("config.toml");
        fs::write(&config, bed.config_toml())?;
        bed.spawn(&config)?;
        bed.wait_ready(Duration::from_secs(30))?;
        Ok(bed)
    }

    fn config_toml(&self) -> String {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let cri = r#"[plugins."io.containerd.grpc.v1.cri"]"#;
        format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
{cri}
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_cdi = false
{cri_prefix}.cni]
  bin_dir = "{cni_bin}"
  conf_dir = "{cni_conf}"
  max_conf_num = 1
{cri_prefix}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
{cri_prefix}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
{cri_prefix}.containerd.runtimes.runc.options]
  Root = "{runc_root}"
  SystemdCgroup = false
"#,
            root = d("root"),
            state = d("state"),
            sock = self.socket.display(),
            opt = d("opt"),
            pause = redirect_image::images::PAUSE,
            cni_bin = self.cni_bin_dir.display(),
            cni_conf = self.cni_conf_dir.display(),
            runc_root = d("runc"),
            cri_prefix = r#"[plugins."io.containerd.grpc.v1.cri""#,
        )
    }

    fn spawn(&mut self, config: &Path) -> Result<()> {
        let ns = File::open(self.node.netns_path())
            .with_context(|| format!("opening {}", self.node.netns_path().display()))?;
        let procs = CString::new(self.cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
        let log = File::create(&self.log)?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let ns_fd = ns.as_raw_fd();
        // SAFETY: between fork and exec only raw syscalls on valid fds and a NUL-terminated
        // path: join the node's network namespace (setns only, no /sys remount) and the
        // bed's cgroup.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) < 0 {
                    return Err(io::Error::last_os_error());
                }
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let w = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if w != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().context("starting containerd")?);
        Ok(())
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "containerd exited ({status}) before it answered:\n{}",
                    self.log_tail(30)
                );
            }
            if self.socket.exists() {
                if let Ok(cri) = Cri::connect(&self.socket) {
                    if cri.version().is_ok() {
                        let _ = self.cri.set(cri);
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd did not answer on {} within {timeout:?}:\n{}",
                    self.socket.display(),
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `n` lines of containerd's log (for error messages).
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The CRI client (connected once containerd answered).
    pub fn cri(&self) -> &Cri {
        self.cri.get().expect("set when start returned")
    }

    /// containerd's gRPC socket: the CRI socket (`--cri-socket` of the agent).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The CNI plugin directory containerd runs plugins from (`install-cni --cni-bin-dir`).
    pub fn cni_bin_dir(&self) -> &Path {
        &self.cni_bin_dir
    }

    /// The CNI config directory containerd reads (`install-cni --cni-conf-dir`).
    pub fn cni_conf_dir(&self) -> &Path {
        &self.cni_conf_dir
    }

    /// Where containerd bind-mounts the sandboxes' network namespaces
    /// (`netns_mounts_under_state_dir`: the bed's `/var/run/netns`).
    pub fn netns_dir(&self) -> PathBuf {
        self.dir.join("state/io.containerd.grpc.v1.cri/netns")
    }

    /// The kubelet cgroup root in the cgroup2 mount (a `kubeletCgroupRoots` entry of the
    /// agent's config): pods' cgroups are `<root>/kubepods/<qos>/pod<UID>`.
    pub fn kubelet_cgroup_root(&self) -> &Path {
        &self.kubelet_root
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// A directory private to this bed, removed with it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ctr --address SOCK -n k8s.io ARGS...` (the CRI plugin's namespace), its stdout.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr images import ARCHIVE` into the CRI plugin's namespace (an OCI or docker archive:
    /// [`redirect_image::write_archive`] writes one that is both); returns once CRI lists every
    /// image of the archive (the CRI plugin learns of imported images from events, a moment
    /// later).
    pub fn import(&self, archive: &Path) -> Result<()> {
        let a = archive.to_str().context("archive path is not UTF-8")?;
        let want = redirect_image::names_in(archive)?;
        self.ctr(&["images", "import", "--no-unpack", a])?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let have: Vec<String> = self
                .cri()
                .list_images()?
                .into_iter()
                .flat_map(|i| i.repo_tags)
                .collect();
            let missing: Vec<&String> = want.iter().filter(|w| !have.contains(w)).collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("imported {a}, but CRI does not list {missing:?} (it has {have:?})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The CNI plugin configurations containerd's CRI plugin has loaded, in chain order (its
    /// verbose status's `cniconfig`: each network's plugins with their source text, parsed).
    /// containerd watches its conf dir and reloads on change, so a config written there
    /// reaches it asynchronously.
    pub fn cni_plugins_loaded(&self) -> Result<Vec<serde_json::Value>> {
        let st = self.cri().status()?;
        let raw = st
            .info
            .get("cniconfig")
            .context("containerd's status has no cniconfig")?;
        let v: serde_json::Value = serde_json::from_str(raw).context("cniconfig is not JSON")?;
        let mut plugins = Vec::new();
        for net in v["Networks"].as_array().into_iter().flatten() {
            for p in net["Config"]["Plugins"].as_array().into_iter().flatten() {
                let source = p["Source"].as_str().unwrap_or("{}");
                plugins.push(serde_json::from_str(source).context("a plugin's source")?);
            }
        }
        Ok(plugins)
    }

    /// Waits until the loaded plugin configurations satisfy `ready` (see
    /// [`Self::cni_plugins_loaded`]).
    pub fn wait_cni_plugins(
        &self,
        what: &str,
        ready: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let plugins = self.cni_plugins_loaded()?;
            if ready(&plugins) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("containerd did not load a CNI configuration with {what}: {plugins:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Makes the pod's cgroup as kubelet's cgroupfs driver does for QoS class `qos`
    /// (`besteffort`, `burstable`, or `guaranteed`: directly under `kubepods`) and returns the
    /// sandbox's `cgroup_parent` for it.
    pub fn pod_cgroup(&self, qos: &str, uid: &str) -> Result<String> {
        let rel = match qos {
            "guaranteed" => format!("kubepods/pod{uid}"),
            q => format!("kubepods/{q}/pod{uid}"),
        };
        let dir = self.kubelet_root.join(&rel);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(format!("{}/{rel}", self.kubelet_root_rel))
    }

    /// A pod spec with a fresh UID, its kubelet-style cgroup (QoS `besteffort`) made, and its
    /// containers' logs in the bed's directory.
    pub fn sandbox_spec(
        &self,
        namespace: &str,
        name: &str,
        annotations: HashMap<String, String>,
    ) -> Result<SandboxSpec> {
        let uid = new_uid();
        let cgroup_parent = self.pod_cgroup("besteffort", &uid)?;
        let logs = self.pod_logs.join(format!("{namespace}_{name}_{uid}"));
        Ok(SandboxSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid,
            annotations,
            labels: HashMap::new(),
            cgroup_parent,
            log_directory: Some(logs),
            host: crate::cri::HostNamespaces::default(),
            privileged: false,
        })
    }

    /// RunPodSandbox for `spec`: the sandbox's id, addresses, network namespace.
    pub fn run_pod(&self, spec: &SandboxSpec) -> Result<CriPod> {
        let config = spec.config();
        if let Some(d) = &spec.log_directory {
            fs::create_dir_all(d)?;
        }
        let id = self.cri().run_pod_sandbox(&config)?;
        let status = self.cri().pod_sandbox_status(&id)?;
        // A host-network sandbox's namespace is the node's (containerd's own).
        let netns = if spec.host.network {
            self.node.netns_path().to_owned()
        } else {
            crate::cri::sandbox_netns(&status)
                .with_context(|| format!("sandbox {id}: no network namespace in its status"))?
        };
        let net = status.status.as_ref().and_then(|s| s.network.as_ref());
        if net.is_none() && !spec.host.network {
            bail!("sandbox {id}: status without network");
        }
        let ips: Vec<std::net::IpAddr> = net
            .into_iter()
            .flat_map(|n| {
                std::iter::once(n.ip.as_str()).chain(n.additional_ips.iter().map(|p| p.ip.as_str()))
            })
            .filter_map(|s| s.parse().ok())
            .collect();
        Ok(CriPod {
            id,
            spec: spec.clone(),
            config,
            netns,
            ips,
            cgroup: self.kubelet_root.join(
                spec.cgroup_parent
                    .trim_start_matches(&self.kubelet_root_rel)
                    .trim_start_matches('/'),
            ),
        })
    }

    /// CreateContainer + StartContainer in `pod`: the container's id.
    pub fn start_container(&self, pod: &CriPod, container: &ContainerSpec) -> Result<String> {
        let id = self
            .cri()
            .create_container(&pod.id, &container.config(), &pod.config)?;
        self.cri().start_container(&id)?;
        Ok(id)
    }

    /// A sidecar pod's two containers from the test images: the application (`echo` as uid
    /// 1000 on `listen`; on `127.0.0.1:18999` for a client that only dials, since a container
    /// needs a process to exec in) and `istio-proxy` (the test proxy, delivering as `dial`
    /// says). Returns the application's container id once both listen in the pod's network
    /// namespace (30 s at most).
    pub fn start_app_and_proxy(
        &self,
        pod: &CriPod,
        listen: &[SocketAddr],
        dial: ProxyDial,
    ) -> Result<String> {
        let mut args = Vec::new();
        for a in listen {
            args.extend(["--listen".to_owned(), a.to_string()]);
        }
        if listen.is_empty() {
            args.extend(["--listen".to_owned(), "127.0.0.1:18999".to_owned()]);
        }
        let app = self.start_container(
            pod,
            &ContainerSpec {
                name: "app".into(),
                image: redirect_image::images::ECHO.into(),
                args,
                run_as_user: Some(1000),
                ..ContainerSpec::default()
            },
        )?;
        self.start_container(
            pod,
            &ContainerSpec {
                name: "istio-proxy".into(),
                image: redirect_image::images::PROXY.into(),
                args: vec!["--delivery".into(), dial.name().into()],
                ..ContainerSpec::default()
            },
        )?;
        let want: Vec<u16> = listen
            .iter()
            .map(|a| a.port())
            .chain([15001, 15006])
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !want
            .iter()
            .all(|p| pod.listening_ports().unwrap_or_default().contains(p))
        {
            if Instant::now() > deadline {
                bail!(
                    "{}: the application and the proxy did not listen on {want:?}",
                    pod.spec.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(app)
    }

    /// `redirect-testbed connect --to TO --payload PAYLOAD` in `container` (ExecSync): the
    /// outcome it printed.
    pub fn connect_from(&self, container: &str, to: SocketAddr, payload: &str) -> Result<Outcome> {
        let to = to.to_string();
        let exec = self.cri().exec_sync(
            container,
            &[
                "/usr/local/bin/redirect-testbed",
                "connect",
                "--to",
                &to,
                "--payload",
                payload,
            ],
            10,
        )?;
        serde_json::from_str(exec.stdout.trim())
            .with_context(|| format!("connect to {to} in {container}: {exec:?}"))
    }

    /// Runs `container` in `pod` to its end, as kubelet runs an init container: an exit other
    /// than 0 (or none within `timeout`) is an error carrying its log.
    pub fn run_to_completion(
        &self,
        pod: &CriPod,
        container: &ContainerSpec,
        timeout: Duration,
    ) -> Result<()> {
        let id = self.start_container(pod, container)?;
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.cri().container_status(&id)?;
            let s = st.status.as_ref().context("container status")?;
            if s.state == k8s_cri::v1::ContainerState::ContainerExited as i32 {
                if s.exit_code != 0 {
                    bail!(
                        "init container {} exited {} ({}): {}",
                        container.name,
                        s.exit_code,
                        s.reason,
                        self.container_log(pod, &container.name)
                    );
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "init container {} still running after {timeout:?}: {}",
                    container.name,
                    self.container_log(pod, &container.name)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What a container of `pod` wrote (the CRI log file, kubelet's `<name>.log`), its
    /// messages only.
    pub fn container_log(&self, pod: &CriPod, name: &str) -> String {
        let Some(dir) = &pod.spec.log_directory else {
            return String::new();
        };
        // Each line: time, stream, tag (F/P), message.
        fs::read_to_string(dir.join(format!("{name}.log")))
            .unwrap_or_default()
            .lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// StopPodSandbox + RemovePodSandbox (the containers go with it), then removes the pod's
    /// cgroup as kubelet would.
    pub fn remove_pod(&self, pod: &CriPod) -> Result<()> {
        self.cri().stop_pod_sandbox(&pod.id)?;
        self.cri().remove_pod_sandbox(&pod.id)?;
        remove_cgroup_tree(&pod.cgroup);
        Ok(())
    }

    fn teardown(&mut self) {
        // Sandboxes through CRI first: CNI DEL runs for each, mounts and netns go.
        if let Some(cri) = self.cri.get() {
            if let Ok(pods) = cri.list_pod_sandboxes() {
                for p in pods {
                    let _ = cri.stop_pod_sandbox(&p.id);
                    if let Err(e) = cri.remove_pod_sandbox(&p.id) {
                        eprintln!("redirect-testbed: removing sandbox {}: {e:#}", p.id);
                    }
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The shims (and anything they left) are in containerd's cgroup; containers in the
        // kubelet root.
        if let Err(e) = cgroup::kill_and_remove(&self.cgroup) {
            eprintln!("redirect-testbed: removing {}: {e}", self.cgroup.display());
        }
        remove_cgroup_tree(&self.kubelet_root);
        unmount_under(&self.dir);
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("redirect-testbed: removing {}: {e}", self.dir.display());
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A sandbox made through CRI.
#[derive(Debug, Clone)]
pub struct CriPod {
    pub id: String,
    pub spec: SandboxSpec,
    /// The config it was made with (CreateContainer needs it again).
    pub config: k8s_cri::v1::PodSandboxConfig,
    /// Its network namespace (`<state>/io.containerd.grpc.v1.cri/netns/cni-UUID`).
    pub netns: PathBuf,
    /// Its addresses, from its status.
    pub ips: Vec<std::net::IpAddr>,
    /// Its cgroup v2 directory (kubelet's `pod<UID>`).
    pub cgroup: PathBuf,
}

impl CriPod {
    pub fn ip4(&self) -> Option<std::net::Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            std::net::IpAddr::V4(a) => Some(*a),
            _ => None,
        })
    }

    pub fn ip6(&self) -> Option<std::net::Ipv6Addr> {
        self.ips.iter().find_map(|ip| match ip {
            std::net::IpAddr::V6(a) => Some(*a),
            _ => None,
        })
    }

    /// Runs `f` on a thread inside the pod's network namespace.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        crate::netns::run_in(&self.netns, f)
    }
}

/// A Kubernetes-style UID (a random version-4 UUID).
impl CriPod {
    /// The TCP ports listening in the pod's network namespace.
    pub fn listening_ports(&self) -> Result<Vec<u16>> {
        self.in_netns(tcp_listening_ports)
    }
}

/// The TCP ports listening in the calling thread's network namespace
/// (`/proc/thread-self/net`: `/proc/net` is the process's, not the thread's that joined a
/// pod's namespace).
pub fn tcp_listening_ports() -> Vec<u16> {
    let mut ports = Vec::new();
    for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = fs::read_to_string(f).unwrap_or_default();
        for l in text.lines().skip(1) {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // st 0A is LISTEN.
            if cols.get(3) == Some(&"0A") {
                if let Some(port) = cols
                    .get(1)
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                {
                    ports.push(port);
                }
            }
        }
    }
    ports
}

pub fn new_uid() -> String {
    let a = state::random_u64();
    let b = state::random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

fn which(tool: &str) -> Result<()> {
    redirect_devtools::find_on_path(tool)
        .map(drop)
        .with_context(|| format!("{tool} not found (apt-get install containerd runc)"))
}

/// Kills and removes the tree at `v2_dir` in the cgroup2 mount and the same path in every
/// cgroup v1 hierarchy (runc makes the sandbox's and containers' directories in each).
fn remove_cgroup_tree(v2_dir: &Path) {
    let _ = cgroup::kill_and_remove(v2_dir);
    let Ok(v2) = cgroup::cgroup2_mount() else {
        return;
    };
    let Ok(rel) = v2_dir.strip_prefix(&v2) else {
        return;
    };
    for m in v1_mounts() {
        let d = m.join(rel);
        if d.exists() {
            let _ = cgroup::kill_and_remove(&d);
        }
    }
}

fn v1_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup").then(|| PathBuf::from(dir))
        })
        .collect()
}

/// Lazily unmounts every mount point at or under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let mut points: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in points {
        if let Ok(c) = CString::new(p.as_os_str().as_bytes()) {
            // SAFETY: umount2 with a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
