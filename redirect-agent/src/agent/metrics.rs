//! The agent's Prometheus metrics.
//!
//! Per-pod counters and map occupancy are read from the kernel at scrape time by a custom
//! [`Collector`]: the values are the kernel's per-CPU sums, never a copy the agent keeps, and a
//! pod's series go away with its record. The agent's own events (enroll latency and errors,
//! pods adopted at start, pods collected) are ordinary prometheus-client metrics.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use redirect_common::Counter as PodCounter;

use crate::{
    conntrack,
    datapath::{Datapath, DatapathError},
    enroll::EnrollError,
    state, stats,
};

/// Labels of an enroll error.
type Reason = Vec<(&'static str, &'static str)>;

/// Every metric of the agent.
pub struct Metrics {
    registry: Registry,
    enroll_duration: Histogram,
    enroll_errors: Family<Reason, Counter>,
    adopted: Gauge,
    collected: Counter,
    cni_ignored: Family<Reason, Counter>,
    /// 1 while the Kubernetes API watch works, 0 while it is down or off (`crate::kube`).
    pub(crate) kube_watch_up: Gauge,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub(crate) fn new(pods: std::sync::Arc<super::PodsView>, pin_root: &Path) -> Metrics {
        let mut registry = Registry::default();
        // 0.25 ms .. about 4 s: an in-process enroll is milliseconds, one waiting for the lock
        // behind a burst is longer.
        let enroll_duration = Histogram::new(exponential_buckets(0.00025, 2.0, 15));
        registry.register(
            "redirect_enroll_duration_seconds",
            "Time to serve one enroll request, from its arrival to its answer",
            enroll_duration.clone(),
        );
        let enroll_errors = Family::<Reason, Counter>::default();
        registry.register(
            "redirect_enroll_errors",
            "Enroll requests that failed, by reason",
            enroll_errors.clone(),
        );
        let adopted = Gauge::default();
        registry.register(
            "redirect_agent_restarts_adopted_pods",
            "Pods this agent found pinned at its start and adopted without detaching anything",
            adopted.clone(),
        );
        let collected = Counter::default();
        registry.register(
            "redirect_pods_collected",
            "Pods unenrolled by the agent because their cgroup or network namespace disappeared",
            collected.clone(),
        );
        let cni_ignored = Family::<Reason, Counter>::default();
        registry.register(
            "redirect_cni_ignored",
            "Pods the CNI plugin let start unenrolled under failurePolicy ignore, by reason",
            cni_ignored.clone(),
        );
        let kube_watch_up = Gauge::default();
        registry.register(
            "redirect_kube_watch_up",
            "1 while the Kubernetes API watch of this node's pods works, 0 while it is down or off",
            kube_watch_up.clone(),
        );
        registry.register_collector(Box::new(KernelCollector {
            pods,
            pin_root: pin_root.to_owned(),
        }));
        Metrics {
            registry,
            enroll_duration,
            enroll_errors,
            adopted,
            collected,
            cni_ignored,
            kube_watch_up,
        }
    }

    /// One pod the CNI plugin let start unenrolled (`failurePolicy: ignore`).
    pub fn cni_ignored(&self, reason: &str) {
        self.cni_ignored
            .get_or_create(&vec![("reason", crate::kubepods::ignored_reason(reason))])
            .inc();
    }

    /// One enroll request served.
    pub fn enrolled(&self, took: Duration, error: Option<&'static str>) {
        self.enroll_duration.observe(took.as_secs_f64());
        if let Some(reason) = error {
            self.enroll_errors
                .get_or_create(&vec![("reason", reason)])
                .inc();
        }
    }

    pub fn set_adopted(&self, n: usize) {
        self.adopted.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn pod_collected(&self) {
        self.collected.inc();
    }

    /// Every metric in the OpenMetrics text format (what Prometheus asks for).
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Every metric in the Prometheus text format 0.0.4 (what `curl` and `promtool` get).
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode_openmetrics())
    }
}

