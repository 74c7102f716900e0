//! Pods from the container runtime: what the CNI plugin (`redirect-cni`) and CRI discovery
//! hand the agent, and how the agent enrolls them through the same code path as the CLI.
//!
//! A pod arrives as a [`KubePod`]: its namespace, name, UID, sandbox id, network namespace,
//! addresses and annotations. The agent finds the pod's cgroup v2 directory from its UID as
//! kubelet lays it out ([`cgroup_candidates`]), builds its [`PodSpec`] from the annotations
//! ([`crate::annotations`]) and enrolls it with [`commands::enroll`]. Its record is named
//! [`record_name`]`(namespace, name)` and carries the pod's [`KubeRef`], so a DEL for an old
//! sandbox never removes a newer one.

use std::{
    collections::BTreeSet,
    io::{self, Read as _},
    net::IpAddr,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    annotations::{self, AnnotationError, Annotations, NodeDefaults, PodPlace, Skip},
    commands::{CommandError, Writer},
    gc,
    spec::{KubeRef, PodSpec},
    state,
};

/// A pod sandbox as the runtime describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubePod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The sandbox's id (CNI_CONTAINERID).
    pub sandbox_id: String,
    /// The sandbox's network namespace file.
    pub netns: PathBuf,
    /// The pod's addresses (from the CNI result before ours).
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub annotations: Annotations,
}

impl KubePod {
    fn kube_ref(&self) -> KubeRef {
        KubeRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            sandbox_id: self.sandbox_id.clone(),
        }
    }
}

/// What the CNI plugin asks the agent (`Request::Cni`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum CniRequest {
    /// Enroll the pod (or say why it is skipped); answered once enrolled or refused.
    Add { pod: KubePod },
    /// Whether the pod is enrolled as its annotations say.
    Check { pod: KubePod },
    /// Unenroll the pod's sandbox if it is enrolled; never fails for missing state.
    Del {
        namespace: String,
        name: String,
        sandbox_id: String,
    },
    /// Unenroll the runtime's pods whose sandbox is not one of these (CNI 1.1 GC).
    Gc { valid_sandboxes: Vec<String> },
    /// A pod started unenrolled under `failurePolicy: ignore`: count it.
    Ignored {
        reason: String,
        namespace: String,
        name: String,
    },
    /// Whether the agent can serve ADD (CNI 1.1 STATUS).
    Status,
}

/// The agent's answer to a [`CniRequest`] (`Response::Cni`); failures are `Response::Error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CniResponse {
    Enrolled { name: String, slot: u32 },
    Skipped { reason: Skip },
    Checked { name: String },
    Removed { name: Option<String> },
    Collected { names: Vec<String> },
    Counted,
    Ready,
}

/// How the agent finds and enrolls runtime pods: the agent's `--config` (`podDefaults`,
/// `kubeletCgroupRoots`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeConfig {
    pub defaults: NodeDefaults,
    /// Directories under which kubelet's `kubepods` (cgroupfs) or `kubepods.slice` (systemd)
    /// hierarchy lives: kubelet's `--cgroup-root` inside the cgroup2 mount (the mount itself
    /// by default).
    pub cgroup_roots: Vec<PathBuf>,
    /// How long ADD waits for the pod's cgroup to appear.
    pub cgroup_wait: Duration,
}

impl Default for KubeConfig {
    fn default() -> Self {
        KubeConfig {
            defaults: NodeDefaults::default(),
            cgroup_roots: crate::probe::cgroup2_mount().into_iter().collect(),
            cgroup_wait: Duration::from_secs(5),
        }
    }
}

/// Why a runtime pod could not be enrolled, checked or removed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("pod {namespace}/{name}: refused")]
    Annotation {
        namespace: String,
        name: String,
        #[source]
        source: AnnotationError,
    },
    #[error("pod {namespace}/{name}: UID {uid:?} is not a Kubernetes UID (hex digits and '-')")]
    BadUid {
        namespace: String,
        name: String,
        uid: String,
    },
    #[error("pod {namespace}/{name}: no cgroup for pod UID {uid} after {waited:?} (looked for {})", tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NoCgroup {
        namespace: String,
        name: String,
        uid: String,
        waited: Duration,
        tried: Vec<PathBuf>,
    },
    #[error("pod {namespace}/{name}: record name {record} is enrolled by hand or for another pod")]
    NameTaken {
        namespace: String,
        name: String,
        record: String,
    },
    #[error("pod {namespace}/{name}: not enrolled as its annotations say: {why}")]
    Mismatch {
        namespace: String,
        name: String,
        why: String,
    },
    #[error("pod {namespace}/{name}")]
    Command {
        namespace: String,
        name: String,
        #[source]
        source: Box<CommandError>,
    },
    #[error(transparent)]
    State(#[from] state::StateError),
}

