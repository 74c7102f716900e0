//! The datapath end to end, driven through the real `redirect-agent` CLI against the real
//! kernel: test-bed pods (netns on a CNI bridge, cgroup v2), the Envoy stand-in as uid 1337,
//! echo applications, and clients in other pods.
//!
//! Covers issue 2's "What it must show": the conformance matrix of DESIGN.md, one test per row
//! of the reference-semantics table, the proxy's life cycle, pods that are not enrolled, exact
//! counters, and enroll/unenroll behaviour. Needs root; without it each test says why and
//! returns, except under `CI=true`, where a skip is a failure.

mod common;

use std::{net::SocketAddr, path::Path};

use common::*;

const POLICIES: [InboundPolicy; 2] = InboundPolicy::ALL;

/// DESIGN.md's conformance matrix: what a client elsewhere gets from `app_port` of the server
/// pod under `policy`, from the one prediction of the matrix (`redirect_common::matrix`).
/// Reachability does not depend on the proxy's dial mode; the application's peer does under
/// `localhost`: a proxy that binds 127.0.0.6 / ::6 itself before dialling keeps that source
/// when the kernel sends it to loopback instead (still a loopback peer, as Istio's LOCALHOST
/// mode gives the application).
fn matrix_expect(
    server: &Pod,
    dial: ProxyDial,
    policy: InboundPolicy,
    f: Family,
    app_port: u16,
) -> Expect {
    let pod_ip = f.pod_ip(server);
    match matrix::expect(policy, app_bind(app_port), dial) {
        None => Expect::NoEcho,
        Some(cell) => Expect::Echo {
            local: cell.local(pod_ip, app_port).into(),
            peer: cell.peer_ip(pod_ip),
            direct: false,
        },
    }
}

/// Runs the 12 cells of one proxy configuration (2 policies x 2 families x 3 apps), changing
/// the policy by re-enrolling in place, and reports every failing cell at once.
fn conformance_matrix(delivery: ProxyDial) {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, delivery, "proxy.log");
    let agent = Agent::new();

    let mut failures = Failures::default();
    for policy in POLICIES {
        agent.enroll(&server, &["--inbound-policy", policy.name()]);
        for f in Family::BOTH {
            for port in [POD_IP_PORT, LOOPBACK_PORT, WILDCARD_PORT] {
                let to = sock(f.pod_ip(&server), port);
                let cell = format!(
                    "proxy {delivery}, policy {policy}, {}, app :{port}",
                    f.name()
                );
                let seen = proxy.entries().len();
                let got = probe(&client, to);
                let expect = matrix_expect(&server, delivery, policy, f, port);
                failures.check(&cell, expect, &got);
                // The connection went through the proxy's inbound listener, which learned the
                // original destination from SO_ORIGINAL_DST.
                let new = proxy.entries().split_off(seen);
                let ok = |e: &ProxyLogEntry| {
                    e.listener == "inbound"
                        && e.orig_dst == Some(to)
                        && e.orig_dst_source.as_deref() == Some("so_original_dst")
                        && (expect == Expect::NoEcho) != (e.result == "ok")
                };
                if new.len() != 1 || !ok(&new[0]) {
                    failures.push(format!(
                        "{cell}: expected one inbound proxy log entry with orig_dst {to} \
                         from so_original_dst, got {new:?}"
                    ));
                }
            }
        }
    }
    failures.assert_none(&format!("conformance matrix, proxy delivery {delivery}"));
}

#[test]
fn conformance_matrix_proxy_dials_loopback() {
    conformance_matrix(ProxyDial::Loopback);
}

#[test]
fn conformance_matrix_proxy_dials_pod_ip() {
    conformance_matrix(ProxyDial::PodIp);
}

/// The conformance matrix with HAProxy 2.6 (Debian's package) as the server pod's sidecar
/// instead of the test proxy: a third-party proxy that reads original destinations with
/// `SO_ORIGINAL_DST`. Every cell gives the matrix's answer, HAProxy logs one inbound
/// connection whose destination is the original one and which it dialled at that destination
/// (pod-IP delivery, from 127.0.0.6 / ::6) or at loopback, and for IPv4 redirect's
/// getsockopt program answered its `SO_ORIGINAL_DST` (`orig_dst_local`, one per connection).
fn conformance_matrix_haproxy(delivery: ProxyDial) {
    require!(Need::Root, datapath());
    if !Path::new("/usr/sbin/haproxy").exists() {
        // Not a kernel feature: `cargo xtask setup` installs it, so CI always runs this.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "haproxy is not installed (cargo xtask setup)"
        );
        eprintln!("skipped: haproxy is not installed (cargo xtask setup installs it)");
        return;
    }
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let haproxy = Haproxy::start(&node, &server, delivery, "haproxy");
    let agent = Agent::new();

    let mut failures = Failures::default();
    for policy in POLICIES {
        agent.enroll(&server, &["--inbound-policy", policy.name()]);
        for f in Family::BOTH {
            for port in [POD_IP_PORT, LOOPBACK_PORT, WILDCARD_PORT] {
                let to = sock(f.pod_ip(&server), port);
                let cell = format!(
                    "haproxy {delivery}, policy {policy}, {}, app :{port}",
                    f.name()
                );
                let seen = haproxy.entries().len();
                let before = agent.stats(&server.name);
                let got = probe(&client, to);
                let expect = matrix_expect(&server, delivery, policy, f, port);
                failures.check(&cell, expect, &got);
                let new = haproxy.new_entries(seen);
                let target = match delivery {
                    ProxyDial::PodIp => to,
                    ProxyDial::Loopback => sock(f.loopback(), port),
                };
                let ok = |e: &redirect_testbed::proxy::haproxy::HaproxyLogEntry| {
                    e.frontend == format!("inbound{}", if to.is_ipv4() { 4 } else { 6 })
                        && e.dst == to
                        && e.server == Some(target)
                        && (delivery == ProxyDial::Loopback
                            || e.source.is_none()
                            || e.source.map(|s| s.ip()) == Some(f.passthrough_src()))
                };
                if new.len() != 1 || !ok(&new[0]) {
                    failures.push(format!(
                        "{cell}: expected one inbound HAProxy log entry with dst {to} and \
                         server {target}, got {new:?}"
                    ));
                }
                let answered = delta(&before, &agent.stats(&server.name))
                    .get("orig_dst_local")
                    .copied()
                    .unwrap_or(0);
                let want = u64::from(to.is_ipv4());
                if answered != want {
                    failures.push(format!(
                        "{cell}: orig_dst_local moved by {answered}, expected {want} \
                         (HAProxy asks SO_ORIGINAL_DST at SOL_IP)"
                    ));
                }
            }
        }
    }
    failures.assert_none(&format!("conformance matrix, HAProxy delivery {delivery}"));
}

