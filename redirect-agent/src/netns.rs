//! Network namespaces of pods: opening and checking them, running work inside them, and
//! preparing them through rtnetlink.
//!
//! # Entering a namespace
//! `setns(CLONE_NEWNET)` changes the namespace of the calling thread only, so the work runs on a
//! dedicated, short-lived thread and the caller's thread never leaves its namespace. A netlink
//! socket belongs to the namespace of the thread that created it, so every request below opens
//! its socket on that thread.
//!
//! # Opening a namespace
//! [`NetnsHandle::open`] is the one check of a `--netns` path: it opens with `O_NONBLOCK` (a
//! FIFO passed as `--netns` must not block, least of all with a lock held), then checks that
//! the file is a namespace (`fstat`, nsfs magic) of the network type (`NS_GET_NSTYPE`) and not
//! the host's own network namespace (that of PID 1, or the agent's own), each refusal with its
//! own error.
//!
//! # Netlink: why netlink-packet-route + netlink-sys, synchronously
//! The agent speaks rtnetlink itself instead of running `ip`, so that a failure is read as an
//! errno (`EEXIST` for an address already there, as istio-init leaves `::6`), never as message
//! text. `rtnetlink` is built on the same two crates (the rust-netlink project's message types
//! and socket) and adds an async handle on top; the agent does a handful of request/ack
//! exchanges on a thread that has just entered a namespace, where a tokio runtime would only be
//! started and dropped again for each. So the requests are sent and their acks read
//! synchronously on that thread, with the message types of `netlink-packet-route`.
//!
//! # Minimum kernel version
//! 4.11 (`NS_GET_NSTYPE`); `setns` with a namespace file and rtnetlink are older.

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd},
        unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope},
    link::{LinkFlags, LinkMessage},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Istio's IPv4 inbound-passthrough source, `127.0.0.6`, as a std type.
pub fn passthrough_src4() -> Ipv4Addr {
    Ipv4Addr::from(redirect_common::INBOUND_PASSTHROUGH_SRC4)
}

/// Istio's IPv6 inbound-passthrough source, `::6`, as a std type: the address the agent adds to
/// a pod's `lo` so that the proxy can bind it.
pub fn passthrough_src6() -> Ipv6Addr {
    Ipv6Addr::from(redirect_common::INBOUND_PASSTHROUGH_SRC6)
}

/// A failure to open, check, enter or prepare a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened or examined (missing, or no permission).
    #[error("cannot open network namespace {path}")]
    Open { path: PathBuf, source: io::Error },
    /// The file is not a namespace at all: a FIFO, a regular file, a directory...
    #[error("{path} is {kind}, not a network namespace")]
    NotNamespace { path: PathBuf, kind: &'static str },
    /// The file is a namespace of another type (`/proc/PID/ns/mnt`, ...).
    #[error("{path} is a {kind} namespace, not a network namespace")]
    OtherNamespace { path: PathBuf, kind: &'static str },
    /// The file is the host's own network namespace (that of PID 1, or the agent's own):
    /// enrolling it would redirect the node's own traffic.
    #[error("{path} is the host's network namespace, not a pod's")]
    HostNetns { path: PathBuf },
    /// `setns` was refused.
    #[error("cannot enter network namespace {path}")]
    Enter { path: PathBuf, source: io::Error },
    /// A netlink request inside the namespace failed; `source` carries the kernel's errno.
    #[error("{op} in network namespace {path}")]
    Netlink {
        path: PathBuf,
        op: String,
        source: io::Error,
    },
}

impl NetnsError {
    /// The OS error behind this failure, if there is one (to tell, e.g., `EACCES` apart).
    pub fn io_source(&self) -> Option<&io::Error> {
        match self {
            NetnsError::Open { source, .. }
            | NetnsError::Enter { source, .. }
            | NetnsError::Netlink { source, .. } => Some(source),
            NetnsError::NotNamespace { .. }
            | NetnsError::OtherNamespace { .. }
            | NetnsError::HostNetns { .. } => None,
        }
    }
}

/// Identity of a namespace: the inode and device of its nsfs file. Two handles name the same
/// namespace exactly when their ids are equal, whatever paths they were opened from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId {
    pub dev: u64,
    pub inode: u64,
}

