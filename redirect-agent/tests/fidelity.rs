//! Redirection the application cannot see (issue 13): what a captured socket reports about
//! itself is what it would under Istio's iptables `REDIRECT` (NAT keeps the socket's addresses):
//! its own address is the pod's, its peer the original destination, the proxy sees the pod
//! address as the connection's source, and a dual-stack socket connecting to `::ffff:a.b.c.d`
//! is the IPv4 connection it is, with IPv4 exclusions and an IPv4 `SO_ORIGINAL_DST`.
//!
//! The addresses come from `redirect-testbed addrs`, run as the application in the pod (its
//! netns and cgroup): `getsockname`, `getpeername` and the first line the server sent (the echo
//! server's banner: the address it accepted on and the peer it saw). Needs root; without it
//! each test says why and returns, except under `CI=true`, where a skip is a failure.

mod common;

use std::{
    io::Read as _,
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
};

use common::*;
use redirect_testbed::Banner;
use serde::Deserialize;

/// One socket of `redirect-testbed addrs`.
#[derive(Debug, Deserialize)]
struct Addrs {
    to: SocketAddr,
    local: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    server: Option<Banner>,
    error: Option<String>,
}

/// Runs `redirect-testbed addrs ARGS` in `pod` as `uid`: one report per `--to`.
fn addrs(pod: &Pod, uid: u32, args: &[String]) -> Vec<Addrs> {
    let mut cmd = Command::new(testbed_bin());
    cmd.arg("addrs")
        .args(args)
        .args(["--timeout-ms", &T.as_millis().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = pod.spawn(uid, cmd).expect("spawn addrs");
    let mut stdout = String::new();
    p.child_mut()
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)
        .expect("read addrs output");
    let mut stderr = String::new();
    let _ = p
        .child_mut()
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr);
    let status = p.child_mut().wait().expect("wait addrs");
    assert!(status.success(), "addrs {args:?}: {status}: {stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

fn to_args(to: &[SocketAddr]) -> Vec<String> {
    to.iter()
        .flat_map(|t| ["--to".to_string(), t.to_string()])
        .collect()
}

/// `::ffff:a.b.c.d:p` for an IPv4 socket address (what a dual-stack socket reports).
fn mapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    }
}

fn echo_on(pod: &Pod, ports: &[u16]) -> PodProcess {
    let mut listen = Vec::new();
    for f in Family::BOTH {
        for p in ports {
            listen.push(sock(f.unspecified(), *p));
        }
    }
    echo(pod, APP_UID, &listen)
}

/// What the application and the proxy see of one captured connection, against what iptables
/// `REDIRECT` gives: `app_ip` is the application's address as its socket names it (mapped for
/// a dual-stack socket), `to` the destination as it asked for it.
struct Want {
    app_ip: IpAddr,
    pod_ip: IpAddr,
    to: SocketAddr,
    asked: SocketAddr,
}

fn check_captured(
    failures: &mut Failures,
    cell: &str,
    got: &Addrs,
    want: Want,
    proxy_new: &[ProxyLogEntry],
) {
    let Want {
        app_ip,
        pod_ip,
        to,
        asked,
    } = want;
    let mut why = Vec::new();
    if got.to != to {
        why.push(format!("report for {}, expected {to}", got.to));
    }
    if let Some(e) = &got.error {
        why.push(format!("error {e}"));
    }
    if got.local.map(|l| l.ip()) != Some(app_ip) {
        why.push(format!("getsockname {:?}, expected {app_ip}:*", got.local));
    }
    if got.peer != Some(asked) {
        why.push(format!(
            "getpeername {:?}, expected the original destination {asked}",
            got.peer
        ));
    }
    // The server saw the proxy's upstream connection, from the pod's address.
    match got.server {
        Some(b) if b.local == to && b.peer.ip() == pod_ip => {}
        other => why.push(format!(
            "server banner {other:?}, expected {to} from {pod_ip}"
        )),
    }
    // The proxy's accepted socket: its peer is the application's socket (the pod's address,
    // unmapped), its original destination the IPv4/IPv6 destination itself.
    let app_local = got.local.map(|l| SocketAddr::new(pod_ip, l.port()));
    let ok = proxy_new.len() == 1
        && proxy_new[0].listener == "outbound"
        && Some(proxy_new[0].peer) == app_local
        && proxy_new[0].orig_dst == Some(to)
        && proxy_new[0].orig_dst_source.as_deref() == Some("so_original_dst")
        && proxy_new[0].result == "ok";
    if !ok {
        why.push(format!(
            "proxy: expected one outbound entry from {app_local:?} with orig_dst {to} from \
             so_original_dst, got {proxy_new:?}"
        ));
    }
    if !why.is_empty() {
        failures.push(format!("{cell}: {}; got {got:?}", why.join(", ")));
    }
}