#[test]
fn conformance_matrix_haproxy_dials_loopback() {
    conformance_matrix_haproxy(ProxyDial::Loopback);
}

#[test]
fn conformance_matrix_haproxy_dials_pod_ip() {
    conformance_matrix_haproxy(ProxyDial::PodIp);
}

/// An echo application (uid 1000) on the wildcard addresses of both families, on each port.
fn wildcard_echo(pod: &Pod, ports: &[u16]) -> PodProcess {
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .flat_map(|p| Family::BOTH.map(|f| sock(f.unspecified(), *p)))
        .collect();
    echo(pod, APP_UID, &addrs)
}

/// Row "app (not 1337) -> own POD_IP or 127.0.0.1: never captured", under both policies: the
/// application reaches 127.0.0.1:18084 and its own POD_IP directly, no counter moves and the
/// proxy sees nothing.
#[test]
fn app_reaches_loopback_and_own_pod_ip_directly() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();

    let mut failures = Failures::default();
    for policy in POLICIES {
        agent.enroll(&server, &["--inbound-policy", policy.name()]);
        let before = agent.stats(&server.name);
        for f in Family::BOTH {
            for (ip, port) in [
                (f.loopback(), LOOPBACK_PORT),
                (f.loopback(), WILDCARD_PORT),
                (f.pod_ip(&server), POD_IP_PORT),
                (f.pod_ip(&server), WILDCARD_PORT),
            ] {
                let to = sock(ip, port);
                let got = connect_as(&server, APP_UID, to, None);
                let expect = Expect::Echo {
                    local: to,
                    peer: ip,
                    direct: true,
                };
                failures.check(format!("policy {policy}, app -> {to}"), expect, &got);
            }
        }
        let d = delta(&before, &agent.stats(&server.name));
        if !d.is_empty() {
            failures.push(format!("policy {policy}: counters moved: {d:?}"));
        }
    }
    let entries = proxy.entries();
    if !entries.is_empty() {
        failures.push(format!("the proxy saw connections: {entries:?}"));
    }
    failures.assert_none("application's own-pod traffic");
}

/// Row "proxy delivers inbound to the app: connects POD_IP:P from 127.0.0.6": reaches the app
/// at POD_IP:P and is not captured again (no proxy log entry), under the passthrough policy.
#[test]
fn proxy_delivery_from_passthrough_source_is_not_captured_again() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&server, &[]);

    let mut failures = Failures::default();
    for f in Family::BOTH {
        for port in [POD_IP_PORT, WILDCARD_PORT] {
            let to = sock(f.pod_ip(&server), port);
            let before = agent.stats(&server.name);
            let got = connect_as(&server, PROXY_UID, to, Some(f.passthrough_src()));
            let expect = Expect::Echo {
                local: to,
                peer: f.passthrough_src(),
                direct: true,
            };
            failures.check(
                format!("proxy from {} -> {to}", f.passthrough_src()),
                expect,
                &got,
            );
            let d = delta(&before, &agent.stats(&server.name));
            let want = counters(&[("delivered_pod_ip", 1)]);
            let want = delta(&counters(&[]), &want);
            if d != want {
                failures.push(format!("{to}: counters moved {d:?}, expected {want:?}"));
            }
        }
    }
    let entries = proxy.entries();
    if !entries.is_empty() {
        failures.push(format!("the proxy saw connections: {entries:?}"));
    }
    failures.assert_none("proxy delivery from the passthrough source");
}

