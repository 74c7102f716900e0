//! A pod template run as a kubelet would run it, for the runtime test bed: the DaemonSet's
//! own pod spec (image, command, args, env, securityContext, hostPath and ConfigMap volumes,
//! probes) turned into the CRI requests kubelet makes, with every host path moved to the
//! test's own directories.
//!
//! The mapping is strict: a field of the template that it does not know is an error, not
//! skipped, so a change to the manifests that the bed cannot honour fails the test instead of
//! passing it untested. What it maps, as kubelet does:
//! - `hostNetwork`, `hostPID` -> the sandbox's and each container's namespace options;
//! - a privileged container -> the sandbox is privileged too;
//! - `securityContext`: `privileged`, `runAsUser`, `readOnlyRootFilesystem`,
//!   `allowPrivilegeEscalation`, `runAsNonRoot` (checked against `runAsUser`),
//!   `capabilities.add`/`drop`, `seccompProfile.type` (`RuntimeDefault`),
//!   `appArmorProfile.type` (`Unconfined`);
//! - `env` values and `valueFrom.fieldRef: spec.nodeName`;
//! - `volumeMounts` of `hostPath` volumes (created for `DirectoryOrCreate`) and `configMap`
//!   volumes (their files written to a directory), with `mountPropagation` and `readOnly`;
//! - `readinessProbe`/`livenessProbe` `httpGet` -> [`Probe`], which the test polls.
//!
//! Fields that only concern the API server or the scheduler (`tolerations`,
//! `priorityClassName`, `serviceAccountName`, `resources`, `ports`, `dnsPolicy`, ...) are
//! accepted and have no effect here.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use k8s_cri::v1::{Mount, MountPropagation};
use serde_json::Value;

use crate::cri::{ContainerSpec, HostNamespaces, SandboxSpec};

/// Where the test puts what the manifest names on the host.
#[derive(Debug, Clone, Default)]
pub struct HostPaths {
    /// A `hostPath` volume's path -> the test's directory for it.
    moved: BTreeMap<String, PathBuf>,
    /// Container paths that must equal the host path (a socket or netns path that processes
    /// on both sides name): mount path -> the moved host path, mounted there instead.
    same_inside: BTreeMap<String, PathBuf>,
}

impl HostPaths {
    pub fn new() -> HostPaths {
        HostPaths::default()
    }

    /// The host's `path` is `to` for this test; containers mount it where the manifest says.
    pub fn moved(mut self, path: &str, to: impl Into<PathBuf>) -> HostPaths {
        self.moved.insert(path.to_owned(), to.into());
        self
    }

    /// As [`HostPaths::moved`], and a container mounting it at `mount_path` gets it at `to`
    /// instead: paths that are passed between the host and the container (the agent's socket,
    /// which the CNI plugin on the host dials; the runtime's netns files, which the plugin
    /// names) must be the same on both sides, as they are on a node.
    pub fn moved_same_inside(
        mut self,
        path: &str,
        mount_path: &str,
        to: impl Into<PathBuf>,
    ) -> Self {
        let to = to.into();
        self.moved.insert(path.to_owned(), to.clone());
        self.same_inside.insert(mount_path.to_owned(), to);
        self
    }

    fn host(&self, path: &str) -> PathBuf {
        self.moved
            .get(path)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(path))
    }

    fn inside(&self, mount_path: &str) -> String {
        self.same_inside
            .get(mount_path)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| mount_path.to_owned())
    }
}

/// An HTTP probe of a container, as kubelet runs it (`GET http://<pod IP>:port/path`; with
/// `hostNetwork` the pod's IP is the node's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub path: String,
    pub port: u16,
}

/// A container of the template and its probes.
#[derive(Debug, Clone)]
pub struct Container {
    pub spec: ContainerSpec,
    pub readiness: Option<Probe>,
    pub liveness: Option<Probe>,
}

/// What kubelet would run for a pod template.
#[derive(Debug, Clone)]
pub struct PodRun {
    pub sandbox: SandboxSpec,
    /// Run one after the other, each to a successful exit, before [`PodRun::containers`].
    pub init: Vec<Container>,
    pub containers: Vec<Container>,
}

