//! `redirect-testbed hostile`: an unprivileged application that tries, for a while, to fill
//! every datapath map its pod can reach and to leave per-connection state behind.
//!
//! Run it in an enrolled pod as a uid that is not the proxy's. Each round it: connects two
//! `SO_REUSEADDR` sockets bound to the same pod address and port to two different destinations
//! (for IPv6 the second fails with `EADDRNOTAVAIL` before its SYN); closes a non-blocking connect at once;
//! resets a connection (`SO_LINGER` 0); connects to an address that refuses; binds sockets it
//! never listens on; listens on the proxy's inbound port; claims another pod's address with
//! `IP_FREEBIND` and connects from it; and keeps up to `--hold` connections open, replacing the
//! oldest. Everything is non-blocking, so a full accept queue never stalls it. Prints one JSON
//! line of what it did ([`HostileReport`]) and exits, closing everything.

use std::{
    collections::VecDeque,
    io,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to keep trying.
    #[arg(long, default_value_t = 60_000)]
    duration_ms: u64,
    /// Off-pod destinations (repeatable, at least two): every connection goes to one of them.
    #[arg(long, required = true)]
    target: Vec<SocketAddr>,
    /// An off-pod address where nothing listens.
    #[arg(long)]
    refused: SocketAddr,
    /// The pod's own addresses (repeatable): the REUSEADDR pairs bind them.
    #[arg(long, required = true)]
    pod_ip: Vec<IpAddr>,
    /// Another pod's address, claimed with IP_FREEBIND.
    #[arg(long)]
    foreign_ip: Option<IpAddr>,
    /// Connections kept open at once.
    #[arg(long, default_value_t = 4000)]
    hold: usize,
    /// Sockets kept bound (never listening) at once.
    #[arg(long, default_value_t = 1000)]
    binds: usize,
    /// New held connections per round (a round takes at least 5 ms).
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// The proxy's inbound port, to listen on as a non-proxy uid.
    #[arg(long, default_value_t = 15006)]
    proxy_inbound_port: u16,
}

/// What the run did, by pattern.
#[derive(Debug, Default, Serialize)]
pub struct HostileReport {
    pub rounds: u64,
    /// Second sockets of REUSEADDR pairs that failed with EADDRNOTAVAIL.
    pub reuseaddr_addrnotavail: u64,
    /// Second sockets of REUSEADDR pairs that got any other result.
    pub reuseaddr_other: u64,
    pub closed_in_progress: u64,
    pub reset: u64,
    pub refused_attempts: u64,
    pub binds: u64,
    /// Sockets bound to another pod's address with IP_FREEBIND.
    pub freebind_binds: u64,
    /// Of those, connects that got under way (routing usually refuses them).
    pub freebind_connects: u64,
    pub held_connects: u64,
    pub proxy_port_listens: u64,
    /// connect() calls that failed at once with an unexpected error (not EINPROGRESS).
    pub connect_errors: u64,
    pub max_held: usize,
}