/// An open, checked network namespace of a pod (never the host's).
#[derive(Debug)]
pub struct NetnsHandle {
    file: File,
    path: PathBuf,
    id: NetnsId,
}

/// `NS_GET_NSTYPE`, `_IO(0xb7, 0x3)` in `linux/nsfs.h`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
/// `NSFS_MAGIC` in `linux/magic.h`.
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// The host's network namespace: that of PID 1 and the agent's own (its main thread never
/// leaves it). PID 1's is unreadable where the agent lacks ptrace access to it (some
/// sandboxes); the agent's own still stands for the host there.
const HOST_NETNS: [&str; 2] = ["/proc/1/ns/net", "/proc/self/ns/net"];

impl NetnsHandle {
    /// Opens `path` (`/var/run/netns/NAME`, `/proc/PID/ns/net`) and checks that it is a
    /// network namespace other than the host's. Never blocks: a FIFO is opened with
    /// `O_NONBLOCK` and refused.
    pub fn open(path: &Path) -> Result<NetnsHandle, NetnsError> {
        let handle = Self::open_any(path)?;
        let is_host = HOST_NETNS.iter().any(|host| {
            std::fs::metadata(host).is_ok_and(|m| {
                NetnsId {
                    dev: m.dev(),
                    inode: m.ino(),
                } == handle.id
            })
        });
        if is_host {
            return Err(NetnsError::HostNetns {
                path: path.to_owned(),
            });
        }
        Ok(handle)
    }

    /// [`open`](Self::open) without the host check.
    fn open_any(path: &Path) -> Result<NetnsHandle, NetnsError> {
        let open_err = |source: io::Error| NetnsError::Open {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let ft = meta.file_type();
        let kind = if ft.is_fifo() {
            Some("a FIFO")
        } else if ft.is_dir() {
            Some("a directory")
        } else if ft.is_socket() {
            Some("a socket")
        } else if ft.is_char_device() || ft.is_block_device() {
            Some("a device")
        } else if ft.is_file() {
            // nsfs files are regular files to fstat; the filesystem tells them apart.
            let st = nix::sys::statfs::fstatfs(&file).map_err(|e| open_err(e.into()))?;
            (st.filesystem_type().0 as i64 != NSFS_MAGIC).then_some("a regular file")
        } else {
            Some("not a regular file")
        };
        if let Some(kind) = kind {
            return Err(NetnsError::NotNamespace {
                path: path.to_owned(),
                kind,
            });
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd, which is open.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if nstype < 0 {
            return Err(open_err(io::Error::last_os_error()));
        }
        if nstype != libc::CLONE_NEWNET {
            return Err(NetnsError::OtherNamespace {
                path: path.to_owned(),
                kind: namespace_kind(nstype),
            });
        }
        let id = NetnsId {
            dev: meta.dev(),
            inode: meta.ino(),
        };
        Ok(NetnsHandle {
            file,
            path: path.to_owned(),
            id,
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// The namespace's inode (what `ip netns identify`, `lsns` and `/proc/PID/ns/net` show).
    pub fn inode(&self) -> u64 {
        self.id.inode
    }

    pub fn dev(&self) -> u64 {
        self.id.dev
    }

    /// Runs `f` on a new thread that has joined this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        run_in(&self.file, &self.path, f)
    }
}

impl AsFd for NetnsHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn namespace_kind(nstype: libc::c_int) -> &'static str {
    match nstype {
        libc::CLONE_NEWNS => "mount",
        libc::CLONE_NEWUTS => "uts",
        libc::CLONE_NEWIPC => "ipc",
        libc::CLONE_NEWUSER => "user",
        libc::CLONE_NEWPID => "pid",
        libc::CLONE_NEWCGROUP => "cgroup",
        0x80 /* CLONE_NEWTIME */ => "time",
        _ => "non-network",
    }
}

/// Opens a network namespace file (`/proc/PID/ns/net`, `/var/run/netns/NAME`) without checking
/// it; `O_NONBLOCK`, so that a FIFO does not block. Prefer [`NetnsHandle::open`].
pub fn open(path: &Path) -> Result<File, NetnsError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })
}

