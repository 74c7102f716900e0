//! The CNI plugin against the real agent and the real kernel: `redirect-cni` run as a
//! runtime runs it (the `CNI_*` environment, the configuration on stdin) for a test-bed pod
//! whose cgroup is laid out as kubelet's (`kubepods/burstable/pod<UID>`), with
//! `redirect-agent run` behind the socket. ADD enrolls (traffic captured), CHECK verifies, a
//! changed annotation is refused by CHECK and applied by the next ADD, DEL of another sandbox
//! leaves the pod, DEL unenrolls (twice is fine), and with the agent down `fail` fails the
//! sandbox while `ignore` lets it start and the next agent counts it. Needs root; the plugin
//! binary comes from `cargo build --workspace --bins` (as the test bed's does).

mod common;

use std::{
    fs,
    io::Write as _,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

const UID: &str = "5b1f0c2e-7d4a-4e8b-9c3d-2a1b0c9d8e7f";

/// A kubelet-style pod cgroup inside the test pod's own cgroup, holding the pod's processes;
/// moved back and removed on drop.
struct KubeletCgroup {
    root: PathBuf,
    dir: PathBuf,
}

impl KubeletCgroup {
    fn new(pod: &Pod) -> KubeletCgroup {
        let root = pod.cgroup.clone();
        let dir = root
            .join("kubepods")
            .join("burstable")
            .join(format!("pod{UID}"));
        fs::create_dir_all(&dir).unwrap();
        KubeletCgroup { root, dir }
    }

    /// Moves every process of the test pod into the kubelet-style directory.
    fn adopt(&self) {
        let procs = fs::read_to_string(self.root.join("cgroup.procs")).unwrap();
        for pid in procs.lines().filter(|l| !l.trim().is_empty()) {
            let _ = fs::write(self.dir.join("cgroup.procs"), pid);
        }
    }
}

impl Drop for KubeletCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        for d in [
            self.dir.clone(),
            self.root.join("kubepods/burstable"),
            self.root.join("kubepods"),
        ] {
            let _ = fs::remove_dir(d);
        }
    }
}

/// `redirect-agent run` with its own socket, port, directories and a config file pointing
/// kubelet's cgroup root at the test pod.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    http: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    extra: Vec<String>,
}

impl Daemon {
    fn new(agent: &Agent, kubelet_root: &Path) -> Daemon {
        let name = agent
            .state_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let dir = std::env::temp_dir().join(format!("{name}.cni"));
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("agent.yaml");
        fs::write(
            &config,
            format!(
                "kubeletCgroupRoots: [{:?}]\npodDefaults:\n  proxyUid: 1337\n",
                kubelet_root.display().to_string()
            ),
        )
        .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Daemon {
            child: None,
            socket: dir.join("agent.sock"),
            http: SocketAddr::from(([127, 0, 0, 1], port)),
            config,
            log: dir.join("agent.log"),
            extra: Vec::new(),
        }
    }

    fn start(&mut self, agent: &Agent) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            agent
                .cmd()
                .env("RUST_LOG", "info")
                .args(["run", "--node-name", "cni-test", "--socket"])
                .arg(&self.socket)
                .arg("--http-address")
                .arg(self.http.to_string())
                .arg("--config")
                .arg(&self.config)
                .args(&self.extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.get("/readyz").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "agent not ready: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        redirect_testbed::http::get(self.http, path).unwrap_or((0, String::new()))
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log_text());
        }
        if let Some(d) = self.socket.parent() {
            let _ = fs::remove_dir_all(d);
        }
    }
}

fn prev_result(pod: &Pod) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","interfaces":[{{"name":"eth0","sandbox":"{}"}}],"ips":[{{"address":"{}/24","interface":0}},{{"address":"{}/64","interface":0}}],"dns":{{}}}}"#,
        pod.netns_path.display(),
        pod.ip4,
        pod.ip6
    )
}