/// IPv4, IPv6 and an IPv4 destination through a dual-stack socket: the application's socket
/// reports the pod's address and the original destination, the server sees the pod's address,
/// the proxy sees the application's socket as its peer and gets the original destination
/// (IPv4 for the mapped one: its accepted socket is IPv4, asked at SOL_IP).
#[test]
fn captured_socket_reports_pod_address_and_original_destination() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let app = node.add_pod("app").unwrap();
    let other = node.add_pod("other").unwrap();
    let _remote = echo_on(&other, &[WILDCARD_PORT]);
    let proxy = Proxy::start(&node, &app, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&app, &[]);
    let before = agent.stats(&app.name);

    let mut failures = Failures::default();
    for (name, f, dual) in [
        ("v4", Family::V4, false),
        ("v6", Family::V6, false),
        ("mapped", Family::V4, true),
    ] {
        let to = sock(f.pod_ip(&other), WILDCARD_PORT);
        let mut args = to_args(&[to]);
        if dual {
            args.push("--mapped".into());
        }
        let seen = proxy.entries().len();
        let got = addrs(&app, APP_UID, &args);
        let new = proxy.entries().split_off(seen);
        let (app_ip, asked) = if dual {
            (mapped(sock(f.pod_ip(&app), 0)).ip(), mapped(to))
        } else {
            (f.pod_ip(&app), to)
        };
        assert_eq!(got.len(), 1, "{got:?}");
        check_captured(
            &mut failures,
            &format!("{name} app -> {asked}"),
            &got[0],
            Want {
                app_ip,
                pod_ip: f.pod_ip(&app),
                to,
                asked,
            },
            &new,
        );
    }
    let d = delta(&before, &agent.stats(&app.name));
    let want = delta(
        &counters(&[]),
        // Each application socket asked getpeername() once (the `addrs` tool).
        &counters(&[
            ("outbound_captured", 3),
            ("orig_dst_hit", 3),
            ("peername_rewritten", 3),
        ]),
    );
    if d != want {
        failures.push(format!("counters moved {d:?}, expected {want:?}"));
    }
    failures.assert_none("addresses of captured sockets");
}

/// The same sockets in a pod that is not enrolled: the kernel's own answers, which the captured
/// ones above must equal (the application cannot tell the difference).
#[test]
fn uncaptured_socket_reports_the_same() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let app = node.add_pod("app").unwrap();
    let other = node.add_pod("other").unwrap();
    let _remote = echo_on(&other, &[WILDCARD_PORT]);
    let mut failures = Failures::default();
    for (name, f, dual) in [
        ("v4", Family::V4, false),
        ("v6", Family::V6, false),
        ("mapped", Family::V4, true),
    ] {
        let to = sock(f.pod_ip(&other), WILDCARD_PORT);
        let mut args = to_args(&[to]);
        if dual {
            args.push("--mapped".into());
        }
        let got = addrs(&app, APP_UID, &args);
        let (app_ip, asked) = if dual {
            (mapped(sock(f.pod_ip(&app), 0)).ip(), mapped(to))
        } else {
            (f.pod_ip(&app), to)
        };
        let g = &got[0];
        let ok = g.error.is_none()
            && g.local.map(|l| l.ip()) == Some(app_ip)
            && g.peer == Some(asked)
            && g.server.is_some_and(|b| {
                b.local == to
                    && Some(b.peer) == g.local.map(|l| SocketAddr::new(f.pod_ip(&app), l.port()))
            });
        if !ok {
            failures.push(format!(
                "{name}: expected {app_ip}:* -> {asked} direct, got {g:?}"
            ));
        }
    }
    failures.assert_none("addresses without capture");
}

