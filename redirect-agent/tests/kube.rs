//! The node agent's Kubernetes API watch (src/kube.rs) against the test bed's fake API server
//! (list + watch with resourceVersion, bookmarks, 410 Gone; kept honest by kubectl in
//! redirect-testbed/tests/fakeapi.rs): an annotation change on a running pod takes effect
//! within 2 s, a pod deleted from the API is unenrolled, each outcome is an Event, and the API
//! server going away (with a compaction while it is gone) and coming back is survived, with
//! `/readyz` and `redirect_kube_watch_up` saying so meanwhile.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use redirect_testbed::fakeapi::FakeApi;
use serde_json::{json, Value};

const NODE: &str = "kube-test-node";
/// How long the agent may take to start, lose or regain the watch.
const PATIENCE: Duration = Duration::from_secs(30);
/// The bound for an annotation change to take effect.
const LIVE: Duration = Duration::from_secs(2);

fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind port 0")
}

fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    redirect_testbed::http::get(addr, path).ok()
}

/// `redirect-agent run` watching the fake API through a kubeconfig.
struct Daemon {
    child: Child,
    socket: PathBuf,
    http: SocketAddr,
    log: PathBuf,
}

impl Daemon {
    fn start(agent: &Agent, kubeconfig: &std::path::Path) -> Daemon {
        let name = agent
            .state_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let socket = std::env::temp_dir().join(format!("{name}.sock"));
        let log = std::env::temp_dir().join(format!("{name}.agent.log"));
        let http = free_addr();
        let child = agent
            .cmd()
            .env("RUST_LOG", "info,redirect_agent::kube=debug")
            .args(["run", "--node-name", NODE, "--kubeconfig"])
            .arg(kubeconfig)
            .arg("--socket")
            .arg(&socket)
            .arg("--http-address")
            .arg(http.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn redirect-agent run");
        Daemon {
            child,
            socket,
            http,
            log,
        }
    }

    fn readyz(&self) -> Option<(u16, String)> {
        get(self.http, "/readyz")
    }

    fn watch_up(&self) -> Option<String> {
        let (_, body) = get(self.http, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with("redirect_kube_watch_up "))
            .map(str::to_owned)
    }

    fn cli(&self, agent: &Agent, args: &[&str]) -> Output {
        agent
            .cmd()
            .env("REDIRECT_SOCKET", &self.socket)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "--- agent log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The API's view of a test bed pod on this node, with Istio's injection status.
fn api_pod(pod: &Pod, annotations: Value) -> Value {
    let mut a = json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"});
    a.as_object_mut()
        .unwrap()
        .extend(annotations.as_object().unwrap().clone());
    json!({
        "metadata": {"name": pod.name, "namespace": "shop", "uid": format!("uid-{}", pod.name),
                     "annotations": a},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": pod.ip4.to_string(),
                   "podIPs": [{"ip": pod.ip4.to_string()}, {"ip": pod.ip6.to_string()}]},
    })
}

fn record(agent: &Agent, name: &str) -> Option<Value> {
    agent.list()["pods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
}

fn events_for(api: &FakeApi, pod: &str, reason: &str) -> Vec<Value> {
    api.events()
        .into_iter()
        .filter(|e| e["involvedObject"]["name"] == pod && e["reason"] == reason)
        .collect()
}

struct Scene {
    // Dropped in this order: the agent process, its directories, then the pods.
    daemon: Daemon,
    agent: Agent,
    api: FakeApi,
    proxy: Proxy,
    _apps: PodProcess,
    client: Pod,
    server: Pod,
    node: Node,
    _kubeconfig: PathBuf,
}

impl Scene {
    /// A server pod enrolled (by hand, as the CNI path would), its API object, and an agent
    /// watching the API, ready.
    fn new() -> Scene {
        let node = Node::new().unwrap();
        let server = node.add_pod("server").unwrap();
        let client = node.add_pod("client").unwrap();
        let apps = matrix_apps(&server);
        let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
        let agent = Agent::new();
        agent.enroll(&server, &[]);
        let api = FakeApi::start().unwrap();
        api.apply_pod(api_pod(&server, json!({})));
        let kubeconfig = node.scratch_file("kubeconfig").unwrap();
        api.write_kubeconfig(&kubeconfig).unwrap();
        let daemon = Daemon::start(&agent, &kubeconfig);
        wait_for("the agent's /readyz to say 200", PATIENCE, || {
            (daemon.readyz()?.0 == 200).then_some(())
        });
        assert_eq!(
            daemon.watch_up().as_deref(),
            Some("redirect_kube_watch_up 1")
        );
        Scene {
            daemon,
            agent,
            api,
            proxy,
            _apps: apps,
            client,
            server,
            node,
            _kubeconfig: kubeconfig,
        }
    }

    /// The pod's excluded inbound ports once its record is settled (`ok`: the record is
    /// written with the new settings before the kernel is changed, and is pending until then).
    fn excluded_inbound(&self) -> Option<Value> {
        let r = record(&self.agent, &self.server.name).expect("enrolled");
        (r["status"] == "ok").then(|| r["exclude_inbound_ports"].clone())
    }
}

#[test]
fn annotation_change_takes_effect_live() {
    require!(Need::Root, datapath());
    let s = Scene::new();
    if let Some(why) = captured_inbound(&s.client, &s.server, &s.proxy) {
        panic!("before the change: {why}");
    }
    // An established connection through the proxy, to see that the update leaves it alone.
    let held = s
        .client
        .in_netns(|| TcpStream::connect(sock(s.server.ip4, POD_IP_PORT)))
        .unwrap()
        .unwrap();
    s.api.apply_pod(api_pod(
        &s.server,
        json!({"traffic.sidecar.istio.io/excludeInboundPorts": WILDCARD_PORT.to_string()}),
    ));
    wait_for("the excluded port in the pod's record", LIVE, || {
        (s.excluded_inbound() == Some(json!([WILDCARD_PORT]))).then_some(())
    });
    if let Some(why) = direct_inbound(&s.client, &s.server) {
        panic!("after excluding {WILDCARD_PORT}: {why}");
    }
    let mut held = held;
    held.set_read_timeout(Some(T)).unwrap();
    held.write_all(b"still").unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    while !String::from_utf8_lossy(&buf).contains("still") {
        let n = held
            .read(&mut chunk)
            .expect("the held connection still answers");
        assert!(
            n > 0,
            "the held connection closed: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    let updated = wait_for("an Updated Event", PATIENCE, || {
        Some(events_for(&s.api, &s.server.name, "Updated")).filter(|e| !e.is_empty())
    });
    assert_eq!(updated.len(), 1, "{:?}", s.api.events());
    assert_eq!(updated[0]["type"], "Normal");
    assert_eq!(updated[0]["source"]["host"], NODE);
    assert_eq!(
        updated[0]["involvedObject"]["uid"],
        format!("uid-{}", s.server.name)
    );
    // And back: the annotation removed, the port is captured again.
    s.api.apply_pod(api_pod(&s.server, json!({})));
    wait_for("the exclusion gone from the record", LIVE, || {
        (s.excluded_inbound() == Some(json!([]))).then_some(())
    });
    if let Some(why) = captured_inbound(&s.client, &s.server, &s.proxy) {
        panic!("after the annotation was removed: {why}");
    }
    // A bad annotation changes nothing and says why.
    s.api.apply_pod(api_pod(
        &s.server,
        json!({"traffic.sidecar.istio.io/excludeInboundPorts": "http"}),
    ));
    wait_for("an EnrollFailed Event", PATIENCE, || {
        (!events_for(&s.api, &s.server.name, "EnrollFailed").is_empty()).then_some(())
    });
    assert_eq!(s.excluded_inbound(), Some(json!([])));
}

#[test]
fn pod_deleted_from_the_api_is_unenrolled() {
    require!(Need::Root, datapath());
    let s = Scene::new();
    assert!(s.api.delete_pod("shop", &s.server.name));
    wait_for("the pod's record gone", PATIENCE, || {
        s.agent.records().is_empty().then_some(())
    });
    if let Some(why) = direct_inbound(&s.client, &s.server) {
        panic!("after the pod was deleted: {why}");
    }
    // The Event is posted once the unenroll is done.
    wait_for("an Unenrolled Event", PATIENCE, || {
        (events_for(&s.api, &s.server.name, "Unenrolled").len() == 1).then_some(())
    });
}

#[test]
fn api_server_going_away_and_back_is_survived() {
    require!(Need::Root, datapath());
    let mut s = Scene::new();
    // A second enrolled pod, deleted from the API while the agent cannot see it.
    let other = s.node.add_pod("other").unwrap();
    s.agent.enroll(&other, &[]);
    // With a setting to apply: its Updated Event says the watch has seen the pod.
    s.api.apply_pod(api_pod(
        &other,
        json!({"traffic.sidecar.istio.io/excludeInboundPorts": "18099"}),
    ));
    wait_for("the watch to see the second pod", PATIENCE, || {
        (!events_for(&s.api, &other.name, "Updated").is_empty()).then_some(())
    });
    s.api.stop();
    let (code, why) = wait_for("/readyz to say 503", PATIENCE, || {
        s.daemon.readyz().filter(|(c, _)| *c == 503)
    });
    assert_eq!(code, 503);
    assert!(why.contains("Kubernetes API watch is down"), "{why}");
    assert_eq!(
        s.daemon.watch_up().as_deref(),
        Some("redirect_kube_watch_up 0")
    );
    // The node keeps working without the API: commands through the agent, the datapath.
    let out = s.daemon.cli(&s.agent, &["list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(why) = captured_inbound(&s.client, &s.server, &s.proxy) {
        panic!("while the API is down: {why}");
    }
    // While it is gone the pod changes and the history is compacted: the agent's watch must
    // get 410 Gone and list again.
    s.api.apply_pod(api_pod(
        &s.server,
        json!({"traffic.sidecar.istio.io/excludeInboundPorts": WILDCARD_PORT.to_string()}),
    ));
    assert!(s.api.delete_pod("shop", &other.name));
    s.api.compact();
    s.api.resume().unwrap();
    wait_for("/readyz to say 200 again", PATIENCE, || {
        (s.daemon.readyz()?.0 == 200).then_some(())
    });
    assert_eq!(
        s.daemon.watch_up().as_deref(),
        Some("redirect_kube_watch_up 1")
    );
    wait_for("the change made while the API was away", PATIENCE, || {
        (s.excluded_inbound() == Some(json!([WILDCARD_PORT]))).then_some(())
    });
    // The relist no longer shows the deleted pod: unenrolled.
    wait_for(
        "the pod deleted during the outage unenrolled",
        PATIENCE,
        || record(&s.agent, &other.name).is_none().then_some(()),
    );
    // And live changes work again.
    s.api.apply_pod(api_pod(&s.server, json!({})));
    wait_for("a live change after the outage", LIVE, || {
        (s.excluded_inbound() == Some(json!([]))).then_some(())
    });
}
