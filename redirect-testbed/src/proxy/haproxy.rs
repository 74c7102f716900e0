//! HAProxy (Debian's 2.6) as a transparent sidecar: a real third-party proxy that learns
//! original destinations with `SO_ORIGINAL_DST`.
//!
//! What HAProxy 2.6 does, from its source (`sock_inet_get_dst`) and checked by the tests: the
//! destination of an accepted connection (`dst`, the `%fi:%fp` of its log) is `getsockname()`,
//! replaced by `getsockopt(SOL_IP, SO_ORIGINAL_DST)` when that succeeds, whatever the socket's
//! family. A `server` whose address is `0.0.0.0` and which has no port connects to that
//! destination, address and port; a server with an address and no port connects to the
//! destination's port at that address. So, with no `transparent` option and no privilege:
//! - the outbound listener (15001) forwards to `server orig 0.0.0.0`: the original destination
//!   that redirect's `cgroup/getsockopt` program (or conntrack, under iptables) answers;
//! - the inbound listener (15006) delivers to the same destination from `source 127.0.0.6`
//!   (Istio 1.10+, [`ProxyDial::PodIp`]; `::6` for IPv6, which must be on the pod's `lo`, as
//!   Istio's init container puts it), or to `127.0.0.1` / `::1` at the destination's port
//!   ([`ProxyDial::Loopback`], before 1.10).
//!
//! An IPv6 socket is asked `SO_ORIGINAL_DST` at `SOL_IP` too; redirect answers only for an
//! IPv4 original destination there, so for IPv6 HAProxy falls back to `getsockname()`, which
//! is the original destination when `sk_lookup` captured the connection (inbound). Outbound
//! IPv6 capture would need `IP6T_SO_ORIGINAL_DST`, which HAProxy 2.6 does not ask.
//!
//! One frontend per family and listener, so that each has a backend with its family's source.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use redirect_common::matrix::{ProxyDial, PASSTHROUGH_SRC4, PASSTHROUGH_SRC6};

/// The `haproxy` binary of Debian's package.
pub const HAPROXY: &str = "haproxy";

/// One sidecar's configuration.
#[derive(Debug, Clone)]
pub struct HaproxyConfig {
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// How the inbound listener delivers.
    pub dial: ProxyDial,
    /// Fixed upstreams instead of original destinations, for clients that dial the proxy
    /// itself (no interception): (the outbound listener's, the inbound listener's). The
    /// inbound delivery source still applies.
    pub upstream: Option<(SocketAddr, SocketAddr)>,
    /// Listen on IPv6 as well (`[::]`, v6-only, beside `0.0.0.0`).
    pub ipv6: bool,
    /// Write one [`HaproxyLogEntry`] line per connection to stdout.
    pub log: bool,
}

/// One line of the connection log ([`HaproxyConfig::log`]), logged when the connection to the
/// server is made or has failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaproxyLogEntry {
    /// `inbound4`, `inbound6`, `outbound4` or `outbound6`.
    pub frontend: String,
    pub client: SocketAddr,
    /// The destination HAProxy read (`SO_ORIGINAL_DST`, else `getsockname()`).
    pub dst: SocketAddr,
    /// The source of the connection to the server, when one was made.
    pub source: Option<SocketAddr>,
    /// Where it connected (or tried to).
    pub server: Option<SocketAddr>,
    /// HAProxy's two-letter termination state (`--` while the connection is open).
    pub termination: String,
}

/// `%ft %ci %cp %fi %fp %bi %bp %si %sp %ts`: addresses and ports apart, so that IPv6
/// addresses parse without brackets.
const LOG_FORMAT: &str = "%ft %ci %cp %fi %fp %bi %bp %si %sp %ts";

impl HaproxyConfig {
    /// The configuration file's text.
    pub fn render(&self) -> String {
        let mut c = String::new();
        let w = &mut c;
        // nbthread 1: the benchmark pins the proxy to one CPU, as it does the others.
        let _ = writeln!(w, "global\n    nbthread 1\n    maxconn 8000");
        if self.log {
            let _ = writeln!(w, "    log stdout format raw local0 info");
        }
        let _ = writeln!(
            w,
            "defaults\n    mode tcp\n    timeout connect 3s\n    timeout client 60s\n    \
             timeout server 60s\n    # A refused delivery fails the client at once, like Envoy \
             does.\n    retries 0"
        );
        if self.log {
            let _ = writeln!(
                w,
                "    log global\n    option logasap\n    log-format \"{LOG_FORMAT}\""
            );
        }
        let families: &[(&str, &str)] = if self.ipv6 {
            &[("4", "0.0.0.0:"), ("6", ":::")]
        } else {
            &[("4", "0.0.0.0:")]
        };
        for (fam, any) in families {
            let v6only = if *fam == "6" { " v6only" } else { "" };
            let (out_server, in_server) = match self.upstream {
                Some((o, i)) => (sa(o), sa(i)),
                None => {
                    let loopback = match (*fam, self.dial) {
                        (_, ProxyDial::PodIp) => "0.0.0.0".to_owned(),
                        ("4", ProxyDial::Loopback) => "127.0.0.1:+0".to_owned(),
                        (_, ProxyDial::Loopback) => "[::1]:+0".to_owned(),
                    };
                    ("0.0.0.0".to_owned(), loopback)
                }
            };
            let source = match (*fam, self.dial) {
                (_, ProxyDial::Loopback) => String::new(),
                ("4", ProxyDial::PodIp) => format!("    source {PASSTHROUGH_SRC4}\n"),
                (_, ProxyDial::PodIp) => format!("    source [{PASSTHROUGH_SRC6}]\n"),
            };
            let _ = writeln!(
                w,
                "frontend outbound{fam}\n    bind {any}{out}{v6only}\n    default_backend \
                 outbound{fam}\n\
                 backend outbound{fam}\n    server orig {out_server}\n\
                 frontend inbound{fam}\n    bind {any}{inb}{v6only}\n    default_backend \
                 inbound{fam}\n\
                 backend inbound{fam}\n{source}    server deliver {in_server}",
                out = self.outbound_port,
                inb = self.inbound_port,
            );
        }
        c
    }

