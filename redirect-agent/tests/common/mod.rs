//! Shared helpers of the datapath and CLI integration tests: the real `redirect-agent` binary
//! with a pin root and state directory private to one test, and the test bed's application,
//! proxy and client roles started inside pods.
//!
//! Every test builds its own [`Node`] (its own subnet) and its own [`Agent`] (its own bpffs
//! pin root and state directory), so tests running in parallel threads never share kernel or
//! agent state, and a test can assert exactly what its own agent left behind.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code, unused_imports)]

use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once, OnceLock,
    },
    time::Duration,
};

pub use redirect_testbed::{
    matrix, proxy::ProxyLogEntry, require, AppBind, InboundPolicy, Need, Node, Outcome, Pod,
    PodProcess, ProxyDial,
};
use serde_json::Value;

/// Budget of one probe connection (connect, payload, echo). Refusals come back at once; only a
/// blackholed connection waits this long.
pub const T: Duration = Duration::from_millis(2000);
/// How long a started process may take to listen.
pub const LISTEN_WAIT: Duration = Duration::from_secs(5);
pub const PROXY_UID: u32 = 1337;
pub const APP_UID: u32 = 1000;
pub const PAYLOAD: &[u8] = b"redirect-test-payload";

/// The conformance matrix's applications: POD_IP:18082, loopback:18084, wildcard:18080.
pub const POD_IP_PORT: u16 = 18082;
pub const LOOPBACK_PORT: u16 = 18084;
pub const WILDCARD_PORT: u16 = 18080;

pub const V4_PASSTHROUGH_SRC: IpAddr = IpAddr::V4(matrix::PASSTHROUGH_SRC4);
pub const V6_PASSTHROUGH_SRC: IpAddr = IpAddr::V6(matrix::PASSTHROUGH_SRC6);

/// The matrix row of one of the conformance matrix's application ports.
pub fn app_bind(port: u16) -> AppBind {
    match port {
        POD_IP_PORT => AppBind::PodIp,
        LOOPBACK_PORT => AppBind::Loopback,
        WILDCARD_PORT => AppBind::Wildcard,
        _ => panic!("port {port} is not one of the matrix's applications"),
    }
}

/// The datapath's mandatory kernel features (`redirect-agent probe`'s mandatory list), probed
/// once per test binary. Only probed as root; `require!(Need::Root, datapath())` says "needs
/// root" first.
pub fn datapath() -> Need {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let found = PROBE.get_or_init(|| {
        if !redirect_testbed::needs::is_root() {
            return Err("cannot be probed without root".into());
        }
        redirect_agent::probe::require_mandatory().map_err(|e| redirect_agent::error_chain(&e))
    });
    Need::kernel("of the datapath (mandatory)", found.clone())
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_redirect-agent"))
}

/// The test bed's binary, built by `cargo build --workspace --exclude redirect-ebpf --bins`.
/// The CNI plugin binary (`cargo build --workspace --bins` builds it beside the agent).
pub fn plugin_bin() -> PathBuf {
    let p = redirect_testbed::bin_path("redirect-cni");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --exclude redirect-ebpf --bins` first",
        p.display()
    );
    p
}

pub fn testbed_bin() -> PathBuf {
    let p = redirect_testbed::bin_path("redirect-testbed");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --exclude redirect-ebpf --bins` first",
        p.display()
    );
    p
}

