//! Listening TCP sockets of a network namespace, from the kernel's sock_diag netlink interface
//! (`netlink-packet-sock-diag`, the rust-netlink message types the agent's netlink code also
//! builds on) instead of parsing `/proc/PID/net/tcp` text.
//!
//! A netlink socket belongs to the namespace of the thread that creates it, and sock_diag dumps
//! only that namespace's sockets, so [`tcp_listeners`] runs on a thread that joined it.

use std::{io, net::SocketAddr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NetlinkAddr};

/// Local addresses of the TCP sockets in `LISTEN` state of the calling thread's network
/// namespace, IPv4 and IPv6.
pub(crate) fn tcp_listeners() -> io::Result<Vec<SocketAddr>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut out = Vec::new();
    for (family, id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut packet = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
                socket_id: id,
            })
            .into(),
        );
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        socket.send(&buf, 0)?;
        'dump: loop {
            let (buf, _) = socket.recv_from_full()?;
            let mut offset = 0;
            while offset < buf.len() {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                match msg.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        let id = &r.header.socket_id;
                        out.push(SocketAddr::new(id.source_address, id.source_port));
                    }
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    _ => {}
                }
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
    Ok(out)
}
