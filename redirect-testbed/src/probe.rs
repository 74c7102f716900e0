//! The test client: connect, send a payload, half-close, and classify what comes back.

use std::{
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// The first line an `echo` server writes on a connection: the addresses as the server's
/// socket sees them, so a test learns where a redirected connection really landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Banner {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// How one probe connection ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "OutcomeRecord", try_from = "OutcomeRecord")]
pub enum Outcome {
    /// Got the server's banner, then exactly the payload back, then EOF.
    Echoed { server: Banner, local: SocketAddr },
    /// The connect was answered with a RST (nobody listening at the final destination).
    Refused,
    /// An established connection was reset (e.g. a proxy closed it with data unread).
    Reset {
        server: Option<Banner>,
        local: Option<SocketAddr>,
    },
    /// EOF before anything came back (e.g. a proxy whose upstream connect failed).
    Closed { local: SocketAddr },
    /// No answer in time, to the connect or to the payload.
    Timeout {
        server: Option<Banner>,
        local: Option<SocketAddr>,
    },
    /// Something came back, but not a banner followed by the payload.
    Mismatch {
        server: Option<Banner>,
        local: SocketAddr,
        received: String,
    },
    /// The connect failed otherwise (EPERM from a cgroup hook, unreachable, ...).
    Error { detail: String },
}

impl Outcome {
    /// The `result` string of the JSON form: `echoed`, `refused`, ...
    pub fn result(&self) -> &'static str {
        match self {
            Outcome::Echoed { .. } => "echoed",
            Outcome::Refused => "refused",
            Outcome::Reset { .. } => "reset",
            Outcome::Closed { .. } => "closed",
            Outcome::Timeout { .. } => "timeout",
            Outcome::Mismatch { .. } => "mismatch",
            Outcome::Error { .. } => "error",
        }
    }

    pub fn is_echoed(&self) -> bool {
        matches!(self, Outcome::Echoed { .. })
    }

    /// The server's banner, when one arrived.
    pub fn server(&self) -> Option<Banner> {
        match self {
            Outcome::Echoed { server, .. } => Some(*server),
            Outcome::Reset { server, .. }
            | Outcome::Timeout { server, .. }
            | Outcome::Mismatch { server, .. } => *server,
            _ => None,
        }
    }

    /// The client's own address, when the connect succeeded.
    pub fn local(&self) -> Option<SocketAddr> {
        match self {
            Outcome::Echoed { local, .. }
            | Outcome::Closed { local }
            | Outcome::Mismatch { local, .. } => Some(*local),
            Outcome::Reset { local, .. } | Outcome::Timeout { local, .. } => *local,
            _ => None,
        }
    }
}

/// The flat JSON form: `{"result":..,"server":{..}|null,"local":..|null}` (+ `detail`).
#[derive(Serialize, Deserialize)]
struct OutcomeRecord {
    result: String,
    server: Option<Banner>,
    local: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl From<Outcome> for OutcomeRecord {
    fn from(o: Outcome) -> Self {
        let (result, server, local) = (o.result().to_owned(), o.server(), o.local());
        let detail = match o {
            Outcome::Mismatch { received, .. } => Some(received),
            Outcome::Error { detail } => Some(detail),
            _ => None,
        };
        OutcomeRecord {
            result,
            server,
            local,
            detail,
        }
    }
}

impl TryFrom<OutcomeRecord> for Outcome {
    type Error = String;