/// Runs `f` on a new thread that has joined the network namespace `ns`.
pub fn run_in<T: Send>(
    ns: &File,
    path: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetnsError::Enter {
                    path: path.to_owned(),
                    source: io::Error::from(e),
                }
            })?;
            Ok(f())
        })
        .join()
        .expect("netns worker panicked")
    })
}

/// Opens `path` and runs `f` inside that network namespace.
pub fn run_at<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let ns = open(path)?;
    run_in(&ns, path, f)
}

/// Whether [`add_lo_addr6`] added the address or found it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// Added by this call: the caller owns it and removes it when done.
    Now,
    /// Already on `lo` (istio-init, another tool, an earlier run): someone else's, to be left.
    AlreadyThere,
}

/// Whether [`remove_lo_addr6`] removed the address or found it gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    Now,
    WasAbsent,
}

/// Adds `addr/128` to `lo` in `ns` (scope host, no duplicate address detection, as
/// `ip -6 addr add ADDR/128 dev lo nodad` does) and sets `lo` up. An address already there is
/// reported as [`Added::AlreadyThere`], read from the kernel's `EEXIST`.
pub fn add_lo_addr6(ns: &NetnsHandle, addr: Ipv6Addr) -> Result<Added, NetnsError> {
    let op = format!("adding {addr}/128 to lo");
    let added = ns.run(|| -> io::Result<Added> {
        let nl = Netlink::open()?;
        let index = lo_index()?;
        let msg = lo_addr6_message(index, addr, true);
        let added = match nl.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(()) => Added::Now,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Added::AlreadyThere,
            Err(e) => return Err(e),
        };
        // A fresh namespace's lo is down; an address on a down lo is not usable.
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        nl.request(RouteNetlinkMessage::SetLink(link), 0)?;
        Ok(added)
    })?;
    added.map_err(|source| netlink_err(ns, op, source))
}

/// Removes `addr/128` from `lo` in `ns`; an address already gone (`EADDRNOTAVAIL`) is
/// [`Removed::WasAbsent`], so that removing converges when re-run.
pub fn remove_lo_addr6(ns: &NetnsHandle, addr: Ipv6Addr) -> Result<Removed, NetnsError> {
    let op = format!("removing {addr}/128 from lo");
    let removed = ns.run(|| -> io::Result<Removed> {
        let nl = Netlink::open()?;
        let msg = lo_addr6_message(lo_index()?, addr, false);
        match nl.request(RouteNetlinkMessage::DelAddress(msg), 0) {
            Ok(()) => Ok(Removed::Now),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(Removed::WasAbsent),
            Err(e) => Err(e),
        }
    })?;
    removed.map_err(|source| netlink_err(ns, op, source))
}

/// `100::/64` (RFC 6666, discard-only: never a real destination), made local on the pod's `lo`
/// so that captured IPv6 connections can go to one address of it per original destination
/// (`redirect_common::SPREAD6_PREFIX`; docs/PER-CONNECTION.md, "Port space").
pub fn spread_prefix6() -> (Ipv6Addr, u8) {
    (
        Ipv6Addr::from(redirect_common::SPREAD6_PREFIX),
        redirect_common::SPREAD6_PREFIX_LEN,
    )
}

/// `ip -6 route add local 100::/64 dev lo table local` in `ns` (every address of the prefix is
/// then this namespace's own, as 127.0.0.0/8 is, so a wildcard listener accepts them). A route
/// already there is [`Added::AlreadyThere`] (`EEXIST`).
pub fn add_spread_route6(ns: &NetnsHandle) -> Result<Added, NetnsError> {
    let (prefix, len) = spread_prefix6();
    let op = format!("adding the local route {prefix}/{len} on lo");
    let added = ns.run(|| -> io::Result<Added> {
        let nl = Netlink::open()?;
        let index = lo_index()?;
        // `::1`, the route's preferred source, exists only while lo is up.
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        nl.request(RouteNetlinkMessage::SetLink(link), 0)?;
        let msg = spread_route6_message(index);
        match nl.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(()) => Ok(Added::Now),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Added::AlreadyThere),
            Err(e) => Err(e),
        }
    })?;
    added.map_err(|source| netlink_err(ns, op, source))
}

