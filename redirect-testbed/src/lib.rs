//! A test bed that builds pods the way a Kubernetes node does, plus the programs that play
//! Envoy, the application and a client.
//!
//! Everything is real: network namespaces, a bridge and veths made by the CNI `bridge` and
//! `host-local` plugins, cgroup v2 directories, processes switched to the proxy's uid. Every
//! resource is removed on drop, also when a test panics, and [`sweep_stale`] removes what a
//! killed run left behind. Addresses come only from 198.18.0.0/15 and 2001:db8::/32, and only
//! inside namespaces created here; the root namespace is never changed.
//!
//! Needs root and Debian's `containernetworking-plugins` (or the plugins in `/opt/cni/bin`).
//!
//! ```no_run
//! use std::{process::Command, time::Duration};
//! use redirect_testbed::{bin_path, probe, Node, Outcome};
//!
//! let node = Node::new()?;
//! let server = node.add_pod("server")?;
//! let client = node.add_pod("client")?;
//! let mut app = Command::new(bin_path("redirect-testbed"));
//! app.args(["echo", "--listen", &format!("{}:18080", server.ip4)]);
//! let mut app = server.spawn(1000, app)?;
//! let addr = (server.ip4, 18080).into();
//! app.wait_for_listen(addr, Duration::from_secs(5))?;
//! let outcome = client.in_netns(|| probe(addr, b"ping", Duration::from_secs(2)))?;
//! assert!(matches!(outcome, Outcome::Echoed { .. }));
//! # anyhow::Ok(())
//! ```

mod cgroup;
pub mod containerd;
pub mod cri;
pub mod daemonset;
pub mod echo;
pub mod fakeapi;
pub mod http;
pub mod images;
pub mod kubelet;
pub mod needs;
mod netns;
mod node;
pub mod probe;
pub mod proxy;
mod sockdiag;
mod state;
pub mod stream;
mod sweep;

use std::path::PathBuf;

pub use cgroup::cgroup2_mount;
pub use containerd::{Containerd, CriPod};
pub use needs::Need;
pub use node::{cni_plugin_dir, Node, Pod, PodProcess};
pub use probe::{probe, probe_from, Banner, Outcome};
pub use proxy::ProxyLogEntry;
pub use redirect_common::{
    matrix::{self, AppBind, ProxyDial},
    InboundPolicy,
};
pub use sweep::sweep_stale;

/// Path of a workspace binary next to the running executable: `target/<profile>/<name>`.
/// Test executables live one level down, in `target/<profile>/deps/`.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join(name)
}

/// The `redirect-testbed` binary: `$REDIRECT_TESTBED_BIN`, else [`bin_path`]. Other crates'
/// tests need it built first (`cargo build -p redirect-testbed`).
pub fn testbed_bin() -> anyhow::Result<PathBuf> {
    let p = std::env::var_os("REDIRECT_TESTBED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_path("redirect-testbed"));
    anyhow::ensure!(
        p.exists(),
        "{} not found: build it with `cargo build -p redirect-testbed` or set REDIRECT_TESTBED_BIN",
        p.display()
    );
    Ok(p)
}
