//! Pods from a real container runtime (issue 11): Debian's containerd, private to the test
//! (`redirect_testbed::Containerd`), pods made through CRI only, and `redirect-agent run` as a
//! process with `--cri-socket`; and the agent's DaemonSet (issue 12) run from its own pod spec
//! through that containerd, as a kubelet runs it (`redirect_testbed::kubelet`). Waits are bounded loops for something to become true; their
//! limits are never what a test asserts.

mod common;

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{agent_bin, datapath, Agent};
use redirect_agent::kubepods::record_name;
use redirect_testbed::{
    cri::ContainerSpec, images, probe, require, Containerd, CriPod, Need, Node, Outcome, ProxyDial,
};

const PATIENCE: Duration = Duration::from_secs(30);

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn containerd_here() -> Need {
    let missing: Vec<&str> = ["containerd", "runc", "ctr", "containerd-shim-runc-v2"]
        .into_iter()
        .filter(|t| redirect_devtools::find_on_path(t).is_none())
        .collect();
    Need::machine(
        "Debian's containerd and runc (cargo xtask setup)",
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing: {}", missing.join(", ")))
        },
    )
}

/// A containerd bed with the test images imported.
fn bed() -> Containerd {
    let archive = images::test_images().expect("test images");
    let bed = Containerd::start(Node::new().expect("node")).expect("containerd");
    bed.import(&archive).expect("import the test images");
    bed
}

/// `redirect-agent run` on an [`Agent`]'s directories, with its own socket, HTTP port and a
/// config naming the bed's kubelet cgroup root; `--cri-socket` the bed's. Killed on drop; its
/// log is printed if the test failed.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    http: SocketAddr,
    log: PathBuf,
    config: PathBuf,
    /// More arguments of `run`.
    extra: Vec<String>,
}

impl Daemon {
    fn start(agent: &Agent, bed: &Containerd) -> Daemon {
        let mut d = Daemon::prepare(agent, bed);
        d.spawn(agent, bed);
        d.wait_ready();
        d
    }

    /// Its socket, port, log and config; no process yet.
    fn prepare(agent: &Agent, bed: &Containerd) -> Daemon {
        let name = agent.state_dir.file_name().unwrap().to_string_lossy();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let config = std::env::temp_dir().join(format!("{name}.agent.yaml"));
        fs::write(
            &config,
            format!(
                "kubeletCgroupRoots: [{:?}]\n",
                bed.kubelet_cgroup_root().display().to_string()
            ),
        )
        .unwrap();
        Daemon {
            child: None,
            socket: std::env::temp_dir().join(format!("{name}.sock")),
            http: SocketAddr::from(([127, 0, 0, 1], port)),
            log: std::env::temp_dir().join(format!("{name}.agent.log")),
            config,
            extra: Vec::new(),
        }
    }

    fn spawn(&mut self, agent: &Agent, bed: &Containerd) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(agent_bin())
            .env("REDIRECT_PIN_ROOT", &agent.pin_root)
            .env("REDIRECT_STATE_DIR", &agent.state_dir)
            .env("RUST_LOG", "info")
            .args(["run", "--node-name", "test-node", "--socket"])
            .arg(&self.socket)
            .arg("--http-address")
            .arg(self.http.to_string())
            .arg("--config")
            .arg(&self.config)
            .arg("--cri-socket")
            .arg(bed.socket())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn redirect-agent run");
        self.child = Some(child);
    }

    fn wait_ready(&self) {
        wait_for("the agent's /readyz to say 200", || {
            self.get("/readyz").map(drop)
        });
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log_text());
        }
        let _ = fs::remove_file(&self.log);
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_dir_all(redirect_agent::kubepods::spool_dir(&self.socket));
        let _ = fs::remove_file(&self.config);
    }
}

/// A pod through CRI with an echo application on `[::]:18080` (uid 1000) and the test proxy
/// (the image's uid 1337).
fn app_pod(bed: &Containerd, namespace: &str, name: &str, annotations: &[(&str, &str)]) -> CriPod {
    let annotations: HashMap<String, String> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let spec = bed.sandbox_spec(namespace, name, annotations).unwrap();
    let pod = bed.run_pod(&spec).unwrap();
    bed.start_container(
        &pod,
        &ContainerSpec {
            name: "app".into(),
            image: redirect_image::images::ECHO.into(),
            args: vec![
                "--listen".into(),
                "[::]:18080".into(),
                "--dual-stack".into(),
            ],
            run_as_user: Some(1000),
            ..ContainerSpec::default()
        },
    )
    .unwrap();
    bed.start_container(
        &pod,
        &ContainerSpec {
            name: "istio-proxy".into(),
            image: redirect_image::images::PROXY.into(),
            ..ContainerSpec::default()
        },
    )
    .unwrap();
    pod
}

