//! The node agent's Kubernetes API watch: the pods of its own node
//! (`fieldSelector=spec.nodeName=NODE_NAME`), through kube-rs's watcher (list, then watch from
//! the list's `resourceVersion` with bookmarks; on `410 Gone` or a broken stream it lists
//! again, with a capped backoff while the API server cannot be reached).
//!
//! What it does with them, each through the agent's one request path (the writer lock, the
//! same enroll transaction as the CLI and the CNI plugin):
//! - a pod whose annotations changed is enrolled again with the new settings: an update in
//!   place (`enroll` of an enrolled pod), established connections untouched;
//! - a pod no longer selected (`redirect.dev/enabled: "false"`, `sidecar.istio.io/inject:
//!   "false"`) is unenrolled, and so is a pod deleted from the API, or one that a relist no
//!   longer shows (deleted while the watch was down);
//! - every outcome is recorded as a Kubernetes Event on the pod (`Enrolled`, `Updated`,
//!   `Unenrolled`, `EnrollFailed`), from `redirect-agent` on this node.
//!
//! Records are matched to API pods by the pod's UID (the `kube` reference the CNI plugin and CRI
//! discovery record), and a record enrolled by hand by the pod's addresses (`status.podIPs`: on
//! one node no two running pods share one). Settings come from [`crate::annotations`], the
//! CNI path's mapping, applied to the record's place (name, cgroup, netns, addresses).
//!
//! The watch is optional: with neither a kubeconfig (`--kubeconfig`, `KUBECONFIG`, the config
//! file's `kubeconfig`) nor the in-cluster service account (`KUBERNETES_SERVICE_HOST`), it is
//! off and says so once. When it is on and the API cannot be reached (network down, RBAC
//! missing), the CNI and CRI paths keep working, `/readyz` answers 503 naming the failure and
//! `redirect_kube_watch_up` is 0; both recover by themselves when the watch does.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use ::kube::{
    api::{Api, PostParams},
    runtime::{
        utils::{Backoff, WatchStreamExt as _},
        watcher,
    },
    Client,
};
use futures_util::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch as tokio_watch;

use crate::{
    agent::{proto::Response, Request, Shared},
    annotations,
    spec::PodSpec,
    state,
};

/// Where the API client's configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiSource {
    /// A kubeconfig file.
    Kubeconfig(PathBuf),
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, the mounted token and CA).
    InCluster,
    /// No API: the watch is off.
    Off,
}

impl ApiSource {
    /// An explicit kubeconfig, else in-cluster when the environment says so, else off. A
    /// kubeconfig is never looked for in `$HOME` (on a node that is an administrator's).
    pub fn pick(kubeconfig: Option<&Path>) -> ApiSource {
        match kubeconfig {
            Some(p) => ApiSource::Kubeconfig(p.to_owned()),
            None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => ApiSource::InCluster,
            None => ApiSource::Off,
        }
    }
}

/// The watch's health, for `/readyz` and `/metrics`.
#[derive(Debug)]
pub struct WatchStatus {
    enabled: bool,
    down: RwLock<Option<String>>,
    up: Gauge,
}

impl WatchStatus {
    /// `up` is the `redirect_kube_watch_up` gauge. A watch that is on starts down
    /// ("connecting"), so the agent is not ready before the first list.
    pub fn new(up: Gauge, source: &ApiSource) -> WatchStatus {
        let on = *source != ApiSource::Off;
        WatchStatus {
            enabled: on,
            down: RwLock::new(on.then(|| "connecting".to_owned())),
            up,
        }
    }

    /// Why the agent is not ready because of the watch: only when the watch is on and down.
    pub fn not_ready(&self) -> Option<String> {
        if !self.enabled {
            return None;
        }
        self.down
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|why| format!("the Kubernetes API watch is down: {why}"))
    }

    fn set_down(&self, why: String) {
        let mut down = self.down.write().unwrap_or_else(|e| e.into_inner());
        if down.as_deref() != Some(why.as_str()) {
            log::warn!("Kubernetes API watch down: {why}");
        }
        *down = Some(why);
        self.up.set(0);
    }

    fn set_up(&self) {
        let mut down = self.down.write().unwrap_or_else(|e| e.into_inner());
        if down.take().is_some() {
            log::info!("Kubernetes API watch up");
        }
        self.up.set(1);
    }
}

/// Retries: 250 ms doubling to at most 5 s, so that an API server back after an outage is
/// seen within seconds; reset once the watch works again.
struct Retry(Duration);

const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(5);

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.0;
        self.0 = (self.0 * 2).min(MAX_RETRY);
        Some(d)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.0 = FIRST_RETRY;
    }
}

