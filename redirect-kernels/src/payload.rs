//! What a guest gets: the test binaries (built and listed here), the programs the test bed
//! runs with every library they link, busybox, the init script, all packed into the initramfs.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};
use redirect_devtools as dev;

use crate::console::{M_DONE, M_PROBE_BEGIN, M_PROBE_END, M_TEST_BEGIN, M_TEST_END};
use crate::cpio::Cpio;

/// Host programs the test bed runs (found on PATH, or at the given absolute path), packed with
/// their libraries. Missing ones are left out with a note.
const DEFAULT_PROGRAMS: &[&str] = &[
    "ip",
    "setpriv",
    "iptables",
    "iptables-nft",
    "iptables-legacy",
    "ip6tables",
    "ip6tables-nft",
    "ip6tables-legacy",
    "xtables-nft-multi",
    "xtables-legacy-multi",
    "nft",
    "bpftool",
    // The DNS capture tests (`redirect-agent:dns`): real servers and clients.
    "dnsmasq",
    "dig",
    "getent",
    "unshare",
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
    "/usr/lib/cni/ptp",
];

/// Directories of dlopen()ed plugins packed whole.
const DLOPEN_DIRS: &[&str] = &["/usr/lib/x86_64-linux-gnu/xtables"];

#[derive(Debug, Clone)]
pub struct TestBin {
    /// `package:target`
    pub id: String,
    pub path: PathBuf,
    /// The package directory (cargo runs tests there).
    pub cwd: PathBuf,
    pub filters: Vec<String>,
    pub tests: Vec<String>,
}

/// Builds the test binaries (and the workspace binaries they run) and lists their tests.
pub fn build_tests(specs: &[String]) -> Result<Vec<TestBin>> {
    dev::build_workspace_bins()?;
    let mut bins = Vec::new();
    for spec in specs {
        let mut parts = spec.split(':');
        let (Some(pkg), Some(target)) = (parts.next(), parts.next()) else {
            bail!("--test {spec}: expected PACKAGE:TARGET[:FILTER...]");
        };
        let filters: Vec<String> = parts.map(str::to_string).collect();
        let mut cmd = dev::cargo();
        cmd.args([
            "test",
            "--no-run",
            "--message-format=json-render-diagnostics",
            "-p",
            pkg,
            "--test",
            target,
        ]);
        cmd.stderr(Stdio::inherit());
        dev::flush();
        let out = cmd.output()?;
        if !out.status.success() {
            // A target that does not exist (yet) is left out, anything else is an error.
            let manifest = dev::workspace_root()
                .join(pkg)
                .join("tests")
                .join(format!("{target}.rs"));
            if !manifest.exists() {
                println!("  note: {spec}: no such test target, left out");
                continue;
            }
            bail!("`{}` failed", dev::display(&cmd));
        }
        let mut exe = None;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["reason"] == "compiler-artifact"
                && v["target"]["name"] == target
                && v["profile"]["test"] == true
            {
                if let Some(e) = v["executable"].as_str() {
                    exe = Some(PathBuf::from(e));
                }
            }
        }
        let path = exe.with_context(|| format!("{spec}: cargo named no test executable"))?;
        let cwd = dev::workspace_root().join(pkg);
        let mut list = Command::new(&path);
        list.arg("--list").args(&filters).current_dir(&cwd);
        let listed = dev::output_if_success(&mut list)
            .with_context(|| format!("{} --list failed", path.display()))?;
        let tests = listed
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .map(str::to_string)
            .collect();
        bins.push(TestBin {
            id: format!("{pkg}:{target}"),
            path,
            cwd,
            filters,
            tests,
        });
    }
    Ok(bins)
}

