//! The test bed against the real kernel: pods on a CNI bridge, uid/cgroup of spawned
//! processes, the proxy's original-destination handling, and cleanup (also after a panic).
//! Needs root; skips otherwise, except under `CI=true` where a skip fails.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use redirect_testbed::{matrix, proxy, require, Need, Node, Outcome, Pod, PodProcess, ProxyDial};

const T: Duration = Duration::from_secs(5);
const PROXY_UID: u32 = 1337;
const APP_UID: u32 = 1000;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_redirect-testbed"))
}

/// Starts `redirect-testbed echo` in `pod` on `listen` and waits until every address listens.
fn echo(pod: &Pod, listen: &[SocketAddr]) -> PodProcess {
    let mut cmd = Command::new(bin());
    cmd.arg("echo").stdout(Stdio::null());
    for a in listen {
        cmd.arg("--listen").arg(a.to_string());
    }
    let mut p = pod.spawn(APP_UID, cmd).unwrap();
    for a in listen {
        p.wait_for_listen(*a, T).unwrap();
    }
    p
}

/// Starts the proxy as uid 1337 in `pod`, logging to a fresh file of the node.
fn proxy(node: &Node, pod: &Pod, delivery: ProxyDial, log_name: &str) -> (PodProcess, PathBuf) {
    let log = node.scratch_file(log_name).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["proxy", "--delivery", delivery.name(), "--log"])
        .arg(&log)
        .stdout(Stdio::null());
    let mut p = pod.spawn(PROXY_UID, cmd).unwrap();
    for port in [15001, 15006] {
        p.wait_for_listen(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port), T)
            .unwrap();
        p.wait_for_listen(format!("[::]:{port}").parse().unwrap(), T)
            .unwrap();
    }
    (p, log)
}

fn probe_from(pod: &Pod, to: SocketAddr) -> Outcome {
    pod.in_netns(|| redirect_testbed::probe(to, b"ping", T))
        .unwrap()
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn assert_echoed(o: &Outcome, server_local: SocketAddr, peer_ip: IpAddr) {
    let Outcome::Echoed { server, .. } = o else {
        panic!("expected echoed, got {o:?}")
    };
    assert_eq!(server.local, server_local, "{o:?}");
    assert_eq!(server.peer.ip(), peer_ip, "{o:?}");
}

/// Echoed by the server itself, no proxy in between: the server's peer is the client socket.
fn assert_direct(o: &Outcome, server_local: SocketAddr, peer_ip: IpAddr) {
    assert_echoed(o, server_local, peer_ip);
    assert_eq!(o.server().unwrap().peer, o.local().unwrap(), "{o:?}");
}

#[test]
fn pods_reach_each_other_over_v4_and_v6() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let (net4, _) = node.subnet4();
    assert_eq!(a.ip4.octets()[..3], net4.octets()[..3]);
    assert!(a.ip6.segments()[..4] == node.subnet6().0.segments()[..4]);
    assert_ne!(a.ip4, b.ip4);
    assert!(
        a.name.starts_with("rdt-") && a.name.ends_with("-a"),
        "{}",
        a.name
    );
    // Pods start with lo up and eth0 only: no default route out of the pod.
    let routes = a.exec("ip", &["route", "show", "default"]).unwrap();
    assert!(routes.trim().is_empty(), "{routes}");

    let _ea = echo(
        &a,
        &[
            sock(Ipv4Addr::UNSPECIFIED, 18080),
            "[::]:18080".parse().unwrap(),
        ],
    );
    let _eb = echo(&b, &[sock(b.ip4, 18080), sock(b.ip6, 18080)]);
    assert_direct(
        &probe_from(&a, sock(b.ip4, 18080)),
        sock(b.ip4, 18080),
        a.ip4.into(),
    );
    assert_direct(
        &probe_from(&a, sock(b.ip6, 18080)),
        sock(b.ip6, 18080),
        a.ip6.into(),
    );
    assert_direct(
        &probe_from(&b, sock(a.ip4, 18080)),
        sock(a.ip4, 18080),
        b.ip4.into(),
    );
    assert_direct(
        &probe_from(&b, sock(a.ip6, 18080)),
        sock(a.ip6, 18080),
        b.ip6.into(),
    );
    // [::] is v6-only, so the pods' IPv4 paths are not tested through a dual-stack socket.
    let lo = a.in_netns(|| redirect_testbed::probe("[::1]:18080".parse().unwrap(), b"x", T));
    assert!(lo.unwrap().is_echoed());
    // Nothing listens on b's 127.0.0.1:18080: only b's pod IP.
    assert_eq!(
        probe_from(&b, sock(Ipv4Addr::LOCALHOST, 18080)),
        Outcome::Refused
    );
}