/// Runs the plugin: (stdout, exit code).
fn plugin(
    command: &str,
    pod: &Pod,
    socket: &Path,
    policy: &str,
    annotations: &str,
    sandbox: &str,
) -> (String, i32) {
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"test-net","type":"redirect-cni","agentSocket":"{}","failurePolicy":"{policy}","logLevel":"debug","runtimeConfig":{{"io.kubernetes.cri.pod-annotations":{annotations}}},"prevResult":{}}}"#,
        socket.display(),
        prev_result(pod)
    );
    let mut child = Command::new(plugin_bin())
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", sandbox)
        .env("CNI_NETNS", &pod.netns_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID={sandbox};K8S_POD_UID={UID}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        out.status.code().unwrap_or(-1),
    )
}

const ISTIO: &str = r#"{"sidecar.istio.io/status":"{}"}"#;

#[test]
fn plugin_enrolls_checks_and_removes_through_the_agent() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let kubelet = KubeletCgroup::new(&server);
    let _apps = wildcard_echo(&server, &[WILDCARD_PORT, 18086]);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    kubelet.adopt();
    let agent = Agent::new();
    let mut daemon = Daemon::new(&agent, &server.cgroup);
    daemon.start(&agent);
    let sock = daemon.socket.clone();

    // ADD: enrolled, prevResult printed unchanged, traffic captured.
    let (out, code) = plugin("ADD", &server, &sock, "fail", ISTIO, "sb1");
    assert_eq!((code, out.as_str()), (0, prev_result(&server).as_str()));
    let listed = agent.list();
    let pods = listed["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 1, "{listed}");
    assert_eq!(pods[0]["name"], "default.web-0");
    assert_eq!(pods[0]["status"], "ok");
    assert_eq!(pods[0]["kube"]["sandbox_id"], "sb1");
    assert_eq!(
        Path::new(pods[0]["cgroup"].as_str().unwrap()),
        kubelet.dir.as_path()
    );
    if let Some(why) = captured_inbound(&client, &server, &proxy) {
        panic!("after ADD: {why}");
    }
    // CHECK: as annotated.
    assert_eq!(
        plugin("CHECK", &server, &sock, "fail", ISTIO, "sb1"),
        (String::new(), 0)
    );
    // Annotations changed: CHECK says so; the next ADD applies them (only 18086 captured).
    let limited = r#"{"sidecar.istio.io/status":"{}","traffic.sidecar.istio.io/includeInboundPorts":"18086"}"#;
    let (out, code) = plugin("CHECK", &server, &sock, "fail", limited, "sb1");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("\"code\":101"), "{out}");
    assert_eq!(plugin("ADD", &server, &sock, "fail", limited, "sb1").1, 0);
    if let Some(why) = direct_inbound(&client, &server) {
        panic!("port 18080 not included, still captured: {why}");
    }
    // A bad annotation: refused, with the annotation named.
    let bad =
        r#"{"sidecar.istio.io/status":"{}","traffic.sidecar.istio.io/excludeInboundPorts":"80,"}"#;
    let (out, code) = plugin("ADD", &server, &sock, "fail", bad, "sb1");
    assert_eq!(code, 1);
    assert!(
        out.contains("\"code\":100") && out.contains("excludeInboundPorts"),
        "{out}"
    );
    // DEL of another sandbox: nothing happens; of this one: unenrolled; again: still fine.
    assert_eq!(
        plugin("DEL", &server, &sock, "fail", "{}", "old-sandbox"),
        (String::new(), 0)
    );
    assert_eq!(agent.listed_names(), ["default.web-0"]);
    assert_eq!(
        plugin("DEL", &server, &sock, "fail", "{}", "sb1"),
        (String::new(), 0)
    );
    assert!(agent.listed_names().is_empty());
    assert_eq!(
        plugin("DEL", &server, &sock, "fail", "{}", "sb1"),
        (String::new(), 0)
    );
    if let Some(why) = direct_inbound(&client, &server) {
        panic!("after DEL: {why}");
    }

    // Agent down: fail fails the sandbox naming the reason; ignore starts it unenrolled and the
    // next agent counts it from the spool.
    daemon.stop();
    let (out, code) = plugin("ADD", &server, &sock, "fail", ISTIO, "sb2");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("\"code\":11") && out.contains("unreachable"),
        "{out}"
    );
    let (out, code) = plugin("ADD", &server, &sock, "ignore", ISTIO, "sb2");
    assert_eq!((code, out.as_str()), (0, prev_result(&server).as_str()));
    assert!(agent.listed_names().is_empty());
    daemon.start(&agent);
    let metrics = daemon.get("/metrics").1;
    assert!(
        metrics.contains("redirect_cni_ignored_total{reason=\"agent_unreachable\"} 1"),
        "{metrics}"
    );
    // Told at once while the agent runs (a refusal under ignore).
    let (_, code) = plugin("ADD", &server, &sock, "ignore", bad, "sb2");
    assert_eq!(code, 0);
    let metrics = daemon.get("/metrics").1;
    assert!(
        metrics.contains("redirect_cni_ignored_total{reason=\"enroll_failed\"} 1"),
        "{metrics}"
    );
}

