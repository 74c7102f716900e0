//! What the runtime hands a CNI plugin: the `CNI_*` environment and the network configuration
//! on stdin (CNI spec 0.3.0 to 1.1.0), and what the plugin prints back.
//!
//! The previous plugin's result is kept as raw JSON and printed byte for byte: a chained plugin
//! that changes nothing must not re-encode it (field order, fields unknown to us, the 0.3/0.4
//! layout with `"version"` in each IP all stay as they came).

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The spec versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version, used where the input names none.
pub const NEWEST: &str = "1.1.0";

/// The CNI error codes used here (spec "Error codes": 1-99 are the spec's, 100+ ours).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// Failure to decode the configuration.
    pub const DECODE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: the agent is not there (yet).
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot serve ADD.
    pub const NOT_AVAILABLE: u32 = 50;
    /// The agent refused to enroll the pod (bad annotation, cgroup not found, kernel refusal).
    pub const ENROLL_REFUSED: u32 = 100;
    /// CHECK: the pod is not enrolled as its annotations say.
    pub const CHECK_FAILED: u32 = 101;
    /// GC: the agent failed to remove a stale pod.
    pub const GC_FAILED: u32 = 102;
}

/// `fail` (the default): a pod that cannot be enrolled does not start. `ignore`: it starts
/// unenrolled and the agent counts it (`redirect_cni_ignored_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    #[default]
    Fail,
    Ignore,
}

/// The plugin's entry in the network configuration list, as the runtime hands it over.
/// Unknown fields (`capabilities`, the runtime's own) are allowed, as every plugin does.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default = "default_socket")]
    pub agent_socket: PathBuf,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub prev_result: Option<Box<RawValue>>,
    /// CNI 1.1 GC: the attachments the runtime still has.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn default_socket() -> PathBuf {
    redirect_agent::agent::DEFAULT_SOCKET.into()
}

fn default_excluded() -> Vec<String> {
    redirect_agent::annotations::DEFAULT_EXCLUDED_NAMESPACES
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

/// What the runtime fills in for the capabilities we declare.
#[derive(Debug, Default, Deserialize)]
pub struct RuntimeConfig {
    /// containerd sends `null` for a pod without annotations (a nil Go map).
    #[serde(
        rename = "io.kubernetes.cri.pod-annotations",
        default,
        deserialize_with = "null_as_default"
    )]
    pub pod_annotations: BTreeMap<String, String>,
}

/// `null` read as the type's default: Go runtimes marshal nil maps and slices as `null`.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// One of GC's valid attachments.
#[derive(Debug, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
}

/// The addresses of a result, in both layouts (0.3/0.4 add `"version"`, 1.x does not).
#[derive(Debug, Deserialize)]
struct ResultIps {
    #[serde(default)]
    ips: Vec<ResultIp>,
}

#[derive(Debug, Deserialize)]
struct ResultIp {
    address: String,
}

/// The pod's addresses from the previous plugin's result (`198.18.0.5/24` -> `198.18.0.5`).
pub fn result_ips(prev: &RawValue) -> Result<Vec<IpAddr>, String> {
    let r: ResultIps = serde_json::from_str(prev.get())
        .map_err(|e| format!("prevResult is not a CNI result: {e}"))?;
    r.ips
        .iter()
        .map(|ip| {
            let a = ip.address.split('/').next().unwrap_or("");
            a.parse()
                .map_err(|_| format!("prevResult: bad IP address {:?}", ip.address))
        })
        .collect()
}

/// The Kubernetes arguments of `CNI_ARGS` (`K=V;K=V`): what containerd and CRI-O pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct K8sArgs {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
    pub infra_container_id: Option<String>,
}

/// Parses `CNI_ARGS`; a pair without `=` is refused, as libcni's `LoadArgs` does.
pub fn k8s_args(s: &str) -> Result<K8sArgs, String> {
    let mut out = K8sArgs::default();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("CNI_ARGS: invalid pair {pair:?}"))?;
        let v = Some(v.to_owned()).filter(|v| !v.is_empty());
        match k {
            "K8S_POD_NAMESPACE" => out.namespace = v,
            "K8S_POD_NAME" => out.name = v,
            "K8S_POD_UID" => out.uid = v,
            "K8S_POD_INFRA_CONTAINER_ID" => out.infra_container_id = v,
            _ => {}
        }
    }
    Ok(out)
}

/// A CNI error object, printed on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CniError {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// The VERSION answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub cni_version: String,
    pub supported_versions: Vec<&'static str>,
}

/// Whether `v` is at least `min` (both dotted numbers).
pub fn version_at_least(v: &str, min: &str) -> bool {
    let parse = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(v) >= parse(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args() {
        let a = k8s_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=0f-1",
        )
        .unwrap();
        assert_eq!(a.namespace.as_deref(), Some("default"));
        assert_eq!(a.name.as_deref(), Some("web-0"));
        assert_eq!(a.uid.as_deref(), Some("0f-1"));
        assert_eq!(a.infra_container_id.as_deref(), Some("abc"));
        assert_eq!(k8s_args("").unwrap(), K8sArgs::default());
        assert!(k8s_args("K8S_POD_NAME").is_err());
    }

    #[test]
    fn ips_of_both_layouts() {
        let old = RawValue::from_string(
            r#"{"cniVersion":"0.3.1","ips":[{"version":"4","address":"198.18.0.5/24"},{"version":"6","address":"2001:db8::5/64"}]}"#.into(),
        )
        .unwrap();
        assert_eq!(result_ips(&old).unwrap().len(), 2);
        let new = RawValue::from_string(
            r#"{"cniVersion":"1.0.0","ips":[{"address":"198.18.0.5/24"}]}"#.into(),
        )
        .unwrap();
        assert_eq!(
            result_ips(&new).unwrap(),
            vec!["198.18.0.5".parse::<IpAddr>().unwrap()]
        );
        let bad = RawValue::from_string(r#"{"ips":[{"address":"x/24"}]}"#.into()).unwrap();
        assert!(result_ips(&bad).is_err());
    }

    #[test]
    fn versions() {
        assert!(version_at_least("1.1.0", "1.1.0"));
        assert!(!version_at_least("1.0.0", "1.1.0"));
        assert!(version_at_least("0.4.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
    }
}
