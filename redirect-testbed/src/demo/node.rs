//! `redirect-testbed demo-node` (`cargo xtask demo node`): this machine as a Kubernetes node,
//! end to end. A private containerd (its own socket, directories, CNI config and network
//! namespace), the agent's image built from the source and imported, the agent's DaemonSet
//! pod run from `deploy/redirect.yaml` as a kubelet runs it; then pods with Istio's
//! annotations made through CRI: a client and one server per policy and proxy dial mode,
//! enrolled by the CNI plugin the agent installed. The client's application dials each
//! server's applications through both sidecars; the matrix is printed against DESIGN.md's
//! prediction, with the server pods' counters and a few lines of the agent's `/metrics`.
//! Last, the uninstall DaemonSet's pod removes everything, and the demo shows that nothing is
//! left. Everything is removed on the way out, on success, failure and Ctrl-C.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use anyhow::{bail, Result};
use redirect_testbed::{
    daemonset::{self, AgentPod, NodeDirs, SharedMounts},
    images, AppBind, Containerd, CriPod, InboundPolicy, Node, ProxyDial,
};

use super::{
    bind_addr, bind_port, check_interrupted, expected, judge, print_counters, print_matrix,
};

/// Istio's injection annotation: what selects a pod for the CNI path.
const ISTIO: (&str, &str) = (
    "sidecar.istio.io/status",
    r#"{"containers":["istio-proxy"]}"#,
);