/// A dual-stack socket's IPv4 destination is matched against the IPv4 exclusions: an excluded
/// CIDR or port is reached directly (the server sees the application's own socket), the rest is
/// captured.
#[test]
fn mapped_destinations_follow_ipv4_exclusions() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let app = node.add_pod("app").unwrap();
    let kept = node.add_pod("kept").unwrap();
    let skipped = node.add_pod("skipped").unwrap();
    let _e1 = echo_on(&kept, &[WILDCARD_PORT, 18090]);
    let _e2 = echo_on(&skipped, &[WILDCARD_PORT]);
    let proxy = Proxy::start(&node, &app, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let cidrs = format!("{}/32", skipped.ip4);
    agent.enroll(
        &app,
        &[
            "--exclude-outbound-ports",
            "18090",
            "--exclude-outbound-cidrs",
            &cidrs,
        ],
    );
    let before = agent.stats(&app.name);
    let mut failures = Failures::default();
    for (to, direct) in [
        (sock(kept.ip4, 18090), true),
        (sock(skipped.ip4, WILDCARD_PORT), true),
        (sock(kept.ip4, WILDCARD_PORT), false),
    ] {
        let mut args = to_args(&[to]);
        args.push("--mapped".into());
        let seen = proxy.entries().len();
        let got = addrs(&app, APP_UID, &args);
        let new = proxy.entries().split_off(seen);
        let g = &got[0];
        let app_local = g
            .local
            .map(|l| SocketAddr::new(IpAddr::V4(app.ip4), l.port()));
        if direct {
            let ok = g.peer == Some(mapped(to))
                && g.server
                    .is_some_and(|b| b.local == to && Some(b.peer) == app_local)
                && new.is_empty();
            if !ok {
                failures.push(format!("{to}: expected direct, got {g:?}, proxy {new:?}"));
            }
        } else {
            check_captured(
                &mut failures,
                &format!("mapped app -> {to}"),
                g,
                Want {
                    app_ip: mapped(sock(app.ip4, 0)).ip(),
                    pod_ip: IpAddr::V4(app.ip4),
                    to,
                    asked: mapped(to),
                },
                &new,
            );
        }
    }
    let d = delta(&before, &agent.stats(&app.name));
    let want = delta(
        &counters(&[]),
        &counters(&[
            ("outbound_excluded", 2),
            ("outbound_captured", 1),
            ("orig_dst_hit", 1),
            ("peername_rewritten", 1),
        ]),
    );
    if d != want {
        failures.push(format!("counters moved {d:?}, expected {want:?}"));
    }
    failures.assert_none("mapped destinations and IPv4 exclusions");
}

