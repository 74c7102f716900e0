//! Pods from a real container runtime (issue 11): Debian's containerd, private to the test
//! (`redirect_testbed::Containerd`), pods made through CRI only, and `redirect-agent run` as a
//! process with `--cri-socket`. Waits are bounded loops for something to become true; their
//! limits are never what a test asserts.

mod common;

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{
    agent_bin, app_bind, datapath, sock, Agent, Expect, Failures, LOOPBACK_PORT, POD_IP_PORT,
    WILDCARD_PORT,
};
use redirect_agent::kubepods::record_name;
use redirect_testbed::{
    cri::ContainerSpec, images, matrix, probe, require, Containerd, CriPod, InboundPolicy, Need,
    Node, Outcome, ProxyDial,
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
            let mut s = TcpStream::connect(self.http).ok()?;
            use std::io::{Read as _, Write as _};
            write!(
                s,
                "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut r = String::new();
            s.read_to_string(&mut r).ok()?;
            r.starts_with("HTTP/1.1 200").then_some(())
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
    assert!(captured(&bed, &agent, &selected, &want));
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
    assert!(captured(&bed, &agent, &second, &want2));
    let log = daemon.log_text();
    assert!(log.contains("discovered"), "{log}");
    drop(daemon);
    bed.remove_pod(&second).unwrap();
    // The agent is gone: the CLI collects what is left (nothing).
    agent.ok(&["gc"]);
    assert!(enrolled_names(&agent).is_empty());
}

/// The static plugin binary (as the agent's image ships it), built if needed.
fn cni_plugin() -> PathBuf {
    images::static_bins(&["redirect-cni"])
        .expect("static redirect-cni")
        .join("redirect-cni")
}

/// The agent with the plugin installed into the bed's CNI dirs by `run --cni-bin-dir
/// --cni-conf-dir` (the installer splices it into the bed's bridge chain).
fn daemon_with_cni(agent: &Agent, bed: &Containerd, policy: &str) -> Daemon {
    let mut d = Daemon::prepare(agent, bed);
    d.extra = vec![
        "--cni-bin-dir".into(),
        bed.cni_bin_dir().display().to_string(),
        "--cni-conf-dir".into(),
        bed.cni_conf_dir().display().to_string(),
        "--cni-plugin".into(),
        cni_plugin().display().to_string(),
        "--cni-failure-policy".into(),
        policy.into(),
    ];
    d.spawn(agent, bed);
    d.wait_ready();
    wait_for("the plugin in the bed's chain", || {
        let conf = fs::read_to_string(
            bed.cni_conf_dir()
                .join(redirect_testbed::containerd::CNI_CONF_FILE),
        )
        .ok()?;
        conf.contains("\"redirect-cni\"").then_some(())
    });
    d
}

/// The matrix's applications in a CRI pod (its addresses are known once its sandbox runs):
/// POD_IP:18082, loopback:18084, wildcard:18080, both families; and the proxy, dialling the
/// application as `delivery`.
fn matrix_pod(
    bed: &Containerd,
    name: &str,
    annotations: &[(&str, &str)],
    delivery: ProxyDial,
) -> CriPod {
    let annotations: HashMap<String, String> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let spec = bed.sandbox_spec("default", name, annotations).unwrap();
    let pod = bed.run_pod(&spec).unwrap();
    let mut args = Vec::new();
    for ip in [IpAddr::from(pod.ip4().unwrap()), pod.ip6().unwrap().into()] {
        for a in [
            sock(ip, POD_IP_PORT),
            sock(matrix::loopback(ip), LOOPBACK_PORT),
            sock(
                if ip.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                },
                WILDCARD_PORT,
            ),
        ] {
            args.push("--listen".to_owned());
            args.push(a.to_string());
        }
    }
    bed.start_container(
        &pod,
        &ContainerSpec {
            name: "app".into(),
            image: redirect_image::images::ECHO.into(),
            args,
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
            args: vec!["--delivery".into(), delivery.to_string()],
            ..ContainerSpec::default()
        },
    )
    .unwrap();
    // Bounded wait for both listeners (the containers start asynchronously).
    let probe_addr = sock(pod.ip4().unwrap(), WILDCARD_PORT);
    wait_for("the pod's application and proxy to listen", || {
        let o = bed
            .node()
            .in_netns(|| probe(probe_addr, b"ping", Duration::from_secs(1)))
            .ok()?;
        matches!(o, Outcome::Echoed { .. }).then_some(())
    });
    pod
}

fn probe_from(client: &CriPod, to: SocketAddr) -> Outcome {
    client
        .in_netns(|| probe(to, b"ping", Duration::from_secs(2)))
        .unwrap()
}

const ISTIO_STATUS: (&str, &str) = (
    "sidecar.istio.io/status",
    r#"{"containers":["istio-proxy"]}"#,
);