async fn client(source: &ApiSource) -> Result<Client, String> {
    let config = match source {
        ApiSource::Kubeconfig(path) => {
            let kc = ::kube::config::Kubeconfig::read_from(path).map_err(|e| {
                format!("kubeconfig {}: {}", path.display(), crate::error_chain(&e))
            })?;
            ::kube::Config::from_custom_kubeconfig(
                kc,
                &::kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| format!("kubeconfig {}: {}", path.display(), crate::error_chain(&e)))?
        }
        ApiSource::InCluster => ::kube::Config::incluster()
            .map_err(|e| format!("in-cluster config: {}", crate::error_chain(&e)))?,
        ApiSource::Off => return Err("no API configured".into()),
    };
    Client::try_from(config).map_err(|e| format!("API client: {}", crate::error_chain(&e)))
}

/// Runs the watch until `stop` (a no-op when the source is [`ApiSource::Off`]).
pub(crate) async fn run(
    shared: Arc<Shared>,
    source: ApiSource,
    mut stop: tokio_watch::Receiver<bool>,
) {
    let status = &shared.kube;
    if source == ApiSource::Off {
        log::info!(
            "Kubernetes API watch off: no kubeconfig given and not in a cluster \
             (KUBERNETES_SERVICE_HOST unset); the CNI and CRI paths work without it"
        );
        return;
    }
    let node = shared.node_name().to_owned();
    let mut retry = Retry(FIRST_RETRY);
    let client = loop {
        match client(&source).await {
            Ok(c) => break c,
            Err(why) => {
                status.set_down(why);
                tokio::select! {
                    _ = tokio::time::sleep(retry.next().unwrap_or(MAX_RETRY)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    let pods: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(pods, config).backoff(Retry(FIRST_RETRY)).boxed();
    let mut node_pods = NodePods {
        shared: shared.clone(),
        client,
        listed: None,
        seen: BTreeMap::new(),
    };
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = stop.changed() => return,
        };
        let Some(event) = event else { return };
        match event {
            Ok(event) => {
                status.set_up();
                node_pods.handle(event).await;
            }
            Err(e) => status.set_down(crate::error_chain(&e)),
        }
    }
}

/// The node's pods as the watch last saw them.
struct NodePods {
    shared: Arc<Shared>,
    client: Client,
    /// During a (re)list: the pods listed so far, by uid.
    listed: Option<BTreeSet<String>>,
    /// Every pod seen and not deleted, by uid: its addresses (to find its record once it is
    /// gone from the API).
    seen: BTreeMap<String, Pod>,
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn pod_ips(pod: &Pod) -> BTreeSet<std::net::IpAddr> {
    let status = pod.status.as_ref();
    let listed = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|p| p.ip.as_str());
    let single = status.and_then(|s| s.pod_ip.as_deref());
    listed
        .chain(single)
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn display(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

impl NodePods {
    async fn handle(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.listed = Some(BTreeSet::new()),
            watcher::Event::InitApply(pod) => {
                if let Some(listed) = self.listed.as_mut() {
                    listed.insert(uid(&pod));
                }
                self.applied(pod).await;
            }
            watcher::Event::InitDone => {
                // Pods seen before and not in this list were deleted while the watch was down.
                let listed = self.listed.take().unwrap_or_default();
                let gone: Vec<Pod> = self
                    .seen
                    .iter()
                    .filter(|(uid, _)| !listed.contains(*uid))
                    .map(|(_, p)| p.clone())
                    .collect();
                for pod in gone {
                    self.deleted(pod).await;
                }
            }
            watcher::Event::Apply(pod) => self.applied(pod).await,
            watcher::Event::Delete(pod) => self.deleted(pod).await,
        }
    }

    /// The record of this pod, if one is enrolled: the one carrying its UID (enrolled by the
    /// CNI plugin or CRI discovery), else one holding one of its addresses (enrolled by hand).
    async fn record_of(&self, uid: &str, ips: &BTreeSet<std::net::IpAddr>) -> Option<PodSpec> {
        let dir = self.shared.state_dir().to_owned();
        let records = tokio::task::spawn_blocking(move || state::list_records(&dir))
            .await
            .ok()?
            .ok()?;
        let specs: Vec<PodSpec> = records.pods.into_iter().map(|r| r.spec).collect();
        let by_uid = specs
            .iter()
            .find(|s| !uid.is_empty() && s.kube.as_ref().is_some_and(|k| k.uid == uid));
        let by_ip = || {
            specs
                .iter()
                .find(|s| s.kube.is_none() && s.pod_ips.iter().any(|ip| ips.contains(ip)))
        };
        by_uid.or_else(by_ip).cloned()
    }

    async fn applied(&mut self, pod: Pod) {
        let ips = pod_ips(&pod);
        self.seen.insert(uid(&pod), pod.clone());
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return; // Shares the node's namespace: never enrolled.
        }
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let selection = annotations::select(
            &namespace,
            &annotations,
            &self.shared.pods_config().defaults.exclude_namespaces,
        );
        let Some(current) = self.record_of(&uid(&pod), &ips).await else {
            if matches!(selection, Ok(Ok(()))) {
                // Not enrolled by the CNI path (or enrolled by it before its addresses were
                // known). Enrolling from here needs the pod's cgroup and netns, which the
                // CNI ADD and the CRI discovery give; the API only names the pod.
                log::debug!(
                    "{}: selected but not enrolled; left to the CNI and CRI paths",
                    display(&pod)
                );
            }
            return;
        };
        let skip = match selection {
            Ok(Ok(())) => None,
            Ok(Err(skip)) => Some(skip.name().to_owned()),
            Err(e) => {
                self.event(&pod, "Warning", "EnrollFailed", e.to_string())
                    .await;
                return;
            }
        };
        if let Some(why) = skip {
            let name = current.name.clone();
            let r = self.request(Request::Unenroll { name }).await;
            let why = format!("no longer selected: {why}");
            self.record(&pod, r, "Unenrolled", &why).await;
            return;
        }
        let wanted =
            match with_annotations(&self.shared.pods_config().defaults, &current, &annotations) {
                Ok(s) => s,
                Err(why) => {
                    self.event(
                        &pod,
                        "Warning",
                        "EnrollFailed",
                        format!("annotations: {why}"),
                    )
                    .await;
                    return;
                }
            };
        if wanted == current {
            return;
        }
        let r = self.request(Request::Enroll { spec: wanted }).await;
        self.record(&pod, r, "Updated", "settings changed by its annotations")
            .await;
    }

    async fn deleted(&mut self, pod: Pod) {
        let seen = self.seen.remove(&uid(&pod));
        let mut ips = pod_ips(&pod);
        if let Some(seen) = &seen {
            ips.extend(pod_ips(seen));
        }
        let Some(current) = self.record_of(&uid(&pod), &ips).await else {
            return;
        };
        let r = self
            .request(Request::Unenroll {
                name: current.name.clone(),
            })
            .await;
        self.record(&pod, r, "Unenrolled", "deleted from the API")
            .await;
    }

    async fn request(&self, req: Request) -> Response {
        crate::agent::dispatch(&self.shared, req).await
    }

    /// An Event for what a request did to the pod.
    async fn record(&self, pod: &Pod, r: Response, reason: &str, why: &str) {
        match r {
            Response::Error { message } => {
                let failed = if reason == "Unenrolled" {
                    "UnenrollFailed"
                } else {
                    "EnrollFailed"
                };
                self.event(pod, "Warning", failed, format!("{why}: {message}"))
                    .await
            }
            _ => {
                self.event(pod, "Normal", reason, format!("redirect: {why}"))
                    .await
            }
        }
    }

    async fn event(&self, pod: &Pod, kind: &str, reason: &str, message: String) {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let node = self.shared.node_name().to_owned();
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!(
                    "{}.",
                    pod.metadata.name.as_deref().unwrap_or("pod")
                )),
                namespace: Some(ns.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                namespace: Some(ns.clone()),
                uid: pod.metadata.uid.clone(),
                resource_version: pod.metadata.resource_version.clone(),
                ..ObjectReference::default()
            },
            reason: Some(reason.into()),
            message: Some(message.clone()),
            type_: Some(kind.into()),
            source: Some(EventSource {
                component: Some("redirect-agent".into()),
                host: Some(node.clone()),
            }),
            reporting_component: Some("redirect.dev/agent".into()),
            reporting_instance: Some(node),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        };
        log::info!("{}: {reason}: {message}", display(pod));
        let events: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = events.create(&PostParams::default(), &event).await {
            log::warn!(
                "{}: recording Event {reason}: {}",
                display(pod),
                crate::error_chain(&e)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Annotations -> settings: the CNI path's mapping (`crate::annotations`), from the record's place.

/// `current` with the settings the node's defaults and the pod's annotations give now, as the
/// CNI plugin's ADD would have made it: the same name, cgroup, netns, addresses and pod.
pub fn with_annotations(
    defaults: &annotations::NodeDefaults,
    current: &PodSpec,
    a: &annotations::Annotations,
) -> Result<PodSpec, String> {
    let place = annotations::PodPlace {
        name: current.name.clone(),
        cgroup: current.cgroup.clone(),
        netns: current.netns.clone(),
        pod_ips: current.pod_ips.clone(),
        kube: current.kube.clone(),
    };
    let mut wanted = annotations::pod_spec(defaults, place, a).map_err(|e| e.to_string())?;
    // Normalised as the stored record is, so that an unchanged pod compares equal.
    wanted.check().map_err(|e| e.to_string())?;
    Ok(wanted)
}