/// The Prometheus text format 0.0.4 of an OpenMetrics text: a counter's `HELP` and `TYPE`
/// lines name the sample (`x_total`, where OpenMetrics names the family `x`), and there is no
/// `# EOF` nor `# UNIT`. Samples are the same lines in both formats.
pub fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        if let Some(prefix) = meta {
            let rest = &line[prefix.len()..];
            let name = rest.split(' ').next().unwrap_or("");
            if counters.contains(name) {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The `reason` label of an enroll error: the variant, in snake case.
pub fn error_reason(e: &crate::commands::CommandError) -> &'static str {
    use crate::commands::CommandError as C;
    match e {
        C::Enroll(e) => match e {
            EnrollError::NotRoot => "not_root",
            EnrollError::Spec(_) => "invalid_spec",
            EnrollError::Cgroup(_) => "cgroup",
            EnrollError::CgroupRoot(_) => "cgroup_root",
            EnrollError::Netns(_) => "netns",
            EnrollError::IpNotInNetns { .. } => "ip_not_in_netns",
            EnrollError::NameCgroupMismatch { .. } => "name_cgroup_mismatch",
            EnrollError::IpInUse { .. } => "ip_in_use",
            EnrollError::CgroupInUse { .. } => "cgroup_in_use",
            EnrollError::NetnsInUse { .. } => "netns_in_use",
            EnrollError::Unknown(_) => "unknown_pod",
            EnrollError::NoSlot => "no_slot",
            EnrollError::State(_) => "state",
            EnrollError::Kernel(_) => "kernel",
            EnrollError::Datapath(_) => "datapath",
            EnrollError::Conntrack(_) => "conntrack",
            EnrollError::MapWrite { .. } => "map_write",
            EnrollError::Prepare { .. } => "prepare_netns",
            EnrollError::Teardown { .. } => "teardown",
        },
        C::State(_) => "state",
        C::Datapath(_) | C::OpenDatapath(_) | C::NoDatapath(_) => "datapath",
        C::NoSuchPod(_) => "unknown_pod",
    }
}

/// A pod's labels ([`crate::spec::PodSpec::labels`]): its namespace (empty for a pod
/// enrolled without one) and its name.
pub fn pod_labels(spec: &crate::spec::PodSpec) -> [(&'static str, String); 2] {
    let (ns, pod) = spec.labels();
    [("namespace", ns.to_owned()), ("pod", pod.to_owned())]
}

fn counter_help(c: PodCounter) -> &'static str {
    match c {
        PodCounter::InboundCaptured => {
            "Connections to the pod's address handed to the proxy's inbound listener"
        }
        PodCounter::InboundExcluded => "Inbound connections not captured: their port is excluded",
        PodCounter::InboundNoListener => {
            "Inbound connections refused: the pod's proxy has no inbound listener"
        }
        PodCounter::OutboundCaptured => {
            "Application connections sent to the proxy's outbound listener"
        }
        PodCounter::OutboundExcluded => {
            "Application connections not captured: their port or CIDR is excluded"
        }
        PodCounter::ProxySelfCaptured => {
            "Proxy connections to its own pod address sent to the inbound listener"
        }
        PodCounter::DeliveredPodIp => "Proxy deliveries that ended at the pod IP",
        PodCounter::DeliveredLoopback => "Proxy deliveries that ended at loopback",
        PodCounter::DeliveryRefused => "Proxy deliveries refused: nothing listens there",
        PodCounter::OrigDstHit => "SO_ORIGINAL_DST answered from the remembered destination",
        PodCounter::OrigDstLocal => "SO_ORIGINAL_DST answered with the socket's own address",
        PodCounter::OrigDstMiss => "SO_ORIGINAL_DST asked by the proxy with nothing to answer",
        PodCounter::MapFull => "Connections let through unchanged because a map was full",
        PodCounter::ListenerRegistered => {
            "Proxy inbound listeners registered for capture at listen()"
        }
        PodCounter::DnsCaptured => {
            "Application UDP DNS queries (datagrams, connected sockets) sent to the proxy's DNS port"
        }
        PodCounter::DnsTcpCaptured => {
            "Application TCP connections to port 53 sent to the proxy's DNS port"
        }
        PodCounter::DnsRepliesRewritten => {
            "DNS replies from the proxy's DNS port reported as coming from the server asked"
        }
        PodCounter::PeernameRewritten => {
            "getpeername() of a redirected socket answered with its original destination"
        }
    }
}

/// The shared maps whose occupancy is exported.
const MAPS: [&str; 8] = [
    "PODS",
    "POD_CGROUPS",
    "POD_ADDRS",
    "PORT_RULES",
    "CIDR4",
    "CIDR6",
    "LISTENERS",
    conntrack::ORIG_DST,
];

/// Reads per-pod counters and map occupancy from the pinned maps (read-only) at each scrape.
struct KernelCollector {
    pods: std::sync::Arc<super::PodsView>,
    pin_root: PathBuf,
}

impl fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl KernelCollector {
    /// (pod, counters) of every enrolled pod whose counters could be read.
    fn pod_counters<'p>(
        &self,
        dp: &mut Datapath,
        pods: &'p [state::PodRecord],
    ) -> Vec<(
        &'p state::PodRecord,
        std::collections::BTreeMap<&'static str, u64>,
    )> {
        match self.batched_counters(pods) {
            Ok(c) => return c,
            Err(e) if crate::bpf_sys::batch_unsupported(&e) => {}
            Err(e) => log::warn!("metrics: reading COUNTERS in batches: {e}"),
        }
        let mut out = Vec::new();
        for p in pods {
            match stats::pod_counters(dp, p.slot) {
                Ok(c) => out.push((p, c)),
                Err(e) => log::warn!(
                    "metrics: counters of {}: {}",
                    p.name(),
                    crate::error_chain(&e)
                ),
            }
        }
        out
    }

    /// Every pod's counters with a few `BPF_MAP_LOOKUP_BATCH` calls on `COUNTERS` (one
    /// lookup per counter and pod would be 14 000 syscalls for 1 000 pods).
    fn batched_counters<'p>(
        &self,
        pods: &'p [state::PodRecord],
    ) -> std::io::Result<
        Vec<(
            &'p state::PodRecord,
            std::collections::BTreeMap<&'static str, u64>,
        )>,
    > {
        let Some(max_slot) = pods.iter().map(|p| p.slot).max() else {
            return Ok(Vec::new());
        };
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let fd = crate::datapath::layout::open_pin_ro(&self.pin_root.join("maps/COUNTERS"))
            .map_err(|e| std::io::Error::other(crate::error_chain(&e)))?;
        let per_pod = PodCounter::ALL.len();
        let want = (max_slot as usize + 1) * per_pod;
        let value_size = 8 * ncpu;
        let (_, values, n) =
            crate::bpf_sys::lookup_all(std::os::fd::AsFd::as_fd(&fd), 4, value_size, 4096, want)?;
        let sum = |index: usize| -> u64 {
            if index >= n {
                return 0;
            }
            values[index * value_size..(index + 1) * value_size]
                .chunks_exact(8)
                .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
                .sum()
        };
        Ok(pods
            .iter()
            .map(|p| {
                let c = PodCounter::ALL
                    .iter()
                    .map(|c| (c.name(), sum(c.index(p.slot) as usize)))
                    .collect();
                (p, c)
            })
            .collect())
    }

    /// (map, entries, capacity) of each shared map.
    fn map_usage(&self, dp: &mut Datapath) -> Vec<(&'static str, u64, u64)> {
        let mut out = Vec::new();
        for name in MAPS {
            let path = self.pin_root.join("maps").join(name);
            let info = match aya::maps::MapInfo::from_pin(&path) {
                Ok(i) => i,
                Err(e) => {
                    log::warn!("metrics: {}: {e}", path.display());
                    continue;
                }
            };
            let capacity = u64::from(info.max_entries());
            match batched_entries(&path, name, &info) {
                Ok(Some(n)) => {
                    out.push((name, n, capacity));
                    continue;
                }
                Ok(None) => {}
                Err(e) => log::warn!("metrics: counting {name} in batches: {e}"),
            }
            match entries(dp, &self.pin_root, name) {
                Ok(n) => out.push((name, n, capacity)),
                Err(e) => log::warn!("metrics: counting {name}: {e}"),
            }
        }
        out
    }
}

