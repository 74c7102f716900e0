//! Pods from a real container runtime (issue 11): Debian's containerd, private to the test
//! (`redirect_testbed::Containerd`), pods made through CRI only, and `redirect-agent run` as a
//! process with `--cri-socket`. Waits are bounded loops for something to become true; their
//! limits are never what a test asserts.

mod common;

use std::{
    collections::HashMap,
    fs,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{agent_bin, datapath, Agent};
use redirect_agent::kubepods::record_name;
use redirect_testbed::{
    cri::ContainerSpec, images, probe, require, Containerd, CriPod, Need, Node, Outcome,
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