/// The proxy's deliveries from a dual-stack socket (`::ffff:127.0.0.1:P`, or `::ffff:POD_IP:P`
/// from `::ffff:127.0.0.6`) are the IPv4 connections they are: under either policy they end
/// where the same delivery from an IPv4 socket ends (the application reached or not, at the same
/// address, from the same source), as iptables' IPv4 rules treat them.
#[test]
fn dual_stack_deliveries_end_where_ipv4_ones_do() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let _apps = matrix_apps(&server);
    let agent = Agent::new();
    let mut failures = Failures::default();
    let loopback = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    let passthrough = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 6));
    // What the application saw of the delivery: the address it accepted on and its peer's
    // address (the port is the kernel's choice), or nothing.
    type Seen = Option<(SocketAddr, IpAddr)>;
    let mut reached: Vec<(String, u16, Seen)> = Vec::new();
    for policy in ["passthrough", "localhost"] {
        agent.enroll(&server, &["--inbound-policy", policy]);
        for port in [POD_IP_PORT, LOOPBACK_PORT, WILDCARD_PORT] {
            for (to, bind) in [
                (sock(loopback, port), None),
                (
                    sock(IpAddr::V4(server.ip4), port),
                    Some(sock(passthrough, 0)),
                ),
            ] {
                let view = |mapped: bool| -> Seen {
                    let mut args = to_args(&[to]);
                    if let Some(b) = bind {
                        args.extend(["--bind".into(), b.to_string()]);
                    }
                    if mapped {
                        args.push("--mapped".into());
                    }
                    let got = addrs(&server, PROXY_UID, &args);
                    got[0].server.map(|b| (b.local, b.peer.ip()))
                };
                let (v4, dual) = (view(false), view(true));
                if v4 != dual {
                    failures.push(format!(
                        "policy {policy}, proxy dials {to} (bound {bind:?}): IPv4 socket {v4:?}, \
                         dual-stack socket {dual:?}"
                    ));
                }
                reached.push((policy.to_string(), port, v4));
            }
        }
    }
    // Not vacuous: each policy reaches its own application and refuses the other's.
    let seen = |policy: &str, port: u16| {
        reached
            .iter()
            .filter(|(p, q, s)| p == policy && *q == port && s.is_some())
            .count()
    };
    if seen("passthrough", POD_IP_PORT) != 2 || seen("passthrough", LOOPBACK_PORT) != 0 {
        failures.push(format!("passthrough deliveries: {reached:?}"));
    }
    if seen("localhost", LOOPBACK_PORT) != 2 || seen("localhost", POD_IP_PORT) != 0 {
        failures.push(format!("localhost deliveries: {reached:?}"));
    }
    failures.assert_none("dual-stack deliveries");
}

/// Two `SO_REUSEADDR` sockets bound to the same pod address and port, connected at the same
/// time to two different servers: distinct four-tuples without redirect and under iptables
/// (NAT keeps the original destination in the tuple), so both must work when captured. Each
/// original destination has its own address in front of the proxy's wildcard listener: IPv4
/// and dual-stack sockets one of 127.128.0.0/12, IPv6 one of `100::/64` (local on the pod's
/// `lo`). Before the IPv6 spreading, every IPv6 connection went to `[::1]:15001` and the second
/// IPv6 socket got `EADDRNOTAVAIL`.
#[test]
fn two_reuseaddr_sockets_on_one_port_reach_two_servers() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let app = node.add_pod("app").unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let _ea = echo_on(&a, &[WILDCARD_PORT]);
    let _eb = echo_on(&b, &[WILDCARD_PORT]);
    let proxy = Proxy::start(&node, &app, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&app, &[]);
    let mut failures = Failures::default();
    for (family, dual) in [(Family::V4, false), (Family::V4, true), (Family::V6, false)] {
        let targets = [
            sock(family.pod_ip(&a), WILDCARD_PORT),
            sock(family.pod_ip(&b), WILDCARD_PORT),
        ];
        let bind = sock(
            family.pod_ip(&app),
            21000 + u16::from(dual) + 2 * u16::from(family == Family::V6),
        );
        let mut args = to_args(&targets);
        args.extend(["--bind".into(), bind.to_string(), "--reuseaddr".into()]);
        if dual {
            args.push("--mapped".into());
        }
        let seen = proxy.entries().len();
        let got = addrs(&app, APP_UID, &args);
        let new = proxy.entries().split_off(seen);
        for (i, to) in targets.iter().enumerate() {
            let asked = if dual { mapped(*to) } else { *to };
            let local = if dual { mapped(bind) } else { bind };
            let g = &got[i];
            let ok = g.error.is_none()
                && g.local == Some(local)
                && g.peer == Some(asked)
                && g.server.is_some_and(|s| s.local == *to)
                && new
                    .iter()
                    .any(|e| e.peer == bind && e.orig_dst == Some(*to) && e.result == "ok");
            if !ok {
                failures.push(format!(
                    "{} dual-stack {dual}: socket {i} bound to {local} -> {asked}: got {g:?}, \
                     proxy {new:?}",
                    family.name()
                ));
            }
        }
    }
    // The IPv6 prefix is local on the pod's lo while it is enrolled, and only then.
    let route = |pod: &Pod| {
        pod.exec("ip", &["-6", "route", "show", "table", "local", "100::/64"])
            .expect("ip route")
            .trim()
            .to_owned()
    };
    let enrolled = route(&app);
    if !enrolled.starts_with("local 100::/64 dev lo") || !enrolled.contains("src ::1") {
        failures.push(format!("route while enrolled: {enrolled:?}"));
    }
    agent.unenroll(&app.name);
    let after = route(&app);
    if !after.is_empty() {
        failures.push(format!("route after unenroll: {after:?}"));
    }
    failures.assert_none("two sockets on one pod address and port");
}

