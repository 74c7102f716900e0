//! `redirect-agent detect` against the real kernel: test-bed pods (netns, CNI bridge, cgroup v2)
//! with real listener processes, read back through sock_diag and /proc.
//!
//! Needs root; without it each test says why and returns, except under `CI=true`, where a skip
//! is a failure.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use redirect_agent::detect::{self, DetectArgs, Level, Status};
use redirect_testbed::{require, Need, Node, Pod, PodProcess};
use serde_json::{json, Value};

const APP_UID: u32 = 1000;

/// Holds one listener of each spec, plus `shared` sockets that a forked child also holds.
/// Prints `{"children": [pid...]}` once every socket is bound, then sleeps.
const LISTENERS_PY: &str = r#"
import json, os, socket, sys, time
specs = json.loads(sys.argv[1])
socks, children = [], []
# Shared sockets first: the child then inherits only those.
for s in sorted(specs, key=lambda s: not s.get("shared")):
    fam = socket.AF_INET6 if ":" in s["addr"] else socket.AF_INET
    k = socket.socket(fam, socket.SOCK_DGRAM if s.get("udp") else socket.SOCK_STREAM)
    if fam == socket.AF_INET6:
        k.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if s.get("v6only") else 0)
    k.bind((s["addr"], s["port"]))
    if not s.get("udp"):
        k.listen(16)
    socks.append(k)
    if s.get("shared"):
        pid = os.fork()
        if pid == 0:
            while True:
                time.sleep(3600)
        children.append(pid)
print(json.dumps({"children": children}), flush=True)
while True:
    time.sleep(3600)
"#;

struct Listeners {
    process: PodProcess,
    children: Vec<u32>,
}

impl Listeners {
    fn pid(&self) -> u32 {
        self.process.pid()
    }
}

fn spawn_listeners(pod: &Pod, specs: Value) -> Listeners {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", LISTENERS_PY, &specs.to_string()])
        .stdout(Stdio::piped());
    let mut process = pod.spawn(APP_UID, cmd).expect("spawn listeners");
    let stdout = process.child_mut().stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read listener status");
    let status: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("listener script failed ({e}): {line:?}"));
    let children = status["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap() as u32)
        .collect();
    Listeners { process, children }
}

fn detect_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_redirect-agent"))
        .arg("detect")
        .args(args)
        // No enrolled pods unless a test says so.
        .env("REDIRECT_STATE_DIR", "/nonexistent/redirect-detect-test")
        .output()
        .expect("run redirect-agent")
}

fn json_report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}); stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Socket inodes differ on every run; everything else in the report is known in advance.
fn without_socket_inodes(mut report: Value) -> Value {
    for ns in report["namespaces"].as_array_mut().unwrap() {
        for l in ns["listeners"].as_array_mut().unwrap() {
            assert!(l["socket_inode"].as_u64().unwrap() > 0);
            l["socket_inode"] = json!(0);
        }
    }
    report
}

fn netns_inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

/// The pod's cgroup as `/proc/PID/cgroup` shows it: relative to the cgroup2 mount.
fn cgroup_of(pod: &Pod) -> String {
    let mount = redirect_testbed::cgroup2_mount().unwrap();
    format!("/{}", pod.cgroup.strip_prefix(mount).unwrap().display())
}

fn owner(pod: &Pod, pid: u32) -> Value {
    json!({"pid": pid, "comm": "python3", "uid": APP_UID, "cgroup": cgroup_of(pod)})
}

#[allow(clippy::too_many_arguments)]
fn listener(
    protocol: &str,
    address: impl ToString,
    port: u16,
    v6only: bool,
    scope: &str,
    families: &[&str],
    exposed: bool,
    exposed_by: &[&str],
    level: &str,
    verdict: &str,
    message: String,
    owners: Vec<Value>,
) -> Value {
    json!({
        "protocol": protocol, "address": address.to_string(), "port": port, "v6only": v6only,
        "scope": scope, "families": families, "exposed": exposed, "exposed_by": exposed_by,
        "policy": null, "level": level, "verdict": verdict, "message": message,
        "socket_inode": 0, "socket_uid": APP_UID, "owners": owners, "note": null,
    })
}

fn ist0143(port: u16) -> String {
    format!("Port {port} is exposed in a Service but listens on localhost. It will not be exposed to other pods.")
}

