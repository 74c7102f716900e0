//! A CRI client for the runtime test bed: what a kubelet says to the container runtime, over its
//! unix socket (the `k8s-cri` bindings of the CRI API `runtime.v1`, gRPC by tonic).
//!
//! Blocking methods (tests are plain threads); any number of threads may call one [`Cri`] at
//! once (the 50-sandboxes-in-parallel test does).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient, *,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// A connection to a CRI runtime's socket.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    socket: PathBuf,
}

/// Every call gives up after this long (a stuck runtime fails the test instead of hanging it).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

impl Cri {
    /// Connects to the runtime at `socket` (no request is made yet).
    pub fn connect(socket: &Path) -> Result<Cri> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the CRI client's runtime")?;
        let path = socket.to_owned();
        // The URI is unused: every connection goes to the unix socket.
        let endpoint = Endpoint::try_from("http://[::1]:50051")?.timeout(CALL_TIMEOUT);
        // The lazy channel spawns its worker on the runtime it is made in.
        let _in_rt = rt.enter();
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }));
        drop(_in_rt);
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            rt,
            socket: socket.to_owned(),
        })
    }

    fn call<T, F>(
        &self,
        what: &str,
        f: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.runtime.clone();
        self.rt
            .block_on(f(client))
            .map(tonic::Response::into_inner)
            .map_err(|s| status_error(what, &self.socket, s))
    }

    /// The runtime's name and version (`containerd 1.6.20...`).
    pub fn version(&self) -> Result<VersionResponse> {
        self.call("Version", |mut c| async move {
            c.version(VersionRequest {
                version: "v1".into(),
            })
            .await
        })
    }

    /// RunPodSandbox: the sandbox's id, once its network is set up (the CNI ADD chain ran).
    pub fn run_pod_sandbox(&self, config: &PodSandboxConfig) -> Result<String> {
        let config = config.clone();
        self.call("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
        })
        .map(|r| r.pod_sandbox_id)
    }

    /// PodSandboxStatus, verbose (its `info` holds the runtime's view: the network
    /// namespace's path, the pause process's pid, the runtime spec).
    pub fn pod_sandbox_status(&self, id: &str) -> Result<PodSandboxStatusResponse> {
        let id = id.to_owned();
        self.call("PodSandboxStatus", |mut c| async move {
            c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id,
                verbose: true,
            })
            .await
        })
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.call("StopPodSandbox", |mut c| async move {
            c.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id })
                .await
        })
        .map(drop)
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.call("RemovePodSandbox", |mut c| async move {
            c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
        })
        .map(drop)
    }

    /// Every sandbox the runtime has, ready or not.
    pub fn list_pod_sandboxes(&self) -> Result<Vec<PodSandbox>> {
        self.call("ListPodSandbox", |mut c| async move {
            c.list_pod_sandbox(ListPodSandboxRequest { filter: None })
                .await
        })
        .map(|r| r.items)
    }

    /// CreateContainer in a sandbox (`sandbox_config` is the one the sandbox was made with, as
    /// a kubelet passes it).
    pub fn create_container(
        &self,
        sandbox_id: &str,
        config: &ContainerConfig,
        sandbox_config: &PodSandboxConfig,
    ) -> Result<String> {
        let req = CreateContainerRequest {
            pod_sandbox_id: sandbox_id.to_owned(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        };
        self.call("CreateContainer", |mut c| async move {
            c.create_container(req).await
        })
        .map(|r| r.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.call("StartContainer", |mut c| async move {
            c.start_container(StartContainerRequest { container_id: id })
                .await
        })
        .map(drop)
    }

    /// StopContainer: SIGTERM, then SIGKILL after `timeout_s`.
    pub fn stop_container(&self, id: &str, timeout_s: i64) -> Result<()> {
        let id = id.to_owned();
        self.call("StopContainer", |mut c| async move {
            c.stop_container(StopContainerRequest {
                container_id: id,
                timeout: timeout_s,
            })
            .await
        })
        .map(drop)
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.call("RemoveContainer", |mut c| async move {
            c.remove_container(RemoveContainerRequest { container_id: id })
                .await
        })
        .map(drop)
    }

    /// ContainerStatus, verbose (`info` has the container's pid).
    pub fn container_status(&self, id: &str) -> Result<ContainerStatusResponse> {
        let id = id.to_owned();
        self.call("ContainerStatus", |mut c| async move {
            c.container_status(ContainerStatusRequest {
                container_id: id,
                verbose: true,
            })
            .await
        })
    }

    /// The containers of one sandbox (all of them when `sandbox_id` is `None`).
    pub fn list_containers(&self, sandbox_id: Option<&str>) -> Result<Vec<Container>> {
        let filter = sandbox_id.map(|id| ContainerFilter {
            pod_sandbox_id: id.to_owned(),
            ..ContainerFilter::default()
        });
        self.call("ListContainers", |mut c| async move {
            c.list_containers(ListContainersRequest { filter }).await
        })
        .map(|r| r.containers)
    }

    /// ExecSync: runs `cmd` in a running container (its namespaces and cgroup, as `kubectl
    /// exec` does), waiting at most `timeout_s`; its exit code, stdout and stderr.
    pub fn exec_sync(&self, container_id: &str, cmd: &[&str], timeout_s: i64) -> Result<Exec> {
        let req = ExecSyncRequest {
            container_id: container_id.to_owned(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_s,
        };
        self.call("ExecSync", |mut c| async move { c.exec_sync(req).await })
            .map(|r| Exec {
                exit_code: r.exit_code,
                stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            })
    }

    /// Status, verbose: the runtime's conditions and its `info` (containerd puts the CNI
    /// configuration it loaded in `info["cniconfig"]`).
    pub fn status(&self) -> Result<StatusResponse> {
        self.call("Status", |mut c| async move {
            c.status(StatusRequest { verbose: true }).await
        })
    }

    /// The images the runtime has, by their names.
    pub fn list_images(&self) -> Result<Vec<k8s_cri::v1::Image>> {
        let mut c = self.images.clone();
        self.rt
            .block_on(async move { c.list_images(ListImagesRequest { filter: None }).await })
            .map(|r| r.into_inner().images)
            .map_err(|s| status_error("ListImages", &self.socket, s))
    }
}

/// What [`Cri::exec_sync`] ran gave.
#[derive(Debug, Clone)]
pub struct Exec {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A CRI error: the call, the socket and the runtime's message (which for RunPodSandbox carries
/// the CNI plugin's error).
fn status_error(what: &str, socket: &Path, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "CRI {what} on {}: {:?}: {}",
        socket.display(),
        s.code(),
        s.message()
    )
}

/// A pod as a kubelet describes it to the runtime.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub annotations: HashMap<String, String>,
    pub labels: HashMap<String, String>,
    /// The pod's cgroup as the cgroupfs driver names it, relative to the cgroup root
    /// (`/kubepods/besteffort/pod<UID>`).
    pub cgroup_parent: String,
    /// Where the runtime writes the containers' logs (kubelet's `/var/log/pods/...`).
    pub log_directory: Option<PathBuf>,
    /// The host's namespaces instead of the pod's own (Kubernetes' `hostNetwork`, `hostPID`).
    pub host: HostNamespaces,
    /// Some container of the pod is privileged (kubelet then says so of the sandbox, and the
    /// runtime refuses a privileged container in a sandbox that is not).
    pub privileged: bool,
}

/// Kubernetes' `hostNetwork` and `hostPID`: for the sandbox and each of its containers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostNamespaces {
    pub network: bool,
    pub pid: bool,
}