/// Captured connections to different destinations held open at once, more than one ephemeral
/// port range holds, IPv4 and IPv6: under iptables each destination has its own range (the
/// four-tuple keeps the original destination); with every connection sent to one proxy address
/// they would all share one. The pod's range is cut to 100 ports (a sysctl of the pod's own
/// network namespace, used by both families) so that 150 connections to 3 destinations need
/// three ranges. Before the spreading 50 failed (IPv4; IPv6 until `100::/64`).
#[test]
fn captured_destinations_have_their_own_port_ranges() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let app = node.add_pod("app").unwrap();
    let remote = node.add_pod("remote").unwrap();
    let mut targets = Vec::new();
    for f in Family::BOTH {
        targets.push(
            (0..3)
                .map(|i| sock(f.pod_ip(&remote), 31000 + i))
                .collect::<Vec<_>>(),
        );
    }
    let _echo = echo(&remote, APP_UID, &targets.concat());
    let _proxy = Proxy::start(&node, &app, ProxyDial::PodIp, "proxy.log");
    app.in_netns(|| std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "40000 40099"))
        .expect("enter netns")
        .expect("set the pod's ip_local_port_range");
    let agent = Agent::new();
    agent.enroll(&app, &[]);
    let mut failures = Failures::default();
    for (f, targets) in Family::BOTH.iter().zip(&targets) {
        let to: Vec<SocketAddr> = (0..150).map(|i| targets[i % 3]).collect();
        let got = addrs(&app, APP_UID, &to_args(&to));
        let failed: Vec<&Addrs> = got
            .iter()
            .filter(|g| g.error.is_some() || g.server.is_none() || g.peer != Some(g.to))
            .collect();
        if got.len() != 150 || !failed.is_empty() {
            failures.push(format!(
                "{}: {} reports, {} failed, first {:?}",
                f.name(),
                got.len(),
                failed.len(),
                failed.first()
            ));
        }
    }
    failures.assert_none("150 connections held open to 3 destinations, 100 ports");
}

/// An echo server on many addresses, ready when it says so: it prints one `listening` line per
/// address once every one is bound (a sock_diag wait per address is slow with a thousand
/// listeners in an emulated kernel).
fn echo_many(pod: &Pod, listen: &[SocketAddr]) -> PodProcess {
    use std::io::BufRead as _;
    let mut cmd = Command::new(testbed_bin());
    cmd.arg("echo").stdout(Stdio::piped());
    for a in listen {
        cmd.arg("--listen").arg(a.to_string());
    }
    let mut p = pod.spawn(APP_UID, cmd).expect("spawn echo");
    let out = p.child_mut().stdout.take().expect("piped");
    let mut lines = std::io::BufReader::new(out).lines();
    for a in listen {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("echo exited before listening on {a}"))
            .expect("read echo output");
        assert_eq!(line, format!("listening {a}"));
    }
    p
}

/// Destinations of the many-connections tests, and rounds over them in CI.
const DESTINATIONS: u16 = 1000;
const ROUNDS: u32 = 5;
/// The figure: 60 000 connections, 60 rounds over the 1 000 destinations.
const FULL_ROUNDS: u32 = 60;

/// How a many-connections run's pod is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    Redirect,
    /// Istio's iptables rules in the pod's own namespace.
    Iptables,
}