fn enrolled_names(agent: &Agent) -> Vec<String> {
    agent.listed_names()
}

/// The proxy's inbound listener answers a client (the node namespace) at the pod's address:
/// the echo's banner names the proxy's delivery, and the pod's counters say it was captured.
fn captured(bed: &Containerd, agent: &Agent, pod: &CriPod, record: &str) -> bool {
    let before = agent
        .stats(record)
        .get("inbound_captured")
        .copied()
        .unwrap_or(0);
    let addr = SocketAddr::new(pod.ip4().unwrap().into(), 18080);
    let o = bed
        .node()
        .in_netns(|| probe(addr, b"ping", Duration::from_secs(2)))
        .unwrap();
    let after = agent
        .stats(record)
        .get("inbound_captured")
        .copied()
        .unwrap_or(0);
    matches!(o, Outcome::Echoed { .. }) && after > before
}

#[test]
fn agent_started_after_pods_discovers_and_enrolls_them() {
    require!(Need::Root, datapath(), containerd_here());
    let bed = bed();
    let istio = [(
        "sidecar.istio.io/status",
        r#"{"containers":["istio-proxy"]}"#,
    )];
    let selected = app_pod(&bed, "default", "disc-selected", &istio);
    let plain = app_pod(&bed, "default", "disc-plain", &[]);
    let system = app_pod(&bed, "kube-system", "disc-system", &istio);
    let opted_out = app_pod(
        &bed,
        "default",
        "disc-opted-out",
        &[istio[0], ("sidecar.istio.io/inject", "false")],
    );
    let agent = Agent::new();
    let mut daemon = Daemon::start(&agent, &bed);
    let want = record_name("default", "disc-selected");
    wait_for("the selected pod to be enrolled by discovery", || {
        enrolled_names(&agent).contains(&want).then_some(())
    });
    assert_eq!(
        enrolled_names(&agent),
        vec![want.clone()],
        "only the selected pod"
    );
    // The containers were just started: wait until they listen and the probe is captured.
    wait_for("the selected pod's traffic captured", || {
        captured(&bed, &agent, &selected, &want).then_some(())
    });
    // The others are untouched: the echo answers directly.
    for p in [&plain, &system, &opted_out] {
        let addr = SocketAddr::new(p.ip4().unwrap().into(), 18080);
        let o = bed
            .node()
            .in_netns(|| probe(addr, b"ping", Duration::from_secs(2)))
            .unwrap();
        assert!(
            matches!(o, Outcome::Echoed { .. }),
            "{}: {o:?}",
            p.spec.name
        );
    }

    // Restarted: the pod is already enrolled for its sandbox, nothing changes; a pod removed
    // while the agent was down is collected at start.
    daemon.kill();
    let second = app_pod(&bed, "default", "disc-second", &istio);
    bed.remove_pod(&selected).unwrap();
    daemon.spawn(&agent, &bed);
    daemon.wait_ready();
    let want2 = record_name("default", "disc-second");
    wait_for("the new pod enrolled and the removed one collected", || {
        (enrolled_names(&agent) == vec![want2.clone()]).then_some(())
    });
    wait_for("the discovered pod's traffic captured", || {
        captured(&bed, &agent, &second, &want2).then_some(())
    });
    let log = daemon.log_text();
    assert!(log.contains("discovered"), "{log}");
    drop(daemon);
    bed.remove_pod(&second).unwrap();
    // The agent is gone: the CLI collects what is left (nothing).
    agent.ok(&["gc"]);
    assert!(enrolled_names(&agent).is_empty());
}

// ---------------------------------------------------------------------------------------------
// The CNI path end to end: containerd runs the chain `bridge` + `redirect-cni` (inserted by the
// agent's installer into the bed's CNI configuration), the plugin hands each sandbox to the
// agent, and RunPodSandbox returns once the pod is enrolled.

/// Istio's injection annotation: what selects a pod for the CNI path.
const ISTIO: (&str, &str) = (
    "sidecar.istio.io/status",
    r#"{"containers":["istio-proxy"]}"#,
);

impl Daemon {
    /// An agent that installs its CNI plugin into the bed's chain with `policy` (`fail` or
    /// `ignore`); ready once containerd has loaded the chain with the plugin in it.
    fn start_cni(agent: &Agent, bed: &Containerd, policy: &str) -> Daemon {
        let mut d = Daemon::prepare(agent, bed);
        d.extra = vec![
            "--cni-bin-dir".into(),
            bed.cni_bin_dir().display().to_string(),
            "--cni-conf-dir".into(),
            bed.cni_conf_dir().display().to_string(),
            "--cni-plugin".into(),
            common::plugin_bin().display().to_string(),
            "--cni-failure-policy".into(),
            policy.into(),
        ];
        d.spawn(agent, bed);
        d.wait_ready();
        wait_chain_loaded(bed, policy);
        d
    }

