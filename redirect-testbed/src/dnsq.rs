//! `redirect-testbed dns-query`: one unconnected UDP socket asking several DNS servers.
//!
//! Sends one `A` query to each `--server` in order (query id = 1 + its index) from the same
//! socket, for the `--name` of the same index (or the only one given), then reads as many
//! replies and prints one JSON line per reply ([`DnsReply`]): the query id, the address
//! `recvfrom` says it came from, and the first `A` record. What DNS capture must show: each
//! reply comes from the server its query went to.
//!
//! `--connect udp` / `--connect tcp`: one socket per server instead, connected to it
//! (`connect`, then `send`/`recv`; TCP with DNS's two-byte length prefix), each reply's line
//! also giving `peer`, what `getpeername()` says the socket is connected to.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// DNS servers (repeatable), all of one family.
    #[arg(long, required = true)]
    server: Vec<SocketAddr>,
    /// The name to ask each server (repeatable: one per server, in order), or one for all.
    #[arg(long, required = true)]
    name: Vec<String>,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// One socket per server, connected to it: `udp` or `tcp`.
    #[arg(long)]
    connect: Option<Connect>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Connect {
    Udp,
    Tcp,
}

#[derive(Debug, Serialize)]
pub struct DnsReply {
    pub id: u16,
    pub from: SocketAddr,
    pub answer: Option<Ipv4Addr>,
    /// `getpeername()` of a connected socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
}

pub fn run(args: Args) -> Result<()> {
    if args.name.len() != 1 && args.name.len() != args.server.len() {
        anyhow::bail!("give one --name, or one per --server");
    }
    if let Some(how) = args.connect {
        return connected(&args, how);
    }
    let bind: SocketAddr = if args.server[0].is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind).context("bind")?;
    socket.set_read_timeout(Some(Duration::from_millis(args.timeout_ms)))?;
    for (i, server) in args.server.iter().enumerate() {
        let id = 1 + i as u16;
        let name = &args.name[i.min(args.name.len() - 1)];
        socket
            .send_to(&query(id, name), server)
            .with_context(|| format!("send to {server}"))?;
    }
    let mut buf = [0u8; 1500];
    for _ in &args.server {
        let (n, from) = socket.recv_from(&mut buf).context("recvfrom")?;
        let reply = &buf[..n];
        let id = u16::from_be_bytes([reply[0], reply[1]]);
        let out = DnsReply {
            id,
            from,
            answer: first_a(reply),
            peer: None,
        };
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}

/// One connected socket per server, in order: `getpeername()`, the query, the reply.
fn connected(args: &Args, how: Connect) -> Result<()> {
    let wait = Duration::from_millis(args.timeout_ms);
    let timeout = Some(wait);
    let mut buf = [0u8; 1500];
    for (i, server) in args.server.iter().enumerate() {
        let id = 1 + i as u16;
        let q = query(id, &args.name[i.min(args.name.len() - 1)]);
        let (peer, from, reply) = match how {
            Connect::Udp => {
                let bind: SocketAddr = if server.is_ipv4() {
                    "0.0.0.0:0".parse()?
                } else {
                    "[::]:0".parse()?
                };
                let socket = UdpSocket::bind(bind).context("bind")?;
                socket.set_read_timeout(timeout)?;
                socket
                    .connect(server)
                    .with_context(|| format!("connect {server}"))?;
                let peer = socket.peer_addr().context("getpeername")?;
                socket
                    .send(&q)
                    .with_context(|| format!("send to {server}"))?;
                let (n, from) = socket.recv_from(&mut buf).context("recvfrom")?;
                (peer, from, buf[..n].to_vec())
            }
            Connect::Tcp => {
                let mut s = TcpStream::connect_timeout(server, wait)
                    .with_context(|| format!("connect {server}"))?;
                s.set_read_timeout(timeout)?;
                let peer = s.peer_addr().context("getpeername")?;
                let mut framed = (q.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&q);
                s.write_all(&framed).context("send")?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len).context("read the reply's length")?;
                let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut reply).context("read the reply")?;
                (peer, peer, reply)
            }
        };
        let out = DnsReply {
            id: u16::from_be_bytes([reply[0], reply[1]]),
            from,
            answer: first_a(&reply),
            peer: Some(peer),
        };
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}

/// A recursive `A IN` query for `name`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The first `A` record of the answer section, if any.
fn first_a(reply: &[u8]) -> Option<Ipv4Addr> {
    let answers = u16::from_be_bytes([*reply.get(6)?, *reply.get(7)?]);
    let mut i = 12;
    // The question: labels up to the root, then type and class.
    while *reply.get(i)? != 0 {
        i += 1 + usize::from(reply[i]);
    }
    i += 5;
    for _ in 0..answers {
        // The owner name: a pointer, or labels.
        if reply.get(i)? & 0xc0 == 0xc0 {
            i += 2;
        } else {
            while *reply.get(i)? != 0 {
                i += 1 + usize::from(reply[i]);
            }
            i += 1;
        }
        let ty = u16::from_be_bytes([*reply.get(i)?, *reply.get(i + 1)?]);
        let len = usize::from(u16::from_be_bytes([*reply.get(i + 8)?, *reply.get(i + 9)?]));
        i += 10;
        if ty == 1 && len == 4 {
            let d = reply.get(i..i + 4)?;
            return Some(Ipv4Addr::new(d[0], d[1], d[2], d[3]));
        }
        i += len;
    }
    None
}
