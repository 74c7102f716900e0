//! One measurement: the load generator in the client pod against the running configuration,
//! with the evidence that the traffic took the path its mode claims (iptables packet counts,
//! redirect's counters, conntrack), and the kernel's statistics of redirect's programs.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};
use redirect_devtools::output;
use redirect_testbed::Pod;
use serde_json::{json, Value};

use crate::bed::{in_netns, Bed, Running, APP_UID, OUTBOUND_PORT, PROGRAMS};
use crate::istio::{self, Generation};
use crate::modes::{Config, Mode, Sample, Scale, Timing, Workload};

/// `pod name -> counter -> value` of redirect's enrolled bench pods.
type Counters = BTreeMap<String, BTreeMap<String, u64>>;
/// What [`Bed::path_checks`] finds: iptables and redirect counter deltas, and the checks.
type PathChecks = (
    Option<BTreeMap<&'static str, u64>>,
    Option<BTreeMap<String, u64>>,
    Vec<(bool, String)>,
);

impl Bed {
    fn conntrack(&self) -> Result<u64> {
        let mut n = 0;
        for pod in [&self.client, &self.server] {
            let out = in_netns(&pod.name, "conntrack")
                .arg("-C")
                .output()
                .context("running conntrack -C")?;
            n += String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
        Ok(n)
    }

    fn flush_conntrack(&self) {
        for pod in [&self.client, &self.server] {
            let _ = in_netns(&pod.name, "conntrack")
                .arg("-F")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    fn iptables_counts(&self, backend: &str) -> Result<[Vec<(String, u64)>; 2]> {
        let save = |pod: &Pod| -> Result<Vec<(String, u64)>> {
            let out = output(
                in_netns(&pod.name, &format!("iptables-{backend}-save")).args(["-c", "-t", "nat"]),
            )?;
            Ok(istio::packet_counts(&out))
        };
        Ok([save(&self.client)?, save(&self.server)?])
    }

    /// `name -> counters` of the enrolled bench pods.
    fn redirect_counters(&self) -> Result<BTreeMap<String, BTreeMap<String, u64>>> {
        let out = output(self.agent().args(["stats", "--output", "json"]))?;
        let v: Value = serde_json::from_str(&out)?;
        let mut m = BTreeMap::new();
        for p in v["pods"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or_default();
            if !name.starts_with("bench-") {
                continue;
            }
            let counters = p["counters"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect();
            m.insert(name.to_owned(), counters);
        }
        Ok(m)
    }

    /// `program -> (run_cnt, run_time_ns)` of redirect's pinned programs.
    pub fn bpf_stats(&self) -> Result<BTreeMap<&'static str, (u64, u64)>> {
        let mut m = BTreeMap::new();
        for prog in PROGRAMS {
            let path = self.pin_root.join("progs").join(prog);
            if !path.exists() {
                continue;
            }
            let out = output(
                Command::new("bpftool")
                    .args(["-j", "prog", "show", "pinned"])
                    .arg(&path),
            )?;
            let v: Value = serde_json::from_str(&out)?;
            m.insert(
                *prog,
                (
                    v["run_cnt"].as_u64().unwrap_or(0),
                    v["run_time_ns"].as_u64().unwrap_or(0),
                ),
            );
        }
        Ok(m)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn measure(
        &self,
        phase: &'static str,
        cfg: Config,
        wl: Workload,
        rep: usize,
        scale: Scale,
        timing: Timing,
        running: &Running,
    ) -> Result<Sample> {
        debug_assert_eq!(running.cfg, cfg);
        let to = match cfg.mode {
            Mode::Explicit | Mode::ExplicitEnrolled => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT)
            }
            _ => self.server_app(),
        };
        self.flush_conntrack();
        let ipt_before = match cfg.mode.iptables() {
            Some((b, _)) => Some(self.iptables_counts(b)?),
            None => None,
        };
        let rd_before = match cfg.mode {
            Mode::Ebpf | Mode::ExplicitEnrolled => Some(self.redirect_counters()?),
            _ => None,
        };
        let duration = if wl.kind == "bulk" {
            timing.bulk_ms
        } else {
            timing.duration_ms
        };
        let mut cmd = Command::new(&self.testbed);
        cmd.arg("load")
            .args(["--to", &to.to_string()])
            .args(["--workload", wl.kind])
            .args(["--size", &wl.size.to_string()])
            .args(["--duration-ms", &duration.to_string()])
            .args(["--warmup-ms", &timing.warmup_ms.to_string()])
            .args(["--cpu", &self.cpu.to_string()])
            .args(["--timeout-ms", "10000"])
            .arg("--cpu-stat")
            .arg(self.client.cgroup.join("cpu.stat"))
            .arg("--cpu-stat")
            .arg(self.server.cgroup.join("cpu.stat"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut p = self.client.spawn(APP_UID, cmd)?;
        let child = p.child_mut();
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut out)?;
        let mut err = String::new();
        child
            .stderr
            .take()
            .expect("piped")
            .read_to_string(&mut err)?;
        let status = child.wait()?;
        let load: Value = match serde_json::from_str(out.trim()) {
            Ok(v) if status.success() => v,
            // Recorded, not fatal: one stalled measurement must not lose the whole run.
            _ => {
                let why = err.lines().take(3).collect::<Vec<_>>().join(" / ");
                json!({ "error": format!("load generator failed ({status}): {why}") })
            }
        };
        let conntrack = self.conntrack()?;
        let (iptables, redirect, path_ok, path) = match load["error"].as_str() {
            Some(e) => (None, None, false, e.to_owned()),
            None => {
                let ops = load["ops"].as_u64().unwrap_or(0);
                let (iptables, redirect, checks) =
                    self.path_checks(cfg, wl, ops, conntrack, ipt_before, rd_before)?;
                let path = checks
                    .iter()
                    .map(|(ok, s)| format!("{}{s}", if *ok { "" } else { "FAILED " }))
                    .collect::<Vec<_>>()
                    .join(", ");
                (iptables, redirect, checks.iter().all(|(ok, _)| *ok), path)
            }
        };
        Ok(Sample {
            phase,
            config: cfg.label(),
            mode: cfg.mode,
            proxy: cfg.proxy,
            workload: wl.name,
            rep,
            rules: scale.rules,
            extra_pods: scale.extra_pods,
            load,
            conntrack,
            iptables,
            redirect,
            path_ok,
            path,
        })
    }

    /// Whether the traffic of a measurement took the path its mode claims, from the counters
    /// before it and now: the checks (passed, evidence), and the counter deltas for the JSON.
    fn path_checks(
        &self,
        cfg: Config,
        wl: Workload,
        ops: u64,
        conntrack: u64,
        ipt_before: Option<[Vec<(String, u64)>; 2]>,
        rd_before: Option<Counters>,
    ) -> Result<PathChecks> {
        let mut iptables = None;
        let mut redirect = None;
        let mut checks: Vec<(bool, String)> = Vec::new();
        if let (Some(before), Some((backend, generation))) = (&ipt_before, cfg.mode.iptables()) {
            let after = self.iptables_counts(backend)?;
            let d = |i: usize, rule: &[&str]| {
                istio::packets_of(&after[i], rule)
                    .saturating_sub(istio::packets_of(&before[i], rule))
            };
            let m = BTreeMap::from([
                ("client_outbound_redirect", d(0, istio::OUTBOUND_REDIRECT)),
                ("server_inbound_redirect", d(1, istio::INBOUND_REDIRECT)),
                ("server_passthrough_return", d(1, istio::PASSTHROUGH_RETURN)),
            ]);
            let want_conns = if wl.kind == "crr" { ops } else { 1 };
            checks.push((
                m["client_outbound_redirect"] >= want_conns,
                format!(
                    "client REDIRECT 15001 pkts {}",
                    m["client_outbound_redirect"]
                ),
            ));
            checks.push((
                m["server_inbound_redirect"] >= want_conns,
                format!(
                    "server REDIRECT 15006 pkts {}",
                    m["server_inbound_redirect"]
                ),
            ));
            if generation == Generation::Passthrough {
                checks.push((
                    m["server_passthrough_return"] >= want_conns,
                    format!("127.0.0.6 RETURN pkts {}", m["server_passthrough_return"]),
                ));
            }
            checks.push((conntrack > 0, format!("conntrack {conntrack}")));
            iptables = Some(m);
        }
        if let Some(before) = &rd_before {
            let after = self.redirect_counters()?;
            let d = |pod: &str, c: &str| {
                let get = |m: &BTreeMap<String, BTreeMap<String, u64>>| {
                    m.get(pod).and_then(|x| x.get(c)).copied().unwrap_or(0)
                };
                get(&after).saturating_sub(get(before))
            };
            let m = BTreeMap::from([
                (
                    "client_outbound_captured".to_owned(),
                    d("bench-client", "outbound_captured"),
                ),
                (
                    "server_inbound_captured".to_owned(),
                    d("bench-server", "inbound_captured"),
                ),
                (
                    "server_delivered_pod_ip".to_owned(),
                    d("bench-server", "delivered_pod_ip"),
                ),
                (
                    "server_delivered_loopback".to_owned(),
                    d("bench-server", "delivered_loopback"),
                ),
                (
                    "map_full".to_owned(),
                    d("bench-client", "map_full") + d("bench-server", "map_full"),
                ),
            ]);
            let want_conns = if wl.kind == "crr" { ops } else { 1 };
            for k in [
                "client_outbound_captured",
                "server_inbound_captured",
                "server_delivered_pod_ip",
            ] {
                if cfg.mode == Mode::ExplicitEnrolled {
                    // Dialled explicitly: the programs run but capture nothing. (The delivery
                    // from 127.0.0.6 to POD_IP:8080 is still recognised as one.)
                    if k != "server_delivered_pod_ip" {
                        checks.push((m[k] == 0, format!("{k} {}", m[k])));
                    }
                } else {
                    checks.push((m[k] >= want_conns, format!("{k} {}", m[k])));
                }
            }
            checks.push((conntrack == 0, format!("conntrack {conntrack}")));
            redirect = Some(m);
        }
        if matches!(cfg.mode, Mode::Direct | Mode::Explicit) {
            checks.push((conntrack == 0, format!("conntrack {conntrack}")));
        }
        checks.push((ops > 0, format!("ops {ops}")));
        Ok((iptables, redirect, checks))
    }
}