fn loopback_only(port: u16, addr: &str) -> String {
    format!("Port {port} listens on localhost ({addr}) only. If it is exposed in a Service, it will not be reachable from other pods once inbound traffic is delivered to the pod IP.")
}

fn pod_ip_only(port: u16, addr: impl std::fmt::Display) -> String {
    format!("Port {port} listens on the pod IP ({addr}) only. A proxy that delivers to 127.0.0.1 cannot reach it; passthrough delivery to the pod IP fixes that.")
}

fn wildcard(port: u16, addr: &str) -> String {
    format!("Port {port} listens on all addresses ({addr}); it is reachable under either policy.")
}

#[test]
fn every_kind_of_listener_exact_json() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let pod = node.add_pod("kinds").unwrap();
    let (ip4, ip6) = (pod.ip4.to_string(), pod.ip6.to_string());
    let l = spawn_listeners(
        &pod,
        json!([
            {"addr": "127.0.0.1", "port": 18084},
            {"addr": "127.0.0.53", "port": 18053},
            {"addr": "::1", "port": 18086},
            {"addr": ip4, "port": 18082},
            {"addr": ip6, "port": 18083},
            {"addr": "0.0.0.0", "port": 18080},
            {"addr": "::", "port": 18081},
            {"addr": "::", "port": 18087, "v6only": true},
            {"addr": "::ffff:127.0.0.1", "port": 18088},
            {"addr": "127.0.0.1", "port": 18090},
            {"addr": ip4, "port": 18090},
            {"addr": "0.0.0.0", "port": 18091, "shared": true},
            {"addr": "0.0.0.0", "port": 18093, "udp": true},
        ]),
    );
    assert_eq!(l.children.len(), 1);
    let ns = pod.netns_path.to_str().unwrap();
    let out = detect_cli(&[
        "--netns",
        ns,
        "--ports",
        "18084,18086,18088,18090,18082,18099",
        "--output",
        "json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = without_socket_inodes(json_report(&out));

    let me = || vec![owner(&pod, l.pid())];
    let mut shared = vec![owner(&pod, l.pid()), owner(&pod, l.children[0])];
    shared.sort_by_key(|o| o["pid"].as_u64());
    let ports = ["--ports"];
    let expected = json!({
        "schema_version": 1,
        "namespaces": [{
            "inode": netns_inode(&pod.netns_path),
            "path": ns,
            "pod": null,
            "status": "scanned",
            "error": null,
            "listeners": [
                listener("tcp", "127.0.0.53", 18053, false, "loopback", &["ipv4"], false, &[], "warning", "loopback_only", loopback_only(18053, "127.0.0.53"), me()),
                listener("tcp", "0.0.0.0", 18080, false, "wildcard", &["ipv4"], false, &[], "ok", "wildcard", wildcard(18080, "0.0.0.0"), me()),
                listener("tcp", "::", 18081, false, "wildcard", &["ipv4", "ipv6"], false, &[], "ok", "wildcard", wildcard(18081, "::"), me()),
                listener("tcp", &ip4, 18082, false, "pod_ip", &["ipv4"], true, &ports, "info", "pod_ip_only", pod_ip_only(18082, &ip4), me()),
                // bind(2) to a specific IPv6 address sets IPV6_V6ONLY itself.
                listener("tcp", &ip6, 18083, true, "pod_ip", &["ipv6"], false, &[], "info", "pod_ip_only", pod_ip_only(18083, &ip6), me()),
                listener("tcp", "127.0.0.1", 18084, false, "loopback", &["ipv4"], true, &ports, "error", "loopback_exposed", ist0143(18084), me()),
                listener("tcp", "::1", 18086, true, "loopback", &["ipv6"], true, &ports, "error", "loopback_exposed", ist0143(18086), me()),
                listener("tcp", "::", 18087, true, "wildcard", &["ipv6"], false, &[], "ok", "wildcard", wildcard(18087, "::"), me()),
                listener("tcp", "::ffff:127.0.0.1", 18088, false, "loopback", &["ipv4"], true, &ports, "error", "loopback_exposed", ist0143(18088), me()),
                listener("tcp", "127.0.0.1", 18090, false, "loopback", &["ipv4"], true, &ports, "error", "loopback_exposed", ist0143(18090), me()),
                listener("tcp", &ip4, 18090, false, "pod_ip", &["ipv4"], true, &ports, "info", "pod_ip_only", pod_ip_only(18090, &ip4), me()),
                listener("tcp", "0.0.0.0", 18091, false, "wildcard", &["ipv4"], false, &[], "ok", "wildcard", wildcard(18091, "0.0.0.0"), shared),
                listener("udp", "0.0.0.0", 18093, false, "wildcard", &["ipv4"], false, &[], "info", "udp", "UDP port 18093 is bound to 0.0.0.0. Inbound UDP is not redirected; listed for information.".to_owned(), me()),
            ],
            "not_listening": [{
                "port": 18099, "exposed_by": ["--ports"], "level": "warning", "verdict": "not_listening",
                "message": "Port 18099 is exposed but nothing in this namespace listens on it.",
            }],
        }],
        "problems": [],
        "summary": {"namespaces": 1, "vanished": 0, "failed": 0, "errors": 4, "warnings": 2, "infos": 4},
    });
    assert_eq!(
        report,
        expected,
        "got:\n{}\nwant:\n{}",
        serde_json::to_string_pretty(&report).unwrap(),
        serde_json::to_string_pretty(&expected).unwrap()
    );

    // Without exposed ports every loopback listener is a warning, and nothing is an error.
    let out = detect_cli(&["--netns", ns, "--output", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let report = json_report(&out);
    let verdicts: Vec<(u64, &str, &str)> = report["namespaces"][0]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["scope"] == "loopback")
        .map(|l| {
            (
                l["port"].as_u64().unwrap(),
                l["level"].as_str().unwrap(),
                l["verdict"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [18053, 18084, 18086, 18088, 18090]
            .map(|p| (p, "warning", "loopback_only"))
            .to_vec()
    );
    assert!(report["namespaces"][0]["not_listening"]
        .as_array()
        .unwrap()
        .is_empty());

    // The table groups by namespace and keeps Istio's wording.
    let out = detect_cli(&["--netns", ns, "--ports", "18084"]);
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with(&format!("netns {ns} (inode ")), "{table}");
    assert!(table.contains(&ist0143(18084)), "{table}");
    assert!(table.contains(&format!("python3[{}]", l.pid())), "{table}");
}

#[test]
fn manifest_named_target_port_and_port_nobody_listens_on() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let pod = node.add_pod("manifest").unwrap();
    let l = spawn_listeners(
        &pod,
        json!([{"addr": "127.0.0.1", "port": 8080}, {"addr": "0.0.0.0", "port": 9090}]),
    );
    let dir = tempdir(&pod);
    let manifest = dir.join("app.yaml");
    std::fs::write(
        &manifest,
        r#"apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels: {app: web}
spec:
  containers:
  - name: app
    image: example/web
    ports:
    - {name: http, containerPort: 8080}
    - {name: metrics, containerPort: 9090}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: metrics, port: 9090}
  - {name: admin, port: 7000, targetPort: 7001}
  - {name: grpc, port: 81, targetPort: grpc}
"#,
    )
    .unwrap();
    let ns = pod.netns_path.to_str().unwrap();
    let out = detect_cli(&[
        "--netns",
        ns,
        "--manifest",
        manifest.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = without_socket_inodes(json_report(&out));
    let me = || vec![owner(&pod, l.pid())];
    let expected = json!({
        "schema_version": 1,
        "namespaces": [{
            "inode": netns_inode(&pod.netns_path),
            "path": ns,
            "pod": null,
            "status": "scanned",
            "error": null,
            "listeners": [
                listener("tcp", "127.0.0.1", 8080, false, "loopback", &["ipv4"], true,
                    &["Service shop/web port 80 (http) -> http=8080"], "error", "loopback_exposed", ist0143(8080), me()),
                listener("tcp", "0.0.0.0", 9090, false, "wildcard", &["ipv4"], true,
                    &["Service shop/web port 9090 (metrics) -> 9090"], "ok", "wildcard", wildcard(9090, "0.0.0.0"), me()),
            ],
            "not_listening": [{
                "port": 7001, "exposed_by": ["Service shop/web port 7000 (admin) -> 7001"],
                "level": "warning", "verdict": "not_listening",
                "message": "Port 7001 is exposed but nothing in this namespace listens on it.",
            }],
        }],
        "problems": [{
            "level": "warning",
            "message": "Service shop/web port 81 (grpc): targetPort \"grpc\" is not a containerPort name of any pod the Service selects in this manifest",
        }],
        "summary": {"namespaces": 1, "vanished": 0, "failed": 0, "errors": 1, "warnings": 2, "infos": 0},
    });
    assert_eq!(
        report,
        expected,
        "got:\n{}",
        serde_json::to_string_pretty(&report).unwrap()
    );

    // A manifest that does not parse is a usage problem.
    std::fs::write(
        &manifest,
        "kind: Service\nspec: {ports: [{port: notaport}]}\n",
    )
    .unwrap();
    let out = detect_cli(&["--netns", ns, "--manifest", manifest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot parse manifest"));
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(pod: &Pod) -> TempDir {
    let dir = std::env::temp_dir().join(format!("rdt-detect-{}-{}", std::process::id(), pod.name));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn pod_record(pod: &Pod, policy: &str, port_policies: Value, exclude: &[u16]) -> Value {
    json!({
        "name": pod.name, "cgroup": pod.cgroup, "cgroup_id": pod.cgroup_id().unwrap(),
        "netns": pod.netns_path, "netns_inode": netns_inode(&pod.netns_path),
        "pod_ips": [pod.ip4, pod.ip6], "proxy_uid": 1337, "inbound_policy": policy,
        "port_policies": port_policies, "exclude_inbound_ports": exclude,
        "exclude_outbound_ports": [], "exclude_outbound_cidrs": [],
        "proxy_inbound_port": 15006, "proxy_outbound_port": 15001, "slot": 0,
    })
}

#[test]
fn enrolled_pods_follow_their_policy() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let pass = node.add_pod("pass").unwrap();
    let local = node.add_pod("local").unwrap();
    let _a = spawn_listeners(
        &pass,
        json!([
            {"addr": "127.0.0.1", "port": 8080},
            {"addr": pass.ip4.to_string(), "port": 8082},
            {"addr": "127.0.0.1", "port": 15000},
            {"addr": "127.0.0.1", "port": 9000},
        ]),
    );
    let _b = spawn_listeners(
        &local,
        json!([
            {"addr": local.ip4.to_string(), "port": 8082},
            {"addr": "127.0.0.1", "port": 8084},
            {"addr": "127.0.0.1", "port": 8085},
            {"addr": local.ip6.to_string(), "port": 9000},
        ]),
    );
    let dir = tempdir(&pass);
    std::fs::create_dir_all(dir.join("pods")).unwrap();
    for (pod, record) in [
        (&pass, pod_record(&pass, "passthrough", json!({}), &[9000])),
        (
            &local,
            pod_record(&local, "localhost", json!({"8085": "passthrough"}), &[9000]),
        ),
    ] {
        std::fs::write(
            dir.join("pods").join(format!("{}.json", pod.name)),
            record.to_string(),
        )
        .unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_redirect-agent"))
        .args(["detect", "--enrolled", "--output", "json"])
        .env("REDIRECT_STATE_DIR", &*dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json_report(&out);
    let mut seen = Vec::new();
    for ns in report["namespaces"].as_array().unwrap() {
        let pod = ns["pod"]["name"].as_str().unwrap().to_owned();
        for l in ns["listeners"].as_array().unwrap() {
            seen.push((
                pod.clone(),
                l["port"].as_u64().unwrap(),
                l["policy"].as_str().unwrap().to_owned(),
                l["exposed"].as_bool().unwrap(),
                l["level"].as_str().unwrap().to_owned(),
                l["verdict"].as_str().unwrap().to_owned(),
            ));
        }
    }
    seen.sort();
    let row = |pod: &Pod, port: u64, policy: &str, exposed: bool, level: &str, verdict: &str| {
        (
            pod.name.clone(),
            port,
            policy.to_owned(),
            exposed,
            level.to_owned(),
            verdict.to_owned(),
        )
    };
    let mut want = vec![
        row(
            &pass,
            8080,
            "passthrough",
            true,
            "error",
            "loopback_exposed",
        ),
        row(&pass, 8082, "passthrough", true, "ok", "pod_ip_delivered"),
        row(&pass, 9000, "passthrough", false, "ok", "not_captured"),
        row(&pass, 15000, "passthrough", false, "ok", "proxy_port"),
        row(
            &local,
            8082,
            "localhost",
            true,
            "error",
            "pod_ip_unreachable",
        ),
        row(&local, 8084, "localhost", true, "ok", "loopback_delivered"),
        row(
            &local,
            8085,
            "passthrough",
            true,
            "error",
            "loopback_exposed",
        ),
        row(&local, 9000, "localhost", false, "ok", "not_captured"),
    ];
    want.sort();
    assert_eq!(seen, want);
    assert_eq!(report["summary"]["errors"], 3);
}

#[test]
fn vanished_namespace_and_exited_owner_are_reported_not_fatal() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let stays = node.add_pod("stays").unwrap();
    let goes = node.add_pod("goes").unwrap();
    let mut l = spawn_listeners(&stays, json!([{"addr": "127.0.0.1", "port": 8080}]));
    let args = DetectArgs {
        netns: vec![stays.netns_path.clone(), goes.netns_path.clone()],
        ports: None,
        ..DetectArgs::default()
    };
    let sources = detect::Sources {
        state_dir: "/nonexistent".into(),
        ..Default::default()
    };
    let targets = detect::resolve_targets(&args, &sources).unwrap();
    assert_eq!(targets.len(), 2);
    let goes_path = goes.netns_path.clone();
    drop(goes);
    assert!(!goes_path.exists());
    let scans = detect::scan(&targets);
    // The listener's only process exits between the socket dump and the owner lookup.
    l.process.kill().unwrap();
    let report = detect::build_report(
        &targets,
        scans,
        &detect::Exposed::default(),
        Vec::new(),
        Path::new("/proc"),
    );
    let by_path = |p: &Path| report.namespaces.iter().find(|n| n.path == p).unwrap();
    let gone = by_path(&goes_path);
    assert_eq!(gone.status, Status::Vanished);
    assert_eq!(
        gone.error.as_deref(),
        Some("the network namespace disappeared before it could be scanned")
    );
    let kept = by_path(&stays.netns_path);
    assert_eq!(kept.status, Status::Scanned);
    assert_eq!(kept.listeners.len(), 1);
    let listener = &kept.listeners[0];
    assert_eq!((listener.port, listener.level), (8080, Level::Warning));
    assert!(listener.owners.is_empty());
    assert_eq!(
        listener.note.as_deref(),
        Some("no process holds this socket any more: its owner exited during the scan")
    );
    assert_eq!(report.summary.vanished, 1);
    assert_eq!(detect::exit_status(&report), 0);
}

#[test]
fn all_counts_each_namespace_once_under_its_name() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let pod = node.add_pod("all").unwrap();
    let _l = spawn_listeners(&pod, json!([{"addr": "0.0.0.0", "port": 8080}]));
    let out = detect_cli(&["--all", "--output", "json"]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
    let report = json_report(&out);
    let inode = netns_inode(&pod.netns_path);
    let ours: Vec<&Value> = report["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["inode"] == inode)
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "the pod's namespace is reached by name and by /proc/PID/ns/net"
    );
    assert_eq!(ours[0]["path"], pod.netns_path.to_str().unwrap());
    assert_eq!(ours[0]["listeners"][0]["port"], 8080);
    // No target means --all.
    let out = detect_cli(&["--output", "json"]);
    let report = json_report(&out);
    assert!(report["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["inode"] == inode));
    // --pid reaches the same namespace.
    let pid = _l.pid().to_string();
    let out = detect_cli(&["--pid", &pid, "--output", "json"]);
    let report = json_report(&out);
    assert_eq!(report["namespaces"][0]["inode"], inode);
}

#[test]
fn permission_and_usage_problems_exit_2() {
    require!(Need::Root);
    let bin = env!("CARGO_BIN_EXE_redirect-agent");
    // Not root: a clear message, before any scanning.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin,
            "detect",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("detect needs root: CAP_SYS_ADMIN is missing"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    // Root without the capabilities to enter other namespaces is no better.
    let out = Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            "--bounding-set=-sys_admin",
            bin,
            "detect",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("CAP_SYS_ADMIN is missing"));

    // A file that is not a network namespace.
    let out = detect_cli(&["--netns", "/etc/hostname"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot use network namespace /etc/hostname: not a namespace file"),
        "{stderr}"
    );
    // A namespace file of another type.
    let out = detect_cli(&["--netns", "/proc/self/ns/uts"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a network namespace"));
    // A path that does not exist, and a pid that does not.
    let out = detect_cli(&["--netns", "/var/run/netns/rdt-detect-no-such-ns"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file or directory"));
    let out = detect_cli(&["--pid", "4000000"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot read the network namespace of pid 4000000"));
    // A bad port list is a usage error from the argument parser.
    let out = detect_cli(&["--ports", "http"]);
    assert_eq!(out.status.code(), Some(2));
}
