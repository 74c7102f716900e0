//! `cargo xtask kernels [VERSION...]`: the datapath's integration tests on real kernels.
//!
//! For each kernel (Debian cloud kernels: 5.10 bullseye, 6.1 bookworm, 6.12 trixie, the newest
//! 7.x in sid) this fetches the packages with apt through a private sources list and private
//! state directories (the machine's apt configuration is never touched), caches them under
//! `/var/cache/redirect-kernels` (`$REDIRECT_KERNELS_CACHE`), extracts vmlinuz and the modules,
//! packs an initramfs (newc cpio, written here) holding busybox, a shell init, the modules the
//! test bed needs (in dependency order, from the same package), the test binaries and the
//! programs they run with every shared library they link, boots it under qemu (TCG) and runs the
//! tests inside. The host kernel is a column too (run natively). It prints a matrix
//! kernel x test, writes JSON (`target/kernels/kernels.json`) and `KERNELS.md`.
//!
//! A test failing in a guest, a guest that panics and one that hangs past its timeout are all
//! failed cells and make the command exit non-zero.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{self, header};

/// The kernels of the matrix: label, Debian suite, version prefix of `linux-image-cloud-amd64`.
const KERNELS: &[(&str, &str, &str)] = &[
    ("5.10", "bullseye", "5.10."),
    ("6.1", "bookworm", "6.1."),
    ("6.12", "trixie", "6.12."),
    ("7.x", "sid", "7."),
];

/// The test bed's own tests (`redirect-testbed:testbed`) also run in the guests, but cost about
/// a minute per kernel under TCG: add them with `--test` when the test bed changes.
const DEFAULT_TESTS: &[&str] = &["redirect-agent:probe", "redirect-agent:datapath"];

const DEFAULT_MODULES: &str = "veth,bridge,br_netfilter,nf_tables,nft_compat,nft_chain_nat,\
nft_nat,nft_redir,nft_counter,nft_ct,xt_REDIRECT,xt_tcpudp,xt_owner,xt_conntrack,xt_addrtype,\
xt_comment,xt_mark,xt_multiport,nf_conntrack,nf_nat";

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
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
    "/usr/lib/cni/ptp",
];

/// Directories of dlopen()ed plugins packed whole.
const DLOPEN_DIRS: &[&str] = &["/usr/lib/x86_64-linux-gnu/xtables"];

#[derive(clap::Args)]
pub struct Args {
    /// Kernels to run: 5.10, 6.1, 6.12, 7.x (prefixes work: 7), host. Default: all and host.
    pub versions: Vec<String>,
    /// Test binaries, PACKAGE:TARGET[:FILTER...] (repeatable; FILTERs are passed to the test
    /// harness, separated by ':'). Targets that do not exist are left out with a note.
    #[arg(long = "test")]
    pub tests: Vec<String>,
    /// Modules to load in each guest (with their dependencies), comma-separated.
    #[arg(long, default_value = DEFAULT_MODULES)]
    pub modules: String,
    /// Seconds a guest may run before it is killed and its cells fail.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Guests booted at once.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Refresh the package lists and re-resolve the newest package of each suite.
    #[arg(long)]
    pub refresh: bool,
    /// Leave out the host kernel column.
    #[arg(long)]
    pub no_host: bool,
    /// Where KERNELS.md goes (default: the workspace root); `-` to skip it.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Results and their parsing (pure, unit-tested).

/// The verdict of one test on one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

impl Outcome {
    fn cell(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail(_) => "FAIL",
            Outcome::Skip(_) => "skip",
        }
    }
    fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Pass => None,
            Outcome::Fail(r) | Outcome::Skip(r) => Some(r),
        }
    }
}

/// How a guest (or the host run) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The init printed its end marker.
    Completed,
    /// The kernel panicked (the line is kept).
    Panicked(String),
    /// Killed after the timeout.
    TimedOut(Duration),
    /// qemu exited without the end marker.
    Exited(String),
}

impl RunEnd {
    fn ok(&self) -> bool {
        matches!(self, RunEnd::Completed)
    }
    fn describe(&self) -> String {
        match self {
            RunEnd::Completed => "completed".into(),
            RunEnd::Panicked(l) => format!("kernel panic: {l}"),
            RunEnd::TimedOut(d) => format!("hung: killed after the {}s timeout", d.as_secs()),
            RunEnd::Exited(s) => format!("guest exited early ({s})"),
        }
    }
}

/// Console markers printed by the init (and by the host run).
const M_BOOTED: &str = "==> BOOTED";
const M_MODULE_FAIL: &str = "==> MODULE-FAILED ";
const M_PROBE_BEGIN: &str = "==> PROBE-BEGIN";
const M_PROBE_END: &str = "==> PROBE-END";
const M_TEST_BEGIN: &str = "==> TEST-BEGIN ";
const M_TEST_END: &str = "==> TEST-END ";
const M_DONE: &str = "==> DONE";

/// What one run (a guest's console, or the host's output) tells.
#[derive(Debug, Default)]
pub struct Parsed {
    /// binary -> test -> outcome.
    pub results: BTreeMap<String, BTreeMap<String, Outcome>>,
    /// binaries whose section ended, with the exit status.
    pub ended: BTreeMap<String, i32>,
    pub probe_json: Option<String>,
    pub module_failures: Vec<String>,
    pub done: bool,
    pub booted: bool,
}

