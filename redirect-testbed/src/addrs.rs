//! `redirect-testbed addrs`: what an application's sockets say about themselves.
//!
//! Connects one socket to each `--to` in order and keeps them all open until the last is done,
//! so that several sockets can share a bound address and port at once (`--bind` with
//! `--reuseaddr`). For each it prints one JSON line ([`AddrsReport`]): the socket's own address
//! (`getsockname`), its peer (`getpeername`), and the first line the server sent (the echo
//! server's banner: the address it accepted on and the peer it saw). `--mapped` uses an
//! `AF_INET6` socket for IPv4 destinations and connects to `::ffff:a.b.c.d`, as a JVM does.
//!
//! `--repeat N` instead makes N rounds of one short connection to each destination (connect,
//! read the banner, close) and prints one JSON line of counts ([`RepeatReport`]).

use std::{
    io::{self, Read as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Result;
use redirect_testbed::Banner;
use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Destinations (repeatable), connected in order.
    #[arg(long, required = true)]
    to: Vec<SocketAddr>,
    /// Bind every socket to this IP:PORT before connecting.
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Set SO_REUSEADDR before binding.
    #[arg(long)]
    reuseaddr: bool,
    /// IPv4 destinations through AF_INET6 sockets, as `::ffff:a.b.c.d`.
    #[arg(long)]
    mapped: bool,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Rounds of short connections (one to each destination per round), counted.
    #[arg(long)]
    repeat: Option<u32>,
}

/// One socket.
#[derive(Debug, Serialize)]
pub struct AddrsReport {
    pub to: SocketAddr,
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    pub server: Option<Banner>,
    pub error: Option<String>,
}

/// The counts of `--repeat`.
#[derive(Debug, Serialize)]
pub struct RepeatReport {
    pub ok: u64,
    pub failed: u64,
    /// The first few errors, with the destination.
    pub errors: Vec<String>,
    pub elapsed_ms: u64,
}

pub fn run(args: Args) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    if let Some(rounds) = args.repeat {
        let start = Instant::now();
        let mut report = RepeatReport {
            ok: 0,
            failed: 0,
            errors: Vec::new(),
            elapsed_ms: 0,
        };
        for _ in 0..rounds {
            for to in &args.to {
                match open(&args, *to, timeout) {
                    Ok((_, r)) if r.server.is_some() => report.ok += 1,
                    Ok((_, r)) => {
                        report.failed += 1;
                        if report.errors.len() < 8 {
                            report
                                .errors
                                .push(format!("{to}: no banner ({:?})", r.error));
                        }
                    }
                    Err(e) => {
                        report.failed += 1;
                        if report.errors.len() < 8 {
                            report.errors.push(format!("{to}: {e}"));
                        }
                    }
                }
            }
        }
        report.elapsed_ms = start.elapsed().as_millis() as u64;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let mut open_sockets = Vec::new();
    for to in &args.to {
        let report = match open(&args, *to, timeout) {
            Ok((s, r)) => {
                open_sockets.push(s);
                r
            }
            Err(e) => AddrsReport {
                to: *to,
                local: None,
                peer: None,
                server: None,
                error: Some(format!("{e} (os error {})", e.raw_os_error().unwrap_or(0))),
            },
        };
        println!("{}", serde_json::to_string(&report)?);
    }
    drop(open_sockets);
    Ok(())
}

/// The address the socket connects to: `::ffff:a.b.c.d` for an IPv4 one under `--mapped`.
fn target(args: &Args, to: SocketAddr) -> SocketAddr {
    match (args.mapped, to.ip()) {
        (true, IpAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), to.port()),
        _ => to,
    }
}

fn open(args: &Args, to: SocketAddr, timeout: Duration) -> io::Result<(TcpStream, AddrsReport)> {
    let dst = target(args, to);
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if dst.is_ipv6() {
        s.set_only_v6(false)?;
    }
    if args.reuseaddr {
        s.set_reuse_address(true)?;
    }
    if let Some(b) = args.bind {
        s.bind(&SockAddr::from(target(args, b)))?;
    }
    s.connect_timeout(&SockAddr::from(dst), timeout)?;
    let stream: TcpStream = s.into();
    let local = stream.local_addr().ok();
    let peer = stream.peer_addr().ok();
    let (server, error) = match banner(&stream, timeout) {
        Ok(b) => (Some(b), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok((
        stream,
        AddrsReport {
            to,
            local,
            peer,
            server,
            error,
        },
    ))
}

/// The server's first line, parsed as the echo server's banner.
fn banner(mut stream: &TcpStream, timeout: Duration) -> io::Result<Banner> {
    stream.set_read_timeout(Some(timeout))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        match stream.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