    /// Writes `haproxy.cfg` into `dir` (readable by the proxy's uid) and returns the command
    /// that runs HAProxy on it in the foreground (`-db`: no daemon, logs to stdout).
    pub fn command(&self, dir: &Path) -> Result<Command> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path: PathBuf = dir.join("haproxy.cfg");
        fs::write(&path, self.render()).with_context(|| format!("writing {}", path.display()))?;
        let mut cmd = Command::new(HAPROXY);
        cmd.arg("-db").arg("-f").arg(&path);
        Ok(cmd)
    }
}

/// `a.b.c.d:p` or `[x::y]:p`, as HAProxy's address syntax wants them.
fn sa(a: SocketAddr) -> String {
    a.to_string()
}

/// Parses the log lines HAProxy printed with [`HaproxyConfig::log`]; other lines (warnings)
/// are skipped.
pub fn parse_log(text: &str) -> Vec<HaproxyLogEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<HaproxyLogEntry> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let [ft, ci, cp, fi, fp, bi, bp, si, sp, ts] = f.as_slice() else {
        return None;
    };
    if !(ft.starts_with("inbound") || ft.starts_with("outbound")) {
        return None;
    }
    let addr = |ip: &str, port: &str| -> Option<SocketAddr> {
        Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
    };
    Some(HaproxyLogEntry {
        frontend: (*ft).to_owned(),
        client: addr(ci, cp)?,
        dst: addr(fi, fp)?,
        source: addr(bi, bp),
        server: addr(si, sp),
        termination: (*ts).to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transparent_sidecar_config() {
        let c = HaproxyConfig {
            inbound_port: 15006,
            outbound_port: 15001,
            dial: ProxyDial::PodIp,
            upstream: None,
            ipv6: true,
            log: false,
        }
        .render();
        assert!(c.contains("bind 0.0.0.0:15001\n"), "{c}");
        assert!(c.contains("bind :::15006 v6only\n"), "{c}");
        assert!(
            c.contains("backend outbound4\n    server orig 0.0.0.0\n"),
            "{c}"
        );
        assert!(
            c.contains("backend inbound4\n    source 127.0.0.6\n    server deliver 0.0.0.0\n"),
            "{c}"
        );
        assert!(c.contains("backend inbound6\n    source [::6]\n"), "{c}");
        assert!(!c.contains("log"), "{c}");
        let l = HaproxyConfig {
            dial: ProxyDial::Loopback,
            ipv6: true,
            log: true,
            ..HaproxyConfig {
                inbound_port: 15006,
                outbound_port: 15001,
                dial: ProxyDial::PodIp,
                upstream: None,
                ipv6: false,
                log: false,
            }
        }
        .render();
        assert!(l.contains("server deliver 127.0.0.1:+0\n"), "{l}");
        assert!(l.contains("server deliver [::1]:+0\n"), "{l}");
        assert!(!l.contains("source"), "{l}");
        assert!(l.contains("option logasap"), "{l}");
    }

    #[test]
    fn explicit_upstreams() {
        let c = HaproxyConfig {
            inbound_port: 15006,
            outbound_port: 15001,
            dial: ProxyDial::PodIp,
            upstream: Some((
                "198.18.0.3:15006".parse().unwrap(),
                "198.18.0.3:8080".parse().unwrap(),
            )),
            ipv6: false,
            log: false,
        }
        .render();
        assert!(c.contains("server orig 198.18.0.3:15006\n"), "{c}");
        assert!(c.contains("server deliver 198.18.0.3:8080"), "{c}");
        assert!(!c.contains(":::"), "{c}");
    }

    #[test]
    fn log_lines() {
        let log = "[WARNING]  (12) : something\n\
                   inbound4 198.18.0.2 40000 198.18.0.3 18082 127.0.0.6 41000 198.18.0.3 18082 --\n\
                   inbound6 2001:db8::2 40001 2001:db8::3 18080 - - 2001:db8::3 18080 SC\n";
        let e = parse_log(log);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].frontend, "inbound4");
        assert_eq!(e[0].dst, "198.18.0.3:18082".parse().unwrap());
        assert_eq!(e[0].source, Some("127.0.0.6:41000".parse().unwrap()));
        assert_eq!(e[1].dst, "[2001:db8::3]:18080".parse().unwrap());
        assert_eq!(e[1].source, None);
        assert_eq!(e[1].termination, "SC");
    }
}
