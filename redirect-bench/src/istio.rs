//! Istio's sidecar capture rules (REDIRECT mode, proxy uid and gid 1337), generated from a
//! table of the rules as `istio-iptables` writes them, so that the benchmark's iptables modes
//! run exactly what a mesh installs today.
//!
//! Source of the table: the `iptables-restore` input that `istio-iptables` logs for a default
//! sidecar (Istio 1.10 and later: the `-o lo -s 127.0.0.6/32 -j RETURN` rule lets the proxy's
//! pod-IP delivery through; it is what Istio 1.10 added for inbound passthrough).
//! Exclusions go where `istio-iptables` puts them: inbound ports as `RETURN` rules in
//! `ISTIO_INBOUND` before the catch-all, outbound CIDRs as `RETURN` rules at the end of
//! `ISTIO_OUTPUT` before the jump to `ISTIO_REDIRECT`.

use std::fmt::Write as _;

/// Which generation of Istio's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// Istio >= 1.10: the proxy delivers to `POD_IP:P` from `127.0.0.6`, and a rule lets that
    /// connection through.
    Passthrough,
    /// Istio < 1.10: the proxy delivers to `127.0.0.1:P`; no `127.0.0.6` rule.
    Localhost,
}

/// Where a row of the table goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// A fixed rule.
    Fixed,
    /// The rule exists only in this generation.
    Only(Generation),
    /// Place of the `--dport P -j RETURN` rules for excluded inbound ports.
    InboundExclusions,
    /// Place of the `-d CIDR -j RETURN` rules for excluded outbound ranges.
    OutboundExclusions,
}

/// The nat table of a default sidecar, in `istio-iptables` order.
const TABLE: &[(Slot, &str)] = &[
    (Slot::Fixed, "-N ISTIO_INBOUND"),
    (Slot::Fixed, "-N ISTIO_REDIRECT"),
    (Slot::Fixed, "-N ISTIO_IN_REDIRECT"),
    (Slot::Fixed, "-N ISTIO_OUTPUT"),
    (
        Slot::Fixed,
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
    ),
    (
        Slot::Fixed,
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ),
    (
        Slot::Fixed,
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    ),
    (Slot::Fixed, "-A PREROUTING -p tcp -j ISTIO_INBOUND"),
    (
        Slot::Fixed,
        "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
    ),
    (
        Slot::Fixed,
        "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
    ),
    (
        Slot::Fixed,
        "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
    ),
    (Slot::InboundExclusions, ""),
    (Slot::Fixed, "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"),
    (Slot::Fixed, "-A OUTPUT -p tcp -j ISTIO_OUTPUT"),
    (Slot::Only(Generation::Passthrough), PASSTHROUGH_RULE),
    (
        Slot::Fixed,
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
    ),
    (
        Slot::Fixed,
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    ),
    (
        Slot::Fixed,
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    ),
    (
        Slot::Fixed,
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
    ),
    (
        Slot::Fixed,
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
    ),
    (
        Slot::Fixed,
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
    ),
    (Slot::Fixed, "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN"),
    (Slot::OutboundExclusions, ""),
    (Slot::Fixed, "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"),
];

/// The rule that captures the application's outbound connections (counted by the path check),
/// as the parts that identify it in `iptables-save` output (which reorders matches).
pub const OUTBOUND_REDIRECT: &[&str] = &["-A ISTIO_REDIRECT ", "-j REDIRECT --to-ports 15001"];
/// The rule that captures inbound connections.
pub const INBOUND_REDIRECT: &[&str] = &["-A ISTIO_IN_REDIRECT ", "-j REDIRECT --to-ports 15006"];
/// The Istio 1.10 rule that lets the proxy's pod-IP delivery through.
pub const PASSTHROUGH_RETURN: &[&str] = &["-A ISTIO_OUTPUT ", "-s 127.0.0.6/32", "-j RETURN"];
/// Its text in the table.
const PASSTHROUGH_RULE: &str = "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN";

/// What the operator configured for the pod.
#[derive(Clone, Debug, Default)]
pub struct Exclusions {
    /// `traffic.sidecar.istio.io/excludeInboundPorts`.
    pub inbound_ports: Vec<u16>,
    /// `traffic.sidecar.istio.io/excludeOutboundIPRanges` (IPv4 CIDRs).
    pub outbound_cidrs: Vec<String>,
}

