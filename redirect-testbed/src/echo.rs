//! The application stand-in: a TCP echo server that first says where the connection landed.

use std::{
    io::{self, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::probe::Banner;

/// Binds a listening socket with `SO_REUSEADDR` (restarts must not wait out TIME_WAIT).
/// For an IPv6 address `IPV6_V6ONLY` is set to `v6only`; without it `[::]` would also take
/// IPv4 connections and hide whether a test's IPv4 path works.
pub fn listen(addr: SocketAddr, v6only: bool) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(v6only)?;
    }
    s.bind(&SockAddr::from(addr))?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Accepts forever; each connection gets a thread. With `plain` the connection is a pure echo
/// (for benchmarks), otherwise it starts with a [`Banner`] line.
pub fn serve(listener: TcpListener, plain: bool) -> io::Result<()> {
    loop {
        let (stream, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        };
        std::thread::spawn(move || {
            let _ = handle(stream, plain);
        });
    }
}

fn handle(mut stream: TcpStream, plain: bool) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    if !plain {
        let banner = Banner {
            local: stream.local_addr()?,
            peer: stream.peer_addr()?,
        };
        let mut line = serde_json::to_vec(&banner).map_err(io::Error::other)?;
        line.push(b'\n');
        stream.write_all(&line)?;
    }
    let mut reader = stream.try_clone()?;
    io::copy(&mut reader, &mut stream)?;
    stream.shutdown(std::net::Shutdown::Write)
}