    /// GET `path` on the agent's HTTP address: the body of a 200 answer.
    fn get(&self, path: &str) -> Option<String> {
        let (status, body) = redirect_testbed::http::get(self.http, path).ok()?;
        (status == 200).then_some(body)
    }
}

/// Waits until containerd's CRI plugin has (re)loaded a CNI configuration whose chain ends in
/// `redirect-cni` with `failurePolicy` `policy`: containerd watches its conf dir and reloads
/// on change, so the installer's write reaches it asynchronously.
fn wait_chain_loaded(bed: &Containerd, policy: &str) {
    bed.wait_cni_plugins(&format!("redirect-cni under {policy}"), |plugins| {
        plugins
            .iter()
            .any(|p| p["type"] == "redirect-cni" && p["failurePolicy"] == policy)
    })
    .unwrap();
}

/// A probe of `to` from the node's namespace (outside every pod: a client elsewhere).
fn probe_from_node(bed: &Containerd, to: SocketAddr) -> Outcome {
    bed.node()
        .in_netns(|| probe(to, common::PAYLOAD, common::T))
        .unwrap()
}

fn start_app_and_proxy(
    bed: &Containerd,
    pod: &CriPod,
    listen: &[SocketAddr],
    dial: ProxyDial,
) -> String {
    bed.start_app_and_proxy(pod, listen, dial).unwrap()
}

/// `redirect-testbed connect` with the matrix's payload in `container` (ExecSync).
fn connect_from(bed: &Containerd, container: &str, to: SocketAddr) -> Outcome {
    bed.connect_from(container, to, std::str::from_utf8(common::PAYLOAD).unwrap())
        .unwrap()
}

fn counter(agent: &Agent, record: &str, name: &str) -> u64 {
    agent.stats(record).get(name).copied().unwrap_or(0)
}

/// The conformance matrix through pods made by containerd, enrolled by the CNI plugin from
/// their annotations (`redirect.dev/inbound-policy`), for both policies, both proxy dial
/// modes, IPv4 and IPv6: 48 cells, each against the one prediction (`redirect_common::matrix`).
/// Each pod is enrolled when RunPodSandbox returns, before any container exists. An
/// application's outbound connection (ExecSync in its container) goes through its own proxy
/// and the server's. Removing the sandboxes leaves no record, pin or link.
#[test]
fn cni_chain_enrolls_sandboxes_and_they_pass_the_conformance_matrix() {
    require!(Need::Root, datapath(), containerd_here());
    let bed = bed();
    let agent = Agent::new();
    let daemon = Daemon::start_cni(&agent, &bed, "fail");
    let pods = conformance_through_cri(&bed, &agent);
    outbound_and_removal(&bed, &agent, &pods);
    drop(daemon);
}

/// A pod of the conformance matrix made through CRI: the sandbox, its record's name, the
/// application's container, the pod's policy.
type MatrixPod = (CriPod, String, String, redirect_testbed::InboundPolicy);