/// `rounds` rounds of short connections (each closed by the application first, so each leaves
/// a TIME_WAIT socket) from a new pod to 1 000 distinct destinations in another, through the
/// pod's proxy, captured as `capture` says. Asserts that every one succeeded (and, under
/// redirect, was captured, no map full); returns the load tool's report (its `elapsed_ms` is
/// for the benchmark, never judged here).
fn many_connections(capture: Capture, rounds: u32) -> serde_json::Value {
    let node = Node::new().unwrap();
    let app = node.add_pod("app").unwrap();
    let remote = node.add_pod("remote").unwrap();
    let ports: Vec<u16> = (0..DESTINATIONS).map(|i| 30000 + i).collect();
    let listen: Vec<SocketAddr> = ports.iter().map(|p| sock(remote.ip4, *p)).collect();
    let _echo = echo_many(&remote, &listen);
    let _proxy = Proxy::start(&node, &app, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    match capture {
        Capture::Redirect => {
            agent.enroll(&app, &[]);
        }
        Capture::Iptables => install_istio_rules(&app).expect("Istio's rules in the pod"),
    }
    let before = (capture == Capture::Redirect).then(|| agent.stats(&app.name));
    let mut args = to_args(&listen);
    args.extend(["--repeat".into(), rounds.to_string()]);
    let mut cmd = Command::new(testbed_bin());
    cmd.arg("addrs")
        .args(&args)
        .args(["--timeout-ms", &T.as_millis().to_string()])
        .stdout(Stdio::piped());
    let mut p = app.spawn(APP_UID, cmd).expect("spawn addrs");
    let mut out = String::new();
    p.child_mut()
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .expect("read addrs output");
    let status = p.child_mut().wait().expect("wait addrs");
    assert!(status.success(), "addrs --repeat: {status}");
    let mut report: serde_json::Value = serde_json::from_str(out.trim()).expect("report");
    let total = u64::from(DESTINATIONS) * u64::from(rounds);
    report["capture"] = format!("{capture:?}").to_lowercase().into();
    report["connections"] = total.into();
    report["destinations"] = DESTINATIONS.into();
    // One line per run, read by `cargo xtask bench connections`.
    println!("many connections: {report}");
    assert_eq!(report["ok"].as_u64(), Some(total), "{report}");
    if let Some(before) = before {
        let d = delta(&before, &agent.stats(&app.name));
        assert_eq!(d.get("outbound_captured").copied(), Some(total), "{d:?}");
        assert_eq!(d.get("map_full").copied().unwrap_or(0), 0, "{d:?}");
    }
    report
}

/// 5 000 short connections to 1 000 distinct destinations, all captured, none failing: the
/// issue's 60 000 scaled down to keep CI short on a shared two-CPU runner and in the kernel
/// matrix's emulated machines (20 000 took 500 s under qemu TCG on 5.10). The full size runs in
/// `sixty_thousand_connections_succeed_as_under_iptables`. (The captured destination is a
/// loopback address, so the kernel reuses TIME_WAIT ports, `tcp_tw_reuse=2`; the held-open case
/// above is the one that needs a range per destination.)
#[test]
fn many_short_connections_to_many_destinations_succeed() {
    require!(Need::Root, datapath());
    many_connections(Capture::Redirect, ROUNDS);
}

/// The full size: 60 000 short connections to 1 000 distinct destinations, under Istio's
/// iptables rules and under redirect, each in a pod of its own; every one succeeds under both
/// (under redirect all captured). Ignored in `cargo test` for its length (about 80 s per run on
/// the two-CPU runner); CI runs it as a step of its own (`cargo xtask test`, "60 000
/// connections"), and `cargo xtask bench connections` runs it and records the times in
/// BENCHMARKS.md.
#[test]
#[ignore = "full size (2 x 60 000 connections): a step of cargo xtask test, and cargo xtask bench connections"]
fn sixty_thousand_connections_succeed_as_under_iptables() {
    require!(Need::Root, datapath(), iptables());
    many_connections(Capture::Iptables, FULL_ROUNDS);
    many_connections(Capture::Redirect, FULL_ROUNDS);
}

/// The proxy's own call to its pod's address goes through its inbound listener (as under
/// iptables, uid 1337 `-o lo`); its socket's peer is still the address it dialled.
#[test]
fn proxy_self_call_reports_the_dialled_address() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let app = node.add_pod("app").unwrap();
    let _apps = matrix_apps(&app);
    let proxy = Proxy::start(&node, &app, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&app, &[]);
    let mut failures = Failures::default();
    for f in Family::BOTH {
        let to = sock(f.pod_ip(&app), WILDCARD_PORT);
        let seen = proxy.entries().len();
        let got = addrs(&app, PROXY_UID, &to_args(&[to]));
        let new = proxy.entries().split_off(seen);
        let g = &got[0];
        let ok = g.error.is_none()
            && g.local.map(|l| l.ip()) == Some(f.pod_ip(&app))
            && g.peer == Some(to)
            && g.server.is_some_and(|s| s.local == to)
            && new.len() == 1
            && new[0].listener == "inbound"
            && new[0].orig_dst == Some(to);
        if !ok {
            failures.push(format!("proxy -> {to}: got {g:?}, proxy {new:?}"));
        }
    }
    failures.assert_none("the proxy's call to its own pod");
}