/// Rows in use in a shared map counted with `BPF_MAP_LOOKUP_BATCH`: arrays and hash maps
/// (PODS is an array: its used rows are the enrolled slots). `None` for a map the kernel does
/// not read in batches (LPM tries, sockhash; kernels before 5.6).
fn batched_entries(
    path: &Path,
    name: &str,
    info: &aya::maps::MapInfo,
) -> std::io::Result<Option<u64>> {
    if matches!(name, "CIDR4" | "CIDR6" | "LISTENERS") {
        return Ok(None);
    }
    let fd = crate::datapath::layout::open_pin_ro(path)
        .map_err(|e| std::io::Error::other(crate::error_chain(&e)))?;
    let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
    let limit = info.max_entries() as usize;
    let r = crate::bpf_sys::lookup_all(
        std::os::fd::AsFd::as_fd(&fd),
        key_size,
        value_size,
        4096,
        limit,
    );
    let (_, values, n) = match r {
        Ok(v) => v,
        Err(e) if crate::bpf_sys::batch_unsupported(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    if name == "PODS" {
        // `enrolled`, the row's first u32, is non-zero for a slot in use.
        let used = values
            .chunks_exact(value_size)
            .filter(|v| v[..4] != [0; 4])
            .count();
        return Ok(Some(used as u64));
    }
    Ok(Some(n as u64))
}

/// Rows in use in a shared map, element by element. PODS is an array: its used rows are the
/// enrolled slots.
fn entries(dp: &mut Datapath, pin_root: &Path, name: &str) -> Result<u64, String> {
    let e = |e: DatapathError| crate::error_chain(&e);
    let n = match name {
        "PODS" => dp
            .pods()
            .map_err(e)?
            .iter()
            .flatten()
            .filter(|c| c.enrolled != 0)
            .count(),
        "POD_CGROUPS" => dp.pod_cgroups().map_err(e)?.keys().flatten().count(),
        "POD_ADDRS" => dp.pod_addrs().map_err(e)?.keys().flatten().count(),
        "PORT_RULES" => dp.port_rules().map_err(e)?.keys().flatten().count(),
        "CIDR4" => dp.cidr4().map_err(e)?.keys().flatten().count(),
        "CIDR6" => dp.cidr6().map_err(e)?.keys().flatten().count(),
        "LISTENERS" => dp.listeners().map_err(e)?.keys().flatten().count(),
        _ => conntrack::PinnedMaps::open(&pin_root.join("maps"))
            .and_then(|m| m.total_entries())
            .map_err(|err| crate::error_chain(&err))?,
    };
    Ok(n as u64)
}

impl Collector for KernelCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let pods = match self.pods.pods() {
            Ok(p) => p,
            Err(e) => {
                log::warn!("metrics: reading records: {}", crate::error_chain(&e));
                Vec::new()
            }
        };
        let g = ConstGauge::new(i64::try_from(pods.len()).unwrap_or(i64::MAX));
        g.encode(enc.encode_descriptor(
            "redirect_pods_enrolled",
            "Pods enrolled on this node",
            None,
            g.metric_type(),
        )?)?;
        let dp = match Datapath::open_read_only(&self.pin_root) {
            Ok(dp) => dp,
            Err(e) => {
                log::warn!("metrics: opening the datapath: {}", crate::error_chain(&e));
                None
            }
        };
        let Some(mut dp) = dp else {
            return Ok(()); // No datapath pinned: no pod, no map.
        };
        let counters = self.pod_counters(&mut dp, &pods);
        if !counters.is_empty() {
            let labels: Vec<_> = counters.iter().map(|(p, _)| pod_labels(p)).collect();
            for c in PodCounter::ALL {
                let name = format!("redirect_{}", c.name());
                let mut m =
                    enc.encode_descriptor(&name, counter_help(c), None, MetricType::Counter)?;
                for ((_, values), l) in counters.iter().zip(&labels) {
                    let v = values.get(c.name()).copied().unwrap_or(0);
                    ConstCounter::new(v).encode(m.encode_family(l)?)?;
                }
            }
        }
        let usage = self.map_usage(&mut dp);
        {
            let mut m = enc.encode_descriptor(
                "redirect_map_entries",
                "Rows in use in a shared datapath map",
                None,
                MetricType::Gauge,
            )?;
            for (map, n, _) in &usage {
                ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX))
                    .encode(m.encode_family(&[("map", *map)])?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "redirect_map_capacity",
            "Rows a shared datapath map holds at most",
            None,
            MetricType::Gauge,
        )?;
        for (map, _, cap) in &usage {
            ConstGauge::new(i64::try_from(*cap).unwrap_or(i64::MAX))
                .encode(m.encode_family(&[("map", *map)])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_samples_in_the_text_format() {
        let om = "# HELP a_b Help.\n# TYPE a_b counter\na_b_total{pod=\"x\"} 3\n\
                  # HELP g Gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP a_b_total Help.\n# TYPE a_b_total counter\na_b_total{pod=\"x\"} 3\n\
             # HELP g Gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn pods_are_labelled_with_their_namespace() {
        let mut spec = crate::spec::PodSpec {
            name: "web-0".into(),
            namespace: None,
            cgroup: "/sys/fs/cgroup/x".into(),
            netns: "/var/run/netns/x".into(),
            pod_ips: vec!["198.18.0.1".parse().unwrap()],
            proxy_uid: 1337,
            inbound_policy: Default::default(),
            port_policies: Default::default(),
            exclude_inbound_ports: vec![],
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec![],
            proxy_inbound_port: 15006,
            proxy_outbound_port: 15001,
            dns_capture: false,
            proxy_dns_port: 15053,
            ..Default::default()
        };
        assert_eq!(
            pod_labels(&spec),
            [("namespace", String::new()), ("pod", "web-0".into())]
        );
        spec.namespace = Some("prod".into());
        assert_eq!(
            pod_labels(&spec),
            [("namespace", "prod".into()), ("pod", "web-0".into())]
        );
    }
}