#[test]
fn spawned_process_has_uid_netns_and_cgroup() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let pod = node.add_pod("uid").unwrap();
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let p = pod.spawn(PROXY_UID, cmd).unwrap();
    let status = fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), ["1337"; 4], "{status}");
    assert_eq!(field("Gid:"), ["1337"; 4], "{status}");
    assert!(field("Groups:").is_empty(), "{status}");
    assert_eq!(field("CapEff:"), ["0000000000000000"], "{status}");

    let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", p.pid())).unwrap();
    let v2 = cgroup.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    let mount = redirect_testbed::cgroup2_mount().unwrap();
    assert_eq!(
        mount.join(v2.trim_start_matches('/')),
        pod.cgroup,
        "{cgroup}"
    );
    assert!(fs::read_to_string(pod.cgroup.join("cgroup.procs"))
        .unwrap()
        .contains(&p.pid().to_string()));
    assert!(pod.cgroup_id().unwrap() > 1);

    use std::os::unix::fs::MetadataExt as _;
    let proc_ns = fs::metadata(format!("/proc/{}/ns/net", p.pid()))
        .unwrap()
        .ino();
    assert_eq!(proc_ns, fs::metadata(&pod.netns_path).unwrap().ino());
    let node_ns = fs::metadata(node.netns_path()).unwrap().ino();
    assert_ne!(proc_ns, node_ns);
}

#[test]
fn exec_and_connect_binary_run_in_the_pod() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let a = node.add_pod("cli").unwrap();
    let b = node.add_pod("srv").unwrap();
    let addrs = a
        .exec("ip", &["-br", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(
        addrs.contains(&a.ip4.to_string()) && addrs.contains(&a.ip6.to_string()),
        "{addrs}"
    );
    assert!(a.exec("false", &[]).is_err());

    let _e = echo(&b, &[sock(b.ip4, 18081)]);
    let bin = bin();
    let to = sock(b.ip4, 18081).to_string();
    let out = a
        .exec(
            bin.to_str().unwrap(),
            &["connect", "--to", &to, "--payload", "abc"],
        )
        .unwrap();
    let o: Outcome = serde_json::from_str(out.trim()).unwrap();
    assert_direct(&o, sock(b.ip4, 18081), a.ip4.into());
    let src = a.ip4.to_string();
    let out = a
        .exec(
            bin.to_str().unwrap(),
            &[
                "connect",
                "--to",
                &to,
                "--bind",
                &src,
                "--timeout-ms",
                "500",
            ],
        )
        .unwrap();
    assert!(
        serde_json::from_str::<Outcome>(out.trim())
            .unwrap()
            .is_echoed(),
        "{out}"
    );
    let closed = sock(b.ip4, 18099).to_string();
    let out = a
        .exec(bin.to_str().unwrap(), &["connect", "--to", &closed])
        .unwrap();
    assert_eq!(
        out.trim(),
        r#"{"result":"refused","server":null,"local":null}"#
    );
}

#[test]
fn proxy_falls_back_to_getsockname_without_so_original_dst() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let pod = node.add_pod("envoy").unwrap();
    let client = node.add_pod("client").unwrap();
    let (_p, log) = proxy(&node, &pod, ProxyDial::Loopback, "proxy.log");

    // Straight to the inbound port: no NAT, so only getsockname can name the destination,
    // and the proxy refuses to connect to itself.
    for to in [sock(pod.ip4, 15006), sock(pod.ip6, 15006)] {
        let o = probe_from(&client, to);
        assert!(
            matches!(o, Outcome::Closed { .. } | Outcome::Reset { .. }),
            "{o:?}"
        );
    }
    // Outbound without SO_ORIGINAL_DST is refused.
    let o = probe_from(&client, sock(pod.ip4, 15001));
    assert!(
        matches!(o, Outcome::Closed { .. } | Outcome::Reset { .. }),
        "{o:?}"
    );

    let entries = proxy::read_log(&log).unwrap();
    assert_eq!(entries.len(), 3, "{entries:#?}");
    for (e, ip) in entries[..2]
        .iter()
        .zip([IpAddr::from(pod.ip4), pod.ip6.into()])
    {
        assert_eq!(e.listener, "inbound");
        assert_eq!(e.orig_dst_source.as_deref(), Some("getsockname"), "{e:?}");
        assert_eq!(e.orig_dst, Some(sock(ip, 15006)));
        assert_eq!(e.local, sock(ip, 15006));
        assert!(e.result.starts_with("loop"), "{e:?}");
    }
    assert_eq!(entries[2].listener, "outbound");
    assert_eq!(entries[2].orig_dst, None);
    assert!(
        entries[2].result.starts_with("no_original_dst"),
        "{:?}",
        entries[2]
    );
}