pub fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// An IP family of a pod, to run the same checks over IPv4 and IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn pod_ip(self, pod: &Pod) -> IpAddr {
        match self {
            Family::V4 => pod.ip4.into(),
            Family::V6 => pod.ip6.into(),
        }
    }

    pub fn loopback(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::LOCALHOST.into(),
            Family::V6 => Ipv6Addr::LOCALHOST.into(),
        }
    }

    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    pub fn passthrough_src(self) -> IpAddr {
        match self {
            Family::V4 => V4_PASSTHROUGH_SRC,
            Family::V6 => V6_PASSTHROUGH_SRC,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Pin roots are `/sys/fs/bpf/redirect-test-<pid>-<n>`; state dirs `/tmp/redirect-test-<pid>-<n>`.
const PREFIX: &str = "redirect-test-";

/// The `redirect-agent` CLI with a pin root and a state directory of its own.
///
/// Dropping it unenrolls whatever is still enrolled and removes both directories, also when the
/// test failed. Declare it after the pods so that it is dropped first.
pub struct Agent {
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
}

impl Agent {
    pub fn new() -> Agent {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_dead_runs);
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let agent = Agent {
            pin_root: Path::new("/sys/fs/bpf").join(&id),
            state_dir: std::env::temp_dir().join(&id),
        };
        let _ = remove_pin_dir(&agent.pin_root);
        let _ = fs::remove_dir_all(&agent.state_dir);
        agent
    }

    /// The CLI, with this agent's directories in its environment.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(agent_bin());
        c.env("REDIRECT_PIN_ROOT", &self.pin_root)
            .env("REDIRECT_STATE_DIR", &self.state_dir)
            .env_remove("RUST_LOG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run redirect-agent")
    }

    /// Runs the CLI and panics, with its output, unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "redirect-agent {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The enroll arguments of `pod` named `name`: its cgroup, netns and both addresses.
    pub fn enroll_args(pod: &Pod, name: &str) -> Vec<String> {
        vec![
            "enroll".into(),
            "--name".into(),
            name.into(),
            "--cgroup".into(),
            pod.cgroup.display().to_string(),
            "--netns".into(),
            pod.netns_path.display().to_string(),
            "--pod-ip".into(),
            pod.ip4.to_string(),
            "--pod-ip".into(),
            pod.ip6.to_string(),
        ]
    }

    /// Enrolls `pod` under its own name with `extra` options; returns stdout.
    pub fn enroll(&self, pod: &Pod, extra: &[&str]) -> String {
        let mut args = Self::enroll_args(pod, &pod.name);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&args)
    }

    pub fn unenroll(&self, name: &str) -> String {
        self.ok(&["unenroll", "--name", name])
    }

    /// `list --output json`.
    pub fn list(&self) -> Value {
        let out = self.ok(&["list", "--output", "json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("list is not JSON ({e}): {out}"))
    }

    /// Names in `list --output json`.
    pub fn listed_names(&self) -> Vec<String> {
        self.list()["pods"]
            .as_array()
            .expect("pods array")
            .iter()
            .map(|p| p["name"].as_str().expect("name").to_owned())
            .collect()
    }

    /// `stats --name NAME --output json`: the pod's counters.
    pub fn stats(&self, name: &str) -> BTreeMap<String, u64> {
        let out = self.ok(&["stats", "--name", name, "--output", "json"]);
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats is not JSON ({e}): {out}"));
        let pods = v["pods"].as_array().expect("pods array");
        assert_eq!(pods.len(), 1, "stats --name {name}: {out}");
        assert_eq!(pods[0]["name"], name, "{out}");
        pods[0]["counters"]
            .as_object()
            .expect("counters object")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().expect("counter is a number")))
            .collect()
    }

    /// Pod records in the state directory (file names without `.json`).
    pub fn records(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.state_dir.join("pods"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.strip_suffix(".json"))
                            .map(str::to_owned)
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Default for Agent {
    fn default() -> Self {
        Agent::new()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for name in self.records() {
            let out = self.run(&["unenroll", "--name", &name]);
            if !out.status.success() {
                eprintln!(
                    "cleanup: unenroll {name}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        if let Err(e) = remove_pin_dir(&self.pin_root) {
            eprintln!("cleanup: removing {}: {e}", self.pin_root.display());
        }
        let _ = fs::remove_dir_all(&self.state_dir);
    }
}

/// Removes a bpffs directory tree (unlinking pins detaches links and frees maps).
fn remove_pin_dir(dir: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Removes pin roots and state directories that a killed test process left behind.
fn sweep_dead_runs() {
    for parent in [PathBuf::from("/sys/fs/bpf"), std::env::temp_dir()] {
        let Ok(entries) = fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = remove_pin_dir(&e.path());
            }
        }
    }
}

/// Starts `redirect-testbed echo` as `uid` in `pod`, listening on every address of `listen`.
pub fn echo(pod: &Pod, uid: u32, listen: &[SocketAddr]) -> PodProcess {
    let mut cmd = Command::new(testbed_bin());
    cmd.arg("echo").stdout(Stdio::null());
    for a in listen {
        cmd.arg("--listen").arg(a.to_string());
    }
    let mut p = pod.spawn(uid, cmd).expect("spawn echo");
    for a in listen {
        p.wait_for_listen(*a, LISTEN_WAIT).expect("echo listens");
    }
    p
}

/// The conformance matrix's three applications for both families: POD_IP:18082,
/// loopback:18084, wildcard:18080 (`0.0.0.0` and a v6-only `[::]`).
pub fn matrix_apps(pod: &Pod) -> PodProcess {
    let mut addrs = Vec::new();
    for f in Family::BOTH {
        addrs.push(sock(f.pod_ip(pod), POD_IP_PORT));
        addrs.push(sock(f.loopback(), LOOPBACK_PORT));
        addrs.push(sock(f.unspecified(), WILDCARD_PORT));
    }
    echo(pod, APP_UID, &addrs)
}

/// Whether the proxy accepted a captured outbound connection at `local`: port 15001 at the
/// destination's own address in 127.128.0.0/12 (IPv4) or `100::/64` (IPv6, a pod with an IPv6
/// address), or `[::1]` (IPv6, a pod without one). The datapath spreads captured connections,
/// one address per original destination, so that they do not share one four-tuple space.
pub fn is_outbound_listener(local: SocketAddr) -> bool {
    local.port() == 15001
        && match local.ip() {
            IpAddr::V4(v4) => u32::from(v4) & 0xfff0_0000 == 0x7f80_0000,
            IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST || is_spread6(v6),
        }
}

/// An address of `100::/64`, where captured IPv6 connections of a pod with an IPv6 address go.
pub fn is_spread6(ip: Ipv6Addr) -> bool {
    ip.segments()[..4] == [0x100, 0, 0, 0]
}

/// The Envoy stand-in running as uid 1337 in a pod, with its connection log.
pub struct Proxy {
    pub process: PodProcess,
    pub log: PathBuf,
}

impl Proxy {
    /// Starts the proxy dialling the way `delivery` says and waits until its four listeners
    /// (15006 and 15001, IPv4 and IPv6) are up. `log_name` must be new in the node.
    pub fn start(node: &Node, pod: &Pod, delivery: ProxyDial, log_name: &str) -> Proxy {
        let log = node.scratch_file(log_name).expect("proxy log");
        let mut cmd = Command::new(testbed_bin());
        cmd.args(["proxy", "--delivery", delivery.name(), "--log"])
            .arg(&log)
            .stdout(Stdio::null());
        let mut process = pod.spawn(PROXY_UID, cmd).expect("spawn proxy");
        for port in [15006, 15001] {
            for f in Family::BOTH {
                process
                    .wait_for_listen(sock(f.unspecified(), port), LISTEN_WAIT)
                    .expect("proxy listens");
            }
        }
        Proxy { process, log }
    }

    pub fn entries(&self) -> Vec<ProxyLogEntry> {
        redirect_testbed::proxy::read_log(&self.log).expect("read proxy log")
    }

    pub fn kill(&mut self) {
        self.process.kill().expect("kill proxy");
    }
}

/// HAProxy (Debian's package) as the pod's sidecar, uid 1337, configured as a transparent
/// proxy (`redirect_testbed::proxy::haproxy`), logging each connection to a scratch file.
pub struct Haproxy {
    pub process: PodProcess,
    pub log: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy delivering the way `delivery` says and waits for its four listeners.
    /// For pod-IP delivery over IPv6 it puts `::6` on the pod's `lo`, as Istio's init does.
    pub fn start(node: &Node, pod: &Pod, delivery: ProxyDial, name: &str) -> Haproxy {
        use redirect_testbed::proxy::haproxy::HaproxyConfig;
        if delivery == ProxyDial::PodIp {
            pod.add_lo_address(V6_PASSTHROUGH_SRC).expect("::6 on lo");
        }
        let dir = node.scratch_dir().join(name);
        let cfg = HaproxyConfig {
            inbound_port: 15006,
            outbound_port: 15001,
            dial: delivery,
            upstream: None,
            ipv6: true,
            log: true,
        };
        let mut cmd = cfg.command(&dir).expect("haproxy config");
        let log = dir.join("connections.log");
        let out = fs::File::create(&log).expect("haproxy log file");
        cmd.stdout(out).stderr(Stdio::null()).stdin(Stdio::null());
        let mut process = pod.spawn(PROXY_UID, cmd).expect("spawn haproxy");
        for port in [15006, 15001] {
            for f in Family::BOTH {
                process
                    .wait_for_listen(sock(f.unspecified(), port), LISTEN_WAIT)
                    .expect("haproxy listens");
            }
        }
        Haproxy { process, log }
    }

    pub fn entries(&self) -> Vec<redirect_testbed::proxy::haproxy::HaproxyLogEntry> {
        redirect_testbed::proxy::haproxy::parse_log(
            &fs::read_to_string(&self.log).unwrap_or_default(),
        )
    }

    /// The entries after the first `seen`, once there is at least one more (HAProxy logs when
    /// its connection to the server is made or has failed, a moment after the client's), or
    /// none after a second.
    pub fn new_entries(
        &self,
        seen: usize,
    ) -> Vec<redirect_testbed::proxy::haproxy::HaproxyLogEntry> {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            let mut e = self.entries();
            if e.len() > seen || std::time::Instant::now() >= deadline {
                return e.split_off(seen.min(e.len()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A probe from `pod`'s network namespace, by the test process itself: outside every pod's
/// cgroup, so like a client in a pod that is not enrolled.
pub fn probe(pod: &Pod, to: SocketAddr) -> Outcome {
    pod.in_netns(|| redirect_testbed::probe(to, PAYLOAD, T))
        .expect("enter netns")
}

/// A probe by a process of `pod` (its netns *and* cgroup) running as `uid`, optionally bound
/// to `bind` first: what the pod's application or proxy would see.
pub fn connect_as(pod: &Pod, uid: u32, to: SocketAddr, bind: Option<IpAddr>) -> Outcome {
    let mut cmd = Command::new(testbed_bin());
    cmd.args(["connect", "--to", &to.to_string()])
        .args(["--payload", std::str::from_utf8(PAYLOAD).unwrap()])
        .args(["--timeout-ms", &T.as_millis().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(b) = bind {
        cmd.arg("--bind").arg(b.to_string());
    }
    let mut p = pod.spawn(uid, cmd).expect("spawn connect");
    let mut stdout = String::new();
    p.child_mut()
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)
        .expect("read connect output");
    let mut stderr = String::new();
    let _ = p
        .child_mut()
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr);
    let status = p.child_mut().wait().expect("wait connect");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("connect to {to} as uid {uid}: {status}, bad output ({e}): {stdout:?} {stderr:?}")
    })
}

/// What a cell expects of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Echoed by an application whose socket is `local`, seeing a peer at `peer`. `direct`:
    /// no proxy in between, so the application's peer is the client's own socket.
    Echo {
        local: SocketAddr,
        peer: IpAddr,
        direct: bool,
    },
    /// Echoed by an application at `local`, whatever the peer.
    EchoAt { local: SocketAddr },
    /// No echo: the connection was refused, reset or closed without data.
    NoEcho,
}

impl Expect {
    /// `None` when `o` is what was expected, otherwise why not.
    pub fn check(&self, o: &Outcome) -> Option<String> {
        match *self {
            Expect::NoEcho => match o {
                Outcome::Refused | Outcome::Reset { server: None, .. } | Outcome::Closed { .. } => {
                    None
                }
                _ => Some(format!("expected refused/reset/closed, got {o:?}")),
            },
            Expect::EchoAt { local } => match o {
                Outcome::Echoed { server, .. } if server.local == local => None,
                _ => Some(format!("expected echo by {local}, got {o:?}")),
            },
            Expect::Echo {
                local,
                peer,
                direct,
            } => {
                let Outcome::Echoed {
                    server,
                    local: client,
                } = o
                else {
                    return Some(format!("expected echo by {local}, got {o:?}"));
                };
                let mut why = Vec::new();
                if server.local != local {
                    why.push(format!("app socket {} != {local}", server.local));
                }
                if server.peer.ip() != peer {
                    why.push(format!("app's peer {} is not {peer}", server.peer));
                }
                if direct && server.peer != *client {
                    why.push(format!(
                        "app's peer {} is not the client {client}: a proxy was in between",
                        server.peer
                    ));
                }
                if !direct && server.peer == *client {
                    why.push(format!(
                        "app's peer is the client {client} itself: no proxy was in between"
                    ));
                }
                (!why.is_empty()).then(|| format!("{}; got {o:?}", why.join(", ")))
            }
        }
    }
}

/// Collects the failing cells of a table-driven test so that one run reports all of them.
#[derive(Default)]
pub struct Failures(Vec<String>);

impl Failures {
    pub fn check(&mut self, cell: impl std::fmt::Display, expect: Expect, got: &Outcome) {
        if let Some(why) = expect.check(got) {
            self.0.push(format!("{cell}: {why}"));
        }
    }

    pub fn push(&mut self, what: String) {
        self.0.push(what);
    }

    /// `Err` with every failing cell, one per line.
    pub fn into_result(self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0.join("\n  "))
        }
    }

    pub fn assert_none(self, what: &str) {
        assert!(
            self.0.is_empty(),
            "{what}: {} failing cell(s):\n  {}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

/// Every counter of `stats`, zero unless given in `nonzero`.
pub fn counters(nonzero: &[(&str, u64)]) -> BTreeMap<String, u64> {
    let mut m: BTreeMap<String, u64> = [
        "inbound_captured",
        "inbound_excluded",
        "inbound_no_listener",
        "outbound_captured",
        "outbound_excluded",
        "proxy_self_captured",
        "delivered_pod_ip",
        "delivered_loopback",
        "delivery_refused",
        "orig_dst_hit",
        "orig_dst_local",
        "orig_dst_miss",
        "map_full",
        "listener_registered",
        "dns_captured",
        "dns_tcp_captured",
        "dns_replies_rewritten",
        "peername_rewritten",
    ]
    .iter()
    .map(|k| (k.to_string(), 0))
    .collect();
    for (k, v) in nonzero {
        assert!(m.contains_key(*k), "unknown counter {k}");
        m.insert(k.to_string(), *v);
    }
    m
}

/// `after - before`, for the counters that changed.
pub fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d != 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// Addresses on the pod's `lo`, as `ip -o addr show dev lo` prints them.
pub fn lo_addresses(pod: &Pod) -> String {
    pod.exec("ip", &["-o", "addr", "show", "dev", "lo"])
        .expect("ip addr")
}

/// Programs attached to a cgroup (`bpftool cgroup show`), empty when none.
pub fn cgroup_programs(cgroup: &Path) -> String {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A client elsewhere reaches the server's wildcard app through the proxy (policy passthrough),
/// for both families; `Some(why)` otherwise.
pub fn captured_inbound(client: &Pod, server: &Pod, proxy: &Proxy) -> Option<String> {
    let mut why = Vec::new();
    for f in Family::BOTH {
        let to = sock(f.pod_ip(server), WILDCARD_PORT);
        let seen = proxy.entries().len();
        let got = probe(client, to);
        let expect = Expect::Echo {
            local: to,
            peer: f.passthrough_src(),
            direct: false,
        };
        if let Some(w) = expect.check(&got) {
            why.push(format!("client -> {to}: {w}"));
        }
        let new = proxy.entries().split_off(seen);
        if new.len() != 1 || new[0].orig_dst != Some(to) {
            why.push(format!("client -> {to}: proxy log {new:?}"));
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// What a client elsewhere gets from the server's wildcard app without any redirection.
pub fn direct_inbound(client: &Pod, server: &Pod) -> Option<String> {
    let mut why = Vec::new();
    for f in Family::BOTH {
        let to = sock(f.pod_ip(server), WILDCARD_PORT);
        let got = probe(client, to);
        let expect = Expect::Echo {
            local: to,
            peer: f.pod_ip(client),
            direct: true,
        };
        if let Some(w) = expect.check(&got) {
            why.push(format!("client -> {to}: {w}"));
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Files and directories under `dir`, relative, sorted (a pin root's layout).
pub fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}