/// Removes the route [`add_spread_route6`] adds; a route already gone (`ESRCH`, or `ENOENT`) is
/// [`Removed::WasAbsent`].
pub fn remove_spread_route6(ns: &NetnsHandle) -> Result<Removed, NetnsError> {
    let (prefix, len) = spread_prefix6();
    let op = format!("removing the local route {prefix}/{len} from lo");
    let removed = ns.run(|| -> io::Result<Removed> {
        let nl = Netlink::open()?;
        let msg = spread_route6_message(lo_index()?);
        match nl.request(RouteNetlinkMessage::DelRoute(msg), 0) {
            Ok(()) => Ok(Removed::Now),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOENT)) => {
                Ok(Removed::WasAbsent)
            }
            Err(e) => Err(e),
        }
    })?;
    removed.map_err(|source| netlink_err(ns, op, source))
}

/// The IPv6 addresses DNS capture sends an application's UDP queries to, one per server a
/// socket asks (`100::53:0` to `100::53:7`, `redirect_common::DNS_POOL6_BASE`): assigned to
/// `lo` (not only routed there), because a wildcard-bound DNS server answers from the address a
/// query reached (`IPV6_PKTINFO`) and the kernel accepts only an assigned address as that
/// source.
pub fn dns_pool6() -> impl Iterator<Item = Ipv6Addr> {
    let base = u128::from_be_bytes(redirect_common::DNS_POOL6_BASE);
    (0..redirect_common::DNS_POOL6_LEN).map(move |i| Ipv6Addr::from(base + u128::from(i)))
}

/// Assigns every [`dns_pool6`] address to `lo` in `ns` (as [`add_lo_addr6`], in one visit of
/// the namespace); those already there (`EEXIST`) are left as they are. The addresses are in
/// the datapath's own prefix, so they are the datapath's whoever added them.
pub fn add_dns_pool6(ns: &NetnsHandle) -> Result<(), NetnsError> {
    let op = "adding the DNS reply addresses 100::53:0-7 to lo".to_string();
    let done = ns.run(|| -> io::Result<()> {
        let nl = Netlink::open()?;
        let index = lo_index()?;
        for addr in dns_pool6() {
            let msg = lo_addr6_message(index, addr, true);
            match nl.request(
                RouteNetlinkMessage::NewAddress(msg),
                NLM_F_CREATE | NLM_F_EXCL,
            ) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        nl.request(RouteNetlinkMessage::SetLink(link), 0)
    })?;
    done.map_err(|source| netlink_err(ns, op, source))
}

/// Removes every [`dns_pool6`] address from `lo` in `ns`; absent ones (`EADDRNOTAVAIL`) are
/// fine, so that it converges when re-run. [`Removed::Now`] if any was there.
pub fn remove_dns_pool6(ns: &NetnsHandle) -> Result<Removed, NetnsError> {
    let op = "removing the DNS reply addresses 100::53:0-7 from lo".to_string();
    let removed = ns.run(|| -> io::Result<Removed> {
        let nl = Netlink::open()?;
        let index = lo_index()?;
        let mut removed = Removed::WasAbsent;
        for addr in dns_pool6() {
            let msg = lo_addr6_message(index, addr, false);
            match nl.request(RouteNetlinkMessage::DelAddress(msg), 0) {
                Ok(()) => removed = Removed::Now,
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    })?;
    removed.map_err(|source| netlink_err(ns, op, source))
}

/// The `local` route of the spread prefix on `lo`, in the local table, preferred source `::1`:
/// a socket that reaches it without a bound address (one bound to `[::]:port`, which the
/// datapath cannot bind to the pod's address any more) gets `::1` as its source, as it did when
/// captured IPv6 connections all went to `[::1]`, and as such an IPv4 socket gets `127.0.0.1`
/// (without the hint the kernel may pick `::6`, which is no pod's and not loopback).
fn spread_route6_message(lo: u32) -> RouteMessage {
    const RT_TABLE_LOCAL: u8 = 255;
    let (prefix, len) = spread_prefix6();
    let mut msg = RouteMessage::default();
    msg.header = RouteHeader {
        address_family: AddressFamily::Inet6,
        destination_prefix_length: len,
        table: RT_TABLE_LOCAL,
        protocol: RouteProtocol::Static,
        scope: RouteScope::Host,
        kind: RouteType::Local,
        ..msg.header
    };
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet6(prefix)));
    msg.attributes.push(RouteAttribute::Oif(lo));
    msg.attributes
        .push(RouteAttribute::PrefSource(RouteAddress::Inet6(
            Ipv6Addr::LOCALHOST,
        )));
    msg
}

/// Every address assigned to an interface of `ns` (IPv4 and IPv6, `lo` included), in the
/// kernel's order.
pub fn assigned_addrs(ns: &NetnsHandle) -> Result<Vec<IpAddr>, NetnsError> {
    let addrs = ns.run(|| -> io::Result<Vec<IpAddr>> {
        let nl = Netlink::open()?;
        let mut out = Vec::new();
        nl.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            |m| {
                if let RouteNetlinkMessage::NewAddress(a) = m {
                    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on
                    // point-to-point links and the same as IFA_LOCAL (or alone, for IPv6)
                    // otherwise.
                    let local = a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let address = a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    });
                    if let Some(ip) = local.or(address) {
                        out.push(ip);
                    }
                }
            },
        )?;
        Ok(out)
    })?;
    addrs.map_err(|source| netlink_err(ns, "listing addresses".into(), source))
}