/// Strips the carriage returns and ANSI escapes a serial console adds.
fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\u{1b}' => {
                // CSI ... final byte
                // CSI sequences up to their final letter; other escapes are one character.
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Parses a console transcript: marker lines, and libtest's `test NAME ... ok|FAILED|ignored`.
pub fn parse_console(text: &str) -> Parsed {
    let mut p = Parsed::default();
    let mut current: Option<String> = None;
    // Failure output blocks: `---- NAME stdout ----` up to the next blank-line-separated marker.
    let mut fail_block: Option<(String, Vec<String>)> = None;
    let mut fail_msgs: HashMap<(String, String), String> = HashMap::new();
    let mut probe: Option<String> = None;
    let mut pending: Option<String> = None;
    for raw in text.lines() {
        let line = clean(raw);
        if let Some(buf) = probe.as_mut() {
            if line.starts_with(M_PROBE_END) {
                p.probe_json = probe.take();
            } else {
                buf.push_str(&line);
                buf.push('\n');
            }
            continue;
        }
        if line.starts_with(M_BOOTED) {
            p.booted = true;
        } else if let Some(m) = line.strip_prefix(M_MODULE_FAIL) {
            p.module_failures.push(m.trim().to_string());
        } else if line.starts_with(M_PROBE_BEGIN) {
            probe = Some(String::new());
        } else if let Some(bin) = line.strip_prefix(M_TEST_BEGIN) {
            let bin = bin.trim().to_string();
            p.results.entry(bin.clone()).or_default();
            current = Some(bin);
        } else if let Some(rest) = line.strip_prefix(M_TEST_END) {
            let mut it = rest.split_whitespace();
            if let (Some(bin), Some(code)) = (it.next(), it.next()) {
                p.ended.insert(bin.to_string(), code.parse().unwrap_or(-1));
            }
            if let Some((name, lines)) = fail_block.take() {
                if let Some(bin) = &current {
                    fail_msgs.insert((bin.clone(), name), failure_reason(&lines));
                }
            }
            current = None;
        } else if line.starts_with(M_DONE) {
            p.done = true;
        } else if let Some(bin) = current.clone() {
            if let Some(rest) = line.strip_prefix("---- ") {
                if let Some(name) = rest.strip_suffix(" stdout ----") {
                    if let Some((prev, lines)) = fail_block.take() {
                        fail_msgs.insert((bin.clone(), prev), failure_reason(&lines));
                    }
                    fail_block = Some((name.to_string(), Vec::new()));
                    continue;
                }
            }
            if let Some((name, outcome)) = parse_test_line(&line) {
                p.results.entry(bin).or_default().insert(name, outcome);
                pending = None;
                continue;
            }
            // A test's child wrote onto the harness's line: the verdict follows on its own line.
            if let Some(name) = line
                .strip_prefix("test ")
                .and_then(|r| r.split_once(" ... "))
                .map(|(n, _)| n.trim().to_string())
            {
                pending = Some(name);
                continue;
            }
            if let Some(name) = pending.take() {
                match parse_verdict(line.trim()) {
                    Some(outcome) => {
                        p.results.entry(bin).or_default().insert(name, outcome);
                        continue;
                    }
                    None => pending = Some(name),
                }
            }
            if line.starts_with("failures:") || line.starts_with("test result:") {
                if let Some((prev, lines)) = fail_block.take() {
                    fail_msgs.insert((bin.clone(), prev), failure_reason(&lines));
                }
                continue;
            }
            if let Some((_, lines)) = fail_block.as_mut() {
                lines.push(line);
            }
        }
    }
    if let Some((name, lines)) = fail_block.take() {
        if let Some(bin) = &current {
            fail_msgs.insert((bin.clone(), name), failure_reason(&lines));
        }
    }
    for ((bin, name), msg) in fail_msgs {
        if let Some(Outcome::Fail(r)) = p.results.get_mut(&bin).and_then(|m| m.get_mut(&name)) {
            if r.is_empty() {
                *r = msg;
            }
        }
    }
    p
}

/// `test NAME ... ok` and friends. With one test thread a line whose test is still running
/// reads `test NAME ... ` and is not a result.
fn parse_test_line(line: &str) -> Option<(String, Outcome)> {
    let rest = line.strip_prefix("test ")?;
    let (name, verdict) = rest.split_once(" ... ")?;
    Some((name.trim().to_string(), parse_verdict(verdict.trim())?))
}

fn parse_verdict(verdict: &str) -> Option<Outcome> {
    let outcome = if verdict == "ok" {
        Outcome::Pass
    } else if verdict == "FAILED" {
        Outcome::Fail(String::new())
    } else if let Some(r) = verdict.strip_prefix("ignored") {
        let r = r.trim_start_matches(',').trim();
        Outcome::Skip(if r.is_empty() {
            "ignored".into()
        } else {
            r.into()
        })
    } else {
        return None;
    };
    Some(outcome)
}

/// The panic message of a failed test: the lines after `panicked at FILE:LINE:`.
fn failure_reason(lines: &[String]) -> String {
    let mut msg = Vec::new();
    let mut after_panic = false;
    for l in lines {
        if l.contains("panicked at") {
            after_panic = true;
            continue;
        }
        if after_panic {
            if l.trim().is_empty() || l.starts_with("note: ") || l.starts_with("stack backtrace") {
                break;
            }
            msg.push(l.trim());
        }
    }
    if msg.is_empty() {
        msg = lines
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .take(2)
            .collect();
    }
    let joined = msg.join(" ");
    truncate(&joined, 300)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Every expected test gets a cell: what the run reported, or a failure that says why not.
pub fn cells(
    expected: &[(String, Vec<String>)],
    parsed: &Parsed,
    end: &RunEnd,
) -> BTreeMap<(String, String), Outcome> {
    let mut out = BTreeMap::new();
    for (bin, tests) in expected {
        let got = parsed.results.get(bin);
        let ended = parsed.ended.get(bin);
        for t in tests {
            let outcome = match got.and_then(|g| g.get(t)) {
                Some(o) => o.clone(),
                None => {
                    let why = if got.is_none() {
                        if end.ok() {
                            "not run".to_string()
                        } else {
                            format!("not run: {}", end.describe())
                        }
                    } else if ended.is_none() {
                        format!("no result: {}", end.describe())
                    } else {
                        format!(
                            "no result (test binary exited {})",
                            ended.copied().unwrap_or(-1)
                        )
                    };
                    Outcome::Fail(why)
                }
            };
            out.insert((bin.clone(), t.clone()), outcome);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Running a guest: qemu with a console reader and a timeout.

/// Runs `cmd`, collecting its stdout+stderr lines until `done_marker`, a kernel panic, exit or
/// the timeout (then it is killed). Returns the transcript, how it ended and when `booted_marker`
/// was seen.
pub fn run_with_timeout(
    mut cmd: Command,
    timeout: Duration,
    done_marker: &str,
    log: Option<&Path>,
) -> Result<(String, RunEnd, Option<Duration>)> {
    let start = Instant::now();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", util::display(&cmd)))?;
    let (tx, rx) = mpsc::channel::<Option<String>>();
    let mut readers = Vec::new();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let _ = tx.send(Some(String::from_utf8_lossy(&buf).into_owned()));
                    }
                }
            }
            let _ = tx.send(None);
        }));
    }
    drop(tx);
    let mut log_file = log.and_then(|p| fs::File::create(p).ok());
    let mut transcript = String::new();
    let mut open_streams = readers.len();
    let mut booted = None;
    let mut panic_line: Option<String> = None;
    let end = loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            break RunEnd::TimedOut(timeout);
        }
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(Some(line)) => {
                if let Some(f) = log_file.as_mut() {
                    let _ = f.write_all(line.as_bytes());
                }
                let cl = clean(&line);
                if booted.is_none() && cl.starts_with(M_BOOTED) {
                    booted = Some(start.elapsed());
                }
                if panic_line.is_none() && cl.contains("Kernel panic") {
                    panic_line = Some(cl.trim().to_string());
                }
                transcript.push_str(&line);
                if cl.starts_with(done_marker) {
                    break RunEnd::Completed;
                }
            }
            Ok(None) => {
                open_streams -= 1;
                if open_streams == 0 {
                    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    break match panic_line.take() {
                        Some(l) => RunEnd::Panicked(l),
                        None => RunEnd::Exited(status),
                    };
                }
            }
            // panic=-1 reboots at once and -no-reboot makes qemu exit, which ends the streams.
            // The process ended but something it started keeps the pipes open: take what is
            // buffered and stop.
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.try_wait() {
                    while let Ok(Some(line)) = rx.recv_timeout(Duration::from_millis(300)) {
                        if let Some(f) = log_file.as_mut() {
                            let _ = f.write_all(line.as_bytes());
                        }
                        transcript.push_str(&line);
                    }
                    break match panic_line.take() {
                        Some(l) => RunEnd::Panicked(l),
                        None => RunEnd::Exited(status.to_string()),
                    };
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                break match panic_line.take() {
                    Some(l) => RunEnd::Panicked(l),
                    None => RunEnd::Exited(status),
                };
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    // The readers end when the pipes close; a grandchild that kept them open must not block
    // us, so they are not joined.
    drop(readers);
    let end = match (end, panic_line) {
        (RunEnd::Completed, _) => RunEnd::Completed,
        (RunEnd::TimedOut(_), Some(l)) => RunEnd::Panicked(l),
        (e, _) => e,
    };
    Ok((transcript, end, booted))
}

