//! Golden tests of the pure translation spec -> map rows: exactly what enroll installs for a
//! spec, as Istio's iptables tests pin the rules istio-iptables generates. No root, no kernel.
//!
//! `UPDATE_GOLDEN=1 cargo test -p redirect-agent --test rows_golden` rewrites the files; the
//! diff is then the review.

use std::{collections::BTreeMap, path::PathBuf};

use redirect_agent::{
    rows::PodRows,
    spec::{PodSpec, SpecError},
};
use redirect_common::InboundPolicy;

fn base(name: &str) -> PodSpec {
    PodSpec {
        name: name.into(),
        namespace: None,
        cgroup: "/sys/fs/cgroup/kubepods/pod1".into(),
        netns: "/var/run/netns/pod1".into(),
        pod_ips: vec!["198.18.0.10".parse().unwrap()],
        proxy_uid: 1337,
        inbound_policy: InboundPolicy::Passthrough,
        port_policies: BTreeMap::new(),
        exclude_inbound_ports: vec![],
        exclude_outbound_ports: vec![],
        exclude_outbound_cidrs: vec![],
        proxy_inbound_port: 15006,
        proxy_outbound_port: 15001,
        dns_capture: false,
        proxy_dns_port: 15053,
        ..Default::default()
    }
}

fn golden(name: &str, mut spec: PodSpec, slot: u32, cgroup_id: u64) {
    spec.check()
        .unwrap_or_else(|e| panic!("{name}: the spec must be valid: {e}"));
    let got = PodRows::new(&spec, slot, cgroup_id).to_string();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/rows")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(got, want, "rows of {name} differ from {}", path.display());
}

#[test]
fn minimal_ipv4_pod() {
    golden("minimal_ipv4", base("web-0"), 0, 4242);
}

#[test]
fn dual_stack_localhost_policy() {
    let mut s = base("legacy");
    s.pod_ips.push("2001:db8::10".parse().unwrap());
    s.inbound_policy = InboundPolicy::Localhost;
    golden("dual_stack_localhost", s, 7, 99);
}

#[test]
fn exclusions_and_port_policies_merge_per_port() {
    let mut s = base("rules");
    s.pod_ips.push("2001:db8::10".parse().unwrap());
    // 8081 is excluded both ways and has a policy: one row with three bits.
    s.exclude_inbound_ports = vec![8081, 15020, 8081];
    s.exclude_outbound_ports = vec![5432, 8081];
    s.port_policies = [
        (8081, InboundPolicy::Localhost),
        (9000, InboundPolicy::Passthrough),
    ]
    .into_iter()
    .collect();
    // Host bits are cleared; a duplicate after clearing is one row.
    s.exclude_outbound_cidrs = vec![
        "198.18.100.7/24".parse().unwrap(),
        "198.18.100.0/24".parse().unwrap(),
        "2001:db8:100::1/48".parse().unwrap(),
        "0.0.0.0/0".parse().unwrap(),
    ];
    golden("exclusions_and_port_policies", s, 4095, 1 << 40);
}

#[test]
fn include_lists_as_istio() {
    let mut s = base("includes");
    s.pod_ips.push("2001:db8::10".parse().unwrap());
    // With includeInboundPorts, excludeInboundPorts means nothing (Istio ignores it); Istio's
    // own never-captured ports stay excluded.
    s.include_inbound_ports = Some(vec![9090, 8080, 8080]);
    s.exclude_inbound_ports = vec![7070];
    s.include_outbound_ports = vec![5432];
    s.exclude_outbound_ports = vec![5432, 3306];
    // 198.18.1.0/24 lies inside an excluded range: left out, so the exclusion wins as in
    // Istio's rules; 198.18.0.0/16 holds the excluded 198.18.100.0/24, which the longer prefix
    // decides.
    s.include_outbound_cidrs = Some(vec![
        "198.18.0.0/16".parse().unwrap(),
        "198.19.1.0/24".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
    ]);
    s.exclude_outbound_cidrs = vec![
        "198.18.100.0/24".parse().unwrap(),
        "198.19.0.0/16".parse().unwrap(),
    ];
    golden("include_lists", s, 3, 77);
}

#[test]
fn empty_include_lists_capture_nothing_that_way() {
    let mut s = base("include-none");
    s.include_inbound_ports = Some(vec![]);
    s.include_outbound_cidrs = Some(vec![]);
    golden("include_nothing", s, 1, 5);
}

#[test]
fn dotted_name_is_valid() {
    // Kubernetes names may contain dots; bpffs refuses them, so the pin directory encodes them.
    let mut s = base("web-0.prod");
    s.check().unwrap();
    assert_eq!(redirect_agent::spec::pin_dir_name(&s.name), "web-0~2eprod");
}

