//! The project's images, defined once: the node agent's (what `cargo xtask image` writes and the
//! DaemonSet runs) and the runtime test bed's (a pod sandbox's pause, the echo application, the
//! test proxy). Each takes the directory holding the static (musl) binaries.

use std::path::Path;

use crate::{Entry, Image, Result};

/// Where the binaries are in every image.
pub const BIN_DIR: &str = "usr/local/bin";

/// The agent image's name: `redirect.dev/redirect-agent:<workspace version>`.
pub fn agent_name() -> String {
    format!("redirect.dev/redirect-agent:{}", env!("CARGO_PKG_VERSION"))
}

fn bin(static_dir: &Path, name: &str) -> Result<Entry> {
    Entry::file_from(&format!("{BIN_DIR}/{name}"), static_dir.join(name), 0o755)
}

/// The node agent and its CNI plugin: `/usr/local/bin/redirect-agent` (the entrypoint, `run` by
/// default) and `/usr/local/bin/redirect-cni` (copied to the node by `install-cni`), when it is
/// in `static_dir`. `/tmp` exists (mode 1777) for tools that want one.
pub fn agent(static_dir: &Path) -> Result<Image> {
    let mut image = Image::new(agent_name())
        .file(bin(static_dir, "redirect-agent")?)
        .file(Entry::Dir {
            path: "tmp".into(),
            mode: 0o1777,
        })
        .entrypoint([format!("/{BIN_DIR}/redirect-agent")])
        .cmd(["run"])
        .label("org.opencontainers.image.title", "redirect-agent")
        .label(
            "org.opencontainers.image.source",
            "https://github.com/redirect-mesh/redirect",
        )
        .label(
            "org.opencontainers.image.version",
            env!("CARGO_PKG_VERSION"),
        );
    if static_dir.join("redirect-cni").exists() {
        image = image.file(bin(static_dir, "redirect-cni")?);
    }
    Ok(image)
}

/// Test images' names.
pub const PAUSE: &str = "redirect.test/pause:1";
pub const ECHO: &str = "redirect.test/echo:1";
pub const PROXY: &str = "redirect.test/proxy:1";

/// The sandbox image (containerd's `sandbox_image`): `redirect-pause`.
pub fn pause(static_dir: &Path) -> Result<Image> {
    Ok(Image::new(PAUSE)
        .file(bin(static_dir, "redirect-pause")?)
        .entrypoint([format!("/{BIN_DIR}/redirect-pause")]))
}

/// The application: `redirect-testbed echo`; a container's args add `--listen ADDR...`.
pub fn echo(static_dir: &Path) -> Result<Image> {
    Ok(Image::new(ECHO)
        .file(bin(static_dir, "redirect-testbed")?)
        .entrypoint([format!("/{BIN_DIR}/redirect-testbed"), "echo".into()]))
}

/// The sidecar proxy playing Envoy: `redirect-testbed proxy`, as uid 1337 (Istio's proxy uid)
/// unless the container says otherwise. Shares its layer with [`echo`].
pub fn proxy(static_dir: &Path) -> Result<Image> {
    Ok(Image::new(PROXY)
        .file(bin(static_dir, "redirect-testbed")?)
        .entrypoint([format!("/{BIN_DIR}/redirect-testbed"), "proxy".into()])
        .user("1337:1337"))
}
