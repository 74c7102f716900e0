//! Start-up discovery through the container runtime's CRI API (`run --cri-socket PATH`).
//!
//! Pods that were running before the agent (or its CNI plugin) was installed never went through
//! the plugin's ADD. At start the agent lists the node's pod sandboxes (`ListPodSandbox`), reads
//! each ready one's annotations, addresses and network namespace (`PodSandboxStatus`, verbose:
//! containerd and CRI-O put the runtime spec, with the namespace paths, in `info`), and enrolls
//! those that are selected and not enrolled yet through the same function as the plugin's ADD
//! ([`kubepods::enroll_pod`]); records of runtime pods whose sandbox is no longer there are
//! collected ([`kubepods::gc_pods`]).
//!
//! The API is `runtime.v1` (containerd 1.6+, CRI-O 1.20+), from the `k8s-cri` bindings over
//! tonic on the unix socket.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ListPodSandboxRequest, PodSandboxState,
    PodSandboxStatusRequest, PodSandboxStatusResponse,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    kubepods::{self, KubeConfig, KubePod},
    state,
};

/// Why the runtime's pods could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("CRI socket {socket}: {source}")]
    Transport {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI {call} on {socket}: {code:?}: {message}")]
    Call {
        call: &'static str,
        socket: PathBuf,
        code: tonic::Code,
        message: String,
    },
}

/// Namespaces whose pods discovery never enrolls: the plugin's default `excludeNamespaces`.
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 1] = ["kube-system"];

/// Every CRI call gives up after this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A CRI runtime service client on the unix socket `socket` (connected on first use).
fn client(socket: &Path) -> Result<RuntimeServiceClient<Channel>, CriError> {
    let path = socket.to_owned();
    // The URI is unused: every connection goes to the unix socket.
    let endpoint = Endpoint::try_from("http://[::1]:50051")
        .map_err(|source| CriError::Transport {
            socket: socket.to_owned(),
            source,
        })?
        .timeout(CALL_TIMEOUT)
        .connect_timeout(CALL_TIMEOUT);
    let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(TokioIo::new(s))
        }
    }));
    Ok(RuntimeServiceClient::new(channel))
}

fn call_error(call: &'static str, socket: &Path, s: tonic::Status) -> CriError {
    CriError::Call {
        call,
        socket: socket.to_owned(),
        code: s.code(),
        message: s.message().to_owned(),
    }
}

/// The node's ready pod sandboxes as the runtime describes them. A sandbox whose status cannot
/// be read (removed meanwhile) or that has no network namespace of its own (host network) is
/// left out.
pub async fn list_pods(socket: &Path) -> Result<Vec<KubePod>, CriError> {
    let mut c = client(socket)?;
    let items = c
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .map_err(|s| call_error("ListPodSandbox", socket, s))?
        .into_inner()
        .items;
    let mut pods = Vec::new();
    for sb in items {
        if sb.state != PodSandboxState::SandboxReady as i32 {
            continue;
        }
        let status = match c
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: sb.id.clone(),
                verbose: true,
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => continue,
            Err(s) => return Err(call_error("PodSandboxStatus", socket, s)),
        };
        if let Some(pod) = kube_pod(&status) {
            pods.push(pod);
        }
    }
    Ok(pods)
}

/// A runtime pod from a verbose sandbox status; `None` without metadata or network namespace.
pub fn kube_pod(status: &PodSandboxStatusResponse) -> Option<KubePod> {
    let s = status.status.as_ref()?;
    let meta = s.metadata.as_ref()?;
    let netns = sandbox_netns(status)?;
    let ips = s
        .network
        .iter()
        .flat_map(|n| {
            std::iter::once(n.ip.as_str()).chain(n.additional_ips.iter().map(|p| p.ip.as_str()))
        })
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .collect();
    Some(KubePod {
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        uid: meta.uid.clone(),
        sandbox_id: s.id.clone(),
        netns,
        ips,
        annotations: s
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

/// The sandbox's network namespace file from the runtime spec in a verbose status's
/// `info["info"]` (`runtimeSpec.linux.namespaces[type=network].path`); `None` for a pod on the
/// host's network (no path).
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

/// What one discovery pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// Pods enrolled now (record names).
    pub enrolled: Vec<String>,
    /// Pods already enrolled for their current sandbox.
    pub already: usize,
    /// Pods their annotations or namespace leave out.
    pub skipped: usize,
    /// Pods that could not be enrolled: `namespace/name: why`.
    pub failed: Vec<String>,
    /// Records of sandboxes that are gone, collected.
    pub collected: Vec<String>,
}

/// Enrolls the selected pods of `pods` that are not enrolled for their sandbox yet, and
/// collects the runtime pods recorded in `before` (the records read before the runtime was
/// asked) whose sandbox is not among `pods` and whose network namespace is gone. A pod being
/// added by the CNI plugin right now is in neither list, so it is never collected here.
pub fn sync(
    cfg: &KubeConfig,
    w: &mut crate::commands::Writer,
    excluded_namespaces: &[String],
    before: &[state::PodRecord],
    pods: &[KubePod],
) -> Discovered {
    let mut out = Discovered::default();
    let enrolled: BTreeSet<&str> = before
        .iter()
        .filter_map(|r| r.spec.kube.as_ref().map(|k| k.sandbox_id.as_str()))
        .collect();
    for pod in pods {
        if excluded_namespaces.contains(&pod.namespace) {
            out.skipped += 1;
            continue;
        }
        if enrolled.contains(pod.sandbox_id.as_str()) {
            out.already += 1;
            continue;
        }
        match kubepods::enroll_pod(cfg, w, pod) {
            Ok(kubepods::CniResponse::Enrolled { name, .. }) => out.enrolled.push(name),
            Ok(_) => out.skipped += 1,
            Err(e) => out.failed.push(format!(
                "{}/{}: {}",
                pod.namespace,
                pod.name,
                crate::error_chain(&e)
            )),
        }
    }
    // Collected: a sandbox recorded before the runtime was asked, not listed by it, whose
    // network namespace is gone. One still there may not be published yet (the runtime lists
    // a sandbox only once its network is set up); the watch collects it if it goes.
    let live: BTreeSet<&str> = pods.iter().map(|p| p.sandbox_id.as_str()).collect();
    for r in before {
        let Some(k) = &r.spec.kube else { continue };
        if live.contains(k.sandbox_id.as_str()) || r.spec.netns.exists() {
            continue;
        }
        // For this sandbox only: a newer sandbox of the same pod keeps its record.
        match kubepods::del_pod(w, &k.namespace, &k.name, &k.sandbox_id) {
            Ok(kubepods::CniResponse::Removed { name: Some(n) }) => out.collected.push(n),
            Ok(_) => {}
            Err(e) => out.failed.push(format!(
                "{}/{}: collecting: {}",
                k.namespace,
                k.name,
                crate::error_chain(&e)
            )),
        }
    }
    out
}