/// Each refusal of dangerous input, one line naming the value.
#[test]
fn dangerous_specs_are_refused() {
    type Mutate = Box<dyn Fn(&mut PodSpec)>;
    let cases: Vec<(&str, Mutate, &str)> = vec![
        ("proxy uid 0", Box::new(|s| s.proxy_uid = 0), "uid 0"),
        (
            "limited broadcast",
            Box::new(|s| s.pod_ips = vec!["255.255.255.255".parse().unwrap()]),
            "broadcast",
        ),
        (
            "class E",
            Box::new(|s| s.pod_ips = vec!["240.0.0.1".parse().unwrap()]),
            "class E",
        ),
        (
            "this network",
            Box::new(|s| s.pod_ips = vec!["0.1.2.3".parse().unwrap()]),
            "0.0.0.0/8",
        ),
        (
            "link-local v4",
            Box::new(|s| s.pod_ips = vec!["169.254.1.1".parse().unwrap()]),
            "link-local",
        ),
        (
            "link-local v6",
            Box::new(|s| s.pod_ips = vec!["fe80::1".parse().unwrap()]),
            "link-local",
        ),
        (
            "v4-mapped",
            Box::new(|s| s.pod_ips = vec!["::ffff:198.18.0.10".parse().unwrap()]),
            "IPv4-mapped",
        ),
        (
            "multicast",
            Box::new(|s| s.pod_ips = vec!["224.0.0.1".parse().unwrap()]),
            "multicast",
        ),
        (
            "loopback",
            Box::new(|s| s.pod_ips = vec!["127.0.0.1".parse().unwrap()]),
            "loopback",
        ),
        (
            "address twice",
            Box::new(|s| s.pod_ips.push("198.18.0.10".parse().unwrap())),
            "twice",
        ),
        (
            "two v4",
            Box::new(|s| s.pod_ips.push("198.18.0.11".parse().unwrap())),
            "same family",
        ),
        (
            "inbound 15020",
            Box::new(|s| s.proxy_inbound_port = 15020),
            "never-captured",
        ),
        (
            "outbound 15090",
            Box::new(|s| s.proxy_outbound_port = 15090),
            "never-captured",
        ),
        (
            "inbound = admin",
            Box::new(|s| s.proxy_inbound_port = 15000),
            "another port of the proxy",
        ),
        (
            "inbound excluded",
            Box::new(|s| s.exclude_inbound_ports = vec![15006]),
            "excluded inbound",
        ),
        (
            "outbound excluded",
            Box::new(|s| s.exclude_outbound_ports = vec![15001]),
            "excluded outbound",
        ),
        (
            "port policy on proxy port",
            Box::new(|s| {
                s.port_policies.insert(15006, InboundPolicy::Localhost);
            }),
            "port policy",
        ),
        (
            "same ports",
            Box::new(|s| s.proxy_outbound_port = 15006),
            "must differ",
        ),
        (
            "name with slash",
            Box::new(|s| s.name = "a/b".into()),
            "invalid pod name",
        ),
        (
            "name starting with dot",
            Box::new(|s| s.name = ".x".into()),
            "invalid pod name",
        ),
        (
            "name with tilde",
            Box::new(|s| s.name = "a~2eb".into()),
            "invalid pod name",
        ),
        (
            "too many ports",
            Box::new(|s| s.exclude_outbound_ports = (20000..=40000).collect()),
            "per-pod limit of 16384",
        ),
        (
            "too many cidrs",
            Box::new(|s| {
                s.exclude_outbound_cidrs = (0..16385u32)
                    .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap())
                    .collect();
            }),
            "per-pod limit of 16384",
        ),
    ];
    for (what, mutate, expect) in cases {
        let mut s = base("web-0");
        mutate(&mut s);
        let err: SpecError = s.check().expect_err(what);
        let line = err.to_string();
        assert!(!line.contains('\n'), "{what}: not one line: {line}");
        assert!(
            line.contains(expect),
            "{what}: {line:?} does not say {expect:?}"
        );
    }
}

#[test]
fn records_keep_cidrs_typed() {
    let mut s = base("typed");
    s.exclude_outbound_cidrs = vec!["198.18.100.0/24".parse().unwrap()];
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["exclude_outbound_cidrs"][0], "198.18.100.0/24");
    let mut bad = json.clone();
    bad["exclude_outbound_cidrs"][0] = "198.18.100.0/33".into();
    let err = serde_json::from_value::<PodSpec>(bad).expect_err("a bad CIDR fails the read");
    assert!(err.to_string().contains("prefix length"), "{err}");
}