/// The pod of a workload's `spec.template` (`template` is the template object: `metadata`
/// and `spec`), with `sandbox` as the bed made it (name, UID, cgroup parent, logs), on node
/// `node_name`. `config_maps` are the ConfigMaps the template may mount, by name; their files
/// are written below `scratch`.
pub fn pod_run(
    template: &Value,
    mut sandbox: SandboxSpec,
    node_name: &str,
    paths: &HostPaths,
    config_maps: &HashMap<String, Value>,
    scratch: &Path,
) -> Result<PodRun> {
    let spec = &template["spec"];
    known(
        spec,
        "spec",
        &[
            "serviceAccountName",
            "automountServiceAccountToken",
            "priorityClassName",
            "tolerations",
            "hostNetwork",
            "dnsPolicy",
            "hostPID",
            "terminationGracePeriodSeconds",
            "initContainers",
            "containers",
            "volumes",
            "nodeSelector",
        ],
    )?;
    let host = HostNamespaces {
        network: spec["hostNetwork"].as_bool().unwrap_or(false),
        pid: spec["hostPID"].as_bool().unwrap_or(false),
    };
    if let Some(a) = template["metadata"]["annotations"].as_object() {
        for (k, v) in a {
            sandbox
                .annotations
                .insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
        }
    }
    if let Some(l) = template["metadata"]["labels"].as_object() {
        for (k, v) in l {
            sandbox
                .labels
                .insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
        }
    }
    let volumes = volumes(spec, paths, config_maps, scratch)?;
    let list = |key: &str| -> Result<Vec<Container>> {
        spec[key]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| container(c, host, node_name, &volumes, paths))
                    .collect()
            })
            .unwrap_or_else(|| Ok(Vec::new()))
    };
    let init = list("initContainers")?;
    let containers = list("containers")?;
    if containers.is_empty() {
        bail!("the template has no containers");
    }
    sandbox.host = host;
    sandbox.privileged = init.iter().chain(&containers).any(|c| c.spec.privileged);
    Ok(PodRun {
        sandbox,
        init,
        containers,
    })
}

/// A volume as a container's mount source.
#[derive(Debug, Clone)]
struct Volume {
    host_path: PathBuf,
    /// ConfigMaps are read-only whatever the mount says.
    read_only: bool,
}

fn volumes(
    spec: &Value,
    paths: &HostPaths,
    config_maps: &HashMap<String, Value>,
    scratch: &Path,
) -> Result<HashMap<String, Volume>> {
    let mut out = HashMap::new();
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().context("a volume without a name")?;
        known(
            v,
            &format!("volume {name}"),
            &["name", "hostPath", "configMap"],
        )?;
        let vol = if let Some(hp) = v.get("hostPath") {
            known(hp, &format!("volume {name}: hostPath"), &["path", "type"])?;
            let path = hp["path"].as_str().context("hostPath without path")?;
            let host_path = paths.host(path);
            match hp["type"].as_str().unwrap_or("") {
                "DirectoryOrCreate" => fs::create_dir_all(&host_path)
                    .with_context(|| format!("volume {name}: creating {}", host_path.display()))?,
                "Directory" => {
                    if !host_path.is_dir() {
                        bail!("volume {name}: {} is not a directory", host_path.display());
                    }
                }
                "" => {}
                t => bail!("volume {name}: hostPath type {t:?} is not mapped by the bed"),
            }
            Volume {
                host_path,
                read_only: false,
            }
        } else if let Some(cm) = v.get("configMap") {
            known(cm, &format!("volume {name}: configMap"), &["name"])?;
            let cm_name = cm["name"].as_str().context("configMap without name")?;
            let data = config_maps
                .get(cm_name)
                .with_context(|| format!("volume {name}: no ConfigMap {cm_name}"))?;
            let dir = scratch.join(format!("configmap-{cm_name}"));
            fs::create_dir_all(&dir)?;
            for (file, text) in data["data"].as_object().into_iter().flatten() {
                fs::write(dir.join(file), text.as_str().unwrap_or_default())?;
            }
            Volume {
                host_path: dir,
                read_only: true,
            }
        } else {
            bail!("volume {name}: only hostPath and configMap volumes are mapped by the bed");
        };
        out.insert(name.to_owned(), vol);
    }
    Ok(out)
}