// ---------------------------------------------------------------------------------------------
// newc cpio writer.

/// Writes a newc ("070701") cpio archive, the format the kernel unpacks as initramfs.
pub struct Cpio<W: std::io::Write> {
    out: W,
    ino: u32,
    written: u64,
    seen: BTreeSet<String>,
}

impl<W: std::io::Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Cpio {
            out,
            ino: 1,
            written: 0,
            seen: BTreeSet::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> Result<()> {
        let name = name.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        let mut hdr = String::with_capacity(110);
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        hdr.push_str("070701");
        for v in fields {
            write!(hdr, "{v:08x}").unwrap();
        }
        self.put(hdr.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    /// A directory and its parents (each once).
    pub fn dir(&mut self, path: &str) -> Result<()> {
        let mut acc = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            acc.push('/');
            acc.push_str(part);
            if self.seen.insert(acc.clone()) {
                self.entry(&acc.clone(), 0o040755, (0, 0), &[])?;
            }
        }
        Ok(())
    }

    fn parent(&mut self, path: &str) -> Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        Ok(())
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.parent(path)?;
        if !self.seen.insert(path.to_string()) {
            return Ok(());
        }
        self.entry(path, 0o100000 | (mode & 0o7777), (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.parent(path)?;
        if !self.seen.insert(path.to_string()) {
            return Ok(());
        }
        self.entry(path, 0o120777, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> Result<()> {
        self.parent(path)?;
        if !self.seen.insert(path.to_string()) {
            return Ok(());
        }
        self.entry(path, 0o020600, (major, minor), &[])
    }

    pub fn finish(mut self) -> Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        let n = (512 - (self.written % 512) as usize) % 512;
        self.put(&vec![0u8; n])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

// ---------------------------------------------------------------------------------------------
// Packages: apt with private state.

fn cache_root() -> PathBuf {
    std::env::var_os("REDIRECT_KERNELS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/redirect-kernels"))
}

struct Apt {
    root: PathBuf,
}

impl Apt {
    fn new(root: &Path) -> Result<Self> {
        let apt = root.join("apt");
        for d in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(apt.join(d))?;
        }
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let mut list = String::new();
        for (_, suite, _) in KERNELS {
            writeln!(
                list,
                "deb [signed-by={keyring}] http://deb.debian.org/debian {suite} main"
            )?;
        }
        fs::write(apt.join("sources.list"), list)?;
        if !apt.join("status").exists() {
            fs::write(apt.join("status"), "")?;
        }
        Ok(Apt { root: apt })
    }

    fn cmd(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        let r = &self.root;
        for (k, v) in [
            ("Dir::Etc::SourceList", r.join("sources.list")),
            ("Dir::Etc::SourceParts", PathBuf::from("/dev/null")),
            ("Dir::State::Lists", r.join("lists")),
            ("Dir::State::Status", r.join("status")),
            ("Dir::Cache", r.join("cache")),
        ] {
            c.arg("-o").arg(format!("{k}={}", v.display()));
        }
        for o in [
            "APT::Architecture=amd64",
            "Debug::NoLocking=1",
            "APT::Sandbox::User=root",
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false",
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false",
            "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false",
        ] {
            c.args(["-o", o]);
        }
        c
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(self.root.join("lists")).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
    }

    fn update(&self) -> Result<()> {
        let mut c = self.cmd("apt-get");
        c.args(["-q", "update"]);
        util::run(&mut c)
    }

    fn output(&self, tool: &str, args: &[&str]) -> Result<String> {
        let mut c = self.cmd(tool);
        c.args(args);
        let out = c.output().with_context(|| format!("cannot start {tool}"))?;
        if !out.status.success() {
            bail!(
                "`{tool} {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The version of `pkg` in `suite` whose version starts with `prefix`.
    fn version_in(&self, pkg: &str, suite: &str, prefix: &str) -> Result<String> {
        let out = self.output("apt-cache", &["madison", pkg])?;
        out.lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split('|').map(str::trim).collect();
                (cols.len() >= 3
                    && cols[2].contains(&format!(" {suite}/"))
                    && cols[1].starts_with(prefix))
                .then(|| cols[1].to_string())
            })
            .next()
            .with_context(|| format!("no {pkg} {prefix}* in {suite}"))
    }

    fn depends(&self, pkg: &str, version: &str) -> Result<Vec<String>> {
        let out = self.output("apt-cache", &["show", &format!("{pkg}={version}")])?;
        let line = out
            .lines()
            .find(|l| l.starts_with("Depends:"))
            .unwrap_or("Depends:");
        Ok(line["Depends:".len()..]
            .split([',', '|'])
            .filter_map(|d| d.split_whitespace().next().map(str::to_string))
            .collect())
    }

    fn download(&self, dir: &Path, pkg: &str, version: &str) -> Result<PathBuf> {
        let find = || -> Option<PathBuf> {
            fs::read_dir(dir)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .map(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
                        .unwrap_or(false)
                        && p.extension().is_some_and(|e| e == "deb")
                })
        };
        if let Some(p) = find() {
            return Ok(p);
        }
        let mut c = self.cmd("apt-get");
        c.current_dir(dir)
            .args(["-q", "download", &format!("{pkg}={version}")]);
        util::run(&mut c)?;
        find().with_context(|| format!("apt-get download {pkg} left no .deb"))
    }
}

/// A kernel ready to boot.
#[derive(Debug, Clone)]
struct Kernel {
    label: String,
    packages: Vec<String>,
    version: String,
    release: String,
    vmlinuz: PathBuf,
    modules_dir: PathBuf,
}

fn extract(deb: &Path, into: &Path) -> Result<()> {
    util::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into))
}

/// Resolves, downloads and extracts one kernel; the extracted tree is reused.
fn fetch_kernel(apt: &Apt, cache: &Path, label: &str, refresh: bool) -> Result<Kernel> {
    let (_, suite, prefix) = KERNELS
        .iter()
        .find(|k| k.0 == label)
        .context("unknown kernel")?;
    let dir = cache.join("kernels").join(label);
    let meta_path = dir.join("kernel.json");
    if !refresh {
        if let Ok(meta) = fs::read_to_string(&meta_path) {
            let v: serde_json::Value = serde_json::from_str(&meta)?;
            if let Some(k) = kernel_from_tree(label, &dir, &v) {
                return Ok(k);
            }
        }
    }
    if refresh || !apt.has_lists() {
        apt.update()?;
    }
    let version = apt.version_in("linux-image-cloud-amd64", suite, prefix)?;
    let image = apt
        .depends("linux-image-cloud-amd64", &version)?
        .into_iter()
        .find(|d| d.starts_with("linux-image-") && d != "linux-image-cloud-amd64")
        .context("the meta package names no image")?;
    let mut packages = vec![image.clone()];
    for d in apt.depends(&image, &version)? {
        if d.starts_with("linux-binary-") || d.starts_with("linux-modules-") {
            packages.push(d);
        }
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let _ = fs::remove_dir_all(dir.join("root"));
    fs::create_dir_all(dir.join("root"))?;
    for p in &packages {
        let deb = apt.download(&debs, p, &version)?;
        extract(&deb, &dir.join("root"))?;
    }
    let meta = serde_json::json!({"packages": packages, "version": version});
    fs::write(&meta_path, serde_json::to_string_pretty(&meta)?)?;
    kernel_from_tree(label, &dir, &meta).context("no vmlinuz or modules in the packages")
}

fn kernel_from_tree(label: &str, dir: &Path, meta: &serde_json::Value) -> Option<Kernel> {
    let root = dir.join("root");
    let mut modules_dir = None;
    for base in ["lib/modules", "usr/lib/modules"] {
        if let Ok(rd) = fs::read_dir(root.join(base)) {
            if let Some(e) = rd.flatten().find(|e| e.path().join("kernel").is_dir()) {
                modules_dir = Some(e.path());
            }
        }
    }
    let modules_dir = modules_dir?;
    let release = modules_dir.file_name()?.to_string_lossy().into_owned();
    let vmlinuz = [
        root.join("boot").join(format!("vmlinuz-{release}")),
        modules_dir.join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())?;
    Some(Kernel {
        label: label.to_string(),
        packages: meta["packages"]
            .as_array()?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        version: meta["version"].as_str()?.to_string(),
        release,
        vmlinuz,
        modules_dir,
    })
}

/// busybox from bookworm's busybox-static, for the init's shell and tools.
fn fetch_busybox(apt: &Apt, cache: &Path) -> Result<PathBuf> {
    let bb = cache.join("busybox");
    if bb.is_file() {
        return Ok(bb);
    }
    if !apt.has_lists() {
        apt.update()?;
    }
    let version = apt.version_in("busybox-static", "bookworm", "")?;
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let deb = apt.download(&debs, "busybox-static", &version)?;
    let tmp = cache.join("busybox-x");
    let _ = fs::remove_dir_all(&tmp);
    extract(&deb, &tmp)?;
    fs::copy(tmp.join("bin/busybox"), &bb)?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(bb)
}

// ---------------------------------------------------------------------------------------------
// Modules: dependency order from each module's .modinfo.

/// Reads a module file, decompressing .xz / .zst.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => Ok(fs::read(path)?),
        Some(t) => {
            let out = Command::new(t)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("cannot run {t}"))?;
            if !out.status.success() {
                bail!(
                    "{t} -dc {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(out.stdout)
        }
    }
}

fn module_name(path: &Path) -> String {
    let n = path.file_name().unwrap_or_default().to_string_lossy();
    n.split(".ko").next().unwrap_or("").replace('-', "_")
}

/// The `depends=` field of a module's .modinfo.
pub fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(pos) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[pos + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// Module names with their (decompressed) contents, in insmod order.
type Modules = Vec<(String, Vec<u8>)>;

/// The modules to insmod, dependencies first, with their (decompressed) contents; and the
/// requested ones that are neither modules nor built in.
fn module_plan(modules_dir: &Path, wanted: &[String]) -> Result<(Modules, Vec<String>)> {
    let mut files: HashMap<String, PathBuf> = HashMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().contains(".ko") {
                files.insert(module_name(&p), p);
            }
        }
    }
    let builtin: BTreeSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(|l| module_name(Path::new(l)))
        .collect();
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut missing = Vec::new();
    fn visit(
        name: &str,
        files: &HashMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
        missing: &mut Vec<String>,
    ) -> Result<()> {
        if !done.insert(name.to_string()) {
            return Ok(());
        }
        let Some(path) = files.get(name) else {
            if !builtin.contains(name) {
                missing.push(name.to_string());
            }
            return Ok(());
        };
        let data = read_module(path)?;
        for dep in modinfo_depends(&data) {
            visit(&dep, files, builtin, done, order, missing)?;
        }
        order.push((name.to_string(), data));
        Ok(())
    }
    for w in wanted {
        visit(
            &w.replace('-', "_"),
            &files,
            &builtin,
            &mut done,
            &mut order,
            &mut missing,
        )?;
    }
    Ok((order, missing))
}