/// Row "proxy (outbound side) -> own POD_IP:P": the proxy's connection to its own pod address
/// (a Service VIP whose endpoint is this pod) goes through its inbound listener, which learns
/// POD_IP:P from SO_ORIGINAL_DST, and the pod's policy then applies to the delivery.
#[test]
fn proxy_to_own_pod_ip_goes_through_inbound_listener() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::Loopback, "proxy.log");
    let agent = Agent::new();

    let mut failures = Failures::default();
    for policy in POLICIES {
        agent.enroll(&server, &["--inbound-policy", policy.name()]);
        for f in Family::BOTH {
            for port in [POD_IP_PORT, WILDCARD_PORT] {
                let to = sock(f.pod_ip(&server), port);
                let cell = format!("policy {policy}, proxy -> {to}");
                let before = agent.stats(&server.name);
                let seen = proxy.entries().len();
                let got = connect_as(&server, PROXY_UID, to, None);
                let (expect, delivered) = match (policy, port) {
                    (InboundPolicy::Passthrough, p) => (
                        Expect::Echo {
                            local: sock(f.pod_ip(&server), p),
                            peer: f.passthrough_src(),
                            direct: false,
                        },
                        vec![("delivered_pod_ip", 1)],
                    ),
                    (_, POD_IP_PORT) => (
                        Expect::NoEcho,
                        vec![("delivered_loopback", 1), ("delivery_refused", 1)],
                    ),
                    (_, p) => (
                        Expect::Echo {
                            local: sock(f.loopback(), p),
                            peer: f.loopback(),
                            direct: false,
                        },
                        vec![("delivered_loopback", 1)],
                    ),
                };
                failures.check(&cell, expect, &got);
                let new = proxy.entries().split_off(seen);
                let ok = new.len() == 1
                    && new[0].listener == "inbound"
                    && new[0].local == sock(f.loopback(), 15006)
                    && new[0].orig_dst == Some(to)
                    && new[0].orig_dst_source.as_deref() == Some("so_original_dst")
                    && got.local().is_none_or(|l| l == new[0].peer);
                if !ok {
                    failures.push(format!(
                        "{cell}: expected one inbound entry at {} with orig_dst {to} from \
                         so_original_dst, got {new:?}",
                        sock(f.loopback(), 15006)
                    ));
                }
                let mut want = vec![("proxy_self_captured", 1), ("orig_dst_hit", 1)];
                want.extend(delivered);
                let want = delta(&counters(&[]), &counters(&want));
                let d = delta(&before, &agent.stats(&server.name));
                if d != want {
                    failures.push(format!("{cell}: counters moved {d:?}, expected {want:?}"));
                }
            }
        }
    }
    failures.assert_none("proxy to its own pod address");
}

/// Row "proxy -> anywhere off-pod, proxy -> 127.0.0.1": the proxy's upstream connections to
/// other pods are never captured, nor are the proxy's own ports over loopback (an admin port
/// on 127.0.0.1:15000), whoever dials them.
#[test]
fn proxy_off_pod_and_proxy_ports_are_not_captured() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let other = node.add_pod("other").unwrap();
    let _remote = wildcard_echo(&other, &[WILDCARD_PORT]);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let _admin = echo(
        &server,
        PROXY_UID,
        &Family::BOTH.map(|f| sock(f.loopback(), 15000)),
    );
    let agent = Agent::new();
    agent.enroll(&server, &[]);
    let before = agent.stats(&server.name);

    let mut failures = Failures::default();
    for f in Family::BOTH {
        let to = sock(f.pod_ip(&other), WILDCARD_PORT);
        let got = connect_as(&server, PROXY_UID, to, None);
        let expect = Expect::Echo {
            local: to,
            peer: f.pod_ip(&server),
            direct: true,
        };
        failures.check(format!("proxy -> off-pod {to}"), expect, &got);
        let admin = sock(f.loopback(), 15000);
        for (who, uid) in [("proxy", PROXY_UID), ("app", APP_UID)] {
            let got = connect_as(&server, uid, admin, None);
            let expect = Expect::Echo {
                local: admin,
                peer: f.loopback(),
                direct: true,
            };
            failures.check(format!("{who} -> {admin}"), expect, &got);
        }
    }
    let d = delta(&before, &agent.stats(&server.name));
    if !d.is_empty() {
        failures.push(format!("counters moved: {d:?}"));
    }
    let entries = proxy.entries();
    if !entries.is_empty() {
        failures.push(format!("the proxy saw connections: {entries:?}"));
    }
    failures.assert_none("proxy's own traffic");
}

/// Row "app -> anything else": the application's connection to another pod reaches the proxy's
/// outbound listener, and SO_ORIGINAL_DST (SOL_IP and SOL_IPV6) gives the exact original
/// address and port; the proxy then reaches the real server.
#[test]
fn app_outbound_is_captured_with_exact_original_destination() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let other = node.add_pod("other").unwrap();
    let ports = [WILDCARD_PORT, 18088];
    let _remote = wildcard_echo(&other, &ports);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&server, &[]);
    let before = agent.stats(&server.name);

    let mut failures = Failures::default();
    for f in Family::BOTH {
        for port in ports {
            let to = sock(f.pod_ip(&other), port);
            let cell = format!("app -> {to}");
            let seen = proxy.entries().len();
            let got = connect_as(&server, APP_UID, to, None);
            let expect = Expect::Echo {
                local: to,
                peer: f.pod_ip(&server),
                direct: false,
            };
            failures.check(&cell, expect, &got);
            let new = proxy.entries().split_off(seen);
            let ok = new.len() == 1
                && new[0].listener == "outbound"
                && is_outbound_listener(new[0].local)
                && got.local() == Some(new[0].peer)
                && new[0].orig_dst == Some(to)
                && new[0].orig_dst_source.as_deref() == Some("so_original_dst")
                && new[0].upstream == Some(to)
                && new[0].result == "ok";
            if !ok {
                failures.push(format!(
                    "{cell}: expected one outbound entry at the outbound listener (127.128.0.0/12 \
                     or [::1], port 15001) from the app's socket {:?} with orig_dst {to} from \
                     so_original_dst, got {new:?}",
                    got.local()
                ));
            }
        }
    }
    let d = delta(&before, &agent.stats(&server.name));
    let want = delta(
        &counters(&[]),
        &counters(&[("outbound_captured", 4), ("orig_dst_hit", 4)]),
    );
    if d != want {
        failures.push(format!("counters moved {d:?}, expected {want:?}"));
    }
    failures.assert_none("application's outbound capture");
}

