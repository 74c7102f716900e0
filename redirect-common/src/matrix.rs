//! The conformance matrix of `docs/DESIGN.md`: where an inbound connection to `POD_IP:P` ends,
//! for each kind of application listener, inbound policy and proxy dial mode.
//!
//! The one prediction of it: the datapath tests, the demo and `redirect-agent detect` all ask
//! [`expect`] (or [`reachable`]) instead of writing the table down again. Pure and `no_std`.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{InboundPolicy, INBOUND_PASSTHROUGH_SRC4, INBOUND_PASSTHROUGH_SRC6};

/// [`INBOUND_PASSTHROUGH_SRC4`] (`127.0.0.6`) as an address.
pub const PASSTHROUGH_SRC4: Ipv4Addr = {
    let a = INBOUND_PASSTHROUGH_SRC4;
    Ipv4Addr::new(a[0], a[1], a[2], a[3])
};
/// [`INBOUND_PASSTHROUGH_SRC6`] (`::6`) as an address.
pub const PASSTHROUGH_SRC6: Ipv6Addr =
    Ipv6Addr::from_bits(u128::from_be_bytes(INBOUND_PASSTHROUGH_SRC6));

/// The passthrough source of `ip`'s family.
pub const fn passthrough_src(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(PASSTHROUGH_SRC4),
        IpAddr::V6(_) => IpAddr::V6(PASSTHROUGH_SRC6),
    }
}

/// The loopback address of `ip`'s family.
pub const fn loopback(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// What an application's listening socket is bound to: the matrix's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AppBind {
    /// The pod's own address (`POD_IP:P`).
    PodIp,
    /// `127.0.0.1:P` / `[::1]:P`.
    Loopback,
    /// `0.0.0.0:P` / `[::]:P`.
    Wildcard,
}

impl AppBind {
    pub const ALL: [AppBind; 3] = [AppBind::PodIp, AppBind::Loopback, AppBind::Wildcard];
}

/// How the proxy dials the application for an inbound connection to `POD_IP:P`: its own
/// configuration, not the pod's policy (which is [`InboundPolicy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum ProxyDial {
    /// `127.0.0.1:P` / `[::1]:P`, as Envoy did before Istio 1.10.
    Loopback,
    /// `POD_IP:P` from `127.0.0.6` / `::6`, as since Istio 1.10.
    PodIp,
}

impl ProxyDial {
    pub const ALL: [ProxyDial; 2] = [ProxyDial::Loopback, ProxyDial::PodIp];

    /// The name on the command line (`--delivery`) and in logs.
    pub const fn name(self) -> &'static str {
        match self {
            ProxyDial::Loopback => "loopback",
            ProxyDial::PodIp => "pod-ip",
        }
    }
}

