//! The Envoy stand-in: a transparent TCP proxy with an inbound and an outbound listener.
//!
//! It learns original destinations the way Envoy's `original_dst` listener filter does
//! (`SO_ORIGINAL_DST`, falling back to the accepted socket's local address, which *is* the
//! original destination when capture is done by `sk_lookup` rather than NAT), and delivers
//! inbound traffic either the pre-1.10 way (`127.0.0.1:P`) or the 1.10+ way (`POD_IP:P` from
//! `127.0.0.6`). Every connection is logged as one JSON line so tests can assert what it saw.

pub mod haproxy;

use std::{
    fs::{File, OpenOptions},
    io::{self, BufRead as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use redirect_common::matrix::{passthrough_src, ProxyDial};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

/// How long the proxy waits for an upstream connect before giving up on a connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// Where the inbound listener sends a connection for original destination `IP:P`.
    pub dial: ProxyDial,
    /// Append one [`ProxyLogEntry`] JSON line per connection here.
    pub log: Option<PathBuf>,
    /// Send every connection here instead of its original destination: an explicitly
    /// configured upstream, for clients that dial the proxy itself (no interception). The
    /// delivery source (`127.0.0.6` for pod-ip) still applies on the inbound side.
    pub upstream: Option<SocketAddr>,
}

/// One line of the proxy's `--log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyLogEntry {
    /// `inbound` or `outbound`.
    pub listener: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub orig_dst: Option<SocketAddr>,
    /// `so_original_dst` or `getsockname`; null when no original destination was found.
    pub orig_dst_source: Option<String>,
    /// Where the proxy connected (or tried to).
    pub upstream: Option<SocketAddr>,
    /// The upstream socket's local address, when connected.
    pub upstream_local: Option<SocketAddr>,
    /// `ok`, `connect_error: ...`, `no_original_dst: ...` or `loop: ...`.
    pub result: String,
}

/// Reads a proxy log written with `--log`.
pub fn read_log(path: &Path) -> Result<Vec<ProxyLogEntry>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    io::BufReader::new(f)
        .lines()
        .map(|l| Ok(serde_json::from_str(&l?)?))
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Inbound,
    Outbound,
}

struct Proxy {
    cfg: ProxyConfig,
    log: Option<Mutex<File>>,
}

/// Binds `0.0.0.0` and `[::]` (v6-only) on both ports, prints a readiness line, and serves
/// until killed.
pub fn run(cfg: ProxyConfig) -> Result<()> {
    let log = match &cfg.log {
        Some(p) => Some(Mutex::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening log {}", p.display()))?,
        )),
        None => None,
    };
    let mut listeners = Vec::new();
    for (side, port) in [
        (Side::Inbound, cfg.inbound_port),
        (Side::Outbound, cfg.outbound_port),
    ] {
        for ip in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            let addr = SocketAddr::new(ip, port);
            let l = crate::echo::listen(addr, true).with_context(|| format!("binding {addr}"))?;
            listeners.push((side, l));
        }
    }
    let proxy = Arc::new(Proxy { cfg, log });
    println!(
        "ready inbound={} outbound={} delivery={}",
        proxy.cfg.inbound_port, proxy.cfg.outbound_port, proxy.cfg.dial
    );
    io::stdout().flush()?;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|(side, l)| {
            let proxy = Arc::clone(&proxy);
            std::thread::spawn(move || -> io::Result<()> {
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            let proxy = Arc::clone(&proxy);
                            std::thread::spawn(move || proxy.handle(side, s));
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                            ) => {}
                        Err(e) => return Err(e),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("listener thread panicked"))??;
    }
    Ok(())
}