/// Inbound ports 15008, 15020, 15021, 15090 and the operator's `--exclude-inbound-ports` are
/// never captured: a client elsewhere reaches the application directly.
#[test]
fn excluded_inbound_ports_bypass_the_proxy() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let excluded = [15008, 15020, 15021, 15090, 18086, 18087];
    let _apps = wildcard_echo(&server, &excluded);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&server, &["--exclude-inbound-ports", "18086,18087"]);

    let mut failures = Failures::default();
    for f in Family::BOTH {
        for port in excluded {
            let to = sock(f.pod_ip(&server), port);
            let got = probe(&client, to);
            let expect = Expect::Echo {
                local: to,
                peer: f.pod_ip(&client),
                direct: true,
            };
            failures.check(format!("client -> excluded {to}"), expect, &got);
        }
    }
    let entries = proxy.entries();
    if !entries.is_empty() {
        failures.push(format!("the proxy saw connections: {entries:?}"));
    }
    failures.assert_none("excluded inbound ports");
}

/// The `inbound_excluded` counter shows every inbound connection that an exclusion let
/// through: the operator's ports and Istio's default ones (15008, 15020, 15021, 15090).
///
/// PRODUCT BUG (failing when written, at a3e3e7e): `redirect-ebpf/src/sk_lookup.rs` returns
/// `SK_PASS` for `is_proxy_port(port)` before it looks at the exclusion rules, and
/// `redirect_common::PROXY_PORTS` contains the four default excluded ports, so connections to
/// them pass uncounted: `inbound_excluded` is 4 (the two user-excluded ports, both families)
/// where 12 are expected. The connections themselves are handled right (see
/// `excluded_inbound_ports_bypass_the_proxy`); only `stats` does not show them.
#[test]
fn excluded_inbound_connections_are_counted() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let excluded = [15008, 15020, 15021, 15090, 18086, 18087];
    let _apps = wildcard_echo(&server, &excluded);
    let _proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&server, &["--exclude-inbound-ports", "18086,18087"]);
    let before = agent.stats(&server.name);
    for f in Family::BOTH {
        for port in excluded {
            let to = sock(f.pod_ip(&server), port);
            let got = probe(&client, to);
            assert!(got.is_echoed(), "client -> {to}: {got:?}");
        }
    }
    let d = delta(&before, &agent.stats(&server.name));
    // One excluded inbound connection per port and family.
    let want = delta(&counters(&[]), &counters(&[("inbound_excluded", 12)]));
    assert_eq!(
        d, want,
        "counters after 12 excluded inbound connections (4 default ports + 2 user ports, \
         IPv4 and IPv6)"
    );
}

/// `--exclude-outbound-ports` and `--exclude-outbound-cidrs` (IPv4 and IPv6) let the
/// application's connections go straight to their destination; the rest is still captured.
#[test]
fn excluded_outbound_ports_and_cidrs_bypass_the_proxy() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let kept = node.add_pod("kept").unwrap();
    let skipped = node.add_pod("skipped").unwrap();
    let _e1 = wildcard_echo(&kept, &[WILDCARD_PORT, 18090]);
    let _e2 = wildcard_echo(&skipped, &[WILDCARD_PORT]);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let cidrs = format!("{}/32,{}/128", skipped.ip4, skipped.ip6);
    agent.enroll(
        &server,
        &[
            "--exclude-outbound-ports",
            "18090",
            "--exclude-outbound-cidrs",
            &cidrs,
        ],
    );
    let before = agent.stats(&server.name);

    let mut failures = Failures::default();
    for f in Family::BOTH {
        for (to, direct) in [
            (sock(f.pod_ip(&kept), 18090), true),
            (sock(f.pod_ip(&skipped), WILDCARD_PORT), true),
            (sock(f.pod_ip(&kept), WILDCARD_PORT), false),
        ] {
            let got = connect_as(&server, APP_UID, to, None);
            let expect = Expect::Echo {
                local: to,
                peer: f.pod_ip(&server),
                direct,
            };
            failures.check(format!("app -> {to}"), expect, &got);
        }
    }
    let seen: Vec<_> = proxy.entries().iter().filter_map(|e| e.orig_dst).collect();
    let want_seen: Vec<_> = Family::BOTH
        .iter()
        .map(|f| sock(f.pod_ip(&kept), WILDCARD_PORT))
        .collect();
    if seen != want_seen {
        failures.push(format!(
            "the proxy saw {seen:?}, expected only {want_seen:?}"
        ));
    }
    let d = delta(&before, &agent.stats(&server.name));
    let want = delta(
        &counters(&[]),
        &counters(&[
            ("outbound_excluded", 4),
            ("outbound_captured", 2),
            ("orig_dst_hit", 2),
        ]),
    );
    if d != want {
        failures.push(format!("counters moved {d:?}, expected {want:?}"));
    }
    failures.assert_none("outbound exclusions");
}