impl KubeError {
    /// The `reason` label of `redirect_enroll_errors_total` for runtime pods that are not
    /// command errors.
    pub fn reason(&self) -> &'static str {
        match self {
            KubeError::Annotation { .. } => "annotation",
            KubeError::BadUid { .. } => "bad_uid",
            KubeError::NoCgroup { .. } => "no_cgroup",
            KubeError::NameTaken { .. } => "name_taken",
            KubeError::Mismatch { .. } => "mismatch",
            KubeError::Command { .. } | KubeError::State(_) => "enroll",
        }
    }
}

/// The record name of a Kubernetes pod: `NAMESPACE.NAME` (a namespace holds no `.`, so two
/// pods never share it), or, when that is longer than a record name may be (63) or holds
/// other characters, its first 46 characters, `-` and 16 hex digits of a hash of
/// `NAMESPACE/NAME`.
pub fn record_name(namespace: &str, name: &str) -> String {
    let plain = format!("{namespace}.{name}");
    if crate::spec::check_name(&plain).is_ok() {
        return plain;
    }
    // FNV-1a, 64 bits: stable across builds and machines (a record name must not change
    // when the agent is upgraded).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{namespace}/{name}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let prefix: String = plain
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(46)
        .collect();
    let prefix = prefix.trim_start_matches('.');
    format!("{prefix}-{h:016x}")
}

/// A Kubernetes UID, as it may appear in a cgroup path: hex digits and `-` only.
fn check_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Every directory kubelet may have made for the pod with `uid` under `root`: the cgroupfs
/// driver's `kubepods/pod<UID>` (Guaranteed), `kubepods/burstable/pod<UID>`,
/// `kubepods/besteffort/pod<UID>`, and the systemd driver's
/// `kubepods.slice/kubepods-pod<UID_>.slice`,
/// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID_>.slice`,
/// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<UID_>.slice`, where
/// `UID_` is the UID with `-` written `_` (systemd reads `-` as nesting).
pub fn cgroup_candidates(root: &Path, uid: &str) -> Vec<PathBuf> {
    let u = uid.replace('-', "_");
    let fs = root.join("kubepods");
    let sd = root.join("kubepods.slice");
    vec![
        fs.join(format!("pod{uid}")),
        fs.join("burstable").join(format!("pod{uid}")),
        fs.join("besteffort").join(format!("pod{uid}")),
        sd.join(format!("kubepods-pod{u}.slice")),
        sd.join("kubepods-burstable.slice")
            .join(format!("kubepods-burstable-pod{u}.slice")),
        sd.join("kubepods-besteffort.slice")
            .join(format!("kubepods-besteffort-pod{u}.slice")),
    ]
}