/// The shared libraries (and loader) a dynamic binary needs, from ldd.
fn shared_libs(bin: &Path) -> Vec<PathBuf> {
    let Some(out) = dev::output_if_success(Command::new("ldd").arg(bin)) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A stripped copy of a binary (debug info is most of a test binary's size).
fn stripped(bin: &Path, scratch: &Path) -> Result<Vec<u8>> {
    let tmp = scratch.join(format!("strip-{}", bin.to_string_lossy().replace('/', "_")));
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(bin)
        .status()
        .is_ok_and(|s| s.success());
    let data = if ok { fs::read(&tmp)? } else { fs::read(bin)? };
    let _ = fs::remove_file(&tmp);
    Ok(data)
}

/// The files every guest gets, as (guest path, mode, contents), and the programs left out.
pub struct Payload {
    pub files: Vec<(String, u32, Vec<u8>)>,
    /// Empty directories the tests run in.
    pub dirs: Vec<String>,
    pub notes: Vec<String>,
}

pub fn host_payload(bins: &[TestBin], busybox: &Path, scratch: &Path) -> Result<Payload> {
    let mut files = Vec::new();
    let mut notes = Vec::new();
    let mut executables: Vec<PathBuf> = bins.iter().map(|b| b.path.clone()).collect();
    let target = dev::target_dir()?.join("debug");
    for name in ["redirect-agent", "redirect-testbed"] {
        let p = target.join(name);
        if p.is_file() {
            executables.push(p);
        }
    }
    for prog in DEFAULT_PROGRAMS {
        let found = if prog.starts_with('/') {
            Some(PathBuf::from(prog)).filter(|p| p.is_file())
        } else {
            dev::find_on_path(prog)
        };
        match found {
            Some(p) => executables.push(fs::canonicalize(&p).unwrap_or(p)),
            None => notes.push(format!("{prog} not found on the host, left out")),
        }
    }
    // The programs under the names they are called by (PATH lookups of the canonical file).
    let mut aliases = Vec::new();
    for prog in DEFAULT_PROGRAMS.iter().filter(|p| !p.starts_with('/')) {
        if let Some(p) = dev::find_on_path(prog) {
            let canon = fs::canonicalize(&p).unwrap_or(p.clone());
            let guest = guest_path(&p);
            if guest != canon.to_string_lossy() {
                aliases.push((guest, canon.to_string_lossy().into_owned()));
            }
        }
    }
    // Plugins loaded with dlopen, which ldd does not see (iptables' extensions).
    for dir in DLOPEN_DIRS {
        if let Ok(rd) = fs::read_dir(dir) {
            executables.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    let mut libs = BTreeSet::new();
    for exe in &executables {
        for l in shared_libs(exe) {
            libs.insert(l);
        }
        let data = if exe.starts_with(&target) || exe.to_string_lossy().contains("/target/") {
            stripped(exe, scratch)?
        } else {
            fs::read(exe)?
        };
        files.push((exe.to_string_lossy().into_owned(), 0o755, data));
    }
    for l in libs {
        let data = fs::read(&l).with_context(|| format!("{}", l.display()))?;
        files.push((guest_path(&l), 0o755, data));
    }
    files.push(("/busybox".into(), 0o755, fs::read(busybox)?));
    for (alias, canon) in aliases {
        files.push((alias, 0o120777, canon.into_bytes()));
    }
    let dirs = bins
        .iter()
        .map(|b| b.cwd.to_string_lossy().into_owned())
        .collect();
    Ok(Payload { files, dirs, notes })
}

/// Host paths through the merged-/usr links (/lib -> usr/lib): the guest has the same links.
fn guest_path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub fn init_script(kernel_label: &str, bins: &[TestBin], agent: &Path) -> String {
    let mut s = String::from(
        r#"#!/busybox sh
/busybox mkdir -p /bbin
/busybox --install -s /bbin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/bbin
export HOME=/root RUST_BACKTRACE=0 TERM=dumb
mkdir -p /proc /sys /dev /tmp /run /root /var/lib /var/tmp /etc
ln -sfn /run /var/run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
# /tmp stays on the (writable) initramfs: the test binaries are packed at their host paths,
# which may be under /tmp (a CI checkout), and a tmpfs there would hide them.
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mkdir -p /sys/fs/cgroup /sys/fs/bpf /run/netns
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo "root:x:0:0:root:/root:/bin/sh" > /etc/passwd
echo "nobody:x:65534:65534:nobody:/nonexistent:/bin/false" >> /etc/passwd
echo "root:x:0:" > /etc/group
echo "nogroup:x:65534:" >> /etc/group
echo "dip:x:30:" >> /etc/group
echo "127.0.0.1 localhost" > /etc/hosts
# Mount points for the glibc resolver test, which binds its own files over them.
: > /etc/resolv.conf
: > /etc/nsswitch.conf
echo 1 > /proc/sys/net/ipv4/ip_forward 2>/dev/null
ip link set lo up
for m in $(cat /modules/order); do
  insmod /modules/$m.ko 2>/tmp/insmod.err || { grep -q 'File exists' /tmp/insmod.err || echo "==> MODULE-FAILED $m $(cat /tmp/insmod.err)"; }
done
"#,
    );
    let _ = writeln!(
        s,
        "echo \"==> BOOTED {kernel_label} $(uname -r) $(cut -d' ' -f1 /proc/uptime)\""
    );
    let _ = writeln!(s, "echo \"{M_PROBE_BEGIN}\"");
    let _ = writeln!(s, "{} probe --output json", agent.display());
    let _ = writeln!(s, "echo \"{M_PROBE_END} $?\"");
    for b in bins {
        let _ = writeln!(s, "cd {}", b.cwd.display());
        let _ = writeln!(s, "echo \"{M_TEST_BEGIN}{}\"", b.id);
        let filters: Vec<String> = b.filters.iter().map(|f| format!("'{f}'")).collect();
        let _ = writeln!(
            s,
            "{} --test-threads=1 {} 2>&1",
            b.path.display(),
            filters.join(" ")
        );
        let _ = writeln!(s, "echo \"{M_TEST_END}{} $?\"", b.id);
    }
    let _ = writeln!(s, "echo \"{M_DONE} $(cut -d' ' -f1 /proc/uptime)\"");
    s.push_str("sync\npoweroff -f\n");
    s
}

pub fn build_initramfs(
    out: &Path,
    payload: &Payload,
    modules: &[(String, Vec<u8>)],
    init: &str,
) -> Result<()> {
    let f = fs::File::create(out)?;
    let mut c = Cpio::new(std::io::BufWriter::new(f));
    for d in [
        "/usr/bin",
        "/usr/sbin",
        "/usr/lib",
        "/usr/lib64",
        "/dev",
        "/proc",
        "/sys",
        "/tmp",
    ] {
        c.dir(d)?;
    }
    for (l, t) in [
        ("/bin", "usr/bin"),
        ("/sbin", "usr/sbin"),
        ("/lib", "usr/lib"),
        ("/lib64", "usr/lib64"),
    ] {
        c.symlink(l, t)?;
    }
    c.char_dev("/dev/console", 5, 1)?;
    c.char_dev("/dev/null", 1, 3)?;
    c.file("/init", 0o755, init.as_bytes())?;
    for dir in &payload.dirs {
        c.dir(dir)?;
    }
    let order: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
    c.file("/modules/order", 0o644, order.join("\n").as_bytes())?;
    for (n, data) in modules {
        c.file(&format!("/modules/{n}.ko"), 0o644, data)?;
    }
    for (path, mode, data) in &payload.files {
        // Paths under the merged-/usr links go to their /usr location.
        let p = normalize_usr(path);
        if *mode == 0o120777 {
            c.symlink(&p, &String::from_utf8_lossy(data))?;
        } else {
            c.file(&p, *mode, data)?;
        }
    }
    c.finish()?;
    Ok(())
}

fn normalize_usr(p: &str) -> String {
    for (l, t) in [
        ("/bin/", "/usr/bin/"),
        ("/sbin/", "/usr/sbin/"),
        ("/lib/", "/usr/lib/"),
        ("/lib64/", "/usr/lib64/"),
    ] {
        if let Some(rest) = p.strip_prefix(l) {
            return format!("{t}{rest}");
        }
    }
    p.to_string()
}