impl Proxy {
    fn handle(&self, side: Side, client: TcpStream) {
        let (Ok(peer), Ok(local)) = (client.peer_addr(), client.local_addr()) else {
            return;
        };
        let mut entry = ProxyLogEntry {
            listener: if side == Side::Inbound {
                "inbound"
            } else {
                "outbound"
            }
            .to_owned(),
            peer,
            local,
            orig_dst: None,
            orig_dst_source: None,
            upstream: None,
            upstream_local: None,
            result: String::new(),
        };
        let orig = if let Some(fixed) = self.cfg.upstream {
            entry.orig_dst_source = Some("fixed".into());
            fixed
        } else {
            match (original_dst(&client, local.is_ipv6()), side) {
                (Ok(a), _) => {
                    entry.orig_dst_source = Some("so_original_dst".into());
                    a
                }
                (Err(_), Side::Inbound) => {
                    entry.orig_dst_source = Some("getsockname".into());
                    local
                }
                (Err(e), Side::Outbound) => {
                    entry.result = format!("no_original_dst: {e}");
                    return self.log(&entry);
                }
            }
        };
        entry.orig_dst = Some(orig);
        // A connection addressed to the proxy itself would make it connect to itself forever.
        if self.cfg.upstream.is_none()
            && [self.cfg.inbound_port, self.cfg.outbound_port].contains(&orig.port())
        {
            entry.result = format!("loop: original destination {orig} is a proxy listener");
            return self.log(&entry);
        }
        let (target, bind) = match (side, self.cfg.dial) {
            (Side::Outbound, _) => (orig, None),
            (Side::Inbound, ProxyDial::Loopback) => (
                SocketAddr::new(redirect_common::matrix::loopback(orig.ip()), orig.port()),
                None,
            ),
            (Side::Inbound, ProxyDial::PodIp) => {
                (orig, Some(SocketAddr::new(passthrough_src(orig.ip()), 0)))
            }
        };
        entry.upstream = Some(target);
        let upstream = match connect_upstream(target, bind) {
            Ok(u) => u,
            Err(e) => {
                entry.result = format!("connect_error: {e}");
                self.log(&entry);
                // Dropping the client without reading makes it see EOF or a reset, never data.
                return;
            }
        };
        entry.upstream_local = upstream.local_addr().ok();
        entry.result = "ok".into();
        self.log(&entry);
        pipe(client, upstream);
    }

    fn log(&self, entry: &ProxyLogEntry) {
        let Some(log) = &self.log else { return };
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        let mut f = log.lock().unwrap_or_else(|e| e.into_inner());
        // One write per line, so lines from concurrent connections never interleave.
        let _ = f.write_all(&line);
    }
}

fn connect_upstream(target: SocketAddr, bind: Option<SocketAddr>) -> io::Result<TcpStream> {
    let s = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if let Some(b) = bind {
        if let Err(e) = s.bind(&SockAddr::from(b)) {
            // `::6` is only local when the pod's init added it to `lo`; freebind lets the
            // bind succeed anyway (the connect then shows whether replies can come back).
            if b.is_ipv6() && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                s.set_freebind_ipv6(true)?;
                s.bind(&SockAddr::from(b))?;
            } else {
                return Err(e);
            }
        }
    }
    s.connect_timeout(&SockAddr::from(target), UPSTREAM_CONNECT_TIMEOUT)?;
    let s: TcpStream = s.into();
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Copies both ways; EOF on one side becomes a half-close on the other, an error tears both
/// down so the opposite copy does not block forever.
fn pipe(client: TcpStream, upstream: TcpStream) {
    let _ = client.set_nodelay(true);
    let copy = |mut from: TcpStream, mut to: TcpStream| match io::copy(&mut from, &mut to) {
        Ok(_) => {
            let _ = to.shutdown(Shutdown::Write);
        }
        Err(_) => {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    };
    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let t = std::thread::spawn(move || copy(c2, u2));
    copy(upstream, client);
    let _ = t.join();
}

/// `getsockopt(SO_ORIGINAL_DST)` (`IP6T_SO_ORIGINAL_DST` for IPv6): the pre-NAT destination
/// from conntrack, or from whatever answers the option (redirect's cgroup/getsockopt program).
pub fn original_dst(stream: &TcpStream, ipv6: bool) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = if ipv6 {
        sock.original_dst_ipv6()?
    } else {
        sock.original_dst()?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST answered with a non-IP address",
        )
    })
}