/// Istio's rule generator, shared with the benchmark (its source, not its crate: the bench is a
/// binary).
#[allow(dead_code)]
#[path = "../../redirect-bench/src/istio.rs"]
mod istio;

/// Installs Istio's sidecar rules (REDIRECT mode, Istio >= 1.10) in `pod`'s own namespace,
/// IPv4 (`iptables-restore`).
fn install_istio_rules(pod: &Pod) -> Result<(), String> {
    let input = istio::restore_input(
        istio::Generation::Passthrough,
        &istio::Exclusions::default(),
    );
    restore(pod, "iptables-restore", &input)
}

/// Istio's IPv6 rules: istio-iptables writes the same chains for ip6tables, with `::6/128` and
/// `::1/128` where the IPv4 rules have `127.0.0.6/32` and `127.0.0.1/32` (the generator here
/// writes the IPv4 ones).
fn install_istio_rules6(pod: &Pod) -> Result<(), String> {
    let input = istio::restore_input(
        istio::Generation::Passthrough,
        &istio::Exclusions::default(),
    )
    .replace("127.0.0.6/32", "::6/128")
    .replace("127.0.0.1/32", "::1/128");
    assert!(!input.contains("127."), "an IPv4 address left: {input}");
    restore(pod, "ip6tables-restore", &input)
}