fn container(
    c: &Value,
    host: HostNamespaces,
    node_name: &str,
    volumes: &HashMap<String, Volume>,
    paths: &HostPaths,
) -> Result<Container> {
    let name = c["name"].as_str().context("a container without a name")?;
    let what = |f: &str| format!("container {name}: {f}");
    known(
        c,
        &what("spec"),
        &[
            "name",
            "image",
            "imagePullPolicy",
            "command",
            "args",
            "env",
            "ports",
            "readinessProbe",
            "livenessProbe",
            "resources",
            "securityContext",
            "volumeMounts",
        ],
    )?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let mut env = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let key = e["name"].as_str().context("env without name")?.to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
            node_name.to_owned()
        } else {
            bail!(
                "{}",
                what(&format!(
                    "env {key}: only values and spec.nodeName are mapped"
                ))
            );
        };
        env.push((key, value));
    }
    let sc = &c["securityContext"];
    known(
        sc,
        &what("securityContext"),
        &[
            "privileged",
            "runAsUser",
            "runAsNonRoot",
            "readOnlyRootFilesystem",
            "allowPrivilegeEscalation",
            "capabilities",
            "seccompProfile",
            "appArmorProfile",
        ],
    )?;
    let run_as_user = sc["runAsUser"].as_i64();
    if sc["runAsNonRoot"] == true && run_as_user.unwrap_or(0) == 0 {
        // kubelet refuses to start it: so does the bed.
        bail!("{}", what("runAsNonRoot with uid 0"));
    }
    let seccomp_runtime_default = match sc["seccompProfile"]["type"].as_str() {
        None | Some("Unconfined") => false,
        Some("RuntimeDefault") => true,
        Some(t) => bail!("{}", what(&format!("seccompProfile {t} is not mapped"))),
    };
    let apparmor_unconfined = match sc["appArmorProfile"]["type"].as_str() {
        None | Some("RuntimeDefault") => false,
        Some("Unconfined") => true,
        Some(t) => bail!("{}", what(&format!("appArmorProfile {t} is not mapped"))),
    };
    let mut mounts = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        known(
            m,
            &what("volumeMount"),
            &["name", "mountPath", "readOnly", "mountPropagation"],
        )?;
        let vname = m["name"].as_str().context("volumeMount without name")?;
        let vol = volumes
            .get(vname)
            .with_context(|| what(&format!("volumeMount of unknown volume {vname}")))?;
        let mount_path = m["mountPath"]
            .as_str()
            .context("volumeMount without mountPath")?;
        let propagation = match m["mountPropagation"].as_str() {
            None | Some("None") => MountPropagation::PropagationPrivate,
            Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => MountPropagation::PropagationBidirectional,
            Some(p) => bail!("{}", what(&format!("mountPropagation {p}"))),
        };
        mounts.push(Mount {
            container_path: paths.inside(mount_path),
            host_path: vol.host_path.display().to_string(),
            readonly: vol.read_only || m["readOnly"] == true,
            propagation: propagation as i32,
            ..Mount::default()
        });
    }
    let probe = |key: &str| -> Result<Option<Probe>> {
        let p = &c[key];
        if p.is_null() {
            return Ok(None);
        }
        let get = &p["httpGet"];
        let path = get["path"]
            .as_str()
            .with_context(|| what(&format!("{key}: only httpGet is mapped")))?;
        let port = get["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .with_context(|| what(&format!("{key}: a numeric port")))?;
        Ok(Some(Probe {
            path: path.to_owned(),
            port,
        }))
    };
    Ok(Container {
        spec: ContainerSpec {
            name: name.to_owned(),
            image: c["image"].as_str().context("no image")?.to_owned(),
            command: strings(&c["command"]),
            args: strings(&c["args"]),
            env,
            run_as_user,
            host,
            mounts,
            privileged: sc["privileged"] == true,
            cap_add: strings(&sc["capabilities"]["add"]),
            cap_drop: strings(&sc["capabilities"]["drop"]),
            readonly_rootfs: sc["readOnlyRootFilesystem"] == true,
            seccomp_runtime_default,
            apparmor_unconfined,
        },
        readiness: probe("readinessProbe")?,
        liveness: probe("livenessProbe")?,
    })
}

/// Fails on a key of `v` (an object, or nothing) that is not in `keys`.
fn known(v: &Value, what: &str, keys: &[&str]) -> Result<()> {
    let Some(o) = v.as_object() else {
        return Ok(());
    };
    let unknown: Vec<&String> = o.keys().filter(|k| !keys.contains(&k.as_str())).collect();
    if !unknown.is_empty() {
        bail!("{what}: the bed does not map {unknown:?} (map it or refuse it in kubelet.rs)");
    }
    Ok(())
}

/// The documents of a multi-document YAML manifest, as JSON values.
pub fn manifest_docs(text: &str) -> Result<Vec<Value>> {
    use serde::Deserialize as _;
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).context("a manifest document"))
        .filter(|d| !matches!(d, Ok(Value::Null)))
        .collect()
}

