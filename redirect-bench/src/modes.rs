//! What the data-path benchmark measures: how traffic reaches the proxies (the modes), which
//! proxy, the workloads, and one measurement as written to the results JSON.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::istio::Generation;

/// How traffic reaches the proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Direct,
    Explicit,
    /// `explicit` with both pods enrolled: redirect's programs attached and run on every
    /// socket, but nothing to redirect (the clients dial the proxies). Separates the cost of
    /// the attached programs from the cost of redirection; measured for crr-1B only.
    ExplicitEnrolled,
    IptablesNft,
    IptablesLegacy,
    IptablesLocalhost,
    Ebpf,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Explicit => "explicit",
            Mode::ExplicitEnrolled => "explicit+enrolled",
            Mode::IptablesNft => "iptables-nft",
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::IptablesLocalhost => "iptables-localhost",
            Mode::Ebpf => "ebpf",
        }
    }

    pub fn iptables(self) -> Option<(&'static str, Generation)> {
        match self {
            Mode::IptablesNft => Some(("nft", Generation::Passthrough)),
            Mode::IptablesLegacy => Some(("legacy", Generation::Passthrough)),
            Mode::IptablesLocalhost => Some(("nft", Generation::Localhost)),
            _ => None,
        }
    }

    /// Whether the clients dial the proxies themselves (fixed upstreams, no interception).
    pub fn explicit(self) -> bool {
        matches!(self, Mode::Explicit | Mode::ExplicitEnrolled)
    }

    /// Whether both pods are enrolled with redirect.
    pub fn enrolled(self) -> bool {
        matches!(self, Mode::Ebpf | Mode::ExplicitEnrolled)
    }

    /// Whether the server proxy delivers to 127.0.0.1:P (else POD_IP:P from 127.0.0.6).
    pub fn loopback_delivery(self) -> bool {
        self == Mode::IptablesLocalhost
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyKind {
    /// `redirect-testbed proxy`: thread per connection, SO_ORIGINAL_DST else getsockname.
    TestProxy,
    /// nginx stream module.
    Nginx,
    /// HAProxy 2.6 as a transparent sidecar (`SO_ORIGINAL_DST`, see
    /// `redirect_testbed::proxy::haproxy`).
    Haproxy,
}

impl ProxyKind {
    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::TestProxy => "test-proxy",
            ProxyKind::Nginx => "nginx",
            ProxyKind::Haproxy => "haproxy",
        }
    }
}

/// One way of running the path: a mode and, except for `direct`, a proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    pub proxy: Option<ProxyKind>,
}

impl Config {
    pub fn label(&self) -> String {
        match self.proxy {
            None => self.mode.name().to_owned(),
            Some(p) => format!("{}/{}", self.mode.name(), p.name()),
        }
    }
}

/// What the load generator does (`redirect-testbed load`): `kind` `rr` (request/response on
/// one kept connection), `crr` (a connection per request/response) or `bulk` (streamed and
/// echoed back) with `size`-byte requests; `name` is the label in the results.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub kind: &'static str,
    pub size: usize,
}

const fn workload(name: &'static str, kind: &'static str, size: usize) -> Workload {
    Workload { name, kind, size }
}

pub const RR_1B: Workload = workload("rr-1B", "rr", 1);
pub const RR_1K: Workload = workload("rr-1KiB", "rr", 1024);
pub const CRR: Workload = workload("crr-1B", "crr", 1);
pub const BULK: Workload = workload("bulk", "bulk", 0);

/// Windows of one measurement.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Timing {
    pub warmup_ms: u64,
    pub duration_ms: u64,
    pub bulk_ms: u64,
}

/// The scale dimension of one measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Scale {
    /// Excluded outbound CIDRs and excluded inbound ports, each (0: Istio's defaults only).
    pub rules: usize,
    /// Pods enrolled with redirect on the node besides the two measured ones.
    pub extra_pods: usize,
}

/// One measurement, as written to the JSON.
#[derive(Debug, Serialize)]
pub struct Sample {
    pub phase: &'static str,
    pub config: String,
    pub mode: Mode,
    pub proxy: Option<ProxyKind>,
    pub workload: &'static str,
    pub rep: usize,
    pub rules: usize,
    pub extra_pods: usize,
    /// The load generator's report (rate, percentiles, CPU).
    pub load: Value,
    /// Conntrack entries in the two pods after the window (tables flushed before).
    pub conntrack: u64,
    /// Packets that hit the capture rules during the measurement (iptables modes).
    pub iptables: Option<BTreeMap<&'static str, u64>>,
    /// redirect's per-pod counter deltas (ebpf mode).
    pub redirect: Option<BTreeMap<String, u64>>,
    /// Whether the traffic took the path the mode claims, and the evidence.
    pub path_ok: bool,
    pub path: String,
}

/// Kernel BPF statistics of one program over one measurement.
#[derive(Debug, Serialize)]
pub struct BpfStat {
    pub config: String,
    pub workload: &'static str,
    pub program: &'static str,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    pub ops: u64,
}