/// The pod's cgroup directory, waiting up to `wait` for kubelet to make it.
pub fn find_cgroup(cfg: &KubeConfig, pod: &KubePod) -> Result<PathBuf, KubeError> {
    if !check_uid(&pod.uid) {
        return Err(KubeError::BadUid {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
        });
    }
    let tried: Vec<PathBuf> = cfg
        .cgroup_roots
        .iter()
        .flat_map(|r| cgroup_candidates(r, &pod.uid))
        .collect();
    let start = Instant::now();
    loop {
        if let Some(found) = tried.iter().find(|p| p.is_dir()) {
            return Ok(found.clone());
        }
        if start.elapsed() >= cfg.cgroup_wait {
            return Err(KubeError::NoCgroup {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                waited: cfg.cgroup_wait,
                tried,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The spec of a runtime pod; `Ok(Err(skip))` when its annotations say it is not enrolled.
pub fn pod_spec(cfg: &KubeConfig, pod: &KubePod) -> Result<Result<PodSpec, Skip>, KubeError> {
    let refused = |source| KubeError::Annotation {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        source,
    };
    // The plugin applies its own namespace exclusions; here only what the annotations say.
    if let Err(skip) =
        annotations::select::<&str>(&pod.namespace, &pod.annotations, &[]).map_err(refused)?
    {
        return Ok(Err(skip));
    }
    let cgroup = find_cgroup(cfg, pod)?;
    // One address per family, the first the runtime gave: the datapath keeps one per family.
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in &pod.ips {
        if !ips.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
            ips.push(*ip);
        }
    }
    let place = PodPlace {
        name: record_name(&pod.namespace, &pod.name),
        cgroup,
        netns: pod.netns.clone(),
        pod_ips: ips,
        kube: Some(pod.kube_ref()),
    };
    annotations::pod_spec(&cfg.defaults, place, &pod.annotations)
        .map(Ok)
        .map_err(refused)
}

/// The record of a runtime pod's name, if there is one, and whether it is this pod's.
/// The record of a runtime pod as the files hold it (for a reader: CHECK).
fn record_on_disk(
    state_dir: &Path,
    namespace: &str,
    name: &str,
) -> Result<Option<state::PodRecord>, KubeError> {
    let rname = record_name(namespace, name);
    Ok(state::list_records(state_dir)?
        .pods
        .into_iter()
        .find(|r| r.name() == rname))
}

/// The record of a runtime pod, through the writer: the agent's records in memory, read
/// again only when another process changed them.
fn record_in(
    w: &mut Writer,
    namespace: &str,
    name: &str,
) -> Result<Option<state::PodRecord>, KubeError> {
    let rname = record_name(namespace, name);
    Ok(w.locked(|store, _| store.get(&rname))?)
}

fn is_pod(r: &state::PodRecord, namespace: &str, name: &str) -> bool {
    r.spec
        .kube
        .as_ref()
        .is_some_and(|k| k.namespace == namespace && k.name == name)
}

/// Enrolls a runtime pod (ADD, CRI discovery): returns once it is enrolled or refused. A
/// newer sandbox of an enrolled pod updates its record in place (its links move to the new
/// network namespace). [`pod_spec`] (which may wait for the cgroup) then [`enroll_spec`]; the
/// agent runs the first outside its writer queue, so a pod whose cgroup is late holds up
/// nobody else.
pub fn enroll_pod(
    cfg: &KubeConfig,
    w: &mut Writer,
    pod: &KubePod,
) -> Result<CniResponse, KubeError> {
    match pod_spec(cfg, pod)? {
        Ok(spec) => enroll_spec(w, pod, spec),
        Err(reason) => Ok(CniResponse::Skipped { reason }),
    }
}

/// Enrolls a runtime pod with the spec [`pod_spec`] built for it.
pub fn enroll_spec(w: &mut Writer, pod: &KubePod, spec: PodSpec) -> Result<CniResponse, KubeError> {
    let command = |source| KubeError::Command {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        source: Box::new(source),
    };
    if let Some(r) = record_in(w, &pod.namespace, &pod.name)? {
        if !is_pod(&r, &pod.namespace, &pod.name) {
            return Err(KubeError::NameTaken {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                record: spec.name,
            });
        }
        // A pod of the same name but another UID: the API server lets only one exist, so
        // the recorded one was deleted (its DEL never reached us). It goes first.
        if r.spec.kube.as_ref().is_some_and(|k| k.uid != pod.uid) {
            w.unenroll(r.name()).map_err(command)?;
        }
    }
    let r = w.enroll(spec).map_err(command)?;
    Ok(CniResponse::Enrolled {
        name: r.name,
        slot: r.slot,
    })
}

/// CHECK: the pod is enrolled for this sandbox, intact, with the spec its annotations give.
pub fn check_pod(
    cfg: &KubeConfig,
    state_dir: &Path,
    pin_root: &Path,
    pod: &KubePod,
) -> Result<CniResponse, KubeError> {
    let mismatch = |why: String| KubeError::Mismatch {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        why,
    };
    let want = match pod_spec(cfg, pod)? {
        Ok(s) => s,
        Err(reason) => return Ok(CniResponse::Skipped { reason }),
    };
    let Some(rec) = record_on_disk(state_dir, &pod.namespace, &pod.name)? else {
        return Err(mismatch(format!("no record {}", want.name)));
    };
    if rec.spec.kube.as_ref().map(|k| &k.sandbox_id) != Some(&pod.sandbox_id) {
        return Err(mismatch(format!(
            "record {} is for another sandbox",
            rec.name()
        )));
    }
    let health = gc::health(&rec);
    if health != gc::Health::Ok {
        return Err(mismatch(format!(
            "record {} is {}",
            rec.name(),
            health.name()
        )));
    }
    if !crate::enroll::links_complete(pin_root, &rec) {
        return Err(mismatch(format!("record {}: links missing", rec.name())));
    }
    let mut want = want;
    want.check().map_err(|e| mismatch(e.to_string()))?;
    if want != rec.spec {
        return Err(mismatch(format!(
            "record {} was enrolled with other settings (annotations changed since; the runtime's next ADD updates it)",
            rec.name()
        )));
    }
    Ok(CniResponse::Checked {
        name: rec.name().to_owned(),
    })
}

/// DEL: unenrolls the pod if its record is for this sandbox; nothing to do is success.
pub fn del_pod(
    w: &mut Writer,
    namespace: &str,
    name: &str,
    sandbox_id: &str,
) -> Result<CniResponse, KubeError> {
    let Some(rec) = record_in(w, namespace, name)? else {
        return Ok(CniResponse::Removed { name: None });
    };
    let ours =
        rec.spec.kube.as_ref().is_some_and(|k| {
            k.namespace == namespace && k.name == name && k.sandbox_id == sandbox_id
        });
    if !ours {
        return Ok(CniResponse::Removed { name: None });
    }
    match w.unenroll(rec.name()) {
        Ok(r) => Ok(CniResponse::Removed { name: Some(r.name) }),
        Err(CommandError::NoSuchPod(_)) => Ok(CniResponse::Removed { name: None }),
        Err(source) => Err(KubeError::Command {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source: Box::new(source),
        }),
    }
}

/// GC: unenrolls every runtime pod whose sandbox is not in `valid`. Every pod is tried; the
/// first failure is returned after the others were.
pub fn gc_pods(w: &mut Writer, valid: &[String]) -> Result<CniResponse, KubeError> {
    let valid: BTreeSet<&str> = valid.iter().map(String::as_str).collect();
    let mut names = Vec::new();
    let mut first_err = None;
    let records: Vec<state::PodRecord> =
        w.locked(|store, _| Ok::<_, state::StateError>(store.pods().cloned().collect()))?;
    for rec in records {
        let Some(k) = rec.spec.kube.clone() else {
            continue;
        };
        if valid.contains(k.sandbox_id.as_str()) {
            continue;
        }
        match w.unenroll(rec.name()) {
            Ok(r) => names.push(r.name),
            Err(CommandError::NoSuchPod(_)) => {}
            Err(source) => {
                first_err.get_or_insert(KubeError::Command {
                    namespace: k.namespace,
                    name: k.name,
                    source: Box::new(source),
                });
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(CniResponse::Collected { names }),
    }
}

/// Reasons the plugin counts a pod started unenrolled under `failurePolicy: ignore`
/// (`redirect_cni_ignored_total{reason}`).
pub const IGNORED_REASONS: [&str; 3] = ["agent_unreachable", "enroll_failed", "agent_error"];

/// The reason label for `reason`: one of [`IGNORED_REASONS`], anything else `other` (the
/// label set stays bounded whatever a spool file says).
pub fn ignored_reason(reason: &str) -> &'static str {
    IGNORED_REASONS
        .iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or("other")
}

/// One pod the plugin let start unenrolled while the agent was unreachable: written by the
/// plugin into [`spool_dir`], read and removed by the agent ([`drain_spool`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ignored {
    pub reason: String,
    pub namespace: String,
    pub name: String,
}

/// Where the plugin leaves [`Ignored`] files for an agent serving `socket`:
/// `<socket>.cni-ignored/` beside the socket (root's directory, mode 0700). Named after the
/// socket, so that two agents whose sockets share a directory never count each other's.
pub fn spool_dir(socket: &Path) -> PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_owned();
    name.push(".cni-ignored");
    socket.with_file_name(name)
}

/// Writes one [`Ignored`] file (the plugin, when the agent cannot be told). The file is
/// written under a temporary name and renamed, so the agent never reads half of one.
pub fn spool_ignored(socket: &Path, ignored: &Ignored) -> io::Result<PathBuf> {
    use std::io::Write as _;
    let dir = spool_dir(socket);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let base = format!("{}-{nanos}", std::process::id());
    let tmp = dir.join(format!(".{base}.tmp"));
    let path = dir.join(format!("{base}.json"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(ignored).expect("serializes"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Reads and removes every [`Ignored`] file in [`spool_dir`]. Only regular files of the
/// agent's own user (root) are read, never through a symlink, at most 4 KiB each; an
/// unreadable one is removed and counted as `other`.
pub fn drain_spool(socket: &Path) -> Vec<Ignored> {
    let dir = spool_dir(socket);
    let Ok(meta) = std::fs::symlink_metadata(&dir) else {
        return Vec::new();
    };
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me {
        log::warn!(
            "{}: not the agent's own directory; not reading the CNI spool",
            dir.display()
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let read = || -> Option<Ignored> {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path)
                .ok()?;
            let m = f.metadata().ok()?;
            if !m.is_file() || m.uid() != me {
                return None;
            }
            let mut buf = Vec::new();
            f.by_ref().take(4096).read_to_end(&mut buf).ok()?;
            serde_json::from_slice(&buf).ok()
        };
        let ignored = read().unwrap_or_else(|| Ignored {
            reason: "other".into(),
            namespace: String::new(),
            name: String::new(),
        });
        if std::fs::remove_file(&path).is_ok() {
            out.push(ignored);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_are_unique_and_valid() {
        assert_eq!(record_name("default", "web-0"), "default.web-0");
        assert_eq!(record_name("default", "web.v1-0"), "default.web.v1-0");
        let long = "a".repeat(200);
        let n = record_name("default", &long);
        assert!(crate::spec::check_name(&n).is_ok(), "{n}");
        assert_eq!(n.len(), 63);
        assert_ne!(n, record_name("default", &format!("{long}b")));
        assert_ne!(record_name("ns", &long), record_name("ns2", &long));
        // Stable: a record name never changes with the build.
        assert_eq!(record_name("default", &long), n);
        assert!(crate::spec::check_name(&record_name("ns", "UPPER_ok")).is_ok());
        assert!(crate::spec::check_name(&record_name("ns", "we/ird")).is_ok());
    }

    #[test]
    fn kubelet_cgroup_layouts() {
        let c = cgroup_candidates(Path::new("/cg"), "1a2b-3c");
        let c: Vec<String> = c.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            c,
            [
                "/cg/kubepods/pod1a2b-3c",
                "/cg/kubepods/burstable/pod1a2b-3c",
                "/cg/kubepods/besteffort/pod1a2b-3c",
                "/cg/kubepods.slice/kubepods-pod1a2b_3c.slice",
                "/cg/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b_3c.slice",
                "/cg/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a2b_3c.slice",
            ]
        );
        assert!(check_uid("0f8e5c1a-2b3c-4d5e-8f90-123456789abc"));
        assert!(!check_uid("../../x"));
        assert!(!check_uid(""));
    }

    #[test]
    fn every_qos_layout_is_found() {
        let root = std::env::temp_dir().join(format!("redirect-kubepods-{}", std::process::id()));
        let uid = "0f8e5c1a-2b3c-4d5e-8f90-123456789abc";
        let pod = KubePod {
            namespace: "ns".into(),
            name: "p".into(),
            uid: uid.into(),
            sandbox_id: "s".into(),
            netns: "/x".into(),
            ips: vec![],
            annotations: Annotations::new(),
        };
        let cfg = KubeConfig {
            defaults: NodeDefaults::default(),
            cgroup_roots: vec![root.clone()],
            cgroup_wait: Duration::from_millis(100),
        };
        for dir in cgroup_candidates(&root, uid) {
            std::fs::create_dir_all(&dir).unwrap();
            assert_eq!(find_cgroup(&cfg, &pod).unwrap(), dir);
            std::fs::remove_dir(&dir).unwrap();
        }
        let e = find_cgroup(&cfg, &pod).unwrap_err();
        assert!(matches!(e, KubeError::NoCgroup { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("kubepods-besteffort-pod0f8e5c1a_2b3c"),
            "{e}"
        );
        let bad = KubePod {
            uid: "../etc".into(),
            ..pod
        };
        assert!(matches!(
            find_cgroup(&cfg, &bad),
            Err(KubeError::BadUid { .. })
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn runtime_pods_are_labelled_with_namespace_and_kubernetes_name() {
        let kube = KubeRef {
            namespace: "prod".into(),
            name: "web-0".into(),
            uid: "u".into(),
            sandbox_id: "s".into(),
        };
        let spec = annotations::pod_spec(
            &NodeDefaults::default(),
            PodPlace {
                name: record_name("prod", "web-0"),
                cgroup: "/x".into(),
                netns: "/y".into(),
                pod_ips: vec![],
                kube: Some(kube),
            },
            &Annotations::new(),
        )
        .unwrap();
        assert_eq!(spec.name, "prod.web-0");
        assert_eq!(spec.labels(), ("prod", "web-0"));
    }

    #[test]
    fn ignored_reasons_are_bounded() {
        assert_eq!(ignored_reason("agent_unreachable"), "agent_unreachable");
        assert_eq!(ignored_reason("anything"), "other");
    }
}