/// No inbound listener: the pod's inbound connections are refused (not blackholed, not
/// delivered around the proxy), for both families.
fn refused_inbound(client: &Pod, server: &Pod) -> Option<String> {
    let mut why = Vec::new();
    for f in Family::BOTH {
        let to = sock(f.pod_ip(server), WILDCARD_PORT);
        let got = probe(client, to);
        if got != Outcome::Refused {
            why.push(format!("client -> {to}: expected refused, got {got:?}"));
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// A proxy that was listening before its pod was enrolled is adopted at enroll.
#[test]
fn proxy_listening_before_enroll_is_adopted() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let out = agent.enroll(&server, &[]);
    assert!(
        out.contains("adopted 2 running proxy listener(s)"),
        "enroll output: {out}"
    );
    if let Some(why) = captured_inbound(&client, &server, &proxy) {
        panic!("adopted proxy: {why}");
    }
    let stats = agent.stats(&server.name);
    assert_eq!(stats["inbound_captured"], 2, "{stats:?}");
    assert_eq!(stats["listener_registered"], 0, "{stats:?}");
}

/// A proxy that starts after enroll is registered when it listens (sock_ops); until then the
/// pod's inbound connections are refused and counted as `inbound_no_listener`.
#[test]
fn proxy_started_after_enroll_is_registered() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let agent = Agent::new();
    let out = agent.enroll(&server, &[]);
    assert!(
        out.contains("proxy not listening yet"),
        "enroll output: {out}"
    );
    if let Some(why) = refused_inbound(&client, &server) {
        panic!("before the proxy started: {why}");
    }
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    if let Some(why) = captured_inbound(&client, &server, &proxy) {
        panic!("proxy started after enroll: {why}");
    }
    let stats = agent.stats(&server.name);
    let want = counters(&[
        ("inbound_no_listener", 2),
        ("listener_registered", 2),
        ("inbound_captured", 2),
        ("orig_dst_local", 2),
        ("delivered_pod_ip", 2),
    ]);
    assert_eq!(stats, want);
}

/// The proxy restarts (killed, a new process with new listening sockets) twice; capture
/// follows each new proxy without re-enrolling, inbound and outbound.
#[test]
fn proxy_restart_keeps_capture_without_reenroll() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let _remote = wildcard_echo(&client, &[18089]);
    let mut proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy-0.log");
    let agent = Agent::new();
    agent.enroll(&server, &[]);
    if let Some(why) = captured_inbound(&client, &server, &proxy) {
        panic!("first proxy: {why}");
    }
    for generation in 1..=2 {
        proxy.kill();
        if let Some(why) = refused_inbound(&client, &server) {
            panic!("proxy {generation} killed: {why}");
        }
        proxy = Proxy::start(
            &node,
            &server,
            ProxyDial::PodIp,
            &format!("proxy-{generation}.log"),
        );
        if let Some(why) = captured_inbound(&client, &server, &proxy) {
            panic!("proxy generation {generation}: {why}");
        }
        for f in Family::BOTH {
            let to = sock(f.pod_ip(&client), 18089);
            let got = connect_as(&server, APP_UID, to, None);
            let expect = Expect::Echo {
                local: to,
                peer: f.pod_ip(&server),
                direct: false,
            };
            if let Some(why) = expect.check(&got) {
                panic!("proxy generation {generation}, app -> {to}: {why}");
            }
            assert!(
                proxy
                    .entries()
                    .iter()
                    .any(|e| e.listener == "outbound" && e.orig_dst == Some(to)),
                "proxy generation {generation} did not see app -> {to}: {:?}",
                proxy.entries()
            );
        }
    }
    let stats = agent.stats(&server.name);
    assert_eq!(stats["listener_registered"], 4, "{stats:?}");
    assert_eq!(stats["inbound_no_listener"], 4, "{stats:?}");
    assert_eq!(stats["inbound_captured"], 6, "{stats:?}");
}

/// Everything a pod's neighbours, application and proxy-uid processes can observe of it:
/// used to compare a pod with the plain kernel.
fn observe(client: &Pod, pod: &Pod) -> Vec<String> {
    let mut seen = Vec::new();
    let show = |o: &Outcome| match o {
        Outcome::Echoed { server, local } => format!(
            "echoed by {} from {}{}",
            server.local,
            server.peer.ip(),
            if server.peer == *local {
                " (direct)"
            } else {
                " (via another socket)"
            }
        ),
        o => o.result().to_owned(),
    };
    for f in Family::BOTH {
        for port in [POD_IP_PORT, LOOPBACK_PORT, WILDCARD_PORT] {
            let to = sock(f.pod_ip(pod), port);
            seen.push(format!("client -> {to}: {}", show(&probe(client, to))));
        }
        for (who, uid) in [("app", APP_UID), ("proxy-uid", PROXY_UID)] {
            for to in [
                sock(f.pod_ip(client), 18089),
                sock(f.pod_ip(pod), WILDCARD_PORT),
                sock(f.pod_ip(pod), LOOPBACK_PORT),
                sock(f.loopback(), LOOPBACK_PORT),
                sock(f.loopback(), WILDCARD_PORT),
            ] {
                let got = connect_as(pod, uid, to, None);
                seen.push(format!("{who} -> {to}: {}", show(&got)));
            }
        }
    }
    seen
}