fn netlink_err(ns: &NetnsHandle, op: String, source: io::Error) -> NetnsError {
    NetnsError::Netlink {
        path: ns.path.clone(),
        op,
        source,
    }
}

/// `lo`'s interface index in the calling thread's namespace (1 on every kernel the agent
/// supports, but asked rather than assumed).
fn lo_index() -> io::Result<u32> {
    nix::net::if_::if_nametoindex("lo").map_err(io::Error::from)
}

fn lo_addr6_message(index: u32, addr: Ipv6Addr, add: bool) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet6;
    msg.header.prefix_len = 128;
    msg.header.index = index;
    msg.header.scope = AddressScope::Host;
    msg.attributes.push(AddressAttribute::Address(addr.into()));
    if add {
        msg.header.flags = AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    msg
}

/// An rtnetlink socket of the calling thread's namespace.
struct Netlink {
    socket: Socket,
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink { socket })
    }

    fn send(&self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = 1;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        Ok(())
    }

    /// Reads messages until `done` says the exchange is over; each is handed to `each`.
    fn receive(
        &self,
        mut each: impl FnMut(NetlinkPayload<RouteNetlinkMessage>) -> io::Result<bool>,
    ) -> io::Result<()> {
        loop {
            let (buf, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < buf.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if each(msg.payload)? {
                    return Ok(());
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }

    /// Sends one request with `NLM_F_ACK` and returns the kernel's answer as an errno.
    fn request(&self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.send(msg, NLM_F_ACK | flags)?;
        let mut result = Ok(());
        self.receive(|payload| match payload {
            NetlinkPayload::Error(e) => {
                if e.code.is_some() {
                    result = Err(e.to_io());
                }
                Ok(true)
            }
            _ => Ok(false),
        })?;
        result
    }

    /// Sends a dump request and hands every answer to `each`.
    fn dump(
        &self,
        msg: RouteNetlinkMessage,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> io::Result<()> {
        self.send(msg, NLM_F_DUMP)?;
        self.receive(|payload| match payload {
            NetlinkPayload::Done(_) => Ok(true),
            NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
            NetlinkPayload::InnerMessage(m) => {
                each(m);
                Ok(false)
            }
            _ => Ok(false),
        })
    }
}
