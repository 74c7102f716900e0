//! What the agent remembers about enrolled pods, outside the kernel.
//!
//! The kernel side keeps the pod's configuration in maps; this store keeps what the maps cannot
//! (the name, the paths the operator gave) as one JSON file per pod under the state directory
//! (default `/run/redirect`, overridden by `REDIRECT_STATE_DIR`).

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Where inbound traffic is finally delivered inside the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Istio >= 1.10: the application sees the connection at POD_IP:P, from 127.0.0.6 / ::6.
    #[default]
    Passthrough,
    /// Istio < 1.10: the application sees the connection at 127.0.0.1:P / ::1.
    Localhost,
}

/// One enrolled pod, as `enroll` recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub name: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub netns: PathBuf,
    /// Inode of the network namespace, to recognise it however it is named.
    pub netns_inode: u64,
    pub pod_ips: Vec<IpAddr>,
    pub proxy_uid: u32,
    pub inbound_policy: Policy,
    pub port_policies: BTreeMap<u16, Policy>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<String>,
    pub proxy_inbound_port: u16,
    pub proxy_outbound_port: u16,
    /// Index of the pod's row in the shared counter and configuration maps.
    pub slot: u32,
}

impl PodRecord {
    /// The policy that applies to inbound port `port`: the per-port override or the pod's.
    pub fn policy_for(&self, port: u16) -> Policy {
        self.port_policies.get(&port).copied().unwrap_or(self.inbound_policy)
    }
}