/// The conformance matrix through pods made by containerd with the CNI chain as it is now
/// (an agent behind it), enrolled from their annotations: see the test above.
fn conformance_through_cri(bed: &Containerd, agent: &Agent) -> Vec<MatrixPod> {
    use common::{app_bind, Expect, Failures, LOOPBACK_PORT, POD_IP_PORT, WILDCARD_PORT};
    use redirect_testbed::{matrix, InboundPolicy};
    let mut failures = Failures::default();
    let mut pods = Vec::new();
    for policy in InboundPolicy::ALL {
        for dial in [ProxyDial::Loopback, ProxyDial::PodIp] {
            let name = format!("mx-{}-{}", policy.name(), dial.name());
            let annotations = HashMap::from([
                (ISTIO.0.to_owned(), ISTIO.1.to_owned()),
                (
                    "redirect.dev/inbound-policy".to_owned(),
                    policy.name().to_owned(),
                ),
            ]);
            let spec = bed.sandbox_spec("default", &name, annotations).unwrap();
            let pod = bed.run_pod(&spec).unwrap();
            let record = record_name("default", &name);
            // Enrolled before any container of the pod exists.
            assert!(
                bed.cri().list_containers(Some(&pod.id)).unwrap().is_empty(),
                "no container yet"
            );
            let listed = agent.list();
            let entry = listed["pods"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == record.as_str())
                .unwrap_or_else(|| panic!("{record} not enrolled after RunPodSandbox: {listed}"))
                .clone();
            assert_eq!(
                entry["inbound_policy"].as_str(),
                Some(policy.name()),
                "{entry}"
            );
            let (ip4, ip6) = (pod.ip4().unwrap(), pod.ip6().unwrap());
            let listen: Vec<SocketAddr> = [IpAddr::V4(ip4), IpAddr::V6(ip6)]
                .into_iter()
                .flat_map(|ip| {
                    let lo = redirect_common::matrix::loopback(ip);
                    let any = match ip {
                        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                    };
                    [
                        SocketAddr::new(ip, POD_IP_PORT),
                        SocketAddr::new(lo, LOOPBACK_PORT),
                        SocketAddr::new(any, WILDCARD_PORT),
                    ]
                })
                .collect();
            let app = start_app_and_proxy(bed, &pod, &listen, dial);
            for pod_ip in [IpAddr::V4(ip4), IpAddr::V6(ip6)] {
                for port in [POD_IP_PORT, LOOPBACK_PORT, WILDCARD_PORT] {
                    let expect = match matrix::expect(policy, app_bind(port), dial) {
                        None => Expect::NoEcho,
                        Some(cell) => Expect::Echo {
                            local: cell.local(pod_ip, port).into(),
                            peer: cell.peer_ip(pod_ip),
                            direct: false,
                        },
                    };
                    let got = probe_from_node(bed, SocketAddr::new(pod_ip, port));
                    failures.check(
                        format!("policy {policy}, proxy {dial}, {pod_ip} :{port}"),
                        expect,
                        &got,
                    );
                }
            }
            pods.push((pod, record, app, policy));
        }
    }
    failures.assert_none("conformance matrix through containerd and the CNI plugin");
    for (_, record, _, policy) in &pods {
        let c = agent.stats(record);
        // 6 cells per pod reach the proxy's inbound listener (refused ones included: the proxy
        // accepts, then finds no application).
        assert_eq!(
            c.get("inbound_captured"),
            Some(&6),
            "{record} ({policy}): {c:?}"
        );
    }

    pods
}

/// An application's outbound connection goes through its own proxy and the server's; then
/// removing the sandboxes (CNI DEL) leaves no record, pin or link.
fn outbound_and_removal(bed: &Containerd, agent: &Agent, pods: &[MatrixPod]) {
    use common::WILDCARD_PORT;
    // Outbound: the first pod's application dials the second's wildcard port; its own proxy
    // takes it (outbound_captured), the server's proxy delivers it from 127.0.0.6.
    let (client, server) = (&pods[0], &pods[1]);
    let before = counter(agent, &client.1, "outbound_captured");
    let to = SocketAddr::new(server.0.ip4().unwrap().into(), WILDCARD_PORT);
    match connect_from(bed, &client.2, to) {
        Outcome::Echoed { server: s, .. } => {
            assert_eq!(s.local, to, "delivered at the original destination");
            assert_eq!(
                s.peer.ip(),
                common::V4_PASSTHROUGH_SRC,
                "through the server's proxy"
            );
        }
        o => panic!("outbound from {}: {o:?}", client.1),
    }
    assert_eq!(counter(agent, &client.1, "outbound_captured"), before + 1);

    // Removing the sandboxes: DEL unenrolls each; nothing of them is left.
    for (pod, ..) in pods {
        bed.remove_pod(pod).unwrap();
    }
    assert!(agent.listed_names().is_empty(), "{}", agent.list());
    assert!(agent.records().is_empty(), "{:?}", agent.records());
    let pinned = common::tree(&agent.pin_root);
    assert!(
        !pinned.iter().any(|p| p.contains("pods/")),
        "pod pins left: {pinned:?}"
    );
}

