//! The one HTTP client of the tests, the demos and the benchmarks: a request without a body,
//! `Connection: close`, read to the end. Enough for the agent's `/metrics`, `/healthz` and
//! `/readyz` and for the fake API's health; a client crate would add a dependency tree to
//! every test binary for three lines of protocol.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// How long a request may take, connect and read alike.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// An answer: its status code, its head (status line and headers) and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// `METHOD path HTTP/1.1` to `addr`, with `Content-Length: 0`.
pub fn request(addr: SocketAddr, method: &str, path: &str) -> io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    // One write: `write!` on an unbuffered stream sends each piece of the format as a segment
    // of its own, and a server may read the first one alone.
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an HTTP response: {raw:?}"),
            )
        })?;
    Ok(Response {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// `GET path` on `addr`: (status, body).
pub fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    request(addr, "GET", path).map(|r| (r.status, r.body))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn reads_status_head_and_body_and_refuses_what_is_not_http() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for answer in [
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nnot ready",
                "hello",
            ] {
                let (mut c, _) = l.accept().unwrap();
                // The whole request head, however it was split into segments.
                let mut req = Vec::new();
                let mut b = [0u8; 256];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = c.read(&mut b).unwrap();
                    assert!(n > 0, "EOF before the request's end: {req:?}");
                    req.extend_from_slice(&b[..n]);
                }
                let req = String::from_utf8_lossy(&req);
                assert!(req.starts_with("GET /readyz HTTP/1.1\r\n"), "{req}");
                assert!(req.contains("\r\nConnection: close\r\n"), "{req}");
                c.write_all(answer.as_bytes()).unwrap();
            }
        });
        let r = request(addr, "GET", "/readyz").unwrap();
        assert_eq!(r.status, 503);
        assert!(r.head.contains("Content-Type: text/plain"), "{r:?}");
        assert_eq!(r.body, "not ready");
        let e = get(addr, "/readyz").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        server.join().unwrap();
    }
}