fn wildcard_echo(pod: &Pod, ports: &[u16]) -> PodProcess {
    let mut listen = Vec::new();
    for p in ports {
        listen.push(common::sock(Family::V4.unspecified(), *p));
        listen.push(common::sock(Family::V6.unspecified(), *p));
    }
    echo(pod, APP_UID, &listen)
}

/// `run --cni-bin-dir --cni-conf-dir`: the agent installs the plugin at start and puts it back
/// whenever the primary CNI rewrites its configuration while the agent runs.
#[test]
fn agent_installs_and_keeps_the_plugin_in_the_chain() {
    require!(Need::Root, datapath());
    let agent = Agent::new();
    let mut daemon = Daemon::new(&agent, Path::new("/nonexistent"));
    let dir = daemon.socket.parent().unwrap().to_owned();
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    fs::create_dir_all(&conf).unwrap();
    let primary = conf.join("10-containerd-net.conflist");
    let original = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/cni/bridge/in/10-containerd-net.conflist"),
    )
    .unwrap();
    fs::write(&primary, &original).unwrap();
    daemon.extra = vec![
        "--cni-bin-dir".into(),
        bin.display().to_string(),
        "--cni-conf-dir".into(),
        conf.display().to_string(),
        "--cni-plugin".into(),
        plugin_bin().display().to_string(),
        "--cni-failure-policy".into(),
        "ignore".into(),
    ];
    daemon.start(&agent);
    assert_eq!(
        fs::read(bin.join("redirect-cni")).unwrap(),
        fs::read(plugin_bin()).unwrap()
    );
    let has_entry = || {
        let text = fs::read_to_string(&primary).unwrap_or_default();
        text.contains("\"type\":\"redirect-cni\"")
            && text.contains(&format!(
                "\"agentSocket\":{:?}",
                daemon.socket.display().to_string()
            ))
            && text.contains("\"failurePolicy\":\"ignore\"")
    };
    assert!(has_entry(), "{}", fs::read_to_string(&primary).unwrap());
    for _ in 0..3 {
        // The primary CNI writes its file again, without us.
        let tmp = conf.join(".rewrite");
        fs::write(&tmp, &original).unwrap();
        fs::rename(&tmp, &primary).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !has_entry() {
            assert!(
                Instant::now() < deadline,
                "not re-inserted: {}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    daemon.stop();
    let out = agent
        .cmd()
        .args(["uninstall-cni", "--cni-bin-dir"])
        .arg(&bin)
        .arg("--cni-conf-dir")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::read_to_string(&primary).unwrap(), original);
    assert!(!bin.join("redirect-cni").exists());
}
