//! The runtime test bed itself: a private containerd in a node namespace, pods through CRI over
//! the bed's `bridge` + `host-local` chain, containers from the project's images, and nothing
//! left behind.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use redirect_testbed::{
    cri::{info_pid, ContainerSpec},
    images, probe, require, Containerd, Need, Node, Outcome,
};

fn containerd_here() -> Need {
    let missing: Vec<&str> = ["containerd", "runc", "ctr", "containerd-shim-runc-v2"]
        .into_iter()
        .filter(|t| redirect_devtools::find_on_path(t).is_none())
        .collect();
    Need::machine(
        "Debian's containerd and runc (cargo xtask setup)",
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing: {}", missing.join(", ")))
        },
    )
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

fn mounts_under(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .filter(|p| p.starts_with(dir.to_str().unwrap()))
        .collect()
}

#[test]
fn sandbox_and_containers_through_cri_then_nothing_left() {
    require!(Need::Root, containerd_here());
    let archive = images::test_images().unwrap();
    let bed = Containerd::start(Node::new().unwrap()).unwrap();
    bed.import(&archive).unwrap();
    let names: Vec<String> = bed
        .cri()
        .list_images()
        .unwrap()
        .into_iter()
        .flat_map(|i| i.repo_tags)
        .collect();
    for want in [
        redirect_image::images::PAUSE,
        redirect_image::images::ECHO,
        redirect_image::images::PROXY,
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }

    let annotations = HashMap::from([("sidecar.istio.io/status".to_owned(), "{}".to_owned())]);
    let spec = bed
        .sandbox_spec("default", "bed-echo", annotations)
        .unwrap();
    let pod = bed.run_pod(&spec).unwrap();
    let (net4, _) = bed.node().subnet4();
    let ip4 = pod.ip4().expect("an IPv4 address");
    let ip6 = pod.ip6().expect("an IPv6 address");
    assert_eq!(
        ip4.octets()[..3],
        net4.octets()[..3],
        "{ip4} in the node's /24"
    );
    assert!(matches!(ip4.octets(), [198, 18 | 19, ..]), "{ip4}");
    assert_eq!(ip6.segments()[..2], [0x2001, 0xdb8], "{ip6}");
    assert!(pod.netns.starts_with(bed.dir()), "{}", pod.netns.display());

    let status = bed.cri().pod_sandbox_status(&pod.id).unwrap();
    let s = status.status.as_ref().unwrap();
    assert_eq!(s.annotations["sidecar.istio.io/status"], "{}");
    let pause = info_pid(&status.info).expect("pause pid");
    // The pause process sits in the kubelet-style pod cgroup: <pod cgroup>/<sandbox id>.
    let cg = std::fs::read_to_string(format!("/proc/{pause}/cgroup")).unwrap();
    let v2 = cg.lines().find(|l| l.starts_with("0::")).unwrap();
    assert!(
        v2.ends_with(&format!("kubepods/besteffort/pod{}/{}", spec.uid, pod.id)),
        "{v2}"
    );
    assert!(pod.cgroup.join(&pod.id).is_dir());

    let app = bed
        .start_container(
            &pod,
            &ContainerSpec {
                name: "app".into(),
                image: redirect_image::images::ECHO.into(),
                args: vec![
                    "--listen".into(),
                    "[::]:18080".into(),
                    "--dual-stack".into(),
                ],
                run_as_user: Some(1000),
                ..ContainerSpec::default()
            },
        )
        .unwrap();
    let proxy = bed
        .start_container(
            &pod,
            &ContainerSpec {
                name: "istio-proxy".into(),
                image: redirect_image::images::PROXY.into(),
                ..ContainerSpec::default()
            },
        )
        .unwrap();
    let proxy_pid = info_pid(&bed.cri().container_status(&proxy).unwrap().info).unwrap();
    assert_eq!(
        uid_of(proxy_pid),
        1337,
        "the proxy image runs as Istio's uid"
    );
    let app_pid = info_pid(&bed.cri().container_status(&app).unwrap().info).unwrap();
    assert_eq!(uid_of(app_pid), 1000);

    // The echo answers at both addresses from the node's namespace, over the bridge.
    for ip in [IpAddr::V4(ip4), IpAddr::V6(ip6)] {
        let addr = SocketAddr::new(ip, 18080);
        let deadline = Instant::now() + Duration::from_secs(10);
        let outcome = loop {
            let o = bed
                .node()
                .in_netns(|| probe(addr, b"ping", Duration::from_secs(2)))
                .unwrap();
            if matches!(o, Outcome::Echoed { .. }) || Instant::now() > deadline {
                break o;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        match outcome {
            Outcome::Echoed { server, .. } => assert_eq!(server.local.ip().to_canonical(), ip),
            o => panic!("{addr}: {o:?}\n{}", bed.log_tail(20)),
        }
    }

    bed.remove_pod(&pod).unwrap();
    assert!(bed.cri().list_pod_sandboxes().unwrap().is_empty());
    assert!(!pod.netns.exists(), "{} left", pod.netns.display());
    assert!(!pod.cgroup.exists(), "{} left", pod.cgroup.display());
    assert!(!PathBuf::from(format!("/proc/{pause}")).exists());

    // A sandbox left running is removed by the bed's Drop, with everything else.
    let spec = bed
        .sandbox_spec("default", "bed-left", HashMap::new())
        .unwrap();
    let left = bed.run_pod(&spec).unwrap();
    let dir = bed.dir().to_owned();
    let root = bed.kubelet_cgroup_root().to_owned();
    drop(bed);
    assert!(!dir.exists(), "{} left", dir.display());
    assert!(mounts_under(&dir).is_empty(), "{:?}", mounts_under(&dir));
    assert!(!root.exists(), "{} left", root.display());
    assert!(!left.netns.exists());
}
