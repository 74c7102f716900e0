//! `redirect-testbed`: the application (`echo`), Envoy (`proxy`) and client (`connect`) roles.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use redirect_testbed::{echo, probe, proxy, stream, ProxyDial};

mod addrs;
mod demo;
mod dnsq;
mod hostile;
mod load;

#[derive(Parser)]
#[command(about = "Stand-ins for the application, the sidecar proxy and a client")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP echo server; each connection starts with a JSON line of its local and peer address.
    Echo {
        /// Address to listen on (repeatable): 127.0.0.1:P, POD_IP:P, 0.0.0.0:P, [::1]:P, [::]:P.
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Pure echo, no JSON line (for benchmarks).
        #[arg(long)]
        plain: bool,
        /// Let [::] also accept IPv4 (IPV6_V6ONLY=0).
        #[arg(long)]
        dual_stack: bool,
    },
    /// Transparent TCP proxy playing Envoy (run it as uid 1337).
    Proxy {
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        /// How the inbound listener dials the application: loopback (127.0.0.1:P) or pod-ip
        /// (POD_IP:P from 127.0.0.6).
        #[arg(long, default_value_t = ProxyDial::PodIp)]
        delivery: ProxyDial,
        /// Append one JSON line per connection to this file.
        #[arg(long)]
        log: Option<PathBuf>,
        /// Send every connection here instead of its original destination (explicit proxying).
        #[arg(long)]
        upstream: Option<SocketAddr>,
    },
    /// Benchmark load generator: one JSON line of rate, latency percentiles and CPU.
    Load(load::Args),
    /// Connect, send a payload, half-close, print one JSON outcome.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "hello")]
        payload: String,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Source address (IP or IP:PORT) to bind before connecting.
        #[arg(long, value_parser = parse_bind)]
        bind: Option<SocketAddr>,
    },
    /// The addresses an application's sockets report (getsockname, getpeername, the server's).
    Addrs(addrs::Args),
    /// One UDP socket asking several DNS servers; prints who each reply came from.
    DnsQuery(dnsq::Args),
    /// The conformance matrix end to end on this machine: pods, proxy, `redirect-agent` (root).
    Demo,
    /// This machine as a node: a private containerd, the agent's DaemonSet pod from its
    /// image, pods with Istio's annotations through CRI, the matrix, /metrics, the uninstall
    /// (root).
    DemoNode,
    /// An unprivileged application trying to fill the datapath's maps (tests/hostile.rs).
    Hostile(hostile::Args),
    /// The byte-stream suite's client: seeded streams checked end to end, one JSON line per
    /// connection (redirect-agent/tests/streams.rs).
    Stream(stream::ClientArgs),
    /// The byte-stream suite's server (redirect-agent/tests/streams.rs).
    StreamServer(stream::ServerArgs),
}

fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 0))
        })
        .map_err(|e| format!("{s:?} is neither IP nor IP:PORT: {e}"))
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Echo {
            listen,
            plain,
            dual_stack,
        } => {
            let listeners = listen
                .iter()
                .map(|a| echo::listen(*a, !dual_stack).with_context(|| format!("binding {a}")))
                .collect::<Result<Vec<_>>>()?;
            // Only once every listener is bound, so a caller waiting for these lines can connect.
            for l in &listeners {
                println!("listening {}", l.local_addr()?);
            }
            use std::io::Write as _;
            std::io::stdout().flush()?;
            let threads: Vec<_> = listeners
                .into_iter()
                .map(|l| std::thread::spawn(move || echo::serve(l, plain)))
                .collect();
            for t in threads {
                t.join()
                    .map_err(|_| anyhow::anyhow!("listener thread panicked"))??;
            }
            Ok(())
        }
        Cmd::Proxy {
            inbound_port,
            outbound_port,
            delivery,
            log,
            upstream,
        } => proxy::run(proxy::ProxyConfig {
            inbound_port,
            outbound_port,
            dial: delivery,
            log,
            upstream,
        }),
        Cmd::Load(args) => load::run(args),
        Cmd::Connect {
            to,
            payload,
            timeout_ms,
            bind,
        } => {
            let outcome = probe::probe_from(
                bind,
                to,
                payload.as_bytes(),
                Duration::from_millis(timeout_ms),
            );
            println!("{}", serde_json::to_string(&outcome)?);
            Ok(())
        }
        Cmd::Addrs(args) => addrs::run(args),
        Cmd::DnsQuery(args) => dnsq::run(args),
        Cmd::Demo => demo::run(demo::Which::Quick),
        Cmd::DemoNode => demo::run(demo::Which::Node),
        Cmd::Hostile(args) => hostile::run(args),
        Cmd::Stream(args) => stream::client(args),
        Cmd::StreamServer(args) => stream::server(args),
    }
}