pub fn run(args: Args) -> Result<()> {
    raise_nofile();
    let deadline = Instant::now() + Duration::from_millis(args.duration_ms);
    let mut report = HostileReport::default();
    let mut held: VecDeque<Socket> = VecDeque::new();
    let mut bound: VecDeque<Socket> = VecDeque::new();
    let mut refused: VecDeque<Socket> = VecDeque::new();
    let mut proxy_port_listener = None;
    let mut round: u64 = 0;
    while Instant::now() < deadline {
        let t0 = args.target[(round as usize) % args.target.len()];
        let t1 = args.target[(round as usize + 1) % args.target.len()];
        let pod_ip = args.pod_ip[(round as usize) % args.pod_ip.len()];
        let t0 = same_family(&args.target, pod_ip).unwrap_or(t0);
        let t1 = other_target(&args.target, t0).unwrap_or(t1);

        // Two sockets on one pod address and port. The second connects to the first's
        // destination: the same four-tuple, EADDRNOTAVAIL after the connect hooks ran (a failing
        // connect that must leave no per-connection state). A third connects to another
        // destination: with port spreading (each destination its own local address, IPv4 and
        // IPv6) it connects as under iptables, unless the two destinations hash alike.
        let port = 20000 + (round % 20000) as u16;
        if let (Ok(a), Ok(b), Ok(c)) = (
            reuse_bound(pod_ip, port),
            reuse_bound(pod_ip, port),
            reuse_bound(pod_ip, port),
        ) {
            let _ = start_connect(&a, t0, &mut report);
            if let Err(e) = b.connect(&SockAddr::from(t0)) {
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                    report.reuseaddr_addrnotavail += 1
                }
            }
            match c.connect(&SockAddr::from(t1)) {
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                    report.reuseaddr_addrnotavail += 1
                }
                _ => report.reuseaddr_other += 1,
            }
        }

        // A non-blocking connect closed before it completes.
        if let Ok(s) = socket_for(t0) {
            if start_connect(&s, t0, &mut report) {
                report.closed_in_progress += 1;
            }
        }

        // A connection reset by its own side (SO_LINGER 0), once it had a moment to connect.
        if let Some(s) = held.pop_front() {
            let _ = s.set_linger(Some(Duration::ZERO));
            report.reset += 1;
        }

        // Refused: held a little so the refusal arrives while it is open.
        if let Ok(s) = socket_for(args.refused) {
            if start_connect(&s, args.refused, &mut report) {
                report.refused_attempts += 1;
                refused.push_back(s);
                if refused.len() > 64 {
                    refused.pop_front();
                }
            }
        }

        // Bound, never listening.
        if let Ok(s) = socket_for(t0) {
            if s.bind(&SockAddr::from(SocketAddr::new(pod_ip, 0))).is_ok() {
                report.binds += 1;
                bound.push_back(s);
                if bound.len() > args.binds {
                    bound.pop_front();
                }
            }
        }

        // Another pod's address as the source.
        if let Some(foreign) = args.foreign_ip {
            if let Some(t) = same_family(&args.target, foreign) {
                if let Ok(s) = socket_for(t) {
                    let freebind = match foreign {
                        IpAddr::V4(_) => s.set_freebind(true),
                        IpAddr::V6(_) => s.set_freebind_ipv6(true),
                    };
                    if freebind.is_ok()
                        && s.bind(&SockAddr::from(SocketAddr::new(foreign, 0))).is_ok()
                    {
                        report.freebind_binds += 1;
                        // Without IP_TRANSPARENT routing refuses the foreign source (EINVAL):
                        // another connect that fails before its SYN.
                        if start_connect(&s, t, &mut report) {
                            report.freebind_connects += 1;
                            held.push_back(s);
                        }
                    }
                }
            }
        }

        // Listening on the proxy's inbound port without being the proxy.
        if proxy_port_listener.is_none() {
            if let Ok(s) = socket_for(SocketAddr::new(pod_ip, 0)) {
                let addr = SocketAddr::new(unspecified(pod_ip), args.proxy_inbound_port);
                if s.bind(&SockAddr::from(addr)).is_ok() && s.listen(16).is_ok() {
                    report.proxy_port_listens += 1;
                    proxy_port_listener = Some(s);
                }
            }
        }

        // Many connections held open, `burst` new ones a round, oldest replaced.
        for i in 0..args.burst {
            let t = args.target[(round as usize + i) % args.target.len()];
            if let Ok(s) = socket_for(t) {
                if start_connect(&s, t, &mut report) {
                    report.held_connects += 1;
                    held.push_back(s);
                }
            }
            while held.len() > args.hold {
                held.pop_front();
            }
        }
        report.max_held = report.max_held.max(held.len());
        round += 1;
        report.rounds = round;
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

fn same_family(targets: &[SocketAddr], ip: IpAddr) -> Option<SocketAddr> {
    targets
        .iter()
        .copied()
        .find(|t| t.is_ipv4() == ip.is_ipv4())
}

fn other_target(targets: &[SocketAddr], t: SocketAddr) -> Option<SocketAddr> {
    targets
        .iter()
        .copied()
        .find(|o| *o != t && o.is_ipv4() == t.is_ipv4())
}

fn socket_for(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn reuse_bound(ip: IpAddr, port: u16) -> io::Result<Socket> {
    let addr = SocketAddr::new(ip, port);
    let s = socket_for(addr)?;
    s.set_reuse_address(true)?;
    s.bind(&SockAddr::from(addr))?;
    Ok(s)
}

/// Starts a non-blocking connect; `true` if it is under way (or done).
fn start_connect(s: &Socket, to: SocketAddr, report: &mut HostileReport) -> bool {
    match s.connect(&SockAddr::from(to)) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
        Err(_) => {
            report.connect_errors += 1;
            false
        }
    }
}

/// As many descriptors as the hard limit allows (up to 65536): holding thousands of sockets
/// is the point.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max.min(65536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
