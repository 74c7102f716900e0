//! `cargo xtask bench cni`: the time redirect adds to a pod's sandbox on a node.
//!
//! A private containerd (the runtime test bed of `redirect-testbed`: its own root, socket, CNI
//! dirs and node network namespace) makes sandboxes through CRI, as a kubelet does, for pods
//! with Istio's injection annotation. Two chains are measured in interleaved rounds on the same
//! containerd: `bridge` + `host-local` alone (`plain`), and the same with `redirect-cni`
//! inserted by `redirect-agent install-cni` and a running agent behind it (`redirect`). A
//! round makes a few sandboxes one after the other with each chain and times RunPodSandbox
//! (the CNI ADD chain included, as the kubelet waits for it); the pairs of per-round medians
//! give the difference with its bootstrap interval (`crate::stats`). Then 50 sandboxes are
//! made at once with each chain (the burst a node sees when a deployment scales up), timed
//! from the first request to the last answer. The agent's own histogram
//! (`redirect_enroll_duration_seconds`) says how much of the difference is enrollment.
//! Results: `bench/cni.json` and the "Pods from the container runtime" section of BENCHMARKS.md.

use std::{collections::HashMap, ffi::OsStr, fs, path::PathBuf, time::Instant};

use anyhow::{bail, ensure, Context as _, Result};
use redirect_devtools as dev;
use redirect_testbed::{images, Containerd, Node};
use serde_json::json;

use crate::{
    agent::{free_port, http_get, write_marked_section, Setup},
    stats,
};

const BEGIN: &str = "<!-- bench cni: begin -->";
const END: &str = "<!-- bench cni: end -->";

/// The sandbox section of a BENCHMARKS.md, markers included, if it has one.
pub fn section_of(md: &str) -> Option<&str> {
    crate::agent::marked_section(md, BEGIN, END)
}

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Interleaved rounds (default 30; 2 with --quick).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Sandboxes per chain and round, made one after the other.
    #[arg(long, default_value_t = 9)]
    pub per_round: usize,
    /// Sandboxes of the parallel burst (default 50; 10 with --quick).
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Debug binaries, results under target/bench-quick/ (BENCHMARKS.md untouched).
    #[arg(long)]
    pub quick: bool,
}

/// Which chain a measurement ran with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Chain {
    Plain,
    Redirect,
}

impl Chain {
    fn name(self) -> &'static str {
        match self {
            Chain::Plain => "plain",
            Chain::Redirect => "redirect",
        }
    }
}

struct Bench {
    bed: Containerd,
    setup: Setup,
    plugin: PathBuf,
    made: usize,
}

impl Bench {
    fn cni_dirs(&self) -> [&OsStr; 4] {
        [
            OsStr::new("--cni-bin-dir"),
            self.bed.cni_bin_dir().as_os_str(),
            OsStr::new("--cni-conf-dir"),
            self.bed.cni_conf_dir().as_os_str(),
        ]
    }

