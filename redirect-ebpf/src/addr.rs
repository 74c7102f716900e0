//! Addresses as the kernel gives them to programs: four network-order words.

use redirect_common::{AF_INET, AF_INET6};

/// An address of either family. IPv4 lives in word 0.
#[derive(Clone, Copy)]
pub struct Addr {
    pub words: [u32; 4],
    pub family: u16,
}

const LOOPBACK6_LAST: u32 = u32::from_be(1); // ::1
const PASSTHROUGH6_LAST: u32 = u32::from_be(6); // ::6
/// Third word of `::ffff:a.b.c.d`.
const MAPPED_PREFIX: u32 = u32::from_be(0xffff);

impl Addr {
    #[inline(always)]
    pub fn v4(ip: u32) -> Self {
        Addr {
            words: [ip, 0, 0, 0],
            family: AF_INET,
        }
    }

    #[inline(always)]
    pub fn v6(words: [u32; 4]) -> Self {
        Addr {
            words,
            family: AF_INET6,
        }
    }

    /// 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104.
    #[inline(always)]
    pub fn is_loopback(&self) -> bool {
        if self.family == AF_INET {
            return is_loopback4(self.words[0]);
        }
        let [a, b, c, d] = self.words;
        if a == 0 && b == 0 && c == 0 && d == LOOPBACK6_LAST {
            return true;
        }
        a == 0 && b == 0 && c == MAPPED_PREFIX && is_loopback4(d)
    }

    /// 127.0.0.6 or ::6, the source of the proxy's inbound delivery.
    #[inline(always)]
    pub fn is_passthrough_src(&self) -> bool {
        if self.family == AF_INET {
            return self.words[0] == u32::from_be(0x7f00_0006);
        }
        let [a, b, c, d] = self.words;
        a == 0 && b == 0 && c == 0 && d == PASSTHROUGH6_LAST
    }

    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket connects to for
    /// an IPv4 destination) as the IPv4 address it is; any other address unchanged.
    #[inline(always)]
    pub fn unmapped(self) -> Self {
        let [a, b, c, d] = self.words;
        if self.family == AF_INET6 && a == 0 && b == 0 && c == MAPPED_PREFIX {
            Addr::v4(d)
        } else {
            self
        }
    }

    /// The address as a socket of `family` names it: an IPv4 address for an `AF_INET6` socket
    /// is `::ffff:a.b.c.d`.
    #[inline(always)]
    pub fn words_for(&self, family: u16) -> [u32; 4] {
        if family == AF_INET6 && self.family == AF_INET {
            [0, 0, MAPPED_PREFIX, self.words[0]]
        } else {
            self.words
        }
    }

    #[inline(always)]
    pub fn is_unspecified(&self) -> bool {
        let [a, b, c, d] = self.words;
        a | b | c | d == 0
    }
}

#[inline(always)]
fn is_loopback4(ip_be: u32) -> bool {
    // First octet is the lowest byte of a network-order word on a little-endian machine and the
    // highest on a big-endian one; from_be makes it the highest on both.
    u32::from_be(ip_be) >> 24 == 127
}

/// 127.0.0.1 or ::1 in network order, for the family.
#[inline(always)]
pub fn loopback(family: u16) -> Addr {
    if family == AF_INET {
        Addr::v4(u32::from_be(0x7f00_0001))
    } else {
        Addr::v6([0, 0, 0, LOOPBACK6_LAST])
    }
}

/// First address of 127.128.0.0/12, where captured IPv4 connections go (host order).
const SPREAD4_BASE: u32 = 0x7f80_0000;
/// Host bits of 127.128.0.0/12.
const SPREAD4_BITS: u32 = 20;

/// The loopback address a captured IPv4 connection to `ip_be:port` is sent to: one of the
/// 2^20 addresses of 127.128.0.0/12, chosen by a hash of the original destination, so that
/// connections to different destinations get different four-tuples (each its own ephemeral
/// port range, as under iptables) in front of the proxy's wildcard listener (0.0.0.0:15001
/// accepts every local address). Two destinations that hash alike share one range: fewer ports,
/// never a wrong answer (`ORIG_DST` is keyed by the whole four-tuple).
#[inline(always)]
pub fn spread4(ip_be: u32, port: u16) -> Addr {
    // Fibonacci hashing: multiplying by an odd constant mixes every input bit into the high
    // bits, which are the ones kept.
    let key = u32::from_be(ip_be) ^ (u32::from(port) << 16 | u32::from(port));
    let h = key.wrapping_mul(0x9e37_79b1) >> (32 - SPREAD4_BITS);
    Addr::v4((SPREAD4_BASE | h).to_be())
}

/// `struct sockaddr_in`, as bpf_bind and SO_ORIGINAL_DST callers expect it.
#[repr(C)]
pub struct SockaddrIn {
    pub family: u16,
    pub port_be: u16,
    pub addr: u32,
    pub zero: [u8; 8],
}

/// `struct sockaddr_in6`.
#[repr(C)]
pub struct SockaddrIn6 {
    pub family: u16,
    pub port_be: u16,
    pub flowinfo: u32,
    pub addr: [u32; 4],
    pub scope_id: u32,
}