    fn try_from(r: OutcomeRecord) -> Result<Self, String> {
        let need_local = || r.local.ok_or_else(|| format!("{} without local", r.result));
        Ok(match r.result.as_str() {
            "echoed" => Outcome::Echoed {
                server: r.server.ok_or("echoed without server")?,
                local: need_local()?,
            },
            "refused" => Outcome::Refused,
            "reset" => Outcome::Reset {
                server: r.server,
                local: r.local,
            },
            "closed" => Outcome::Closed {
                local: need_local()?,
            },
            "timeout" => Outcome::Timeout {
                server: r.server,
                local: r.local,
            },
            "mismatch" => Outcome::Mismatch {
                server: r.server,
                local: need_local()?,
                received: r.detail.clone().unwrap_or_default(),
            },
            "error" => Outcome::Error {
                detail: r.detail.clone().unwrap_or_default(),
            },
            other => return Err(format!("unknown result {other:?}")),
        })
    }
}

/// Connects to `addr`, sends `payload`, half-closes, and reads until EOF, all within
/// `timeout`. Call it inside [`crate::Pod::in_netns`] to probe from a pod.
pub fn probe(addr: SocketAddr, payload: &[u8], timeout: Duration) -> Outcome {
    probe_from(None, addr, payload, timeout)
}

/// [`probe`] with the client socket bound to `bind` first (port 0 for any).
pub fn probe_from(
    bind: Option<SocketAddr>,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Outcome {
    let deadline = Instant::now() + timeout;
    let stream = match connect(bind, addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            return match e.kind() {
                io::ErrorKind::ConnectionRefused => Outcome::Refused,
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Outcome::Timeout {
                    server: None,
                    local: None,
                },
                io::ErrorKind::ConnectionReset => Outcome::Reset {
                    server: None,
                    local: None,
                },
                _ => Outcome::Error {
                    detail: e.to_string(),
                },
            }
        }
    };
    let local = match stream.local_addr() {
        Ok(l) => l,
        Err(e) => {
            return Outcome::Error {
                detail: format!("getsockname: {e}"),
            }
        }
    };
    exchange(stream, local, payload, deadline)
}

fn connect(bind: Option<SocketAddr>, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(b) = bind {
        s.bind(&SockAddr::from(b))?;
    }
    s.connect_timeout(&SockAddr::from(addr), timeout)?;
    Ok(s.into())
}

fn exchange(
    mut stream: TcpStream,
    local: SocketAddr,
    payload: &[u8],
    deadline: Instant,
) -> Outcome {
    let classify = |e: &io::Error, received: &[u8]| {
        let server = parse_banner(received);
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Outcome::Timeout {
                server,
                local: Some(local),
            },
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected => Outcome::Reset {
                server,
                local: Some(local),
            },
            _ => Outcome::Error {
                detail: e.to_string(),
            },
        }
    };
    let remaining = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let _ = stream.set_write_timeout(Some(remaining()));
    // Half-close after the payload: the echo server then knows it has everything, answers,
    // and closes, so EOF marks a complete answer without any framing.
    // A peer that already closed or reset makes these fail (EPIPE, ENOTCONN); what the read
    // side then returns tells which of the two it was, so only a timeout ends the probe here.
    if let Err(e) = stream
        .write_all(payload)
        .and_then(|()| stream.shutdown(Shutdown::Write))
    {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            return classify(&e, &[]);
        }
    }
    let mut received = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if Instant::now() >= deadline {
            return Outcome::Timeout {
                server: parse_banner(&received),
                local: Some(local),
            };
        }
        let _ = stream.set_read_timeout(Some(remaining()));
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return classify(&e, &received),
        }
    }
    if received.is_empty() {
        return Outcome::Closed { local };
    }
    let server = parse_banner(&received);
    match (server, received.iter().position(|&b| b == b'\n')) {
        (Some(server), Some(nl)) if &received[nl + 1..] == payload => {
            Outcome::Echoed { server, local }
        }
        _ => Outcome::Mismatch {
            server,
            local,
            received: String::from_utf8_lossy(&received).into_owned(),
        },
    }
}

fn parse_banner(received: &[u8]) -> Option<Banner> {
    let nl = received.iter().position(|&b| b == b'\n')?;
    serde_json::from_slice(&received[..nl]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let o = Outcome::Echoed {
            server: Banner {
                local: "198.18.0.2:80".parse().unwrap(),
                peer: "[2001:db8::3]:4000".parse().unwrap(),
            },
            local: "[2001:db8::3]:4000".parse().unwrap(),
        };
        let s = serde_json::to_string(&o).unwrap();
        assert_eq!(
            s,
            r#"{"result":"echoed","server":{"local":"198.18.0.2:80","peer":"[2001:db8::3]:4000"},"local":"[2001:db8::3]:4000"}"#
        );
        assert_eq!(serde_json::from_str::<Outcome>(&s).unwrap(), o);
        let r = serde_json::to_string(&Outcome::Refused).unwrap();
        assert_eq!(r, r#"{"result":"refused","server":null,"local":null}"#);
        assert_eq!(
            serde_json::from_str::<Outcome>(&r).unwrap(),
            Outcome::Refused
        );
    }

    #[test]
    fn refused_on_closed_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        assert_eq!(probe(addr, b"x", Duration::from_secs(1)), Outcome::Refused);
    }
}