    /// Puts `chain` in place and waits until containerd has loaded it.
    fn use_chain(&self, chain: Chain) -> Result<()> {
        let mut cmd = self.setup.cli();
        // The agent's socket, which the installed plugin is told to use.
        cmd.env("REDIRECT_SOCKET", &self.setup.socket);
        match chain {
            Chain::Redirect => {
                cmd.arg("install-cni")
                    .args(self.cni_dirs())
                    .arg("--cni-plugin")
                    .arg(&self.plugin);
            }
            Chain::Plain => {
                cmd.arg("uninstall-cni").args(self.cni_dirs());
            }
        }
        let out = cmd.output().context("running redirect-agent")?;
        ensure!(
            out.status.success(),
            "redirect-agent {chain:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = chain == Chain::Redirect;
        self.bed.wait_cni_plugins(chain.name(), |plugins| {
            plugins.iter().any(|p| p["type"] == "redirect-cni") == want
        })
    }

    fn spec(&mut self) -> Result<redirect_testbed::cri::SandboxSpec> {
        self.made += 1;
        let annotations = HashMap::from([(
            "sidecar.istio.io/status".to_owned(),
            r#"{"containers":["istio-proxy"]}"#.to_owned(),
        )]);
        self.bed
            .sandbox_spec("bench", &format!("sb-{}", self.made), annotations)
    }

    /// `n` sandboxes one after the other: RunPodSandbox's time of each, in seconds. They are
    /// removed afterwards (not timed).
    fn sequential(&mut self, n: usize) -> Result<Vec<f64>> {
        let mut times = Vec::new();
        let mut pods = Vec::new();
        for _ in 0..n {
            let spec = self.spec()?;
            let t = Instant::now();
            let pod = self.bed.run_pod(&spec)?;
            times.push(t.elapsed().as_secs_f64());
            pods.push(pod);
        }
        for p in &pods {
            self.bed.remove_pod(p)?;
        }
        Ok(times)
    }

    /// `n` sandboxes at once: the time from the first request to the last answer.
    fn burst(&mut self, n: usize) -> Result<f64> {
        let specs: Vec<_> = (0..n).map(|_| self.spec()).collect::<Result<_>>()?;
        let bed = &self.bed;
        let t = Instant::now();
        let pods: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = specs
                .iter()
                .map(|spec| s.spawn(move || bed.run_pod(spec)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect()
        });
        let wall = t.elapsed().as_secs_f64();
        let mut failed = Vec::new();
        for p in pods {
            match p {
                Ok(p) => self.bed.remove_pod(&p)?,
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        ensure!(
            failed.is_empty(),
            "{} sandboxes failed: {failed:?}",
            failed.len()
        );
        Ok(wall)
    }

    /// The agent's enroll histogram: sum in seconds, count, and the cumulative bucket counts
    /// by upper bound (seconds).
    fn enroll_histogram(&self) -> Result<Histogram> {
        let (code, body) = http_get(self.setup.http, "/metrics")?;
        ensure!(code == 200, "/metrics: {code}");
        let value = |name: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let buckets = body
            .lines()
            .filter_map(|l| l.strip_prefix("redirect_enroll_duration_seconds_bucket{le=\""))
            .filter_map(|l| {
                let (le, rest) = l.split_once("\"}")?;
                Some((le.parse::<f64>().ok()?, rest.trim().parse::<f64>().ok()?))
            })
            .collect();
        Ok(Histogram {
            sum: value("redirect_enroll_duration_seconds_sum "),
            count: value("redirect_enroll_duration_seconds_count "),
            buckets,
        })
    }
}

/// A Prometheus histogram as read from `/metrics`.
struct Histogram {
    sum: f64,
    count: f64,
    /// (upper bound, cumulative count), in the order exposed (ascending; `+Inf` last).
    buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// The upper bound of the bucket holding the median of what was observed between
    /// `before` and `self`: the median is at most that.
    fn median_bound_since(&self, before: &Histogram) -> Option<f64> {
        let n = self.count - before.count;
        self.buckets
            .iter()
            .zip(&before.buckets)
            .find(|((_, now), (_, then))| now - then >= n / 2.0)
            .map(|((le, _), _)| *le)
    }
}

pub fn run(opts: Opts) -> Result<()> {
    crate::sys::ensure_root("bench cni needs root (containerd, network namespaces, eBPF)")?;
    let rounds = opts.rounds.unwrap_or(if opts.quick { 2 } else { 30 });
    let parallel = opts.parallel.unwrap_or(if opts.quick { 10 } else { 50 });
    ensure!(
        rounds >= 2,
        "--rounds must be at least 2 (an interval needs two pairs)"
    );
    let root = dev::workspace_root();
    dev::header("bench cni: binaries and images");
    let mut build = dev::cargo();
    build.args([
        "build",
        "-p",
        "redirect-agent",
        "-p",
        "redirect-cni",
        "--bins",
    ]);
    if !opts.quick {
        build.arg("--release");
    }
    dev::run(&mut build)?;
    let bin_dir = dev::target_dir()?.join(if opts.quick { "debug" } else { "release" });
    let archive = images::test_images()?;
    let pid = std::process::id();
    let setup = Setup {
        agent_bin: bin_dir.join("redirect-agent"),
        pin_root: PathBuf::from(format!("/sys/fs/bpf/redirect-bench-cni-{pid}")),
        state_dir: PathBuf::from(format!("/dev/shm/redirect-bench-cni-{pid}")),
        socket: PathBuf::from(format!("/tmp/redirect-bench-cni-{pid}.sock")),
        http: std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        log: PathBuf::from(format!("/tmp/redirect-bench-cni-{pid}.agent.log")),
    };
    let config = PathBuf::from(format!("/tmp/redirect-bench-cni-{pid}.agent.yaml"));
    let started = Instant::now();
    let result = (|| {
        dev::header("bench cni: containerd and the agent");
        let bed = Containerd::start(Node::new()?)?;
        bed.import(&archive)?;
        fs::write(
            &config,
            format!(
                "kubeletCgroupRoots: [{:?}]\n",
                bed.kubelet_cgroup_root().display().to_string()
            ),
        )?;
        let mut agent = setup.start_agent_with(&[OsStr::new("--config"), config.as_os_str()])?;
        setup.wait_ready(&mut agent)?;
        let mut b = Bench {
            bed,
            setup: setup.clone(),
            plugin: bin_dir.join("redirect-cni"),
            made: 0,
        };
        measure(&mut b, rounds, opts.per_round, parallel)
    })();
    for p in [&setup.socket, &setup.log, &config] {
        let _ = fs::remove_file(p);
    }
    let _ = fs::remove_dir_all(&setup.pin_root);
    let _ = fs::remove_dir_all(&setup.state_dir);
    let mut results = result?;
    results["elapsed_s"] = json!(started.elapsed().as_secs_f64());
    crate::agent::publish(&mut results, opts.quick, "cni", report, |section| {
        write_marked_section(&root.join("BENCHMARKS.md"), BEGIN, END, section)?;
        Ok("the CNI section")
    })
}

fn measure(
    b: &mut Bench,
    rounds: usize,
    per_round: usize,
    parallel: usize,
) -> Result<serde_json::Value> {
    // One warm-up sandbox per chain: the first sandbox of a containerd pays for its snapshot.
    for chain in [Chain::Plain, Chain::Redirect] {
        b.use_chain(chain)?;
        b.sequential(1)?;
    }
    let mut per_round_medians: Vec<(f64, f64)> = Vec::new();
    let mut all: HashMap<&str, Vec<f64>> = HashMap::new();
    let h0 = b.enroll_histogram()?;
    for r in 0..rounds {
        dev::header(&format!("bench cni: round {}/{rounds}", r + 1));
        // Alternate which chain goes first, so that neither always follows the other.
        let order = if r % 2 == 0 {
            [Chain::Plain, Chain::Redirect]
        } else {
            [Chain::Redirect, Chain::Plain]
        };
        let mut med = [0.0; 2];
        for chain in order {
            b.use_chain(chain)?;
            let t = b.sequential(per_round)?;
            med[(chain == Chain::Redirect) as usize] = stats::median(&t);
            all.entry(chain.name()).or_default().extend(t);
        }
        per_round_medians.push((med[1], med[0]));
    }
    let h1 = b.enroll_histogram()?;
    let enrolls = h1.count - h0.count;
    if enrolls < (rounds * per_round) as f64 {
        bail!(
            "the agent enrolled {enrolls} pods for {} sandboxes",
            rounds * per_round
        );
    }
    let mut bursts = serde_json::Map::new();
    for chain in [Chain::Plain, Chain::Redirect] {
        dev::header(&format!(
            "bench cni: {parallel} sandboxes at once, {}",
            chain.name()
        ));
        b.use_chain(chain)?;
        bursts.insert(chain.name().into(), json!(b.burst(parallel)?));
    }
    b.use_chain(Chain::Plain)?;
    let diff = stats::difference_of_medians(&per_round_medians);
    let ratio = stats::ratio_of_medians(&per_round_medians);
    let pct = |c: &str, p: f64| {
        let mut v = all[c].clone();
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    Ok(json!({
        "rounds": rounds,
        "per_round": per_round,
        "pairs_redirect_plain_s": per_round_medians,
        "sequential": {
            "plain": {"p50_s": pct("plain", 0.5), "p90_s": pct("plain", 0.9), "n": all["plain"].len()},
            "redirect": {"p50_s": pct("redirect", 0.5), "p90_s": pct("redirect", 0.9), "n": all["redirect"].len()},
        },
        "added_s": {"point": diff.point, "lo": diff.lo, "hi": diff.hi, "n": diff.n},
        "ratio": {"point": ratio.point, "lo": ratio.lo, "hi": ratio.hi, "n": ratio.n},
        "verdict": ratio.verdict(stats::Better::Lower).name(),
        "agent_enroll_mean_s": (h1.sum - h0.sum) / enrolls,
        "agent_enroll_median_at_most_s": h1.median_bound_since(&h0),
        "parallel": parallel,
        "burst_s": bursts,
    }))
}

fn report(r: &serde_json::Value) -> String {
    let ms = |v: &serde_json::Value| format!("{:.1} ms", v.as_f64().unwrap_or(f64::NAN) * 1e3);
    let seq = &r["sequential"];
    let added = &r["added_s"];
    let burst = &r["burst_s"];
    let n = r["parallel"].as_u64().unwrap_or(0) as f64;
    let per = |c: &str| format!("{:.1} ms", burst[c].as_f64().unwrap_or(f64::NAN) / n * 1e3);
    format!(
        "{BEGIN}\n## Pods from the container runtime (CNI)\n\n\
         Generated by `cargo xtask bench cni` ({profile} binaries, kernel {kernel}, {elapsed:.0} s, \
         load average at the end {load}). Raw results: [`bench/cni.json`](bench/cni.json). A private \
         containerd 1.6 (the runtime test bed) makes sandboxes through CRI for pods with Istio's \
         injection annotation, with the chain `bridge` + `host-local` alone (`plain`) and with \
         `redirect-cni` inserted by `redirect-agent install-cni`, a running agent behind it \
         (`redirect`), in {rounds} interleaved rounds of {per} sandboxes each, one after the \
         other. RunPodSandbox is timed as a kubelet waits for it (network namespace, the CNI ADD \
         chain, the pause container).\n\n\
         | RunPodSandbox | plain | redirect |\n|---|---|---|\n\
         | p50 | {p50p} | {p50r} |\n| p90 | {p90p} | {p90r} |\n\
         | {n} at once, wall time | {bp:.2} s | {br:.2} s |\n| {n} at once, per sandbox | {pp} | {pr} |\n\n\
         **Time redirect adds per sandbox** (difference of the per-round medians, 95 % paired \
         bootstrap interval over {pairs} rounds): **{add} [{lo}, {hi}]**, ratio {ratio:.2}x \
         ({verdict}). The agent's own enrollment of these pods, from its \
         `redirect_enroll_duration_seconds` over the same rounds: mean {enroll}, median at most \
         {enroll_median} (the histogram's bucket); the rest of the difference is the plugin's \
         process start, the socket round trip, and containerd reading the longer chain.\n{END}\n",
        profile = r["profile"].as_str().unwrap_or("?"),
        kernel = r["kernel"].as_str().unwrap_or("?"),
        elapsed = r["elapsed_s"].as_f64().unwrap_or(0.0),
        load = r["load_average_after"]
            .as_str()
            .or(r["load_average"].as_str())
            .unwrap_or("?"),
        rounds = r["rounds"],
        per = r["per_round"],
        p50p = ms(&seq["plain"]["p50_s"]),
        p50r = ms(&seq["redirect"]["p50_s"]),
        p90p = ms(&seq["plain"]["p90_s"]),
        p90r = ms(&seq["redirect"]["p90_s"]),
        n = r["parallel"],
        bp = burst["plain"].as_f64().unwrap_or(f64::NAN),
        br = burst["redirect"].as_f64().unwrap_or(f64::NAN),
        pp = per("plain"),
        pr = per("redirect"),
        pairs = added["n"],
        add = ms(&added["point"]),
        lo = ms(&added["lo"]),
        hi = ms(&added["hi"]),
        ratio = r["ratio"]["point"].as_f64().unwrap_or(f64::NAN),
        verdict = r["verdict"].as_str().unwrap_or("?"),
        enroll = ms(&r["agent_enroll_mean_s"]),
        enroll_median = if r["agent_enroll_median_at_most_s"].is_null() {
            "?".to_owned()
        } else {
            ms(&r["agent_enroll_median_at_most_s"])
        },
    )
}