impl HostNamespaces {
    fn options(self) -> NamespaceOption {
        NamespaceOption {
            network: if self.network {
                NamespaceMode::Node
            } else {
                NamespaceMode::Pod
            } as i32,
            pid: if self.pid {
                NamespaceMode::Node
            } else {
                NamespaceMode::Container
            } as i32,
            ipc: NamespaceMode::Pod as i32,
            ..NamespaceOption::default()
        }
    }
}

impl SandboxSpec {
    /// The `PodSandboxConfig` a kubelet sends: metadata, annotations, labels, cgroup parent, a
    /// network namespace of the pod's own and per-container PID namespaces (Kubernetes'
    /// defaults).
    pub fn config(&self) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            // As kubelet: a host-network pod has the node's UTS namespace, and no hostname
            // of its own (runc refuses one without a private UTS namespace).
            hostname: if self.host.network {
                String::new()
            } else {
                self.name.chars().take(63).collect()
            },
            log_directory: self
                .log_directory
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(self.host.options()),
                    privileged: self.privileged,
                    ..LinuxSandboxSecurityContext::default()
                }),
                ..LinuxPodSandboxConfig::default()
            }),
            ..PodSandboxConfig::default()
        }
    }
}

/// A container as a kubelet describes it.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint when not empty (Kubernetes' `command`).
    pub command: Vec<String>,
    /// Replaces the image's cmd (Kubernetes' `args`).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `runAsUser` (and the same group); the image's user when `None`.
    pub run_as_user: Option<i64>,
    /// The pod's [`SandboxSpec::host`]: a container's namespaces are its pod's.
    pub host: HostNamespaces,
    /// Bind mounts from the host (Kubernetes' volumes as kubelet resolves them).
    pub mounts: Vec<Mount>,
    pub privileged: bool,
    /// Capabilities added to and dropped from the runtime's default set (Kubernetes' names,
    /// `NET_ADMIN`, `ALL`; the runtime adds the `CAP_` prefix).
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub readonly_rootfs: bool,
    /// seccomp: `None` is unconfined (Kubernetes' default without a profile); `Some` the
    /// runtime's default profile.
    pub seccomp_runtime_default: bool,
    /// AppArmor unconfined (the bed's containerd has AppArmor off anyway; said for fidelity).
    pub apparmor_unconfined: bool,
}