#[test]
fn pods_through_the_plugin_pass_the_conformance_matrix_and_leave_no_state() {
    require!(Need::Root, datapath(), containerd_here());
    let bed = bed();
    let agent = Agent::new();
    let _daemon = daemon_with_cni(&agent, &bed, "fail");
    let client = bed
        .run_pod(
            &bed.sandbox_spec("default", "mx-client", HashMap::new())
                .unwrap(),
        )
        .unwrap();
    assert!(agent.listed_names().is_empty(), "the client has no sidecar");
    let mut failures = Failures::default();
    for policy in [InboundPolicy::Passthrough, InboundPolicy::Localhost] {
        let delivery = ProxyDial::PodIp;
        let name = format!("mx-{policy}");
        let server = matrix_pod(
            &bed,
            &name,
            &[ISTIO_STATUS, ("redirect.dev/inbound-policy", policy.name())],
            delivery,
        );
        let record = record_name("default", &name);
        assert!(agent.listed_names().contains(&record), "{record} enrolled");
        for ip in [
            IpAddr::from(server.ip4().unwrap()),
            server.ip6().unwrap().into(),
        ] {
            for port in [POD_IP_PORT, LOOPBACK_PORT, WILDCARD_PORT] {
                let expect = match matrix::expect(policy, app_bind(port), delivery) {
                    None => Expect::NoEcho,
                    Some(cell) => Expect::Echo {
                        local: cell.local(ip, port).into(),
                        peer: cell.peer_ip(ip),
                        direct: false,
                    },
                };
                let cell = format!("policy {policy}, {ip}, app :{port}");
                failures.check(&cell, expect, &probe_from(&client, sock(ip, port)));
            }
        }
        bed.remove_pod(&server).unwrap();
        assert!(
            !agent.listed_names().contains(&record),
            "RemovePodSandbox (CNI DEL) unenrolled {record}"
        );
    }
    failures.assert_none("conformance matrix through CRI pods");
    bed.remove_pod(&client).unwrap();
    assert!(
        agent.records().is_empty(),
        "no record left: {:?}",
        agent.records()
    );
    assert!(
        !agent.pin_root.join("pods").exists()
            || fs::read_dir(agent.pin_root.join("pods"))
                .unwrap()
                .next()
                .is_none(),
        "no pod links left"
    );
}

#[test]
fn annotations_exclude_and_include_ports() {
    require!(Need::Root, datapath(), containerd_here());
    let bed = bed();
    let agent = Agent::new();
    let _daemon = daemon_with_cni(&agent, &bed, "fail");
    let client = bed
        .run_pod(
            &bed.sandbox_spec("default", "ann-client", HashMap::new())
                .unwrap(),
        )
        .unwrap();
    let client_ip = IpAddr::from(client.ip4().unwrap());
    let excluded = matrix_pod(
        &bed,
        "ann-excluded",
        &[
            ISTIO_STATUS,
            ("traffic.sidecar.istio.io/excludeInboundPorts", "18080"),
        ],
        ProxyDial::PodIp,
    );
    let included = matrix_pod(
        &bed,
        "ann-included",
        &[
            ISTIO_STATUS,
            ("traffic.sidecar.istio.io/includeInboundPorts", "18082"),
        ],
        ProxyDial::PodIp,
    );
    let mut failures = Failures::default();
    let ip = IpAddr::from(excluded.ip4().unwrap());
    // Excluded port: straight to the application, whose peer is the client itself.
    failures.check(
        "excludeInboundPorts 18080: :18080 bypasses",
        Expect::Echo {
            local: sock(ip, WILDCARD_PORT),
            peer: client_ip,
            direct: true,
        },
        &probe_from(&client, sock(ip, WILDCARD_PORT)),
    );
    failures.check(
        "excludeInboundPorts 18080: :18082 captured",
        Expect::Echo {
            local: sock(ip, POD_IP_PORT),
            peer: matrix::PASSTHROUGH_SRC4.into(),
            direct: false,
        },
        &probe_from(&client, sock(ip, POD_IP_PORT)),
    );
    let ip = IpAddr::from(included.ip4().unwrap());
    failures.check(
        "includeInboundPorts 18082: :18082 captured",
        Expect::Echo {
            local: sock(ip, POD_IP_PORT),
            peer: matrix::PASSTHROUGH_SRC4.into(),
            direct: false,
        },
        &probe_from(&client, sock(ip, POD_IP_PORT)),
    );
    failures.check(
        "includeInboundPorts 18082: :18080 not captured",
        Expect::Echo {
            local: sock(ip, WILDCARD_PORT),
            peer: client_ip,
            direct: true,
        },
        &probe_from(&client, sock(ip, WILDCARD_PORT)),
    );
    failures.assert_none("annotations through the CNI plugin");
}

#[test]
fn agent_down_fails_the_sandbox_under_fail_and_not_under_ignore() {
    require!(Need::Root, datapath(), containerd_here());
    for policy in ["fail", "ignore"] {
        let bed = bed();
        let agent = Agent::new();
        let mut daemon = daemon_with_cni(&agent, &bed, policy);
        daemon.kill();
        let spec = bed
            .sandbox_spec(
                "default",
                &format!("down-{policy}"),
                HashMap::from([(ISTIO_STATUS.0.to_owned(), ISTIO_STATUS.1.to_owned())]),
            )
            .unwrap();
        let r = bed.run_pod(&spec);
        match policy {
            "fail" => {
                let e = format!(
                    "{:#}",
                    r.expect_err("RunPodSandbox must fail with the agent down")
                );
                assert!(e.contains("redirect"), "the plugin's message: {e}");
                assert!(bed
                    .cri()
                    .list_pod_sandboxes()
                    .unwrap()
                    .iter()
                    .all(|s| s.state != 0));
            }
            _ => {
                let pod = r.expect("RunPodSandbox succeeds under ignore");
                assert!(agent.records().is_empty(), "started unenrolled");
                bed.remove_pod(&pod).unwrap();
            }
        }
    }
}
