//! Exposed ports from Kubernetes manifests: the `targetPort`s of Services, numeric or named
//! through the `containerPort` names of the pods they select.

use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;
use serde_norway::Value;

/// Failure to read a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A document is not valid YAML, or a Pod/Service in it does not have the expected shape.
    #[error("cannot parse manifest {path}, document {index}: {source}")]
    Parse {
        path: String,
        index: usize,
        source: serde_norway::Error,
    },
}

/// What the manifests say about exposed ports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Exposure {
    /// Exposed TCP port -> the Service ports that expose it (`"Service ns/name port 80 -> 8080"`).
    pub ports: BTreeMap<u16, Vec<String>>,
    /// Service ports whose named `targetPort` no selected pod declares.
    pub unresolved: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct PodSpec {
    #[serde(default)]
    containers: Vec<Container>,
    #[serde(default, rename = "initContainers")]
    init_containers: Vec<Container>,
}

#[derive(Debug, Deserialize)]
struct Container {
    #[serde(default)]
    ports: Vec<ContainerPort>,
}

#[derive(Debug, Deserialize)]
struct ContainerPort {
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "containerPort")]
    container_port: u16,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ServiceSpec {
    #[serde(default)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    ports: Vec<ServicePort>,
}

#[derive(Debug, Deserialize)]
struct ServicePort {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default, rename = "targetPort")]
    target_port: Option<IntOrString>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u16),
    Str(String),
}

/// A pod template: its labels and its named TCP ports.
struct PodPorts {
    namespace: String,
    labels: BTreeMap<String, String>,
    named: BTreeMap<String, u16>,
}

struct Service {
    namespace: String,
    name: String,
    spec: ServiceSpec,
}

fn is_tcp(protocol: &Option<String>) -> bool {
    protocol
        .as_deref()
        .is_none_or(|p| p.eq_ignore_ascii_case("TCP"))
}

/// Reads a multi-document YAML file of Pods, Services, workloads with a pod template
/// (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job) and `List`s of them. Other kinds are
/// ignored.
pub fn load(path: &Path) -> Result<Exposure, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// [`load`] on text already read; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Exposure, ManifestError> {
    let mut pods = Vec::new();
    let mut services = Vec::new();
    for (index, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let err = |source| ManifestError::Parse {
            path: origin.to_owned(),
            index,
            source,
        };
        let value = Value::deserialize(doc).map_err(err)?;
        collect(value, &mut pods, &mut services).map_err(err)?;
    }
    let mut exposure = Exposure::default();
    for svc in services {
        let selected: Vec<&PodPorts> = pods
            .iter()
            .filter(|p| p.namespace == svc.namespace)
            .filter(|p| match &svc.spec.selector {
                Some(sel) if !sel.is_empty() => sel.iter().all(|(k, v)| p.labels.get(k) == Some(v)),
                _ => false,
            })
            .collect();
        for sp in svc.spec.ports.iter().filter(|sp| is_tcp(&sp.protocol)) {
            let label = match &sp.name {
                Some(n) => format!(
                    "Service {}/{} port {} ({n})",
                    svc.namespace, svc.name, sp.port
                ),
                None => format!("Service {}/{} port {}", svc.namespace, svc.name, sp.port),
            };
            let target = match &sp.target_port {
                None => Some(sp.port),
                Some(IntOrString::Int(p)) => Some(*p),
                Some(IntOrString::Str(s)) => match s.parse::<u16>() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        let mut resolved: Vec<u16> = selected
                            .iter()
                            .filter_map(|p| p.named.get(s).copied())
                            .collect();
                        resolved.sort_unstable();
                        resolved.dedup();
                        if resolved.is_empty() {
                            exposure.unresolved.push(format!(
                                "{label}: targetPort {s:?} is not a containerPort name of any pod \
                                 the Service selects in this manifest"
                            ));
                        }
                        for p in resolved {
                            exposure
                                .ports
                                .entry(p)
                                .or_default()
                                .push(format!("{label} -> {s}={p}"));
                        }
                        None
                    }
                },
            };
            if let Some(p) = target {
                exposure
                    .ports
                    .entry(p)
                    .or_default()
                    .push(format!("{label} -> {p}"));
            }
        }
    }
    Ok(exposure)
}

fn collect(
    value: Value,
    pods: &mut Vec<PodPorts>,
    services: &mut Vec<Service>,
) -> Result<(), serde_norway::Error> {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let meta = |v: &Value| -> Result<Meta, serde_norway::Error> {
        match v.get("metadata") {
            Some(m) => serde_norway::from_value(m.clone()),
            None => Ok(Meta {
                name: String::new(),
                namespace: None,
                labels: BTreeMap::new(),
            }),
        }
    };
    match kind.as_str() {
        "List" => {
            if let Some(Value::Sequence(items)) = value.get("items") {
                for item in items {
                    collect(item.clone(), pods, services)?;
                }
            }
        }
        "Pod" => {
            let m = meta(&value)?;
            let spec: PodSpec =
                serde_norway::from_value(value.get("spec").cloned().unwrap_or_default())?;
            pods.push(pod_ports(m.namespace, m.labels, &spec));
        }
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => {
            let m = meta(&value)?;
            if let Some(template) = value.get("spec").and_then(|s| s.get("template")) {
                let t = meta(template)?;
                let spec: PodSpec =
                    serde_norway::from_value(template.get("spec").cloned().unwrap_or_default())?;
                pods.push(pod_ports(m.namespace, t.labels, &spec));
            }
        }
        "Service" => {
            let m = meta(&value)?;
            let spec: ServiceSpec =
                serde_norway::from_value(value.get("spec").cloned().unwrap_or_default())?;
            services.push(Service {
                namespace: m.namespace.unwrap_or_else(|| "default".to_owned()),
                name: m.name,
                spec,
            });
        }
        _ => {}
    }
    Ok(())
}

fn pod_ports(
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
    spec: &PodSpec,
) -> PodPorts {
    let named = spec
        .containers
        .iter()
        .chain(&spec.init_containers)
        .flat_map(|c| &c.ports)
        .filter(|p| is_tcp(&p.protocol))
        .filter_map(|p| Some((p.name.clone()?, p.container_port)))
        .collect();
    PodPorts {
        namespace: namespace.unwrap_or_else(|| "default".to_owned()),
        labels,
        named,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-0, labels: {app: web}}
spec:
  containers:
  - name: app
    ports:
    - {name: http, containerPort: 8080}
    - {name: dns, containerPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: admin, port: 9090}
  - {name: metrics, port: 9100, targetPort: 9102}
  - {name: grpc, port: 81, targetPort: grpc}
  - {name: dns, port: 53, targetPort: dns, protocol: UDP}
---
kind: ConfigMap
metadata: {name: ignored}
"#;

    #[test]
    fn named_and_numeric_target_ports() {
        let e = parse(MANIFEST, "m.yaml").unwrap();
        assert_eq!(
            e.ports.keys().copied().collect::<Vec<_>>(),
            vec![8080, 9090, 9102]
        );
        assert_eq!(
            e.ports[&8080],
            vec!["Service default/web port 80 (http) -> http=8080"]
        );
        assert_eq!(
            e.ports[&9090],
            vec!["Service default/web port 9090 (admin) -> 9090"]
        );
        assert_eq!(e.unresolved.len(), 1);
        assert!(e.unresolved[0].contains("\"grpc\""), "{:?}", e.unresolved);
    }

    #[test]
    fn bad_yaml_names_the_document() {
        let e = parse("kind: Pod\n---\nkind: [\n", "x.yaml").unwrap_err();
        assert!(e.to_string().contains("document 1"), "{e}");
    }
}