/// A pod that is not enrolled behaves exactly as with no redirect at all, while another pod
/// of the same node is enrolled with the same datapath; its own proxy (running, same uid) sees
/// nothing.
#[test]
fn pod_not_enrolled_behaves_as_plain_kernel() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let plain = node.add_pod("plain").unwrap();
    let enrolled = node.add_pod("enrolled").unwrap();
    let client = node.add_pod("client").unwrap();
    let _remote = wildcard_echo(&client, &[18089]);
    let _apps = matrix_apps(&plain);
    let _apps2 = matrix_apps(&enrolled);
    let proxy = Proxy::start(&node, &plain, ProxyDial::PodIp, "plain.log");
    let proxy2 = Proxy::start(&node, &enrolled, ProxyDial::PodIp, "enrolled.log");
    let lo_before = lo_addresses(&plain);

    let baseline = observe(&client, &plain);
    let agent = Agent::new();
    agent.enroll(&enrolled, &[]);
    if let Some(why) = captured_inbound(&client, &enrolled, &proxy2) {
        panic!("the enrolled pod is not redirected: {why}");
    }
    let now = observe(&client, &plain);
    let diff: Vec<String> = baseline
        .iter()
        .zip(&now)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("plain kernel: {a}\n    next to an enrolled pod: {b}"))
        .collect();
    assert!(diff.is_empty(), "differences:\n  {}", diff.join("\n  "));
    assert_eq!(
        proxy.entries(),
        vec![],
        "the not-enrolled pod's proxy saw traffic"
    );
    assert_eq!(lo_addresses(&plain), lo_before, "the pod's lo changed");
    assert!(
        cgroup_programs(&plain.cgroup).is_empty(),
        "programs attached to the not-enrolled pod's cgroup:\n{}",
        cgroup_programs(&plain.cgroup)
    );
}

/// After a known sequence of connections, `stats --name X --output json` (and `stats --output
/// json`) show exactly the expected count of every counter, across a policy update in place.
#[test]
fn stats_show_exact_counts_after_known_connections() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let _excluded_app = wildcard_echo(&server, &[18086]);
    let _remote = wildcard_echo(&client, &[WILDCARD_PORT, 18090]);
    let agent = Agent::new();
    let options = ["--exclude-inbound-ports", "18086"];
    let options = [&options[..], &["--exclude-outbound-ports", "18090"]].concat();
    agent.enroll(&server, &options);
    assert_eq!(agent.stats(&server.name), counters(&[]), "fresh pod");
    // Registered by sock_ops as it listens: 15006 over IPv4 and IPv6.
    let mut proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let (v4, v6) = (Family::V4, Family::V6);
    let expect = |what: &str, e: Expect, got: Outcome| {
        if let Some(why) = e.check(&got) {
            panic!("{what}: {why}");
        }
    };
    let echo_at = |ip, port| Expect::EchoAt {
        local: sock(ip, port),
    };

    // Inbound, captured and delivered to the pod IP: 3 echoed, 1 refused at delivery.
    for _ in 0..2 {
        let got = probe(&client, sock(server.ip4, WILDCARD_PORT));
        expect(
            "client -> :18080",
            echo_at(server.ip4.into(), WILDCARD_PORT),
            got,
        );
    }
    let got = probe(&client, sock(server.ip4, LOOPBACK_PORT));
    expect("client -> :18084", Expect::NoEcho, got);
    let got = probe(&client, sock(server.ip6, POD_IP_PORT));
    expect(
        "client -> [v6]:18082",
        echo_at(server.ip6.into(), POD_IP_PORT),
        got,
    );
    // Inbound, excluded.
    let got = probe(&client, sock(server.ip4, 18086));
    expect("client -> :18086", echo_at(server.ip4.into(), 18086), got);
    // The application: captured, excluded, and its own loopback (nothing).
    let to = sock(client.ip4, WILDCARD_PORT);
    expect(
        "app -> client",
        echo_at(to.ip(), to.port()),
        connect_as(&server, APP_UID, to, None),
    );
    let to = sock(client.ip6, 18090);
    expect(
        "app -> client:18090",
        echo_at(to.ip(), to.port()),
        connect_as(&server, APP_UID, to, None),
    );
    let to = sock(v4.loopback(), LOOPBACK_PORT);
    expect(
        "app -> lo",
        echo_at(to.ip(), to.port()),
        connect_as(&server, APP_UID, to, None),
    );
    // The proxy to its own pod address: through the inbound listener, then delivered.
    let to = sock(server.ip4, WILDCARD_PORT);
    expect(
        "proxy -> own pod",
        echo_at(to.ip(), to.port()),
        connect_as(&server, PROXY_UID, to, None),
    );
    // Update in place to localhost: counters continue; one delivery to loopback.
    let localhost = [&options[..], &["--inbound-policy", "localhost"]].concat();
    agent.enroll(&server, &localhost);
    let got = probe(&client, sock(server.ip6, LOOPBACK_PORT));
    expect(
        "client -> [v6]:18084",
        echo_at(v6.loopback(), LOOPBACK_PORT),
        got,
    );
    // No proxy: refused.
    proxy.kill();
    let got = probe(&client, sock(server.ip4, WILDCARD_PORT));
    assert_eq!(got, Outcome::Refused, "no proxy");

    let want = counters(&[
        ("inbound_captured", 5),
        ("inbound_excluded", 1),
        ("inbound_no_listener", 1),
        ("outbound_captured", 1),
        ("outbound_excluded", 1),
        ("proxy_self_captured", 1),
        ("delivered_pod_ip", 5),
        ("delivered_loopback", 1),
        ("delivery_refused", 1),
        ("orig_dst_hit", 2),
        ("orig_dst_local", 5),
        ("listener_registered", 2),
    ]);
    assert_eq!(agent.stats(&server.name), want, "stats --name");
    let all: serde_json::Value =
        serde_json::from_str(&agent.ok(&["stats", "--output", "json"])).unwrap();
    assert_eq!(
        all,
        serde_json::json!({"pods": [{"name": server.name, "counters": want}]}),
        "stats --output json"
    );
}