// ---------------------------------------------------------------------------------------------
// Test binaries and what they need.

#[derive(Debug, Clone)]
struct TestBin {
    /// `package:target`
    id: String,
    path: PathBuf,
    /// The package directory (cargo runs tests there).
    cwd: PathBuf,
    filters: Vec<String>,
    tests: Vec<String>,
}

/// Builds the test binaries (and the workspace binaries they run) and lists their tests.
fn build_tests(specs: &[String]) -> Result<Vec<TestBin>> {
    util::build_workspace_bins()?;
    let mut bins = Vec::new();
    for spec in specs {
        let mut parts = spec.split(':');
        let (Some(pkg), Some(target)) = (parts.next(), parts.next()) else {
            bail!("--test {spec}: expected PACKAGE:TARGET[:FILTER...]");
        };
        let filters: Vec<String> = parts.map(str::to_string).collect();
        let mut cmd = util::cargo();
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
        util::flush();
        let out = cmd.output()?;
        if !out.status.success() {
            // A target that does not exist (yet) is left out, anything else is an error.
            let manifest = util::workspace_root()
                .join(pkg)
                .join("tests")
                .join(format!("{target}.rs"));
            if !manifest.exists() {
                println!("  note: {spec}: no such test target, left out");
                continue;
            }
            bail!("`{}` failed", util::display(&cmd));
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
        let cwd = util::workspace_root().join(pkg);
        let mut list = Command::new(&path);
        list.arg("--list").args(&filters).current_dir(&cwd);
        let listed = util::output_if_success(&mut list)
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
    let Some(out) = util::output_if_success(Command::new("ldd").arg(bin)) else {
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
struct Payload {
    files: Vec<(String, u32, Vec<u8>)>,
    /// Empty directories the tests run in.
    dirs: Vec<String>,
    notes: Vec<String>,
}

fn host_payload(bins: &[TestBin], busybox: &Path, scratch: &Path) -> Result<Payload> {
    let mut files = Vec::new();
    let mut notes = Vec::new();
    let mut executables: Vec<PathBuf> = bins.iter().map(|b| b.path.clone()).collect();
    let target = util::target_dir()?.join("debug");
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
            util::find_on_path(prog)
        };
        match found {
            Some(p) => executables.push(fs::canonicalize(&p).unwrap_or(p)),
            None => notes.push(format!("{prog} not found on the host, left out")),
        }
    }
    // The programs under the names they are called by (PATH lookups of the canonical file).
    let mut aliases = Vec::new();
    for prog in DEFAULT_PROGRAMS.iter().filter(|p| !p.starts_with('/')) {
        if let Some(p) = util::find_on_path(prog) {
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

fn init_script(kernel_label: &str, bins: &[TestBin], agent: &Path) -> String {
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
echo "root:x:0:" > /etc/group
echo "127.0.0.1 localhost" > /etc/hosts
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

fn build_initramfs(
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

// ---------------------------------------------------------------------------------------------
// The matrix.

struct Column {
    label: String,
    detail: String,
    end: RunEnd,
    boot: Option<Duration>,
    total: Duration,
    probe: Option<serde_json::Value>,
    module_failures: Vec<String>,
    missing_modules: Vec<String>,
    cells: BTreeMap<(String, String), Outcome>,
}

fn run_guest(
    k: &Kernel,
    bins: &[TestBin],
    payload: &Payload,
    args: &Args,
    work: &Path,
    agent: &Path,
) -> Result<Column> {
    let wanted: Vec<String> = args
        .modules
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let (modules, missing_modules) = module_plan(&k.modules_dir, &wanted)?;
    let init = init_script(&k.label, bins, agent);
    let initrd = work.join(format!("initramfs-{}.cpio", k.label));
    build_initramfs(&initrd, payload, &modules, &init)?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .args(["-m", &args.memory.to_string()])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3 oops=panic",
        ]);
    let log = work.join(format!("console-{}.log", k.label));
    let start = Instant::now();
    let (text, end, boot) =
        run_with_timeout(cmd, Duration::from_secs(args.timeout), M_DONE, Some(&log))?;
    let parsed = parse_console(&text);
    let expected: Vec<(String, Vec<String>)> = bins
        .iter()
        .map(|b| (b.id.clone(), b.tests.clone()))
        .collect();
    Ok(Column {
        label: k.label.clone(),
        detail: format!(
            "{} ({})",
            k.release,
            k.packages.join(", ") + " " + &k.version
        ),
        boot,
        total: start.elapsed(),
        probe: parsed
            .probe_json
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok()),
        module_failures: parsed.module_failures.clone(),
        missing_modules,
        cells: cells(&expected, &parsed, &end),
        end,
    })
}

fn run_host(bins: &[TestBin], agent: &Path, timeout: Duration) -> Result<Column> {
    let start = Instant::now();
    let mut text = String::new();
    let probe = Command::new(agent)
        .args(["probe", "--output", "json"])
        .output()?;
    let mut end = RunEnd::Completed;
    for b in bins {
        let mut cmd = Command::new(&b.path);
        cmd.arg("--test-threads=1")
            .args(&b.filters)
            .current_dir(&b.cwd);
        let left = timeout.saturating_sub(start.elapsed());
        let (out, e, _) = run_with_timeout(cmd, left, "\u{0}never", None)?;
        let _ = writeln!(text, "{M_TEST_BEGIN}{}", b.id);
        text.push_str(&out);
        let code = match &e {
            RunEnd::Exited(s) if s.contains("exit status: 0") => 0,
            _ => 1,
        };
        let _ = writeln!(text, "{M_TEST_END}{} {code}", b.id);
        if let RunEnd::TimedOut(_) = e {
            end = e;
            break;
        }
    }
    let parsed = parse_console(&text);
    let expected: Vec<(String, Vec<String>)> = bins
        .iter()
        .map(|b| (b.id.clone(), b.tests.clone()))
        .collect();
    let release = String::from_utf8_lossy(
        &Command::new("uname")
            .arg("-r")
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    )
    .trim()
    .to_string();
    Ok(Column {
        label: "host".into(),
        detail: format!("{release} (native)"),
        boot: None,
        total: start.elapsed(),
        probe: serde_json::from_slice(&probe.stdout).ok(),
        module_failures: Vec::new(),
        missing_modules: Vec::new(),
        cells: cells(&expected, &parsed, &end),
        end,
    })
}

pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    let mut labels: Vec<String> = Vec::new();
    let mut host = !args.no_host;
    if args.versions.is_empty() {
        labels = KERNELS.iter().map(|k| k.0.to_string()).collect();
    } else {
        host = false;
        for v in &args.versions {
            if v == "host" {
                host = true;
                continue;
            }
            let v = v.trim_end_matches(".x");
            let k = KERNELS
                .iter()
                .find(|k| {
                    k.0 == v || k.0.trim_end_matches(".x") == v || k.2.starts_with(&format!("{v}."))
                })
                .with_context(|| {
                    format!("unknown kernel {v}: one of 5.10, 6.1, 6.12, 7.x, host")
                })?;
            labels.push(k.0.to_string());
        }
    }
    let specs: Vec<String> = if args.tests.is_empty() {
        DEFAULT_TESTS.iter().map(|s| s.to_string()).collect()
    } else {
        args.tests.clone()
    };

    header("kernels: packages");
    let cache = cache_root();
    fs::create_dir_all(&cache)?;
    let apt = Apt::new(&cache)?;
    let busybox = fetch_busybox(&apt, &cache)?;
    let mut kernels = Vec::new();
    for l in &labels {
        let k = fetch_kernel(&apt, &cache, l, args.refresh)?;
        println!(
            "  {l}: {} {} ({})",
            k.release,
            k.version,
            k.packages.join(", ")
        );
        kernels.push(k);
    }

    header("kernels: test binaries");
    let bins = build_tests(&specs)?;
    for b in &bins {
        println!("  {}: {} tests ({})", b.id, b.tests.len(), b.path.display());
    }
    let agent = util::target_dir()?.join("debug").join("redirect-agent");
    let work = util::target_dir()?.join("kernels");
    fs::create_dir_all(&work)?;
    let payload = host_payload(&bins, &busybox, &work)?;
    for n in &payload.notes {
        println!("  note: {n}");
    }

    let mut columns: Vec<Column> = Vec::new();
    if host {
        header("kernels: host (native)");
        let c = run_host(&bins, &agent, Duration::from_secs(args.timeout))?;
        println!(
            "  host: {} in {:.0}s",
            c.end.describe(),
            c.total.as_secs_f64()
        );
        columns.push(c);
    }
    header(&format!(
        "kernels: booting {} guest(s), {} at a time",
        kernels.len(),
        args.jobs.max(1)
    ));
    let mut guest_cols: Vec<Option<Column>> = (0..kernels.len()).map(|_| None).collect();
    for chunk in kernels.chunks(args.jobs.max(1)).collect::<Vec<_>>() {
        let results: Vec<Result<Column>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|k| s.spawn(|| run_guest(k, &bins, &payload, &args, &work, &agent)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| bail!("guest thread panicked")))
                .collect()
        });
        for (k, r) in chunk.iter().zip(results) {
            let c = r.with_context(|| format!("kernel {}", k.label))?;
            println!(
                "  {}: {} (boot {}, total {:.0}s)",
                c.label,
                c.end.describe(),
                c.boot
                    .map(|b| format!("{:.1}s", b.as_secs_f64()))
                    .unwrap_or("-".into()),
                c.total.as_secs_f64()
            );
            let i = kernels.iter().position(|x| x.label == k.label).unwrap();
            guest_cols[i] = Some(c);
        }
    }
    columns.extend(guest_cols.into_iter().flatten());

    let matrix = render_matrix(&bins, &columns);
    println!("\n{matrix}");
    let json = to_json(&bins, &columns);
    let json_path = work.join("kernels.json");
    fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;
    println!("JSON: {}", json_path.display());
    let md_path = args
        .markdown
        .clone()
        .unwrap_or_else(|| util::workspace_root().join("KERNELS.md"));
    if md_path != Path::new("-") {
        fs::write(
            &md_path,
            render_markdown(
                &bins,
                &columns,
                &payload.notes,
                args.timeout,
                start.elapsed(),
            ),
        )?;
        println!("report: {}", md_path.display());
    }
    let failed: Vec<String> = columns
        .iter()
        .filter(|c| !c.end.ok() || c.cells.values().any(|o| matches!(o, Outcome::Fail(_))))
        .map(|c| c.label.clone())
        .collect();
    println!("total {:.0}s", start.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!("failed cells or guests on: {}", failed.join(", "));
    }
    Ok(())
}