/// Annotations handed over by containerd (`runtimeConfig.io.kubernetes.cri.pod-annotations`)
/// decide what the plugin enrolls and how: an excluded inbound port reaches the application
/// directly, an include list captures only its ports, an excluded outbound port bypasses the
/// pod's own proxy, `redirect.dev/enabled: "false"` and a missing annotation leave the pod
/// alone, and a pod in an excluded namespace is never handed to the agent.
#[test]
fn cni_chain_honours_the_pods_annotations() {
    require!(Need::Root, datapath(), containerd_here());
    let bed = bed();
    let agent = Agent::new();
    let _daemon = Daemon::start_cni(&agent, &bed, "fail");
    let ports = [18080u16, 18090, 18091];
    let listen: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([0, 0, 0, 0], *p)))
        .collect();
    let make = |name: &str, namespace: &str, extra: &[(&str, &str)]| {
        let mut annotations = HashMap::from([(ISTIO.0.to_owned(), ISTIO.1.to_owned())]);
        for (k, v) in extra {
            annotations.insert(k.to_string(), v.to_string());
        }
        let spec = bed.sandbox_spec(namespace, name, annotations).unwrap();
        let pod = bed.run_pod(&spec).unwrap();
        let app = start_app_and_proxy(&bed, &pod, &listen, ProxyDial::PodIp);
        (pod, app, record_name(namespace, name))
    };
    let excl = make(
        "ann-exclude",
        "default",
        &[
            ("traffic.sidecar.istio.io/excludeInboundPorts", "18090"),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "18091"),
        ],
    );
    let incl = make(
        "ann-include",
        "default",
        &[("traffic.sidecar.istio.io/includeInboundPorts", "18091")],
    );
    let off = make("ann-off", "default", &[("redirect.dev/enabled", "false")]);
    let system = make("ann-system", "kube-system", &[]);
    assert_eq!(
        {
            let mut n = agent.listed_names();
            n.sort();
            n
        },
        {
            let mut n = vec![excl.2.clone(), incl.2.clone()];
            n.sort();
            n
        },
        "only the selected pods are enrolled"
    );

    // Inbound, from the node: captured cells are delivered by the proxy (peer 127.0.0.6),
    // bypassed ones reach the application with the client's own address as its peer.
    let inbound = |pod: &CriPod, port: u16| {
        probe_from_node(&bed, SocketAddr::new(pod.ip4().unwrap().into(), port))
    };
    let via_proxy = |o: &Outcome| matches!(o, Outcome::Echoed { server, .. } if server.peer.ip() == common::V4_PASSTHROUGH_SRC);
    let direct =
        |o: &Outcome| matches!(o, Outcome::Echoed { server, local } if server.peer == *local);
    let cases: [(&(CriPod, String, String), u16, bool); 8] = [
        (&excl, 18080, true),
        (&excl, 18090, false),
        (&excl, 18091, true),
        (&incl, 18080, false),
        (&incl, 18090, false),
        (&incl, 18091, true),
        (&off, 18080, false),
        (&system, 18080, false),
    ];
    let mut failures = common::Failures::default();
    for (p, port, captured) in cases {
        let o = inbound(&p.0, port);
        let ok = if captured { via_proxy(&o) } else { direct(&o) };
        if !ok {
            failures.push(format!(
                "{} :{port}: expected {}, got {o:?}",
                p.0.spec.name,
                if captured {
                    "the proxy"
                } else {
                    "the app directly"
                }
            ));
        }
    }
    failures.assert_none("annotations through the CNI plugin");
    assert_eq!(counter(&agent, &excl.2, "inbound_captured"), 2);
    assert_eq!(counter(&agent, &incl.2, "inbound_captured"), 1);

    // Outbound from the excluding pod: :18091 bypasses its proxy, :18080 goes through it.
    let before = counter(&agent, &excl.2, "outbound_captured");
    let to = |port| SocketAddr::new(off.0.ip4().unwrap().into(), port);
    for (port, through_proxy) in [(18091, false), (18080, true)] {
        match connect_from(&bed, &excl.1, to(port)) {
            Outcome::Echoed { server, .. } => assert_eq!(server.local, to(port)),
            o => panic!("outbound to {}: {o:?}", to(port)),
        }
        let now = counter(&agent, &excl.2, "outbound_captured");
        assert_eq!(now - before, u64::from(through_proxy), ":{port}");
    }
}

/// With the agent down, `failurePolicy: fail` fails RunPodSandbox with the plugin's message
/// (naming the agent's socket) and leaves no sandbox behind; a pod the plugin does not select
/// starts anyway. Under `ignore` the sandbox starts unenrolled, and the next agent counts it in
/// `redirect_cni_ignored_total{reason}` and (CRI discovery) enrolls it.
#[test]
fn agent_down_fails_sandboxes_under_fail_and_starts_them_unenrolled_under_ignore() {
    require!(Need::Root, datapath(), containerd_here());
    let bed = bed();
    let agent = Agent::new();
    let mut daemon = Daemon::start_cni(&agent, &bed, "fail");
    daemon.kill();
    let istio = HashMap::from([(ISTIO.0.to_owned(), ISTIO.1.to_owned())]);
    let spec = bed
        .sandbox_spec("default", "down-fail", istio.clone())
        .unwrap();
    let err = bed.run_pod(&spec).expect_err("the sandbox must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("redirect-cni"), "names the plugin: {msg}");
    assert!(
        msg.contains(&daemon.socket.display().to_string()),
        "names the agent's socket: {msg}"
    );
    assert!(
        bed.cri()
            .list_pod_sandboxes()
            .unwrap()
            .iter()
            .all(|s| s.state != k8s_cri::v1::PodSandboxState::SandboxReady as i32),
        "no ready sandbox is left"
    );
    assert!(agent.listed_names().is_empty());
    let plain = bed
        .sandbox_spec("default", "down-plain", HashMap::new())
        .unwrap();
    let plain = bed
        .run_pod(&plain)
        .expect("an unselected pod does not need the agent");
    bed.remove_pod(&plain).unwrap();

    // The same, with the plugin installed under `ignore`.
    let mut daemon = Daemon::start_cni(&agent, &bed, "ignore");
    daemon.kill();
    let spec = bed.sandbox_spec("default", "down-ignore", istio).unwrap();
    let pod = bed.run_pod(&spec).expect("ignore lets the sandbox start");
    assert!(agent.listed_names().is_empty(), "started unenrolled");
    let record = record_name("default", "down-ignore");
    daemon.spawn(&agent, &bed);
    daemon.wait_ready();
    let metrics = wait_for("the ignored pod counted", || {
        daemon.get("/metrics").filter(|m| {
            m.lines()
                .any(|l| l.starts_with("redirect_cni_ignored_total{"))
        })
    });
    let counted: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("redirect_cni_ignored_total{"))
        .collect();
    assert_eq!(counted.len(), 1, "{counted:?}");
    assert!(counted[0].ends_with(" 1"), "{counted:?}");
    wait_for("discovery to enroll the ignored pod", || {
        agent.listed_names().contains(&record).then_some(())
    });
    bed.remove_pod(&pod).unwrap();
    assert!(agent.listed_names().is_empty());
}