/// The document of `kind` named `name`.
pub fn find_doc<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} in the manifest"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox() -> SandboxSpec {
        SandboxSpec {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
            annotations: HashMap::new(),
            labels: HashMap::new(),
            cgroup_parent: "/kubepods/podu".into(),
            log_directory: None,
            host: HostNamespaces::default(),
            privileged: false,
        }
    }

    fn template(container: Value) -> Value {
        serde_json::json!({
            "metadata": {"annotations": {"a": "b"}},
            "spec": {
                "hostNetwork": true,
                "hostPID": true,
                "volumes": [
                    {"name": "run", "hostPath": {"path": "/run/x", "type": "DirectoryOrCreate"}},
                    {"name": "cfg", "configMap": {"name": "cm"}},
                ],
                "containers": [container],
            },
        })
    }

    fn run(t: &Value, scratch: &Path) -> Result<PodRun> {
        let paths = HostPaths::new().moved_same_inside("/run/x", "/run/x", scratch.join("x"));
        let cms = HashMap::from([(
            "cm".to_owned(),
            serde_json::json!({"data": {"config.yaml": "k: v\n"}}),
        )]);
        pod_run(t, sandbox(), "node-1", &paths, &cms, scratch)
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("redirect-kubelet-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_template_becomes_what_kubelet_sends() {
        let d = scratch("map");
        let t = template(serde_json::json!({
            "name": "c",
            "image": "i:1",
            "command": ["/bin/x"],
            "args": ["--y"],
            "env": [
                {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "A", "value": "1"},
            ],
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": 9977}},
            "securityContext": {
                "runAsUser": 0,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumeMounts": [
                {"name": "run", "mountPath": "/run/x", "mountPropagation": "HostToContainer"},
                {"name": "cfg", "mountPath": "/etc/c"},
            ],
        }));
        let r = run(&t, &d).unwrap();
        let sb = r.sandbox.config();
        let sc = sb.linux.unwrap().security_context.unwrap();
        let ns = sc.namespace_options.unwrap();
        assert_eq!(ns.network, k8s_cri::v1::NamespaceMode::Node as i32);
        assert_eq!(ns.pid, k8s_cri::v1::NamespaceMode::Node as i32);
        assert_eq!(
            sb.hostname, "",
            "no hostname of its own on the host network"
        );
        assert_eq!(sb.annotations["a"], "b");
        let c = &r.containers[0];
        assert_eq!(
            c.readiness,
            Some(Probe {
                path: "/readyz".into(),
                port: 9977
            })
        );
        let cc = c.spec.config();
        assert_eq!(cc.command, ["/bin/x"]);
        assert_eq!(cc.args, ["--y"]);
        let env: Vec<(String, String)> = cc
            .envs
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        assert_eq!(
            env,
            [
                ("NODE_NAME".into(), "node-1".into()),
                ("A".into(), "1".into())
            ]
        );
        let csc = cc.linux.unwrap().security_context.unwrap();
        assert!(csc.readonly_rootfs && !csc.privileged);
        let caps = csc.capabilities.unwrap();
        assert_eq!(
            (caps.add_capabilities, caps.drop_capabilities),
            (vec!["NET_ADMIN".into()], vec!["ALL".into()])
        );
        assert!(csc.seccomp.is_some());
        // The moved path is mounted at the same path inside; the ConfigMap read-only.
        let x = d.join("x").display().to_string();
        assert!(d.join("x").is_dir(), "DirectoryOrCreate");
        assert_eq!(cc.mounts[0].container_path, x);
        assert_eq!(cc.mounts[0].host_path, x);
        assert_eq!(
            cc.mounts[0].propagation,
            MountPropagation::PropagationHostToContainer as i32
        );
        assert_eq!(cc.mounts[1].container_path, "/etc/c");
        assert!(cc.mounts[1].readonly);
        let cfg = PathBuf::from(&cc.mounts[1].host_path).join("config.yaml");
        assert_eq!(fs::read_to_string(cfg).unwrap(), "k: v\n");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn what_the_bed_cannot_honour_is_refused_by_name() {
        let d = scratch("refuse");
        for (c, named) in [
            (
                serde_json::json!({"name": "c", "image": "i", "securityContext": {"sysctls": []}}),
                "sysctls",
            ),
            (
                serde_json::json!({"name": "c", "image": "i", "lifecycle": {}}),
                "lifecycle",
            ),
            (
                serde_json::json!({"name": "c", "image": "i", "securityContext": {"runAsNonRoot": true, "runAsUser": 0}}),
                "runAsNonRoot",
            ),
            (
                serde_json::json!({"name": "c", "image": "i", "env": [{"name": "P", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}),
                "env P",
            ),
            (
                serde_json::json!({"name": "c", "image": "i", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}),
                "nope",
            ),
            (
                serde_json::json!({"name": "c", "image": "i", "livenessProbe": {"exec": {"command": ["true"]}}}),
                "livenessProbe",
            ),
        ] {
            let e = run(&template(c), &d).unwrap_err();
            assert!(format!("{e:#}").contains(named), "{named}: {e:#}");
        }
        let _ = fs::remove_dir_all(&d);
    }
}
