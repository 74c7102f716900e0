//! The feature probe against the running kernel: one test per feature (each must be present on
//! the kernels the datapath supports; a test failing names what the kernel lacks), the JSON
//! schema of `redirect-agent probe --output json`, and `require_mandatory`.
//!
//! Needs root (loads eBPF programs, creates a cgroup and a network namespace); without it each
//! test says so and returns, except under `CI=true`, where that is a failure.

use std::process::Command;

use redirect_agent::probe;
use redirect_testbed::{require, Need};

fn assert_present(name: &str) {
    require!(Need::Root);
    let feat = probe::feature(name).unwrap_or_else(|| panic!("no feature {name}"));
    let st = probe::check(feat);
    assert!(
        st.present,
        "{name} ({}) is missing on kernel {}; Linux {} brings it; without it: {}; detail: {}",
        feat.kind.as_str(),
        probe::kernel_release(),
        feat.since,
        feat.impact,
        st.detail.as_deref().unwrap_or("-")
    );
}

macro_rules! feature_tests {
    ($($test:ident => $name:literal,)*) => {
        $(
            #[test]
            fn $test() {
                assert_present($name);
            }
        )*

        /// Every feature of the probe has its test above.
        #[test]
        fn every_feature_has_a_test() {
            let tested = [$($name),*];
            for f in probe::FEATURES {
                assert!(tested.contains(&f.name), "no test for feature {}", f.name);
            }
            assert_eq!(tested.len(), probe::FEATURES.len());
        }
    };
}

feature_tests! {
    program_type_cgroup_sock_addr => "cgroup_sock_addr",
    program_type_sock_ops => "sock_ops",
    program_type_cgroup_sockopt => "cgroup_sockopt",
    program_type_sk_lookup => "sk_lookup",
    map_hash => "hash",
    map_lru_hash => "lru_hash",
    map_array => "array",
    map_percpu_array => "percpu_array",
    map_lpm_trie => "lpm_trie",
    map_sockhash => "sockhash",
    helper_bind_sock_addr => "bpf_bind/cgroup_sock_addr",
    helper_uid_gid_sock_addr => "bpf_get_current_uid_gid/cgroup_sock_addr",
    helper_uid_gid_sockopt => "bpf_get_current_uid_gid/cgroup_sockopt",
    helper_cgroup_id_sock_addr => "bpf_get_current_cgroup_id/cgroup_sock_addr",
    helper_cgroup_id_sockopt => "bpf_get_current_cgroup_id/cgroup_sockopt",
    helper_ancestor_cgroup_id_sock_addr => "bpf_get_current_ancestor_cgroup_id/cgroup_sock_addr",
    helper_socket_cookie_sock_addr => "bpf_get_socket_cookie/cgroup_sock_addr",
    helper_socket_cookie_sock_ops => "bpf_get_socket_cookie/sock_ops",
    helper_sk_lookup_udp_sock_addr => "bpf_sk_lookup_udp/cgroup_sock_addr",
    helper_sock_hash_update_sock_ops => "bpf_sock_hash_update/sock_ops",
    helper_cb_flags_set_sock_ops => "bpf_sock_ops_cb_flags_set/sock_ops",
    helper_sk_assign_sk_lookup => "bpf_sk_assign/sk_lookup",
    callback_tcp_listen => "BPF_SOCK_OPS_TCP_LISTEN_CB",
    link_cgroup => "cgroup_link",
    link_netns_sk_lookup => "netns_link/sk_lookup",
    syscall_pidfd_getfd => "pidfd_getfd",
    program_rd_connect4 => "program/rd_connect4",
    program_rd_connect6 => "program/rd_connect6",
    program_rd_bind4 => "program/rd_bind4",
    program_rd_bind6 => "program/rd_bind6",
    program_rd_sock_ops => "program/rd_sock_ops",
    program_rd_getsockopt => "program/rd_getsockopt",
    program_rd_sk_lookup => "program/rd_sk_lookup",
    program_rd_getpeername4 => "program/rd_getpeername4",
    program_rd_getpeername6 => "program/rd_getpeername6",
    program_rd_sendmsg4 => "program/rd_sendmsg4",
    program_rd_sendmsg6 => "program/rd_sendmsg6",
    program_rd_recvmsg4 => "program/rd_recvmsg4",
    program_rd_recvmsg6 => "program/rd_recvmsg6",
}

#[test]
fn require_mandatory_passes() {
    require!(Need::Root);
    if let Err(e) = probe::require_mandatory() {
        panic!("{e}");
    }
}

#[test]
fn json_schema() {
    require!(Need::Root);
    let out = Command::new(env!("CARGO_BIN_EXE_redirect-agent"))
        .args(["probe", "--output", "json"])
        .output()
        .expect("run redirect-agent probe");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(doc["kernel"].is_string());
    assert!(doc["ok"].is_boolean());
    assert!(doc["missing_mandatory"].is_array());
    assert!(doc["missing_optional"].is_array());
    let features = doc["features"].as_array().expect("features array");
    assert_eq!(features.len(), probe::FEATURES.len());
    let kinds = [
        "program_type",
        "map_type",
        "helper",
        "callback",
        "link",
        "syscall",
        "program",
    ];
    for f in features {
        assert!(f["name"].is_string(), "{f}");
        assert!(kinds.contains(&f["kind"].as_str().unwrap_or("")), "{f}");
        assert!(f["mandatory"].is_boolean(), "{f}");
        assert!(f["dns_capture"].is_boolean(), "{f}");
        assert!(f["present"].is_boolean(), "{f}");
        assert!(f["since"].is_string(), "{f}");
        assert!(f["impact"].is_string(), "{f}");
        assert!(f["method"].is_string(), "{f}");
        assert!(f["detail"].is_null() || f["detail"].is_string(), "{f}");
    }
    // The exit code follows the mandatory features.
    assert_eq!(out.status.success(), doc["ok"].as_bool().unwrap());
}

#[test]
fn table_output_and_exit_code() {
    require!(Need::Root);
    let out = Command::new(env!("CARGO_BIN_EXE_redirect-agent"))
        .arg("probe")
        .output()
        .expect("run redirect-agent probe");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FEATURE"), "{text}");
    for f in probe::FEATURES {
        assert!(text.contains(f.name), "{} not in table:\n{text}", f.name);
    }
    assert!(
        out.status.success(),
        "exit {:?}, a mandatory feature is missing:\n{text}",
        out.status
    );
}