/// Outcome of one sandbox of the concurrent tests.
struct Made {
    name: String,
    result: anyhow::Result<CriPod>,
}

/// Makes `n` selected sandboxes at once (one thread each).
fn make_many(bed: &Containerd, prefix: &str, n: usize) -> Vec<Made> {
    let istio = HashMap::from([(ISTIO.0.to_owned(), ISTIO.1.to_owned())]);
    thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let istio = istio.clone();
                s.spawn(move || {
                    let name = format!("{prefix}-{i}");
                    let result = bed
                        .sandbox_spec("default", &name, istio)
                        .and_then(|spec| bed.run_pod(&spec));
                    Made { name, result }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Every sandbox that RunPodSandbox made is enrolled with its links in the kernel (status
/// `ok`, programs on its cgroup); every one it failed left nothing (no record, no ready
/// sandbox). `Err` lists what is not so.
fn all_or_nothing(bed: &Containerd, agent: &Agent, made: &[Made]) -> Result<(), String> {
    let list = agent.list();
    let listed: HashMap<String, String> = list["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let ready: Vec<String> = bed
        .cri()
        .list_pod_sandboxes()
        .unwrap()
        .into_iter()
        .filter(|s| s.state == k8s_cri::v1::PodSandboxState::SandboxReady as i32)
        .map(|s| s.id)
        .collect();
    let mut failures = common::Failures::default();
    for m in made {
        let record = record_name("default", &m.name);
        match &m.result {
            Ok(pod) => {
                if listed.get(&record).map(String::as_str) != Some("ok") {
                    failures.push(format!(
                        "{record}: made but listed as {:?}",
                        listed.get(&record)
                    ));
                }
                if common::cgroup_programs(&pod.cgroup).is_empty() {
                    failures.push(format!("{record}: made but no program on its cgroup"));
                }
            }
            Err(e) => {
                if listed.contains_key(&record) {
                    failures.push(format!("{record}: failed ({e:#}) but listed"));
                }
            }
        }
    }
    let made_ids: Vec<&str> = made
        .iter()
        .filter_map(|m| m.result.as_ref().ok().map(|p| p.id.as_str()))
        .collect();
    for id in &ready {
        if !made_ids.contains(&id.as_str()) {
            failures.push(format!(
                "sandbox {id} is ready but RunPodSandbox failed for it"
            ));
        }
    }
    if listed.len() != made_ids.len() {
        failures.push(format!(
            "{} pods listed for {} sandboxes made: {list}",
            listed.len(),
            made_ids.len()
        ));
    }
    failures.into_result()
}

/// [`all_or_nothing`] once the node has settled: a sandbox that failed while the agent was
/// being killed may have been enrolled just before; the agent collects it when its network
/// namespace goes (containerd's clean-up of the failed sandbox) or at its start-up discovery.
fn assert_all_or_nothing(bed: &Containerd, agent: &Agent, made: &[Made]) {
    let start = Instant::now();
    loop {
        match all_or_nothing(bed, agent, made) {
            Ok(()) => return,
            Err(why) if start.elapsed() > PATIENCE => panic!("all or nothing per sandbox: {why}"),
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// 20 sandboxes created at once while the agent is killed (SIGKILL) and restarted three
/// times: each ends enrolled or failed cleanly, none half-enrolled, and removing them all
/// leaves nothing.
#[test]
fn agent_restarted_while_twenty_sandboxes_are_created_leaves_none_half_enrolled() {
    require!(Need::Root, datapath(), containerd_here());
    let bed = bed();
    let agent = Agent::new();
    let mut daemon = Daemon::start_cni(&agent, &bed, "fail");
    let made = thread::scope(|s| {
        let maker = s.spawn(|| make_many(&bed, "restart", 20));
        for i in 0..3u64 {
            // Spread the kills over the burst (a few hundred ms of CNI work on this machine).
            thread::sleep(Duration::from_millis(150 + 97 * i));
            daemon.kill();
            thread::sleep(Duration::from_millis(50));
            daemon.spawn(&agent, &bed);
        }
        maker.join().unwrap()
    });
    daemon.wait_ready();
    let ok = made.iter().filter(|m| m.result.is_ok()).count();
    eprintln!("{ok} of 20 sandboxes made, {} failed", 20 - ok);
    // The agent's start-up reconcile has run (ready); a sandbox made while it was down and
    // enrolled by discovery is also fine: wait until the list holds still.
    assert_all_or_nothing(&bed, &agent, &made);
    for m in &made {
        if let Ok(pod) = &m.result {
            bed.remove_pod(pod).unwrap();
        }
    }
    assert!(agent.listed_names().is_empty(), "{}", agent.list());
    assert!(agent.records().is_empty(), "{:?}", agent.records());
    let log = daemon.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

/// 50 sandboxes created in parallel are all made and all enrolled; removed in parallel, all
/// are unenrolled. (The time redirect adds per sandbox is a benchmark: `cargo xtask bench
/// cni`.)
#[test]
fn fifty_sandboxes_in_parallel_are_all_enrolled() {
    require!(Need::Root, datapath(), containerd_here());
    let bed = bed();
    let agent = Agent::new();
    let _daemon = Daemon::start_cni(&agent, &bed, "fail");
    let made = make_many(&bed, "par", 50);
    let failed: Vec<String> = made
        .iter()
        .filter_map(|m| {
            m.result
                .as_ref()
                .err()
                .map(|e| format!("{}: {e:#}", m.name))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert_all_or_nothing(&bed, &agent, &made);
    thread::scope(|s| {
        for m in &made {
            let pod = m.result.as_ref().unwrap();
            let bed = &bed;
            s.spawn(move || bed.remove_pod(pod).unwrap());
        }
    });
    assert!(agent.listed_names().is_empty(), "{}", agent.list());
    assert!(agent.records().is_empty());
}

/// A long-lived connection from the node to a pod's port: banner read, then each check is
/// one byte echoed.
struct Held(TcpStream);

impl Held {
    fn open(bed: &Containerd, to: SocketAddr) -> Held {
        use std::io::BufRead as _;
        let s = bed
            .node()
            .in_netns(|| TcpStream::connect_timeout(&to, common::T))
            .unwrap()
            .expect("a long-lived connection");
        s.set_read_timeout(Some(common::T)).unwrap();
        let mut banner = String::new();
        std::io::BufReader::new(&s).read_line(&mut banner).unwrap();
        assert!(banner.contains("local"), "banner {banner:?}");
        Held(s)
    }

    fn alive(&mut self) -> bool {
        use std::io::{Read as _, Write as _};
        let mut b = [0u8; 1];
        self.0.write_all(b"x").is_ok() && self.0.read_exact(&mut b).is_ok() && &b == b"x"
    }
}

/// The agent's DaemonSet, from `deploy/redirect.yaml` itself, run through CRI as a kubelet on
/// a node runs it (`redirect_testbed::kubelet`: image, command, args, env with `NODE_NAME`
/// from the downward API, securityContext, hostPath and ConfigMap volumes with their
/// propagation, `hostNetwork`, `hostPID`, the readiness probe): its init container makes the
/// pin root ready; the agent, root with exactly its four capabilities and nothing else,
/// installs its CNI plugin into the node's chain and turns ready on the probe's port. Pods
/// made afterwards are enrolled by the plugin and pass the conformance matrix. A rolling
/// update (the container replaced by one of a newer image) keeps an established connection
/// through a pod's proxy, the new agent adopts every pod and enrolls new ones. The uninstall
/// DaemonSet's pod (`deploy/redirect-uninstall.yaml`) then leaves no plugin entry, binary,
/// pins or state behind.
#[test]
fn the_daemonsets_pod_spec_runs_the_node_agent_through_cri() {
    use redirect_testbed::daemonset::{self, AgentPod, NodeDirs, SharedMounts};
    require!(Need::Root, datapath(), containerd_here());
    // The runtime's netns dir shared (containerd refuses HostToContainer from a private
    // mount), unmounted only after the bed has removed its sandboxes: declared first.
    let mut netns_shared = SharedMounts::default();
    let bed = bed();
    netns_shared.bind_shared(&bed.netns_dir()).unwrap();
    let (archive, image, newer) = images::agent_images().expect("the agent's images");
    bed.import(&archive).expect("import the agent's images");
    let original_conf: Vec<(PathBuf, String)> = fs::read_dir(bed.cni_conf_dir())
        .unwrap()
        .flatten()
        .map(|e| (e.path(), fs::read_to_string(e.path()).unwrap()))
        .collect();

    let mut agent = Agent::new();
    let node = NodeDirs::new(&PathBuf::from(format!(
        "{}-node",
        agent.state_dir.display()
    )))
    .unwrap();
    // The CLI of this test reads what the agent in its container writes, at the same paths.
    agent.state_dir = node.state_dir();
    agent.pin_root = node.pin_root();
    let cm = node.config_map(&bed).unwrap();
    let run = node
        .pod(&bed, "redirect.yaml", "redirect-agent", &cm)
        .unwrap();
    assert_eq!(
        run.containers[0].spec.image, image,
        "the DaemonSet runs the image xtask builds"
    );
    let mut pod = AgentPod::start(&bed, run).unwrap();
    assert_eq!(pod.readiness.path, "/readyz");
    // Least privilege: root with exactly NET_ADMIN, SYS_ADMIN, SYS_PTRACE, DAC_OVERRIDE.
    let want = (1u64 << 12) | (1 << 21) | (1 << 19) | (1 << 1);
    assert_eq!(
        daemonset::cap_eff(&bed, &pod.container).unwrap(),
        want,
        "the agent container's effective capabilities"
    );
    assert!(
        bed.cni_bin_dir().join("redirect-cni").exists(),
        "plugin binary"
    );
    wait_chain_loaded(&bed, "fail");
    let metrics = pod.get(&bed, "/metrics").unwrap();
    assert!(metrics.contains("redirect_pods_enrolled 0\n"), "{metrics}");

    let pods = conformance_through_cri(&bed, &agent);

    // Rolling update: the old container goes (SIGTERM), one of the newer image comes.
    let mut held = Held::open(
        &bed,
        SocketAddr::new(pods[0].0.ip4().unwrap().into(), common::WILDCARD_PORT),
    );
    assert!(held.alive());
    pod.update(&bed, &newer).unwrap();
    assert!(held.alive(), "the connection across the rolling update");
    let metrics = pod.get(&bed, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!(
            "redirect_agent_restarts_adopted_pods {}\n",
            pods.len()
        )),
        "{metrics}"
    );
    for (_, record, _, _) in &pods {
        assert_eq!(
            counter(&agent, record, "inbound_captured"),
            6 + u64::from(record == &pods[0].1),
            "{record}: counters continue across the update"
        );
    }
    outbound_and_removal(&bed, &agent, &pods);
    drop(held);
    let late = bed
        .run_pod(
            &bed.sandbox_spec(
                "default",
                "after-update",
                HashMap::from([(ISTIO.0.into(), ISTIO.1.into())]),
            )
            .unwrap(),
        )
        .unwrap();
    let late_record = record_name("default", "after-update");
    assert!(
        agent.listed_names().contains(&late_record),
        "a pod made after the update is enrolled: {}",
        agent.list()
    );
    start_app_and_proxy(
        &bed,
        &late,
        &[SocketAddr::from(([0, 0, 0, 0], 18080))],
        ProxyDial::PodIp,
    );
    assert!(captured(&bed, &agent, &late, &late_record));

    // Uninstall: the agent's DaemonSet is deleted first, then the uninstall DaemonSet's pod.
    pod.stop(&bed).unwrap();
    let said = daemonset::uninstall(&bed, &node, &cm).unwrap();
    assert!(
        said.contains(&format!("unenrolled {late_record}")),
        "{said}"
    );
    for (path, text) in &original_conf {
        assert_eq!(
            &fs::read_to_string(path).unwrap(),
            text,
            "{}",
            path.display()
        );
    }
    assert_eq!(
        fs::read_dir(bed.cni_conf_dir()).unwrap().count(),
        original_conf.len(),
        "a file left in the CNI conf dir"
    );
    assert!(
        !bed.cni_bin_dir().join("redirect-cni").exists(),
        "plugin binary left"
    );
    assert!(
        !agent.pin_root.exists(),
        "pins left: {:?}",
        common::tree(&agent.pin_root)
    );
    assert!(!agent.state_dir.exists(), "state left");
    assert!(!node.socket().exists(), "socket left");
    bed.remove_pod(&late).unwrap();
    bed.remove_pod(&pod.pod).unwrap();
}