fn short_test(bin: &str, test: &str) -> String {
    let target = bin.rsplit(':').next().unwrap_or(bin);
    format!("{target}::{test}")
}

fn render_matrix(bins: &[TestBin], cols: &[Column]) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["test".to_string()];
    header.extend(cols.iter().map(|c| c.label.clone()));
    rows.push(header);
    let mut boot = vec!["(guest)".to_string()];
    boot.extend(cols.iter().map(|c| {
        if c.end.ok() {
            "ok".into()
        } else {
            "FAIL".into()
        }
    }));
    rows.push(boot);
    for b in bins {
        for t in &b.tests {
            let mut r = vec![short_test(&b.id, t)];
            for c in cols {
                r.push(
                    c.cells
                        .get(&(b.id.clone(), t.clone()))
                        .map(|o| o.cell().to_string())
                        .unwrap_or("-".into()),
                );
            }
            rows.push(r);
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut s = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(s, "{}", line.join("  ").trim_end());
    }
    // Reasons for everything that is not a pass.
    let mut notes = String::new();
    for c in cols {
        if !c.end.ok() {
            let _ = writeln!(notes, "  {}: {}", c.label, c.end.describe());
        }
        for ((bin, t), o) in &c.cells {
            if let Some(r) = o.reason() {
                let _ = writeln!(
                    notes,
                    "  {} {} {}: {}",
                    c.label,
                    o.cell(),
                    short_test(bin, t),
                    r
                );
            }
        }
    }
    if !notes.is_empty() {
        let _ = write!(s, "\nnot passing:\n{notes}");
    }
    s
}

