use which::which;

/// Rebuild the programs when bpf-linker changes: cargo does not track the linker itself.
fn main() {
    let bpf_linker = which("bpf-linker").unwrap();
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