/// Istio's outbound capture, done with a real REDIRECT rule inside the client pod: the app's
/// connection reaches the proxy's 15001, whose SO_ORIGINAL_DST names the real server.
#[test]
fn proxy_outbound_follows_iptables_redirect() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _e = echo(
        &server,
        &[
            sock(Ipv4Addr::UNSPECIFIED, 18080),
            "[::]:18080".parse().unwrap(),
        ],
    );
    let (_p, log) = proxy(&node, &client, ProxyDial::PodIp, "outbound.log");
    for (tool, dst) in [
        ("iptables", server.ip4.to_string()),
        ("ip6tables", server.ip6.to_string()),
    ] {
        client
            .exec(
                tool,
                &[
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "-d",
                    &dst,
                    "--dport",
                    "18080",
                    "-m",
                    "owner",
                    "!",
                    "--uid-owner",
                    "1337",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    "15001",
                ],
            )
            .unwrap();
    }
    for (dst, src) in [
        (IpAddr::from(server.ip4), IpAddr::from(client.ip4)),
        (server.ip6.into(), client.ip6.into()),
    ] {
        let o = probe_from(&client, sock(dst, 18080));
        // The server sees the proxy's upstream connection, from the client pod's address.
        let Outcome::Echoed {
            server: banner,
            local,
        } = &o
        else {
            panic!("{o:?}")
        };
        assert_eq!(banner.local, sock(dst, 18080));
        assert_eq!(banner.peer.ip(), src);
        assert_ne!(banner.peer, *local, "went through the proxy, not directly");
    }
    let entries = proxy::read_log(&log).unwrap();
    assert_eq!(entries.len(), 2, "{entries:#?}");
    for (e, dst) in entries
        .iter()
        .zip([IpAddr::from(server.ip4), server.ip6.into()])
    {
        assert_eq!(e.listener, "outbound");
        assert_eq!(
            e.orig_dst_source.as_deref(),
            Some("so_original_dst"),
            "{e:?}"
        );
        assert_eq!(e.orig_dst, Some(sock(dst, 18080)));
        assert_eq!(e.local.port(), 15001);
        assert_eq!(e.upstream, Some(sock(dst, 18080)));
        assert_eq!(e.result, "ok");
    }
}