fn to_json(bins: &[TestBin], cols: &[Column]) -> serde_json::Value {
    let kernels: Vec<serde_json::Value> = cols
        .iter()
        .map(|c| {
            let results: Vec<serde_json::Value> = c
                .cells
                .iter()
                .map(|((bin, t), o)| {
                    serde_json::json!({
                        "binary": bin, "test": t, "result": o.cell().to_lowercase(),
                        "reason": o.reason(),
                    })
                })
                .collect();
            serde_json::json!({
                "kernel": c.label,
                "detail": c.detail,
                "guest": c.end.describe(),
                "ok": c.end.ok(),
                "boot_seconds": c.boot.map(|b| b.as_secs_f64()),
                "total_seconds": c.total.as_secs_f64(),
                "module_failures": c.module_failures,
                "modules_not_found": c.missing_modules,
                "probe": c.probe,
                "results": results,
            })
        })
        .collect();
    serde_json::json!({
        "binaries": bins.iter().map(|b| serde_json::json!({"id": b.id, "filters": b.filters, "tests": b.tests})).collect::<Vec<_>>(),
        "kernels": kernels,
    })
}

fn render_markdown(
    bins: &[TestBin],
    cols: &[Column],
    notes: &[String],
    timeout: u64,
    took: Duration,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Kernel compatibility\n");
    let _ = writeln!(
        s,
        "Produced by `cargo xtask kernels` (do not edit by hand): Debian cloud kernels booted under \
         qemu (TCG, 1 vCPU, {} s per guest at most) with the integration tests inside; `host` is \
         the development machine's kernel, run natively. Whole run: {:.0} s.\n",
        timeout,
        took.as_secs_f64()
    );
    let _ = writeln!(s, "## Kernels\n");
    let _ = writeln!(
        s,
        "| kernel | release / package | guest | boot | run | tests pass / fail / skip |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for c in cols {
        let count = |f: fn(&Outcome) -> bool| c.cells.values().filter(|o| f(o)).count();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.0} s | {} / {} / {} |",
            c.label,
            c.detail,
            c.end.describe(),
            c.boot
                .map(|b| format!("{:.1} s", b.as_secs_f64()))
                .unwrap_or("-".into()),
            c.total.as_secs_f64(),
            count(|o| matches!(o, Outcome::Pass)),
            count(|o| matches!(o, Outcome::Fail(_))),
            count(|o| matches!(o, Outcome::Skip(_))),
        );
    }
    let _ = writeln!(s, "\n## Test matrix\n");
    let _ = write!(s, "| test |");
    for c in cols {
        let _ = write!(s, " {} |", c.label);
    }
    let _ = write!(s, "\n|---|");
    for _ in cols {
        let _ = write!(s, "---|");
    }
    s.push('\n');
    for b in bins {
        for t in &b.tests {
            let _ = write!(s, "| `{}` |", short_test(&b.id, t));
            for c in cols {
                let cell = c
                    .cells
                    .get(&(b.id.clone(), t.clone()))
                    .map(|o| o.cell())
                    .unwrap_or("-");
                let _ = write!(s, " {cell} |");
            }
            s.push('\n');
        }
    }
    let mut reasons = String::new();
    for c in cols {
        if !c.end.ok() {
            let _ = writeln!(reasons, "- **{}**: {}", c.label, c.end.describe());
        }
        for m in &c.module_failures {
            let _ = writeln!(reasons, "- **{}**: module failed to load: {m}", c.label);
        }
        for ((bin, t), o) in &c.cells {
            if let Some(r) = o.reason() {
                let _ = writeln!(
                    reasons,
                    "- **{}** {} `{}`: {}",
                    c.label,
                    o.cell(),
                    short_test(bin, t),
                    r.replace('\n', " ")
                );
            }
        }
    }
    if !reasons.is_empty() {
        let _ = writeln!(s, "\n### Not passing\n\n{reasons}");
    }
    let _ = writeln!(
        s,
        "\n## Feature probe (`redirect-agent probe`) per kernel\n"
    );
    let _ = write!(s, "| feature | kind | required | since |");
    for c in cols {
        let _ = write!(s, " {} |", c.label);
    }
    let _ = write!(s, "\n|---|---|---|---|");
    for _ in cols {
        let _ = write!(s, "---|");
    }
    s.push('\n');
    let names: Vec<serde_json::Value> = cols
        .iter()
        .find_map(|c| c.probe.as_ref()?["features"].as_array().cloned())
        .unwrap_or_default();
    for f in &names {
        let name = f["name"].as_str().unwrap_or("?");
        let _ = write!(
            s,
            "| `{name}` | {} | {} | {} |",
            f["kind"].as_str().unwrap_or(""),
            if f["mandatory"] == true {
                "mandatory"
            } else {
                "optional"
            },
            f["since"].as_str().unwrap_or("")
        );
        for c in cols {
            let st = c.probe.as_ref().and_then(|p| {
                p["features"]
                    .as_array()?
                    .iter()
                    .find(|x| x["name"] == name)
                    .map(|x| x["present"] == true)
            });
            let _ = write!(
                s,
                " {} |",
                match st {
                    Some(true) => "present",
                    Some(false) => "**MISSING**",
                    None => "-",
                }
            );
        }
        s.push('\n');
    }
    let mut missing = String::new();
    for c in cols {
        match &c.probe {
            None => {
                let _ = writeln!(missing, "- **{}**: no probe output", c.label);
            }
            Some(p) => {
                for f in p["features"].as_array().into_iter().flatten() {
                    if f["present"] != true {
                        let _ = writeln!(
                            missing,
                            "- **{}** lacks `{}` (Linux {}): {}{}",
                            c.label,
                            f["name"].as_str().unwrap_or("?"),
                            f["since"].as_str().unwrap_or("?"),
                            f["impact"].as_str().unwrap_or(""),
                            f["detail"]
                                .as_str()
                                .map(|d| format!(" — `{}`", truncate(&d.replace('\n', " "), 400)))
                                .unwrap_or_default()
                        );
                    }
                }
            }
        }
    }
    if !missing.is_empty() {
        let _ = writeln!(s, "\n### Missing features\n\n{missing}");
    }
    if !notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    const CONSOLE: &str = "\
[    0.000000] Linux version 5.10.0\r
==> BOOTED 5.10 5.10.0-32-cloud-amd64 1.52\r
==> MODULE-FAILED xt_owner insmod: can't insert\r
==> PROBE-BEGIN\r
{\"kernel\": \"5.10\", \"ok\": true, \"features\": []}\r
==> PROBE-END 0\r
==> TEST-BEGIN redirect-agent:probe\r
\r
running 3 tests\r
test map_hash ... ok\r
test helper_x ... FAILED\r
test slow_one ... ignored, needs a second node\r
\r
failures:\r
\r
---- helper_x stdout ----\r
\r
thread 'helper_x' panicked at redirect-agent/tests/probe.rs:14:5:\r
helper_x is missing on kernel 5.10\r
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\r
\r
failures:\r
    helper_x\r
\r
test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out\r
==> TEST-END redirect-agent:probe 101\r
==> TEST-BEGIN redirect-agent:datapath\r
running 2 tests\r
test enroll_connect ... enrolled web (slot 0)\r
ok\r
test inbound ... ";

    fn expected() -> Vec<(String, Vec<String>)> {
        vec![
            (
                "redirect-agent:probe".into(),
                vec!["map_hash".into(), "helper_x".into(), "slow_one".into()],
            ),
            (
                "redirect-agent:datapath".into(),
                vec!["enroll_connect".into(), "inbound".into()],
            ),
            ("redirect-testbed:testbed".into(), vec!["smoke".into()]),
        ]
    }

    #[test]
    fn parses_results_reasons_and_markers() {
        let p = parse_console(CONSOLE);
        assert!(p.booted);
        assert!(!p.done);
        assert_eq!(p.module_failures, vec!["xt_owner insmod: can't insert"]);
        assert!(p.probe_json.as_deref().unwrap().contains("\"ok\": true"));
        let probe = &p.results["redirect-agent:probe"];
        assert_eq!(probe["map_hash"], Outcome::Pass);
        assert_eq!(
            probe["helper_x"],
            Outcome::Fail("helper_x is missing on kernel 5.10".into())
        );
        assert_eq!(
            probe["slow_one"],
            Outcome::Skip("needs a second node".into())
        );
        assert_eq!(p.ended["redirect-agent:probe"], 101);
        // A test still running when the console stops is not a result.
        assert!(!p.results["redirect-agent:datapath"].contains_key("inbound"));
        // A verdict pushed to the next line by a child's output still counts.
        assert_eq!(
            p.results["redirect-agent:datapath"]["enroll_connect"],
            Outcome::Pass
        );
    }

    #[test]
    fn a_dead_guest_fails_the_tests_it_did_not_finish() {
        let p = parse_console(CONSOLE);
        for end in [
            RunEnd::TimedOut(Duration::from_secs(7)),
            RunEnd::Panicked("Kernel panic - not syncing: Fatal exception".into()),
        ] {
            let c = cells(&expected(), &p, &end);
            let key = |b: &str, t: &str| (b.to_string(), t.to_string());
            assert_eq!(
                c[&key("redirect-agent:datapath", "enroll_connect")],
                Outcome::Pass
            );
            let Outcome::Fail(r) = &c[&key("redirect-agent:datapath", "inbound")] else {
                panic!("inbound should fail");
            };
            assert!(r.contains(&end.describe()), "{r}");
            let Outcome::Fail(r) = &c[&key("redirect-testbed:testbed", "smoke")] else {
                panic!("smoke should fail");
            };
            assert!(r.starts_with("not run"), "{r}");
        }
    }

    #[test]
    fn clean_console_lines() {
        assert_eq!(clean("\u{1b}[0mtest a ... ok\r"), "test a ... ok");
        assert_eq!(
            clean("\u{1b}c\u{1b}[?7l\u{1b}[2J==> BOOTED x"),
            "==> BOOTED x"
        );
        assert_eq!(
            parse_test_line("test a::b ... ok"),
            Some(("a::b".into(), Outcome::Pass))
        );
        assert_eq!(parse_test_line("test a ... "), None);
        assert_eq!(parse_test_line("test result: ok. 1 passed"), None);
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn timeout_kills_a_hung_guest() {
        let t = Instant::now();
        let (text, end, booted) = run_with_timeout(
            sh("echo '==> BOOTED x'; echo 'test a ... ok'; exec sleep 30"),
            Duration::from_millis(800),
            M_DONE,
            None,
        )
        .unwrap();
        assert_eq!(end, RunEnd::TimedOut(Duration::from_millis(800)));
        assert!(t.elapsed() < Duration::from_secs(10), "not killed in time");
        assert!(booted.is_some());
        assert!(text.contains("test a ... ok"));
    }

    #[test]
    fn panic_and_early_exit_are_failures() {
        let (_, end, _) = run_with_timeout(
            sh("echo '[ 1.0] Kernel panic - not syncing: Attempted to kill init!'; exit 0"),
            Duration::from_secs(10),
            M_DONE,
            None,
        )
        .unwrap();
        assert!(matches!(end, RunEnd::Panicked(ref l) if l.contains("Attempted to kill init")));
        assert!(!end.ok());
        let (_, end, _) = run_with_timeout(
            sh("echo hello; exit 3"),
            Duration::from_secs(10),
            M_DONE,
            None,
        )
        .unwrap();
        assert!(matches!(end, RunEnd::Exited(_)));
        let (_, end, _) = run_with_timeout(
            sh("echo '==> DONE 1.0'; sleep 30"),
            Duration::from_secs(10),
            M_DONE,
            None,
        )
        .unwrap();
        assert_eq!(end, RunEnd::Completed);
    }

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::new(Vec::new());
        c.file("/a/b", 0o644, b"hello").unwrap();
        c.symlink("/lib", "usr/lib").unwrap();
        let out = c.finish().unwrap();
        assert_eq!(out.len() % 512, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("070701"));
        // dir "a", file "a/b", symlink, trailer.
        assert_eq!(text.matches("070701").count(), 4);
        assert!(text.contains("a/b\0"));
        assert!(text.contains("TRAILER!!!"));
        // Every header starts 4-aligned.
        for (i, _) in text.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
        // The cpio tool reads it back.
        if util::find_on_path("cpio").is_some() {
            let mut child = Command::new("cpio")
                .args(["-t", "--quiet"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&out).unwrap();
            let mut listed = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut listed)
                .unwrap();
            child.wait().unwrap();
            assert_eq!(listed.lines().collect::<Vec<_>>(), ["a", "a/b", "lib"]);
        }
    }

    #[test]
    fn modinfo_dependencies() {
        let ko = b"\x7fELF....\0license=GPL\0depends=stp,llc\0intree=Y\0";
        assert_eq!(modinfo_depends(ko), vec!["stp", "llc"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert_eq!(module_name(Path::new("/x/nf-nat.ko.xz")), "nf_nat");
    }
}