/// `unenroll` restores plain behaviour at once; with two pods enrolled, unenrolling one leaves
/// the other redirected; the last unenroll removes every pin.
#[test]
fn unenroll_restores_plain_behaviour_and_keeps_other_pods() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let client = node.add_pod("client").unwrap();
    let _remote = wildcard_echo(&client, &[18089]);
    let _apps_a = matrix_apps(&a);
    let _apps_b = matrix_apps(&b);
    let proxy_a = Proxy::start(&node, &a, ProxyDial::PodIp, "a.log");
    let proxy_b = Proxy::start(&node, &b, ProxyDial::PodIp, "b.log");
    let lo_a = lo_addresses(&a);
    let baseline = observe(&client, &a);
    assert_eq!(proxy_a.entries(), vec![], "plain kernel");

    let agent = Agent::new();
    agent.enroll(&a, &[]);
    agent.enroll(&b, &[]);
    for (pod, proxy) in [(&a, &proxy_a), (&b, &proxy_b)] {
        if let Some(why) = captured_inbound(&client, pod, proxy) {
            panic!("{} enrolled: {why}", pod.name);
        }
    }
    assert_ne!(lo_addresses(&a), lo_a, "enroll adds ::6 to lo");

    agent.unenroll(&a.name);
    let seen = proxy_a.entries().len();
    let now = observe(&client, &a);
    let diff: Vec<String> = baseline
        .iter()
        .zip(&now)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| format!("before enroll: {x}\n    after unenroll: {y}"))
        .collect();
    assert!(diff.is_empty(), "differences:\n  {}", diff.join("\n  "));
    assert_eq!(
        proxy_a.entries().len(),
        seen,
        "a's proxy saw traffic after unenroll"
    );
    assert_eq!(lo_addresses(&a), lo_a, "unenroll removes ::6 from lo");
    assert_eq!(
        cgroup_programs(&a.cgroup),
        "",
        "programs left on a's cgroup"
    );
    assert_eq!(agent.listed_names(), vec![b.name.clone()]);
    assert!(
        !tree(&agent.pin_root).iter().any(|p| p.contains(&a.name)),
        "a's pins left: {:?}",
        tree(&agent.pin_root)
    );

    // b is untouched: inbound and outbound capture both still work.
    if let Some(why) = captured_inbound(&client, &b, &proxy_b) {
        panic!("b after a's unenroll: {why}");
    }
    let to = sock(client.ip4, 18089);
    let got = connect_as(&b, APP_UID, to, None);
    let expect = Expect::Echo {
        local: to,
        peer: b.ip4.into(),
        direct: false,
    };
    if let Some(why) = expect.check(&got) {
        panic!("b's app -> {to} after a's unenroll: {why}");
    }

    agent.unenroll(&b.name);
    if let Some(why) = direct_inbound(&client, &b) {
        panic!("b after unenroll: {why}");
    }
    assert_eq!(agent.listed_names(), Vec::<String>::new());
    assert_eq!(agent.records(), Vec::<String>::new());
    assert!(
        !agent.pin_root.exists(),
        "the last unenroll leaves {:?}",
        tree(&agent.pin_root)
    );
}