/// Istio's inbound capture with a real PREROUTING REDIRECT in the server pod, for both ways of
/// delivering to the application: the pre-1.10 loopback way reaches only the app bound to
/// 127.0.0.1, the 1.10 way (from 127.0.0.6 to the pod IP) only the app bound to the pod IP.
#[test]
fn proxy_inbound_delivery_modes_with_iptables_redirect() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    server
        .add_lo_address(matrix::PASSTHROUGH_SRC6.into())
        .unwrap();
    let _apps = echo(
        &server,
        &[
            sock(server.ip4, 18082),
            sock(server.ip6, 18082),
            sock(Ipv4Addr::LOCALHOST, 18084),
            "[::1]:18084".parse().unwrap(),
        ],
    );
    for tool in ["iptables", "ip6tables"] {
        server
            .exec(
                tool,
                &[
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-p",
                    "tcp",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    "15006",
                ],
            )
            .unwrap();
    }
    for delivery in [ProxyDial::PodIp, ProxyDial::Loopback] {
        let (mut p, log) = proxy(&node, &server, delivery, &format!("inbound-{delivery}.log"));
        for (pod_ip, lo_ip, src_ip) in [
            (
                IpAddr::from(server.ip4),
                IpAddr::from(Ipv4Addr::LOCALHOST),
                IpAddr::from(matrix::PASSTHROUGH_SRC4),
            ),
            (
                server.ip6.into(),
                "::1".parse().unwrap(),
                matrix::PASSTHROUGH_SRC6.into(),
            ),
        ] {
            let to_pod_ip_app = probe_from(&client, sock(pod_ip, 18082));
            let to_lo_app = probe_from(&client, sock(pod_ip, 18084));
            if delivery == ProxyDial::PodIp {
                assert_echoed(&to_pod_ip_app, sock(pod_ip, 18082), src_ip);
                assert!(
                    matches!(to_lo_app, Outcome::Closed { .. } | Outcome::Reset { .. }),
                    "{to_lo_app:?}"
                );
            } else {
                assert!(
                    matches!(
                        to_pod_ip_app,
                        Outcome::Closed { .. } | Outcome::Reset { .. }
                    ),
                    "{to_pod_ip_app:?}"
                );
                assert_echoed(&to_lo_app, sock(lo_ip, 18084), lo_ip);
            }
        }
        let entries = proxy::read_log(&log).unwrap();
        assert_eq!(entries.len(), 4, "{entries:#?}");
        for e in &entries {
            assert_eq!(e.listener, "inbound");
            assert_eq!(
                e.orig_dst_source.as_deref(),
                Some("so_original_dst"),
                "{e:?}"
            );
            assert_eq!(e.local.port(), 15006);
            let orig = e.orig_dst.unwrap();
            assert!(orig.ip() == IpAddr::from(server.ip4) || orig.ip() == IpAddr::from(server.ip6));
            let refused = e.result.starts_with("connect_error");
            assert_eq!(
                refused,
                (delivery == ProxyDial::PodIp) == (orig.port() == 18084),
                "{e:?}"
            );
        }
        p.kill().unwrap();
    }
}

fn netns_list() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

/// What a test's node leaves behind, to check after it is gone.
struct Footprint {
    run_id: String,
    netns: Vec<String>,
    cgroups: Vec<PathBuf>,
    subnet_lock: PathBuf,
    pid: u32,
}

fn assert_gone(f: &Footprint) {
    let list = netns_list();
    for n in &f.netns {
        assert!(
            !list.lines().any(|l| l.split_whitespace().next() == Some(n)),
            "netns {n} left: {list}"
        );
        assert!(!Path::new("/var/run/netns").join(n).exists());
    }
    for c in &f.cgroups {
        assert!(!c.exists(), "cgroup {} left", c.display());
    }
    // The index may already be reused by a concurrent test's node, never by our run.
    let holder = fs::read_to_string(&f.subnet_lock).unwrap_or_default();
    assert!(
        !holder.contains(&f.run_id),
        "subnet lock {} still ours",
        f.subnet_lock.display()
    );
    assert!(!Path::new("/run/redirect-testbed/nodes")
        .join(&f.run_id)
        .exists());
    // Gone, or a zombie waiting for whoever inherited it (after the sweep test's abort).
    let stat = fs::read_to_string(format!("/proc/{}/stat", f.pid)).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "pod process survived: {stat}"
    );
}

fn build_and_fill() -> (Node, Pod, Pod, PodProcess, Footprint) {
    let node = Node::new().unwrap();
    let a = node.add_pod("gone-a").unwrap();
    let b = node.add_pod("gone-b").unwrap();
    let mut cmd = Command::new("sleep");
    // Not the test's stdout: the sweep test reads its child's stdout to EOF.
    cmd.arg("60").stdout(Stdio::null()).stderr(Stdio::null());
    let p = a.spawn(PROXY_UID, cmd).unwrap();
    let f = Footprint {
        run_id: node.run_id().to_owned(),
        netns: vec![node.name().to_owned(), a.name.clone(), b.name.clone()],
        cgroups: vec![a.cgroup.clone(), b.cgroup.clone()],
        subnet_lock: PathBuf::from(format!(
            "/run/redirect-testbed/subnets/{}",
            node.subnet_index()
        )),
        pid: p.pid(),
    };
    let list = netns_list();
    for n in &f.netns {
        assert!(list.contains(n.as_str()), "{n} missing from {list}");
    }
    assert!(fs::read_to_string(&f.subnet_lock)
        .unwrap()
        .contains(&f.run_id));
    (node, a, b, p, f)
}