impl ContainerSpec {
    pub fn config(&self) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: self.name.clone(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: self.image.clone(),
                ..ImageSpec::default()
            }),
            command: self.command.clone(),
            args: self.args.clone(),
            envs: self
                .env
                .iter()
                .map(|(k, v)| KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            log_path: format!("{}.log", self.name),
            mounts: self.mounts.clone(),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(self.host.options()),
                    run_as_user: self.run_as_user.map(|value| Int64Value { value }),
                    run_as_group: self.run_as_user.map(|value| Int64Value { value }),
                    privileged: self.privileged,
                    capabilities: (!self.cap_add.is_empty() || !self.cap_drop.is_empty()).then(
                        || Capability {
                            add_capabilities: self.cap_add.clone(),
                            drop_capabilities: self.cap_drop.clone(),
                            ..Capability::default()
                        },
                    ),
                    readonly_rootfs: self.readonly_rootfs,
                    seccomp: self.seccomp_runtime_default.then(|| SecurityProfile {
                        profile_type: security_profile::ProfileType::RuntimeDefault as i32,
                        ..SecurityProfile::default()
                    }),
                    apparmor: self.apparmor_unconfined.then(|| SecurityProfile {
                        profile_type: security_profile::ProfileType::Unconfined as i32,
                        ..SecurityProfile::default()
                    }),
                    ..LinuxContainerSecurityContext::default()
                }),
                ..LinuxContainerConfig::default()
            }),
            ..ContainerConfig::default()
        }
    }
}

/// The sandbox's network namespace path from a verbose PodSandboxStatus (containerd puts the
/// runtime spec in `info["info"]`: `runtimeSpec.linux.namespaces[type=network].path`).
pub fn sandbox_netns(status: &PodSandboxStatusResponse) -> Option<PathBuf> {
    let info: serde_json::Value = serde_json::from_str(status.info.get("info")?).ok()?;
    info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")?["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The pid of a container's (or sandbox's) first process from its verbose status `info`.
pub fn info_pid(info: &HashMap<String, String>) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    v["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
}