/// Enrolling the same pod twice with the same settings changes nothing: same list, same pins,
/// same attachments, same `lo`, same behaviour, and the counters keep counting.
#[test]
fn enroll_twice_is_idempotent() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let options = [
        "--inbound-policy",
        "passthrough",
        "--port-policy",
        "18084=localhost",
        "--exclude-inbound-ports",
        "18086",
    ];
    let first = agent.enroll(&server, &options);
    assert!(first.starts_with("enrolled "), "{first}");
    let list = agent.list();
    let pins = tree(&agent.pin_root);
    let lo = lo_addresses(&server);
    let progs = cgroup_programs(&server.cgroup);
    if let Some(why) = captured_inbound(&client, &server, &proxy) {
        panic!("after the first enroll: {why}");
    }

    let second = agent.enroll(&server, &options);
    assert!(second.starts_with("updated "), "{second}");
    assert_eq!(agent.list(), list, "list");
    assert_eq!(tree(&agent.pin_root), pins, "pins");
    assert_eq!(lo_addresses(&server), lo, "lo");
    assert_eq!(cgroup_programs(&server.cgroup), progs, "cgroup attachments");
    if let Some(why) = captured_inbound(&client, &server, &proxy) {
        panic!("after the second enroll: {why}");
    }
    // The per-port policy still holds: loopback app reachable on 18084.
    let to = sock(server.ip4, LOOPBACK_PORT);
    let got = probe(&client, to);
    let expect = Expect::EchoAt {
        local: sock(Family::V4.loopback(), LOOPBACK_PORT),
    };
    if let Some(why) = expect.check(&got) {
        panic!("client -> {to} with 18084=localhost: {why}");
    }
    let stats = agent.stats(&server.name);
    assert_eq!(stats["inbound_captured"], 5, "{stats:?}");
}

/// Each CLI command acts once and exits: the enrolling process is gone, the pod stays
/// redirected through its pinned links, and a new process unenrolls it.
#[test]
fn redirection_outlives_the_enrolling_process() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();

    let mut args = Agent::enroll_args(&server, &server.name);
    args.push("--inbound-policy".into());
    args.push("passthrough".into());
    let mut child = agent.cmd().args(&args).spawn().unwrap();
    let pid = child.id();
    assert!(child.wait().unwrap().success(), "enroll");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the enrolling process {pid} is still there"
    );
    let links = tree(&agent.pin_root.join("pods").join(&server.name));
    assert_eq!(
        links.len(),
        redirect_agent::datapath::Hook::ALL.len(),
        "pinned links: {links:?}"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    if let Some(why) = captured_inbound(&client, &server, &proxy) {
        panic!("after the enrolling process exited: {why}");
    }

    let out = agent
        .cmd()
        .args(["unenroll", "--name", &server.name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "unenroll by a new process: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(why) = direct_inbound(&client, &server) {
        panic!("after unenroll by a new process: {why}");
    }
    assert!(
        !agent.pin_root.exists(),
        "pins left after the last unenroll"
    );
}

/// `--port-policy` overrides the pod's policy for one port, both ways, both families.
#[test]
fn port_policy_overrides_the_pod_policy() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let _proxy = Proxy::start(&node, &server, ProxyDial::Loopback, "proxy.log");
    let agent = Agent::new();

    let mut failures = Failures::default();
    for (policy, port_policy, overridden) in [
        (
            InboundPolicy::Passthrough,
            "18084=localhost",
            InboundPolicy::Localhost,
        ),
        (
            InboundPolicy::Localhost,
            "18082=passthrough",
            InboundPolicy::Passthrough,
        ),
    ] {
        agent.enroll(
            &server,
            &[
                "--inbound-policy",
                policy.name(),
                "--port-policy",
                port_policy,
            ],
        );
        for f in Family::BOTH {
            for port in [POD_IP_PORT, LOOPBACK_PORT, WILDCARD_PORT] {
                let effective = if port_policy.starts_with(&port.to_string()) {
                    overridden
                } else {
                    policy
                };
                let to = sock(f.pod_ip(&server), port);
                let got = probe(&client, to);
                let expect = matrix_expect(&server, ProxyDial::Loopback, effective, f, port);
                failures.check(
                    format!("policy {policy} with {port_policy}: client -> {to}"),
                    expect,
                    &got,
                );
            }
        }
    }
    failures.assert_none("per-port policies");
}

/// Enrolling again with another policy updates the pod in place: a connection established
/// through the proxy before the update keeps working, new connections follow the new policy.
#[test]
fn update_in_place_keeps_established_connections() {
    use std::io::{Read as _, Write as _};
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let _proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&server, &["--inbound-policy", "passthrough"]);

    let mut open = Vec::new();
    for f in Family::BOTH {
        let to = sock(f.pod_ip(&server), WILDCARD_PORT);
        let mut s = client
            .in_netns(|| std::net::TcpStream::connect_timeout(&to, T))
            .unwrap()
            .unwrap_or_else(|e| panic!("connect {to}: {e}"));
        s.set_read_timeout(Some(T)).unwrap();
        // The banner: where the proxy delivered it under passthrough.
        let mut banner = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            s.read_exact(&mut byte).unwrap();
            banner.push(byte[0]);
        }
        let banner: redirect_testbed::Banner = serde_json::from_slice(&banner).unwrap();
        assert_eq!(
            banner.local, to,
            "delivered to the pod IP before the update"
        );
        open.push((to, s));
    }

    agent.enroll(&server, &["--inbound-policy", "localhost"]);

    for (to, mut s) in open {
        s.write_all(PAYLOAD).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back)
            .unwrap_or_else(|e| panic!("established connection to {to} after the update: {e}"));
        assert_eq!(
            back, PAYLOAD,
            "echo on the connection to {to} established before"
        );
    }
    for f in Family::BOTH {
        let to = sock(f.pod_ip(&server), WILDCARD_PORT);
        let got = probe(&client, to);
        let expect = Expect::EchoAt {
            local: sock(f.loopback(), WILDCARD_PORT),
        };
        if let Some(why) = expect.check(&got) {
            panic!("new connection to {to} after the update to localhost: {why}");
        }
    }
}
