//! The datapath end to end, driven through the real `redirect-agent` CLI against the real
//! kernel: test-bed pods (netns on a CNI bridge, cgroup v2), the Envoy stand-in as uid 1337,
//! echo applications, and clients in other pods.
//!
//! Covers issue 2's "What it must show": the conformance matrix of DESIGN.md, one test per row
//! of the reference-semantics table, the proxy's life cycle, pods that are not enrolled, exact
//! counters, and enroll/unenroll behaviour. Needs root; without it each test says why and
//! returns, except under `CI=true`, where a skip is a failure.

mod common;

use std::net::SocketAddr;

use common::*;

const POLICIES: [&str; 2] = ["passthrough", "localhost"];

/// DESIGN.md's conformance matrix: what a client elsewhere gets from `app_port` of the server
/// pod under `policy`. Reachability does not depend on the proxy's delivery configuration; the
/// application's peer does under `localhost`: a proxy that binds 127.0.0.6 / ::6 itself before
/// dialling keeps that source when the kernel sends it to loopback instead (still a loopback
/// peer, as Istio's LOCALHOST mode gives the application).
fn matrix_expect(server: &Pod, delivery: &str, policy: &str, f: Family, app_port: u16) -> Expect {
    match (policy, app_port) {
        ("passthrough", LOOPBACK_PORT) | ("localhost", POD_IP_PORT) => Expect::NoEcho,
        ("passthrough", port) => Expect::Echo {
            local: sock(f.pod_ip(server), port),
            peer: f.passthrough_src(),
            direct: false,
        },
        ("localhost", port) => Expect::Echo {
            local: sock(f.loopback(), port),
            peer: if delivery == "pod-ip" {
                f.passthrough_src()
            } else {
                f.loopback()
            },
            direct: false,
        },
        _ => unreachable!("policy {policy}"),
    }
}

/// Runs the 12 cells of one proxy configuration (2 policies x 2 families x 3 apps), changing
/// the policy by re-enrolling in place, and reports every failing cell at once.
fn conformance_matrix(test: &str, delivery: &str) {
    if !root(test) {
        return;
    }
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, delivery, "proxy.log");
    let agent = Agent::new();

    let mut failures = Failures::default();
    for policy in POLICIES {
        agent.enroll(&server, &["--inbound-policy", policy]);
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
    conformance_matrix("conformance_matrix_proxy_dials_loopback", "loopback");
}

#[test]
fn conformance_matrix_proxy_dials_pod_ip() {
    conformance_matrix("conformance_matrix_proxy_dials_pod_ip", "pod-ip");
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
    if !root("app_reaches_loopback_and_own_pod_ip_directly") {
        return;
    }
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, "pod-ip", "proxy.log");
    let agent = Agent::new();

    let mut failures = Failures::default();
    for policy in POLICIES {
        agent.enroll(&server, &["--inbound-policy", policy]);
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
    if !root("proxy_delivery_from_passthrough_source_is_not_captured_again") {
        return;
    }
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, "pod-ip", "proxy.log");
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
    if !root("proxy_to_own_pod_ip_goes_through_inbound_listener") {
        return;
    }
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, "loopback", "proxy.log");
    let agent = Agent::new();

    let mut failures = Failures::default();
    for policy in POLICIES {
        agent.enroll(&server, &["--inbound-policy", policy]);
        for f in Family::BOTH {
            for port in [POD_IP_PORT, WILDCARD_PORT] {
                let to = sock(f.pod_ip(&server), port);
                let cell = format!("policy {policy}, proxy -> {to}");
                let before = agent.stats(&server.name);
                let seen = proxy.entries().len();
                let got = connect_as(&server, PROXY_UID, to, None);
                let (expect, delivered) = match (policy, port) {
                    ("passthrough", p) => (
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
    if !root("proxy_off_pod_and_proxy_ports_are_not_captured") {
        return;
    }
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let other = node.add_pod("other").unwrap();
    let _remote = wildcard_echo(&other, &[WILDCARD_PORT]);
    let proxy = Proxy::start(&node, &server, "pod-ip", "proxy.log");
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
    if !root("app_outbound_is_captured_with_exact_original_destination") {
        return;
    }
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let other = node.add_pod("other").unwrap();
    let ports = [WILDCARD_PORT, 18088];
    let _remote = wildcard_echo(&other, &ports);
    let proxy = Proxy::start(&node, &server, "pod-ip", "proxy.log");
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
                && new[0].local == sock(f.loopback(), 15001)
                && got.local() == Some(new[0].peer)
                && new[0].orig_dst == Some(to)
                && new[0].orig_dst_source.as_deref() == Some("so_original_dst")
                && new[0].upstream == Some(to)
                && new[0].result == "ok";
            if !ok {
                failures.push(format!(
                    "{cell}: expected one outbound entry at {} from the app's socket {:?} with \
                     orig_dst {to} from so_original_dst, got {new:?}",
                    sock(f.loopback(), 15001),
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
    if !root("excluded_inbound_ports_bypass_the_proxy") {
        return;
    }
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let excluded = [15008, 15020, 15021, 15090, 18086, 18087];
    let _apps = wildcard_echo(&server, &excluded);
    let proxy = Proxy::start(&node, &server, "pod-ip", "proxy.log");
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
/// PRODUCT BUG (fails on ab88a36): `redirect-ebpf/src/sk_lookup.rs` returns `SK_PASS` for
/// `is_proxy_port(port)` before it looks at the exclusion rules, and
/// `redirect_common::PROXY_PORTS` contains the four default excluded ports, so connections to
/// them pass uncounted: `inbound_excluded` is 4 (the two user-excluded ports, both families)
/// where 12 are expected. The connections themselves are handled right (see
/// `excluded_inbound_ports_bypass_the_proxy`); only `stats` does not show them.
#[test]
fn excluded_inbound_connections_are_counted() {
    if !root("excluded_inbound_connections_are_counted") {
        return;
    }
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let excluded = [15008, 15020, 15021, 15090, 18086, 18087];
    let _apps = wildcard_echo(&server, &excluded);
    let _proxy = Proxy::start(&node, &server, "pod-ip", "proxy.log");
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
    if !root("excluded_outbound_ports_and_cidrs_bypass_the_proxy") {
        return;
    }
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let kept = node.add_pod("kept").unwrap();
    let skipped = node.add_pod("skipped").unwrap();
    let _e1 = wildcard_echo(&kept, &[WILDCARD_PORT, 18090]);
    let _e2 = wildcard_echo(&skipped, &[WILDCARD_PORT]);
    let proxy = Proxy::start(&node, &server, "pod-ip", "proxy.log");
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