#[test]
fn drop_removes_everything() {
    require!(Need::Root);
    let (node, a, b, p, f) = build_and_fill();
    // Dropping the node first keeps it alive until its pods are gone.
    drop(node);
    assert!(Path::new("/var/run/netns").join(&f.netns[0]).exists());
    drop((a, b, p));
    assert_gone(&f);
}

#[test]
fn drop_removes_everything_after_a_panic() {
    require!(Need::Root);
    let footprint = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let (_node, _a, _b, _p, f) = build_and_fill();
        *footprint.lock().unwrap() = Some(f);
        panic!("test body fails");
    });
    assert!(r.is_err());
    assert_gone(footprint.lock().unwrap().as_ref().unwrap());
}

/// A run killed without unwinding leaves its node behind; the next sweep removes it.
#[test]
fn sweep_removes_what_a_killed_run_left() {
    if std::env::var_os("RDT_LEAK_AND_ABORT").is_some() {
        // Child mode: build, report, and die without running any destructor.
        let (_node, _a, _b, p, f) = build_and_fill();
        println!(
            "LEAK {} {} {} {} {}",
            f.run_id,
            f.netns.join(","),
            f.cgroups
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(","),
            f.subnet_lock.display(),
            p.pid()
        );
        use std::io::Write as _;
        std::io::stdout().flush().unwrap();
        std::process::abort();
    }
    require!(Need::Root);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sweep_removes_what_a_killed_run_left",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RDT_LEAK_AND_ABORT", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| Some(&l[l.find("LEAK ")? + 5..]))
        .unwrap_or_else(|| panic!("{stdout}"));
    let fields: Vec<&str> = line.split(' ').collect();
    let f = Footprint {
        run_id: fields[0].to_owned(),
        netns: fields[1].split(',').map(str::to_owned).collect(),
        cgroups: fields[2].split(',').map(PathBuf::from).collect(),
        subnet_lock: PathBuf::from(fields[3]),
        pid: fields[4].parse().unwrap(),
    };
    assert!(
        Path::new("/var/run/netns").join(&f.netns[1]).exists(),
        "child left nothing to sweep"
    );
    assert!(f.cgroups[0].exists());
    redirect_testbed::sweep_stale();
    assert_gone(&f);
}

#[test]
fn echo_modes_readiness_and_connect_as() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let a = node.add_pod("echoer").unwrap();
    let b = node.add_pod("caller").unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["echo", "--dual-stack", "--listen", "[::]:18090"])
        .stdout(Stdio::piped());
    let mut dual = a.spawn(APP_UID, cmd).unwrap();
    assert_eq!(
        dual.wait_for_line("listening", T).unwrap(),
        "listening [::]:18090"
    );
    let mut cmd = Command::new(bin());
    cmd.args([
        "echo",
        "--plain",
        "--listen",
        "0.0.0.0:18091",
        "--listen",
        "[::]:18092",
    ])
    .stdout(Stdio::piped());
    let mut plain = a.spawn(APP_UID, cmd).unwrap();
    plain.wait_for_line("listening [::]:18092", T).unwrap();

    // --dual-stack: [::] takes IPv4 too, seen as a v4-mapped address.
    let o = probe_from(&b, sock(a.ip4, 18090));
    let mapped: SocketAddr = format!("[::ffff:{}]:18090", a.ip4).parse().unwrap();
    assert_echoed(&o, mapped, b.ip4.to_ipv6_mapped().into());
    assert_eq!(o.server().unwrap().peer.port(), o.local().unwrap().port());
    // Without it [::] is v6-only.
    assert_eq!(probe_from(&b, sock(a.ip4, 18092)), Outcome::Refused);
    // --plain: the payload alone comes back, which the client reports as a mismatch.
    let o = probe_from(&b, sock(a.ip4, 18091));
    let Outcome::Mismatch {
        received,
        server: None,
        ..
    } = &o
    else {
        panic!("{o:?}")
    };
    assert_eq!(received, "ping");

    // The client binary in the pod's cgroup, as the app's uid and as the proxy's.
    for uid in [APP_UID, PROXY_UID] {
        let o = b.connect_as(uid, sock(a.ip6, 18090), b"hi", T).unwrap();
        assert_direct(&o, sock(a.ip6, 18090), b.ip6.into());
    }
}