impl core::fmt::Display for ProxyDial {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A proxy dial mode name that is neither `loopback` nor `pod-ip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownProxyDial;

impl core::fmt::Display for UnknownProxyDial {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("expected loopback or pod-ip")
    }
}

impl core::error::Error for UnknownProxyDial {}

impl core::str::FromStr for ProxyDial {
    type Err = UnknownProxyDial;
    fn from_str(s: &str) -> Result<Self, UnknownProxyDial> {
        ProxyDial::ALL
            .into_iter()
            .find(|d| d.name() == s.trim())
            .ok_or(UnknownProxyDial)
    }
}

/// Which of the application's addresses a delivered connection ends at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// `POD_IP:P`.
    PodIp,
    /// `127.0.0.1:P` / `[::1]:P`.
    Loopback,
}

/// Whom the application sees as the connection's peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// `127.0.0.6` / `::6`.
    PassthroughSrc,
    /// `127.0.0.1` / `::1`.
    Loopback,
}

/// A cell of the matrix that reaches the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub at: Landing,
    pub peer: Peer,
}

impl Delivered {
    /// The application's socket address for the pod address `pod_ip` and port `port`.
    pub const fn local(self, pod_ip: IpAddr, port: u16) -> (IpAddr, u16) {
        let ip = match self.at {
            Landing::PodIp => pod_ip,
            Landing::Loopback => loopback(pod_ip),
        };
        (ip, port)
    }

    /// The peer address the application sees, in `pod_ip`'s family.
    pub const fn peer_ip(self, pod_ip: IpAddr) -> IpAddr {
        match self.peer {
            Peer::PassthroughSrc => passthrough_src(pod_ip),
            Peer::Loopback => loopback(pod_ip),
        }
    }
}

/// Where the policy sends an inbound connection for an application bound as `bind`, whatever
/// the proxy dials: `None` when the application is not reachable (refused).
pub const fn reachable(policy: InboundPolicy, bind: AppBind) -> Option<Landing> {
    match (policy, bind) {
        (InboundPolicy::Passthrough, AppBind::Loopback)
        | (InboundPolicy::Localhost, AppBind::PodIp) => None,
        (InboundPolicy::Passthrough, _) => Some(Landing::PodIp),
        (InboundPolicy::Localhost, _) => Some(Landing::Loopback),
    }
}

/// The full cell: `None` when refused, else where it lands and whom the application sees.
///
/// The policy decides where a connection ends. Its source is `127.0.0.6` / `::6` under
/// passthrough; under localhost it is whatever the proxy had: `127.0.0.1` for a proxy that
/// dials loopback, and the `127.0.0.6` that a pod-IP proxy binds itself before connecting.
pub const fn expect(policy: InboundPolicy, bind: AppBind, dial: ProxyDial) -> Option<Delivered> {
    let Some(at) = reachable(policy, bind) else {
        return None;
    };
    let peer = match (policy, dial) {
        (InboundPolicy::Passthrough, _) | (InboundPolicy::Localhost, ProxyDial::PodIp) => {
            Peer::PassthroughSrc
        }
        (InboundPolicy::Localhost, ProxyDial::Loopback) => Peer::Loopback,
    };
    Some(Delivered { at, peer })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_the_abi_constants() {
        assert_eq!(PASSTHROUGH_SRC4.octets(), [127, 0, 0, 6]);
        assert_eq!(PASSTHROUGH_SRC6.octets(), INBOUND_PASSTHROUGH_SRC6);
        assert_eq!(
            passthrough_src(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6))
        );
    }

    /// DESIGN.md's table, written out once more only here, as the test of [`expect`].
    #[test]
    fn the_matrix() {
        use AppBind as B;
        use InboundPolicy as P;
        use ProxyDial as D;
        let pod = Delivered {
            at: Landing::PodIp,
            peer: Peer::PassthroughSrc,
        };
        let lo_lo = Delivered {
            at: Landing::Loopback,
            peer: Peer::Loopback,
        };
        let lo_six = Delivered {
            at: Landing::Loopback,
            peer: Peer::PassthroughSrc,
        };
        let table = [
            (P::Passthrough, B::PodIp, [Some(pod), Some(pod)]),
            (P::Passthrough, B::Loopback, [None, None]),
            (P::Passthrough, B::Wildcard, [Some(pod), Some(pod)]),
            (P::Localhost, B::PodIp, [None, None]),
            (P::Localhost, B::Loopback, [Some(lo_lo), Some(lo_six)]),
            (P::Localhost, B::Wildcard, [Some(lo_lo), Some(lo_six)]),
        ];
        for (p, b, cells) in table {
            for (d, want) in [D::Loopback, D::PodIp].into_iter().zip(cells) {
                assert_eq!(expect(p, b, d), want, "{p} {b:?} {d}");
                assert_eq!(reachable(p, b), want.map(|c| c.at), "{p} {b:?}");
            }
        }
    }

    #[test]
    fn dial_names_round_trip() {
        for d in ProxyDial::ALL {
            assert_eq!(d.name().parse::<ProxyDial>(), Ok(d));
        }
        assert_eq!("podip".parse::<ProxyDial>(), Err(UnknownProxyDial));
    }
}
