//! Addresses as the kernel gives them to programs: four network-order words.

use redirect_common::{AF_INET, AF_INET6, SPREAD6_PREFIX};

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

    /// Loopback or an address of the IPv6 spread prefix (local in every enrolled pod with an
    /// IPv6 address): this namespace's own, never an off-pod destination.
    #[inline(always)]
    pub fn is_local(&self) -> bool {
        self.is_loopback() || self.is_spread6()
    }

    /// An address of `100::/64`, where captured IPv6 connections go ([`spread6`]).
    #[inline(always)]
    pub fn is_spread6(&self) -> bool {
        self.family == AF_INET6 && self.words[0] == SPREAD6_W0 && self.words[1] == SPREAD6_W1
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

/// The first two words of the spread prefix (`redirect_common::SPREAD6_PREFIX`, a /64), in
/// the kernel's network-order words.
const SPREAD6_W0: u32 = u32::from_ne_bytes([
    SPREAD6_PREFIX[0],
    SPREAD6_PREFIX[1],
    SPREAD6_PREFIX[2],
    SPREAD6_PREFIX[3],
]);
const SPREAD6_W1: u32 = u32::from_ne_bytes([
    SPREAD6_PREFIX[4],
    SPREAD6_PREFIX[5],
    SPREAD6_PREFIX[6],
    SPREAD6_PREFIX[7],
]);

/// The address a captured IPv6 connection to `words:port` is sent to: one of the 2^64 addresses
/// of `100::/64`, which the agent makes local on the pod's `lo`, chosen by a hash of the
/// original destination; the IPv6 twin of [`spread4`] (each destination its own four-tuple
/// space in front of the proxy's wildcard listener `[::]:15001`). Two destinations share an
/// address only if their 64-bit hashes collide.
#[inline(always)]
pub fn spread6(words: [u32; 4], port: u16) -> Addr {
    // Two independent multiplicative hashes of the four words and the port, one per host
    // word; xor-shifts between rounds carry high bits down. Straight-line code for the verifier.
    let mix = |seed: u32, k: u32| -> u32 {
        let mut h = seed ^ u32::from(port);
        h = (h ^ u32::from_be(words[0])).wrapping_mul(k);
        h ^= h >> 15;
        h = (h ^ u32::from_be(words[1])).wrapping_mul(k);
        h ^= h >> 13;
        h = (h ^ u32::from_be(words[2])).wrapping_mul(k);
        h ^= h >> 16;
        h = (h ^ u32::from_be(words[3])).wrapping_mul(k);
        h ^ (h >> 15)
    };
    let hi = mix(0x243f_6a88, 0x9e37_79b1);
    let lo = mix(0x85a3_08d3, 0x85eb_ca6b);
    Addr::v6([SPREAD6_W0, SPREAD6_W1, hi.to_be(), lo.to_be()])
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