pub fn demo() -> Result<bool> {
    let built = Instant::now();
    println!("# building the test images and the agent's image from the source (no registry)");
    let test_images = images::test_images()?;
    let (agent_images, agent_image, _) = images::agent_images()?;
    println!("# images ready after {:.1}s", built.elapsed().as_secs_f32());
    check_interrupted()?;
    let started = Instant::now();

    // Declared first, dropped last: the runtime's netns dir stays shared until the bed has
    // removed its sandboxes.
    let mut netns_shared = SharedMounts::default();
    let bed = Containerd::start(Node::new()?)?;
    netns_shared.bind_shared(&bed.netns_dir())?;
    bed.import(&test_images)?;
    bed.import(&agent_images)?;
    println!(
        "# a private containerd: {} (CNI conf dir {})",
        bed.socket().display(),
        bed.cni_conf_dir().display()
    );
    let node = NodeDirs::new(
        &std::env::temp_dir().join(format!("redirect-demo-node-{}", std::process::id())),
    )?;
    let cm = node.config_map(&bed)?;
    let run = node.pod(&bed, "redirect.yaml", "redirect-agent", &cm)?;
    println!(
        "# the DaemonSet's pod from deploy/redirect.yaml: image {agent_image}, init {:?}, then {:?}",
        run.init.iter().map(|c| &c.spec.name).collect::<Vec<_>>(),
        run.containers[0].spec.command
    );
    let agent = AgentPod::start(&bed, run)?;
    println!(
        "# GET {} on port {}: 200 after {:.1}s",
        agent.readiness.path,
        agent.readiness.port,
        started.elapsed().as_secs_f32()
    );
    let caps = daemonset::cap_eff(&bed, &agent.container)?;
    println!("# the agent runs as root with CapEff {caps:#x} (NET_ADMIN, SYS_ADMIN, SYS_PTRACE, DAC_OVERRIDE)");
    for e in fs::read_dir(bed.cni_conf_dir())?.flatten() {
        let text = fs::read_to_string(e.path())?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let chain: Vec<&str> = v["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["type"].as_str())
            .collect();
        println!(
            "# the chain in {}: {}",
            e.file_name().to_string_lossy(),
            chain.join(" -> ")
        );
    }
    bed.wait_cni_plugins("redirect-cni", |plugins| {
        plugins.iter().any(|p| p["type"] == "redirect-cni")
    })?;
    println!();

    let client = pod(&bed, "client", &[])?;
    let client_app = bed.start_app_and_proxy(&client, &[], ProxyDial::PodIp)?;
    let mut servers = Vec::new();
    for policy in InboundPolicy::ALL {
        for dial in ProxyDial::ALL {
            check_interrupted()?;
            let name = format!("server-{}-{}", policy.name(), dial.name());
            println!(
                "# RunPodSandbox {name} with {}: {:?} and redirect.dev/inbound-policy: {:?}",
                ISTIO.0,
                ISTIO.1,
                policy.name()
            );
            let p = pod(
                &bed,
                &name,
                &[("redirect.dev/inbound-policy", policy.name())],
            )?;
            let listen: Vec<SocketAddr> = p
                .ips
                .iter()
                .flat_map(|ip| AppBind::ALL.map(|b| bind_addr(b, *ip)))
                .collect();
            bed.start_app_and_proxy(&p, &listen, dial)?;
            servers.push((policy, dial, p));
        }
    }
    let pod_ips: [IpAddr; 2] = [servers[0].2.ips[0], servers[0].2.ips[1]];
    let mut results: Vec<Vec<(String, bool)>> = vec![Vec::new(); 2 * AppBind::ALL.len()];
    for (policy, dial, server) in &servers {
        for (vi, ip) in server.ips.iter().take(2).enumerate() {
            for (bi, bind) in AppBind::ALL.into_iter().enumerate() {
                check_interrupted()?;
                let to = SocketAddr::new(*ip, bind_port(bind));
                let o = bed.connect_from(&client_app, to, "demo")?;
                results[vi * AppBind::ALL.len() + bi]
                    .push(judge(&o, expected(*policy, *dial, bind, *ip)));
            }
        }
    }
    println!();
    print_matrix(&results, &pod_ips);
    println!(
        "(the client pod's application dials through its own proxy; each column is a server pod \
         of its own, the rows show the first one's addresses)"
    );
    let mut counters = Vec::new();
    for policy in InboundPolicy::ALL {
        let mut sum = serde_json::Map::new();
        for (p, _, server) in servers.iter().filter(|(p, ..)| *p == policy) {
            let _ = p;
            for (k, v) in stats(&node, &record(&server.spec.name))? {
                let before = sum.get(&k).and_then(|x| x.as_u64()).unwrap_or(0);
                sum.insert(k, (before + v.as_u64().unwrap_or(0)).into());
            }
        }
        counters.push(sum);
    }
    print_counters(&counters);

    println!();
    println!(
        "# curl http://127.0.0.1:{}/metrics (a few lines)",
        agent.readiness.port
    );
    let metrics = agent.get(&bed, "/metrics")?;
    let first = format!("pod=\"{}\"", servers[0].2.spec.name);
    for l in metrics.lines().filter(|l| {
        l.starts_with("redirect_pods_enrolled ")
            || l.starts_with("redirect_enroll_duration_seconds_count")
            || (l.starts_with("redirect_inbound_captured_total") && l.contains(&first))
            || l.starts_with("redirect_delivered_pod_ip_total")
            || (l.starts_with("redirect_outbound_captured_total") && l.contains("client"))
    }) {
        println!("  {l}");
    }

    println!();
    println!("# the server pods go (CNI DEL unenrolls each); the client stays for the uninstall");
    for p in servers.iter().map(|(_, _, p)| p) {
        bed.remove_pod(p)?;
    }
    println!(
        "# uninstall: delete the agent's DaemonSet, then run deploy/redirect-uninstall.yaml's pod"
    );
    agent.stop(&bed)?;
    let said = daemonset::uninstall(&bed, &node, &cm)?;
    for l in said.lines() {
        println!("  {l}");
    }
    let left_conf = fs::read_dir(bed.cni_conf_dir())?
        .flatten()
        .any(|e| fs::read_to_string(e.path()).is_ok_and(|t| t.contains("redirect-cni")));
    let left = [
        (
            left_conf,
            "the plugin's entry in the CNI conf dir".to_owned(),
        ),
        (
            bed.cni_bin_dir().join("redirect-cni").exists(),
            "the plugin binary".to_owned(),
        ),
        (
            node.pin_root().exists(),
            format!("pins under {}", node.pin_root().display()),
        ),
        (
            node.state_dir().exists(),
            format!("the state {}", node.state_dir().display()),
        ),
    ];
    let left: Vec<&String> = left.iter().filter(|(l, _)| *l).map(|(_, w)| w).collect();
    if left.is_empty() {
        println!(
            "# nothing of redirect is left: CNI conf restored, plugin, pins and state removed"
        );
    } else {
        println!("# left behind: {left:?}");
    }
    bed.remove_pod(&client)?;
    bed.remove_pod(&agent.pod)?;

    let wrong = results.iter().flatten().filter(|(_, ok)| !ok).count();
    let total = results.iter().map(Vec::len).sum::<usize>();
    let secs = started.elapsed().as_secs_f32();
    drop(node);
    drop(bed);
    drop(netns_shared);
    println!();
    if wrong == 0 && left.is_empty() {
        println!(
            "verdict: PASS, all {total} cells as DESIGN.md expects, clean uninstall ({secs:.1}s)"
        );
        Ok(true)
    } else {
        println!(
            "verdict: FAIL, {wrong} of {total} cells differ from DESIGN.md, {} things left ({secs:.1}s)",
            left.len()
        );
        Ok(false)
    }
}

fn record(name: &str) -> String {
    format!("default.{name}")
}

/// A sandbox with Istio's annotation (and `extra`), as kubelet makes it.
fn pod(bed: &Containerd, name: &str, extra: &[(&str, &str)]) -> Result<CriPod> {
    let annotations: HashMap<String, String> = std::iter::once(ISTIO)
        .chain(extra.iter().copied())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let spec = bed.sandbox_spec("default", name, annotations)?;
    bed.run_pod(&spec)
}

/// `redirect-agent stats --name NAME --output json` on the host, reading the pins the agent
/// in its container keeps.
fn stats(node: &NodeDirs, name: &str) -> Result<serde_json::Map<String, serde_json::Value>> {
    let out = std::process::Command::new(redirect_testbed::bin_path("redirect-agent"))
        .env("REDIRECT_STATE_DIR", node.state_dir())
        .env("REDIRECT_PIN_ROOT", node.pin_root())
        .env("REDIRECT_SOCKET", node.socket())
        .args(["stats", "--name", name, "--output", "json"])
        .output()?;
    if !out.status.success() {
        bail!("stats {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let pod = v["pods"]
        .as_array()
        .and_then(|p| p.first())
        .cloned()
        .unwrap_or(v.clone());
    Ok(pod["counters"].as_object().cloned().unwrap_or_default())
}
