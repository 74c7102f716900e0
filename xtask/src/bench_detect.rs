//! Placeholder for `cargo xtask bench detect`; its owner replaces this file.

pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