fn restore(pod: &Pod, tool: &str, input: &str) -> Result<(), String> {
    use std::io::Write as _;
    pod.in_netns(|| -> Result<(), String> {
        let mut child = Command::new(tool)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{tool}: {e}"))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    })
    .map_err(|e| e.to_string())?
}

fn iptables() -> Need {
    let found = ["iptables-restore", "ip6tables-restore"]
        .iter()
        .try_for_each(|tool| {
            Command::new(tool)
                .arg("--version")
                .output()
                .map_err(|e| format!("{tool}: {e}"))
                .and_then(|o| {
                    o.status
                        .success()
                        .then_some(())
                        .ok_or_else(|| format!("{tool} --version: {}", o.status))
                })
        });
    Need::machine(
        "iptables-restore, ip6tables-restore (Istio's rules in a test pod's namespace)",
        found,
    )
}

/// What the application sees of its connections, with its own pod's addresses written `POD`
/// (so that two pods' views compare): its socket's address, its peer, and the server it
/// reached; and what the proxy got as the original destination.
fn app_view(pod: &Pod, got: &[Addrs], proxy_new: &[ProxyLogEntry]) -> Vec<String> {
    let name = |a: Option<SocketAddr>, keep_port: bool| -> String {
        let Some(a) = a else {
            return "-".into();
        };
        let ip = match a.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let mapped = a.is_ipv6() && ip.is_ipv4();
        let ip = if ip == IpAddr::V4(pod.ip4) || ip == IpAddr::V6(pod.ip6) {
            "POD".to_string()
        } else {
            ip.to_string()
        };
        let ip = if mapped { format!("::ffff:{ip}") } else { ip };
        if keep_port {
            format!("{ip}:{}", a.port())
        } else {
            format!("{ip}:*")
        }
    };
    let mut view: Vec<String> = got
        .iter()
        .map(|g| {
            format!(
                "local {} peer {} server {} (its peer {}) error {:?}",
                name(g.local, false),
                name(g.peer, true),
                name(g.server.map(|s| s.local), true),
                name(g.server.map(|s| s.peer), false),
                g.error.as_ref().map(|_| "yes"),
            )
        })
        .collect();
    let mut origs: Vec<String> = proxy_new
        .iter()
        .map(|e| {
            format!(
                "proxy: {} peer {} orig_dst {} via {:?}",
                e.listener,
                name(Some(e.peer), false),
                name(e.orig_dst, true),
                e.orig_dst_source
            )
        })
        .collect();
    origs.sort();
    view.extend(origs);
    view
}

/// The same application in two pods, one under Istio's iptables rules and one enrolled, each
/// with its proxy: IPv4, IPv6 and a dual-stack socket's `::ffff:a.b.c.d`, one socket each and a
/// `SO_REUSEADDR` pair on one port to two servers. What the application sees (its socket's
/// address, its peer, the server it reached, the server's view of it) and the original
/// destination the proxy gets are the same (IPv6 under the same rules for ip6tables).
#[test]
fn application_sees_what_it_sees_under_istio_iptables() {
    require!(Need::Root, datapath(), iptables());
    let node = Node::new().unwrap();
    let nat = node.add_pod("nat").unwrap();
    let ebpf = node.add_pod("ebpf").unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let _ea = echo_on(&a, &[WILDCARD_PORT]);
    let _eb = echo_on(&b, &[WILDCARD_PORT]);
    let nat_proxy = Proxy::start(&node, &nat, ProxyDial::PodIp, "nat-proxy.log");
    let ebpf_proxy = Proxy::start(&node, &ebpf, ProxyDial::PodIp, "ebpf-proxy.log");
    install_istio_rules(&nat).expect("Istio's rules in the nat pod");
    install_istio_rules6(&nat).expect("Istio's IPv6 rules in the nat pod");
    let agent = Agent::new();
    agent.enroll(&ebpf, &[]);

    let mut failures = Failures::default();
    for (case, family, dual, pair) in [
        ("v4", Family::V4, false, false),
        ("v6", Family::V6, false, false),
        ("mapped", Family::V4, true, false),
        ("v4 REUSEADDR pair", Family::V4, false, true),
        ("v6 REUSEADDR pair", Family::V6, false, true),
        ("mapped REUSEADDR pair", Family::V4, true, true),
    ] {
        let targets = [
            sock(family.pod_ip(&a), WILDCARD_PORT),
            sock(family.pod_ip(&b), WILDCARD_PORT),
        ];
        let views: Vec<(Vec<String>, Vec<String>)> = [(&nat, &nat_proxy), (&ebpf, &ebpf_proxy)]
            .iter()
            .map(|(pod, proxy)| {
                let mut args = if pair {
                    to_args(&targets)
                } else {
                    to_args(&targets[..1])
                };
                if pair {
                    let bind = sock(family.pod_ip(pod), 22000 + u16::from(dual));
                    args.extend(["--bind".into(), bind.to_string(), "--reuseaddr".into()]);
                }
                if dual {
                    args.push("--mapped".into());
                }
                let seen = proxy.entries().len();
                let got = addrs(pod, APP_UID, &args);
                let new = proxy.entries().split_off(seen);
                let mut view = app_view(pod, &got, &new);
                // Under NAT a clashing pair's second connection reaches the proxy from another
                // source port (conntrack remaps it): only the original destinations compare.
                let proxy_view = view.split_off(got.len());
                (view, proxy_view)
            })
            .collect();
        let (nat_view, ebpf_view) = (&views[0], &views[1]);
        if nat_view != ebpf_view {
            failures.push(format!(
                "{case}: under iptables {nat_view:#?}\nunder redirect {ebpf_view:#?}"
            ));
        }
        if !nat_view.0.iter().all(|l| l.contains("error None")) {
            failures.push(format!("{case}: under iptables itself {nat_view:#?}"));
        }
    }
    failures.assert_none("the application's view, iptables against redirect");
}