/// `iptables-restore --noflush` input for one pod.
pub fn restore_input(generation: Generation, excl: &Exclusions) -> String {
    let mut out = String::from("* nat\n");
    for (slot, rule) in TABLE {
        match slot {
            Slot::Fixed => writeln!(out, "{rule}"),
            Slot::Only(g) if *g == generation => writeln!(out, "{rule}"),
            Slot::Only(_) => Ok(()),
            Slot::InboundExclusions => excl
                .inbound_ports
                .iter()
                .try_for_each(|p| writeln!(out, "-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN")),
            Slot::OutboundExclusions => excl
                .outbound_cidrs
                .iter()
                .try_for_each(|c| writeln!(out, "-A ISTIO_OUTPUT -d {c} -j RETURN")),
        }
        .expect("writing to a String cannot fail");
    }
    out.push_str("COMMIT\n");
    out
}

/// Packet counts by rule, from `iptables-save -c` output (`[pkts:bytes] -A CHAIN ...`).
pub fn packet_counts(save: &str) -> Vec<(String, u64)> {
    save.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('[')?;
            let (counts, rule) = rest.split_once("] ")?;
            let pkts = counts.split(':').next()?.parse().ok()?;
            Some((rule.trim().to_owned(), pkts))
        })
        .collect()
}

/// Packets that matched the rule(s) containing every part of `rule` (0 when absent).
pub fn packets_of(counts: &[(String, u64)], rule: &[&str]) -> u64 {
    counts
        .iter()
        .filter(|(r, _)| rule.iter().all(|part| r.contains(part)))
        .map(|(_, p)| p)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exactly what `istio-iptables` logs for a default sidecar since Istio 1.10.
    const GOLDEN_PASSTHROUGH: &str = "\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
";

    #[test]
    fn default_sidecar_matches_istio() {
        assert_eq!(
            restore_input(Generation::Passthrough, &Exclusions::default()),
            GOLDEN_PASSTHROUGH
        );
    }

    #[test]
    fn localhost_generation_lacks_only_the_passthrough_rule() {
        let expected = GOLDEN_PASSTHROUGH.replace(&format!("{PASSTHROUGH_RULE}\n"), "");
        assert_eq!(
            restore_input(Generation::Localhost, &Exclusions::default()),
            expected
        );
    }

    #[test]
    fn exclusions_go_where_istio_puts_them() {
        let excl = Exclusions {
            inbound_ports: vec![9000, 9001],
            outbound_cidrs: vec!["198.19.0.1/32".into(), "198.19.0.2/32".into()],
        };
        let got = restore_input(Generation::Passthrough, &excl);
        let expected = GOLDEN_PASSTHROUGH
            .replace(
                "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n",
                "-A ISTIO_INBOUND -p tcp --dport 9000 -j RETURN\n\
                 -A ISTIO_INBOUND -p tcp --dport 9001 -j RETURN\n\
                 -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n",
            )
            .replace(
                "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n",
                "-A ISTIO_OUTPUT -d 198.19.0.1/32 -j RETURN\n\
                 -A ISTIO_OUTPUT -d 198.19.0.2/32 -j RETURN\n\
                 -A ISTIO_OUTPUT -j ISTIO_REDIRECT\n",
            );
        assert_eq!(got, expected);
    }

    #[test]
    fn rule_count_grows_one_per_exclusion() {
        let base = restore_input(Generation::Passthrough, &Exclusions::default())
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count();
        let excl = Exclusions {
            inbound_ports: (20000..21000).collect(),
            outbound_cidrs: (0..1000)
                .map(|i| format!("198.19.{}.{}/32", i / 256, i % 256))
                .collect(),
        };
        let n = restore_input(Generation::Passthrough, &excl)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count();
        assert_eq!(n, base + 2000);
    }

    #[test]
    fn parses_save_counters() {
        let save = "*nat\n:PREROUTING ACCEPT [3:180]\n\
                    [7:420] -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n\
                    [0:0] -A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN\nCOMMIT\n";
        let c = packet_counts(save);
        assert_eq!(packets_of(&c, INBOUND_REDIRECT), 7);
        assert_eq!(packets_of(&c, PASSTHROUGH_RETURN), 0);
        assert_eq!(packets_of(&c, OUTBOUND_REDIRECT), 0);
    }
}
