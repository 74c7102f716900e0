//! BENCHMARKS.md and the charts, from the results JSON alone (so an earlier run's report can be
//! rewritten with `cargo xtask bench report --from FILE`).

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::stats::{self, Better, Interval};

/// The proxies a report knows, in the order it shows them.
pub const PROXIES: &[&str] = &["test-proxy", "nginx", "haproxy"];

/// Median, min and max of one metric over repetitions.
#[derive(Clone, Copy, Debug, Default)]
pub struct Agg {
    pub med: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Agg {
    pub fn of(mut v: Vec<f64>) -> Agg {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return Agg {
                med: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n: 0,
            };
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        Agg {
            med: stats::median(&v),
            min: v[0],
            max: v[n - 1],
            n,
        }
    }
}

/// The metrics the report shows, from one sample.
pub fn metric(s: &Value, name: &str) -> f64 {
    let l = &s["load"];
    let f = |k: &str| l[k].as_f64().unwrap_or(f64::NAN);
    let ops = f("ops");
    match name {
        "rate" => f("rate"),
        "p50" => f("p50_us"),
        "p90" => f("p90_us"),
        "p99" => f("p99_us"),
        "cpu_per_op" => f("cgroup_cpu_us") / ops,
        "gib_s" => f("rate") / GIB,
        "cpu_s_per_gib" => f("cgroup_cpu_us") / 1e6 / (ops / GIB),
        "conntrack" => s["conntrack"].as_f64().unwrap_or(f64::NAN),
        "conntrack_per_op" => s["conntrack"].as_f64().unwrap_or(f64::NAN) / ops,
        "setup_ms" => f("setup_ms"),
        _ => f64::NAN,
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// One group of samples: a configuration's measurements of one workload in one phase.
#[derive(Clone, Debug)]
pub struct Key {
    pub phase: String,
    pub config: String,
    pub workload: String,
    pub rules: u64,
    pub pods: u64,
}

impl Key {
    pub fn main(config: &str, workload: &str) -> Key {
        Key::new("main", config, workload, 0, 0)
    }

    pub fn new(phase: &str, config: &str, workload: &str, rules: u64, pods: u64) -> Key {
        Key {
            phase: phase.to_owned(),
            config: config.to_owned(),
            workload: workload.to_owned(),
            rules,
            pods,
        }
    }

    fn tuple(&self) -> (String, String, String, u64, u64) {
        (
            self.phase.clone(),
            self.config.clone(),
            self.workload.clone(),
            self.rules,
            self.pods,
        )
    }
}

/// Samples grouped by (phase, config, workload, rules, extra_pods).
pub struct Groups<'a> {
    pub map: BTreeMap<(String, String, String, u64, u64), Vec<&'a Value>>,
}

impl<'a> Groups<'a> {
    pub fn new(results: &'a Value) -> Groups<'a> {
        let mut map: BTreeMap<_, Vec<&Value>> = BTreeMap::new();
        for s in results["samples"].as_array().into_iter().flatten() {
            let k = (
                s["phase"].as_str().unwrap_or("").to_owned(),
                s["config"].as_str().unwrap_or("").to_owned(),
                s["workload"].as_str().unwrap_or("").to_owned(),
                s["rules"].as_u64().unwrap_or(0),
                s["extra_pods"].as_u64().unwrap_or(0),
            );
            map.entry(k).or_default().push(s);
        }
        Groups { map }
    }

    pub fn agg(
        &self,
        phase: &str,
        config: &str,
        workload: &str,
        rules: u64,
        pods: u64,
        m: &str,
    ) -> Agg {
        let k = (
            phase.to_owned(),
            config.to_owned(),
            workload.to_owned(),
            rules,
            pods,
        );
        Agg::of(
            self.map
                .get(&k)
                .map(|v| v.iter().map(|s| metric(s, m)).collect())
                .unwrap_or_default(),
        )
    }

    /// `(a, b)` of metric `m` for every round (`rep`) in which both `a` and `b` were measured:
    /// the pairs a comparison of the two is bootstrapped from.
    pub fn pairs(&self, a: &Key, b: &Key, m: &str) -> Vec<(f64, f64)> {
        let by_rep = |k: &Key| -> BTreeMap<u64, f64> {
            self.map
                .get(&k.tuple())
                .into_iter()
                .flatten()
                .filter_map(|s| Some((s["rep"].as_u64()?, metric(s, m))))
                .collect()
        };
        let (ma, mb) = (by_rep(a), by_rep(b));
        ma.iter()
            .filter_map(|(r, x)| Some((*x, *mb.get(r)?)))
            .collect()
    }

    /// `median(a) / median(b)` of metric `m` with its interval over the paired rounds.
    pub fn ratio(&self, a: &Key, b: &Key, m: &str) -> Interval {
        stats::ratio_of_medians(&self.pairs(a, b, m))
    }

    /// `median(a) - median(b)` of metric `m` with its interval over the paired rounds.
    pub fn difference(&self, a: &Key, b: &Key, m: &str) -> Interval {
        stats::difference_of_medians(&self.pairs(a, b, m))
    }

    /// Configs of a phase, in first-seen order of the run.
    pub fn configs(results: &Value, phase: &str) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for s in results["samples"].as_array().into_iter().flatten() {
            if s["phase"] == phase {
                let c = s["config"].as_str().unwrap_or("").to_owned();
                if !v.contains(&c) {
                    v.push(c);
                }
            }
        }
        v
    }
}

fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        "–".into()
    } else if x.abs() >= 100.0 {
        format!("{:.0}", x)
    } else if x.abs() >= 10.0 {
        format!("{:.1}", x)
    } else {
        format!("{:.2}", x)
    }
}

fn cell(a: Agg) -> String {
    if a.n <= 1 {
        fmt_num(a.med)
    } else {
        format!("{} ({}–{})", fmt_num(a.med), fmt_num(a.min), fmt_num(a.max))
    }
}

/// A ratio with its 95 % interval and the verdict for a metric where `better` is good:
/// `0.812 [0.750, 0.871] faster`.
fn ratio_cell(i: Interval, better: Better) -> String {
    if !i.point.is_finite() {
        return "–".into();
    }
    if !i.lo.is_finite() {
        return format!("{:.3}", i.point);
    }
    format!(
        "{:.3} [{:.3}, {:.3}] {}",
        i.point,
        i.lo,
        i.hi,
        i.verdict(better).name()
    )
}

/// A difference with its 95 % interval: `+60.5 [+40.1, +80.2]`, and the verdict.
fn difference_cell(i: Interval, better: Better) -> String {
    if !i.point.is_finite() {
        return "–".into();
    }
    if !i.lo.is_finite() {
        return format!("{:+.1}", i.point);
    }
    format!(
        "{:+.1} [{:+.1}, {:+.1}] {}",
        i.point,
        i.lo,
        i.hi,
        i.verdict(better).name()
    )
}

pub fn rewrite(from: &Path) -> Result<()> {
    let text = fs::read_to_string(from).with_context(|| format!("reading {}", from.display()))?;
    let results: Value = serde_json::from_str(&text)?;
    let dir = from.parent().unwrap_or(Path::new("."));
    let root = redirect_devtools::workspace_root();
    let md = if dir.canonicalize().ok() == root.join("bench").canonicalize().ok() {
        root.join("BENCHMARKS.md")
    } else {
        dir.join("BENCHMARKS.md")
    };
    write(&results, dir, &md)?;
    println!("wrote {}", md.display());
    Ok(())
}

pub fn write(results: &Value, out_dir: &Path, md_path: &Path) -> Result<()> {
    let groups = Groups::new(results);
    let charts = crate::charts::draw(results, &groups, out_dir)?;
    let rel = |p: &Path| -> String {
        let base = md_path.parent().unwrap_or(Path::new("."));
        p.strip_prefix(base)
            .map(|r| r.display().to_string())
            .unwrap_or_else(|_| p.display().to_string())
    };
    let meta = &results["meta"];
    let mut md = String::new();
    let w = &mut md;
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    writeln!(
        w,
        "# Benchmarks: redirect (eBPF) against Istio's iptables redirection\n"
    )?;
    writeln!(
        w,
        "Generated by `{}` on {} ({:.0} s). Raw results: [`{}`]({}). Rewrite this file from them \
         with `cargo xtask bench report --from {}`.\n",
        s(&meta["command"]),
        s(&meta["date"]),
        meta["elapsed_s"].as_f64().unwrap_or(0.0),
        rel(&out_dir.join("datapath.json")),
        rel(&out_dir.join("datapath.json")),
        rel(&out_dir.join("datapath.json")),
    )?;
    if meta["quick"].as_bool() == Some(true) {
        writeln!(
            w,
            "> **Quick run** (`--quick`: one repetition, short windows, debug binaries): it checks \
             the harness; its figures mean nothing.\n"
        )?;
    }
    writeln!(w, "## Machine\n")?;
    writeln!(w, "| | |\n|---|---|")?;
    writeln!(
        w,
        "| CPU | {} ({} vCPU), everything pinned to CPU {} |",
        s(&meta["cpu_model"]),
        meta["cpus"],
        meta["pinned_cpu"]
    )?;
    writeln!(
        w,
        "| memory | {:.0} GiB |",
        meta["mem_gib"].as_f64().unwrap_or(0.0)
    )?;
    writeln!(w, "| kernel | {} |", s(&meta["kernel"]))?;
    writeln!(w, "| OS | {} |", s(&meta["os"]))?;
    writeln!(w, "| iptables | {} |", s(&meta["iptables"]))?;
    writeln!(w, "| nginx | {} |", s(&meta["nginx"]))?;
    if !s(&meta["haproxy"]).is_empty() {
        writeln!(w, "| HAProxy | {} |", s(&meta["haproxy"]))?;
    }
    writeln!(w, "| binaries | {} profile |", s(&meta["profile"]))?;
    writeln!(
        w,
        "| load average at the end | {} (other work on the machine during the run) |",
        s(&meta["loadavg_end"])
    )?;
    let t = &meta["timing"];
    writeln!(
        w,
        "| windows | {} repetitions; {} ms warm-up, {} ms measured ({} ms for bulk) per measurement |\n",
        meta["reps"], t["warmup_ms"], t["duration_ms"], t["bulk_ms"]
    )?;

    method(w)?;
    // Hand-written reading of the figures, kept beside the results so a rewrite keeps it.
    if let Ok(notes) = fs::read_to_string(out_dir.join("notes.md")) {
        writeln!(w, "## What this run shows\n\n{}\n", notes.trim())?;
    }
    headline(w, results, &groups)?;
    writeln!(w, "### Latency per mode\n")?;
    for c in &charts.latency {
        writeln!(w, "![latency]({})\n", rel(c))?;
    }
    full_tables(w, results, &groups)?;
    ratios(w, results, &groups)?;
    setup_cost(w, results, &groups, "## Where the setup time goes")?;
    scale(w, results, &groups, &charts, &rel)?;
    pods(w, results, &groups)?;
    bpf(w, results)?;
    path_checks(w, results)?;
    // The node agent's section is written by `bench agent`; a data-path report keeps it.
    let agent = fs::read_to_string(md_path)
        .ok()
        .and_then(|old| crate::agent::section_of(&old).map(str::to_owned));
    let md = match agent {
        Some(section) => format!("{}\n\n{section}", md.trim_end()),
        None => md,
    };
    // So is the many-connections section, written by `bench connections`.
    let connections = fs::read_to_string(md_path)
        .ok()
        .and_then(|old| crate::connections::section_of(&old).map(str::to_owned));
    let md = match connections {
        Some(section) => format!("{}\n\n{section}", md.trim_end()),
        None => md,
    };
    // And the sandbox section of `bench cni`, and the setup section of `bench setup`.
    let mut md = md;
    for section_of in [crate::cni::section_of, crate::setup::section_of] {
        if let Some(section) = fs::read_to_string(md_path)
            .ok()
            .and_then(|old| section_of(&old).map(str::to_owned))
        {
            md = format!("{}\n\n{section}", md.trim_end());
        }
    }
    fs::write(md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    Ok(())
}

fn method(w: &mut String) -> Result<()> {
    writeln!(
        w,
        "## Method\n\n\
Two test-bed pods on one node (network namespaces on a bridge made by the real CNI `bridge` \
plugin, one cgroup v2 directory each): a **client** pod running the load generator as the \
application (uid 1000) beside its sidecar proxy (uid 1337), and a **server** pod running the \
echo application (uid 1000, `0.0.0.0:8080`) beside its sidecar proxy. In every proxied mode a \
request travels load generator → client proxy → server proxy → application: three TCP \
connections, as in a sidecar-to-sidecar mesh call. Only the way traffic reaches the proxies \
changes:\n\n\
| mode | how |\n|---|---|\n\
| `direct` | load generator → application at POD_IP:8080; no proxy, no rule: the floor |\n\
| `explicit` | load generator dials its proxy at 127.0.0.1:15001, which dials the server proxy at POD_IP:15006, which dials the application: proxies configured with fixed upstreams, no interception. The proxies' own cost |\n\
| `iptables-nft` | Istio's 1.10+ `nat` rules (generated from a table of `istio-iptables`' output, golden-tested) in both pods through `iptables-nft-restore`; the server proxy delivers to POD_IP:8080 from 127.0.0.6 |\n\
| `iptables-legacy` | the same rules through `iptables-legacy-restore` (x_tables) |\n\
| `iptables-localhost` | the pre-1.10 rules (no 127.0.0.6 `RETURN`), nft back end; the server proxy delivers to 127.0.0.1:8080 |\n\
| `ebpf` | both pods enrolled with `redirect-agent enroll` (cgroup connect/bind/sockopt/sock_ops, netns sk_lookup); no rule, no NAT, no conntrack |\n\n\
Proxies: the project's **test proxy** (`redirect-testbed proxy`: a thread per connection, \
`SO_ORIGINAL_DST` else `getsockname`), and **nginx**'s stream module (Debian `nginx-light` + \
`libnginx-mod-stream`). nginx cannot read `SO_ORIGINAL_DST`, so its outbound listener always \
proxies to the server application; its inbound listener proxies to `$server_addr:$server_port` \
(the original destination when capture keeps it, as sk_lookup does) with `proxy_bind 127.0.0.6`, \
and to the application's fixed address when the local port is the capture port (REDIRECT). \
**HAProxy** 2.6 (Debian `haproxy`) is a transparent sidecar: its outbound listener forwards to \
`server 0.0.0.0` (no port), the original destination HAProxy reads with `SO_ORIGINAL_DST` \
(answered by redirect's `cgroup/getsockopt` program, or by conntrack under iptables); its \
inbound listener forwards to the same destination with `source 127.0.0.6` (to `127.0.0.1` at \
the destination's port for the pre-1.10 rules); one thread, no logging.\n\n\
Workloads (Rust load generator, `redirect-testbed load`, HDR histograms, one connection at a \
time): `rr-1B` and `rr-1KiB` request/response on one kept connection; `crr-1B` connect, \
request/response, close; `bulk` one connection streaming 64 KiB writes through the echo path \
(throughput counts bytes echoed back). All benchmark processes (load generator, proxies, \
application) are pinned to one CPU: on this VM cross-CPU wake-ups triple latency and make p99 \
meaningless. The configurations are measured **interleaved** (A B C … A B C …) so that drift \
falls on all alike; figures are the **median of the repetitions, with (min–max)**.\n\n\
**Statistics.** A round measures every configuration once, so a comparison of two \
configurations is a set of pairs, one per round. Every ratio and difference the report \
prints comes with a 95 % interval from a **paired bootstrap over the rounds** (4 000 \
replicates drawing whole rounds with replacement, ratio or difference of the medians, \
percentile interval; ChaCha8 with a fixed seed, so rewriting the report from the JSON gives \
the same intervals; `redirect-bench/src/stats.rs`, unit-tested on synthetic data). The \
verdict is read off the interval: **faster** or **slower** when it lies entirely on one side \
of no difference, **within noise** when it contains it. After the fixed rounds, the \
comparisons of `ebpf` with `explicit` and `iptables-nft` (rr-1B and crr-1B, p50 and CPU) \
whose interval contains no difference but is wider than ±5 % get **more rounds** of just \
the configurations involved, while the run's time budget (19 minutes) lasts. A percentile \
bootstrap over few rounds is somewhat too narrow (on synthetic data with 8 rounds, about 6 % \
of identical pairs are called different instead of 5 %): read a verdict at the edge of its \
interval as weak.\n\n\
**CPU per operation** is the `usage_usec` delta of both pods' cgroups over the measured window \
(load generator, proxies, application, and the kernel work charged to them), divided by the \
operations. **Conntrack** is `conntrack -C` in both pods after the window (tables flushed \
before it). **BPF run time** comes from the kernel's BPF statistics, switched on only for a \
separate pass with `BPF_ENABLE_STATS` (an fd-scoped switch: no sysctl is changed), because the \
statistics themselves add two clock reads to every program run.\n\n\
Inside the two pods (their own network namespaces only) the benchmark widens the ephemeral port \
range and sets `net.ipv4.tcp_max_tw_buckets=0`, so that connect-request-close runs do not \
exhaust ports with TIME_WAIT sockets; the setting is the same in every mode.\n"
    )?;
    Ok(())
}

const MODES: &[&str] = &[
    "explicit",
    "iptables-nft",
    "iptables-legacy",
    "iptables-localhost",
    "ebpf",
];

fn headline(w: &mut String, results: &Value, g: &Groups) -> Result<()> {
    let configs = Groups::configs(results, "main");
    let proxies: Vec<&str> = PROXIES
        .iter()
        .copied()
        .filter(|p| configs.iter().any(|c| c.ends_with(p)))
        .collect();
    writeln!(w, "## Headline: interception cost over `explicit`\n")?;
    writeln!(
        w,
        "The cost each mechanism adds on top of the same proxies dialled explicitly, from the \
         medians of this run: latency in µs added at p50 and CPU µs added per operation, each \
         with its 95 % interval over the paired rounds and the verdict the interval gives \
         (\"slower\": the mode costs more than `explicit`). `direct` (no proxy at all) is \
         shown for scale.\n"
    )?;
    for proxy in &proxies {
        writeln!(w, "**{proxy}**\n")?;
        writeln!(
            w,
            "| mode | rr-1B p50 µs | +µs | crr-1B p50 µs | +µs | crr-1B rate /s | crr CPU µs/op | +µs | rr-1B CPU µs/op | +µs |"
        )?;
        writeln!(w, "|---|---|---|---|---|---|---|---|---|---|")?;
        let base = format!("explicit/{proxy}");
        for mode in std::iter::once("direct").chain(MODES.iter().copied()) {
            let cfg = if mode == "direct" {
                "direct".to_owned()
            } else {
                format!("{mode}/{proxy}")
            };
            let med = |wl: &str, m: &str| g.agg("main", &cfg, wl, 0, 0, m).med;
            let d = |wl: &str, m: &str| {
                difference_cell(
                    g.difference(&Key::main(&cfg, wl), &Key::main(&base, wl), m),
                    Better::of_metric(m),
                )
            };
            writeln!(
                w,
                "| `{mode}` | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                fmt_num(med("rr-1B", "p50")),
                d("rr-1B", "p50"),
                fmt_num(med("crr-1B", "p50")),
                d("crr-1B", "p50"),
                fmt_num(med("crr-1B", "rate")),
                fmt_num(med("crr-1B", "cpu_per_op")),
                d("crr-1B", "cpu_per_op"),
                fmt_num(med("rr-1B", "cpu_per_op")),
                d("rr-1B", "cpu_per_op"),
            )?;
        }
        writeln!(w)?;
    }
    Ok(())
}

fn full_tables(w: &mut String, results: &Value, g: &Groups) -> Result<()> {
    let configs = Groups::configs(results, "main");
    writeln!(w, "## All measurements (median (min–max))\n")?;
    for wl in ["rr-1B", "rr-1KiB", "crr-1B"] {
        writeln!(w, "### {wl}\n")?;
        writeln!(
            w,
            "| config | rate /s | p50 µs | p90 µs | p99 µs | CPU µs/op | conntrack entries |"
        )?;
        writeln!(w, "|---|---|---|---|---|---|---|")?;
        for c in &configs {
            if g.agg("main", c, wl, 0, 0, "rate").n == 0 {
                continue;
            }
            let a = |m: &str| cell(g.agg("main", c, wl, 0, 0, m));
            writeln!(
                w,
                "| `{c}` | {} | {} | {} | {} | {} | {:.0} |",
                a("rate"),
                a("p50"),
                a("p90"),
                a("p99"),
                a("cpu_per_op"),
                g.agg("main", c, wl, 0, 0, "conntrack").med,
            )?;
        }
        writeln!(w)?;
    }
    writeln!(w, "### bulk\n")?;
    writeln!(
        w,
        "| config | GiB/s echoed | CPU s per GiB | conntrack entries |"
    )?;
    writeln!(w, "|---|---|---|---|")?;
    for c in &configs {
        if g.agg("main", c, "bulk", 0, 0, "rate").n == 0 {
            continue;
        }
        let a = |m: &str| cell(g.agg("main", c, "bulk", 0, 0, m));
        writeln!(
            w,
            "| `{c}` | {} | {} | {:.0} |",
            a("gib_s"),
            a("cpu_s_per_gib"),
            g.agg("main", c, "bulk", 0, 0, "conntrack").med
        )?;
    }
    writeln!(w)?;
    Ok(())
}

/// The workloads and metrics of the ratio table.
pub const RATIO_METRICS: &[(&str, &[&str])] = &[
    ("rr-1B", &["rate", "p50", "p99", "cpu_per_op"]),
    ("rr-1KiB", &["rate", "p50", "p99", "cpu_per_op"]),
    ("crr-1B", &["rate", "p50", "p99", "cpu_per_op"]),
    ("bulk", &["gib_s", "cpu_s_per_gib"]),
];

/// The modes `ebpf` is compared with in the ratio table.
pub const RATIO_BASES: &[&str] = &[
    "explicit",
    "iptables-nft",
    "iptables-legacy",
    "iptables-localhost",
];

fn ratios(w: &mut String, results: &Value, g: &Groups) -> Result<()> {
    let configs = Groups::configs(results, "main");
    writeln!(w, "## Ratios from the same run\n")?;
    writeln!(
        w,
        "Ratio of medians, `ebpf` over the other mode with the same proxy, with its 95 % \
         interval from a paired bootstrap over the interleaved rounds ({} resamples, seed {}; \
         see Method) and the verdict for `ebpf`: **faster** when the whole interval is on the \
         good side of 1 (below 1 for latency and CPU, above 1 for rate and GiB/s), **slower** \
         when it is on the other side, **within noise** when it contains 1.\n",
        stats::RESAMPLES,
        stats::SEED
    )?;
    writeln!(
        w,
        "| proxy | workload | metric | rounds | ebpf/explicit | ebpf/iptables-nft | ebpf/iptables-legacy | ebpf/iptables-localhost |"
    )?;
    writeln!(w, "|---|---|---|---|---|---|---|---|")?;
    for proxy in PROXIES {
        if !configs.iter().any(|c| c.ends_with(proxy)) {
            continue;
        }
        for (wl, metrics) in RATIO_METRICS {
            for m in *metrics {
                let e = Key::main(&format!("ebpf/{proxy}"), wl);
                let cells: Vec<Interval> = RATIO_BASES
                    .iter()
                    .map(|mode| g.ratio(&e, &Key::main(&format!("{mode}/{proxy}"), wl), m))
                    .collect();
                write!(w, "| {proxy} | {wl} | {m} | {} |", cells[0].n)?;
                for c in cells {
                    write!(w, " {} |", ratio_cell(c, Better::of_metric(m)))?;
                }
                writeln!(w)?;
            }
        }
    }
    writeln!(w)?;
    verdict_summary(w, results, g)?;
    Ok(())
}

/// How many of the ratio table's comparisons came out which way.
fn verdict_summary(w: &mut String, results: &Value, g: &Groups) -> Result<()> {
    let configs = Groups::configs(results, "main");
    writeln!(w, "Verdicts for `ebpf`, counted over the table above:\n")?;
    writeln!(w, "| against | faster | slower | within noise |")?;
    writeln!(w, "|---|---|---|---|")?;
    for base in RATIO_BASES {
        let mut n = [0usize; 3];
        for proxy in PROXIES {
            if !configs.iter().any(|c| c.ends_with(proxy)) {
                continue;
            }
            for (wl, metrics) in RATIO_METRICS {
                for m in *metrics {
                    let i = g.ratio(
                        &Key::main(&format!("ebpf/{proxy}"), wl),
                        &Key::main(&format!("{base}/{proxy}"), wl),
                        m,
                    );
                    match i.verdict(Better::of_metric(m)) {
                        stats::Verdict::Faster => n[0] += 1,
                        stats::Verdict::Slower => n[1] += 1,
                        stats::Verdict::WithinNoise => n[2] += 1,
                        stats::Verdict::NoData => {}
                    }
                }
            }
        }
        writeln!(w, "| `{base}` | {} | {} | {} |", n[0], n[1], n[2])?;
    }
    writeln!(w)?;
    Ok(())
}

/// BPF run time per operation of all programs of both pods, from the statistics pass.
fn bpf_ns_per_op(results: &Value, config: &str, workload: &str) -> f64 {
    let mut ns = 0.0;
    let mut ops = f64::NAN;
    for s in results["bpf_stats"].as_array().into_iter().flatten() {
        if s["config"] == config && s["workload"] == workload {
            ns += s["run_time_ns"].as_f64().unwrap_or(0.0);
            ops = s["ops"].as_f64().unwrap_or(f64::NAN);
        }
    }
    ns / ops
}

/// Connection setup (crr-1B) taken apart: the proxies dialled explicitly, then the same with
/// both pods enrolled (every program attached and run, nothing redirected), then redirected.
pub fn setup_cost(w: &mut String, results: &Value, g: &Groups, heading: &str) -> Result<()> {
    let configs = Groups::configs(results, "main");
    let proxies: Vec<&str> = PROXIES
        .iter()
        .copied()
        .filter(|p| configs.contains(&format!("explicit+enrolled/{p}")))
        .collect();
    if proxies.is_empty() {
        return Ok(());
    }
    writeln!(w, "{heading}\n")?;
    writeln!(
        w,
        "`crr-1B` (connect, 1-byte request/response, close: three TCP connections per \
         operation through two sidecars) in three steps, measured in the same interleaved \
         rounds: `explicit`; `explicit+enrolled`, the same traffic with both pods enrolled, so \
         every redirect program is attached and runs on every socket (sock_ops callbacks, \
         connect4/bind4 checks, sk_lookup on every SYN) but nothing is redirected; and `ebpf`, \
         where the application's connection is redirected to its proxy (connect4 rewrite and \
         `bpf_bind`, the original destination filed and taken over by sock_ops, \
         `SO_ORIGINAL_DST` answered by getsockopt) and the server proxy's connection handed to \
         its listener by sk_lookup. Each step's difference to the one before is a paired \
         interval over the rounds; \"BPF ns/op\" is the kernel's run time of all programs of \
         both pods per operation from the statistics pass (below).\n"
    )?;
    writeln!(
        w,
        "| proxy | step | p50 µs | Δ p50 µs | CPU µs/op | Δ CPU µs/op | BPF ns/op |"
    )?;
    writeln!(w, "|---|---|---|---|---|---|---|")?;
    for proxy in &proxies {
        let steps = ["explicit", "explicit+enrolled", "ebpf"];
        for (i, step) in steps.iter().enumerate() {
            let c = format!("{step}/{proxy}");
            let k = Key::main(&c, "crr-1B");
            let (dp, dc) = if i == 0 {
                ("".to_owned(), "".to_owned())
            } else {
                let prev = Key::main(&format!("{}/{proxy}", steps[i - 1]), "crr-1B");
                (
                    difference_cell(g.difference(&k, &prev, "p50"), Better::Lower),
                    difference_cell(g.difference(&k, &prev, "cpu_per_op"), Better::Lower),
                )
            };
            let bpf = if i == 0 {
                "0".to_owned()
            } else {
                fmt_num(bpf_ns_per_op(results, &c, "crr-1B"))
            };
            writeln!(
                w,
                "| {proxy} | `{step}` | {} | {dp} | {} | {dc} | {bpf} |",
                cell(g.agg("main", &c, "crr-1B", 0, 0, "p50")),
                cell(g.agg("main", &c, "crr-1B", 0, 0, "cpu_per_op")),
            )?;
        }
        let e = Key::main(&format!("ebpf/{proxy}"), "crr-1B");
        let x = Key::main(&format!("explicit/{proxy}"), "crr-1B");
        writeln!(
            w,
            "| {proxy} | **`ebpf` − `explicit`** | | {} | | {} | |",
            difference_cell(g.difference(&e, &x, "p50"), Better::Lower),
            difference_cell(g.difference(&e, &x, "cpu_per_op"), Better::Lower),
        )?;
    }
    writeln!(w)?;
    setup_programs(w, results, &proxies)?;
    Ok(())
}

/// What runs each program, for the per-program table.
fn hook_of(program: &str) -> &'static str {
    match program {
        "rd_sock_ops" => "every sock_ops callback of a pod's TCP sockets",
        "rd_connect4" | "rd_connect6" => "every connect()",
        "rd_bind4" | "rd_bind6" => "every bind(), also `bpf_bind`'s",
        "rd_getpeername4" | "rd_getpeername6" => "every getpeername()",
        "rd_getsockopt" => "every getsockopt(), any level and option",
        "rd_sk_lookup" => "every connection request into a pod's network namespace",
        "rd_sendmsg4" | "rd_sendmsg6" => "every unconnected UDP sendmsg()",
        "rd_recvmsg4" | "rd_recvmsg6" => "every UDP recvmsg()",
        _ => "",
    }
}

/// Per program of both pods, from the statistics pass: how often it runs per crr-1B operation
/// and how long one run takes, with the programs attached but nothing redirected and with
/// redirection.
fn setup_programs(w: &mut String, results: &Value, proxies: &[&str]) -> Result<()> {
    let stats = results["bpf_stats"].as_array().cloned().unwrap_or_default();
    // (proxy, program) -> step -> (runs/op, ns/run, ns/op)
    type ByStep<'a> = BTreeMap<&'a str, (f64, f64, f64)>;
    let mut rows: BTreeMap<(String, String), ByStep> = BTreeMap::new();
    let steps = ["explicit+enrolled", "ebpf"];
    for s in &stats {
        if s["workload"] != "crr-1B" {
            continue;
        }
        let cfg = s["config"].as_str().unwrap_or("");
        let Some((step, proxy)) = cfg.split_once('/') else {
            continue;
        };
        let Some(step) = steps.iter().find(|x| **x == step) else {
            continue;
        };
        let cnt = s["run_cnt"].as_f64().unwrap_or(0.0);
        if cnt == 0.0 {
            continue;
        }
        let ns = s["run_time_ns"].as_f64().unwrap_or(0.0);
        let ops = s["ops"].as_f64().unwrap_or(f64::NAN);
        let program = s["program"].as_str().unwrap_or("").to_owned();
        rows.entry((proxy.to_owned(), program))
            .or_default()
            .insert(step, (cnt / ops, ns / cnt, ns / ops));
    }
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        w,
        "Per program, from the statistics pass (crr-1B, both pods): runs per operation, \
         kernel run time per run (`run_time_ns / run_cnt`, the program alone: not the \
         kernel's work to invoke it, nor what its helpers leave to do later, such as freeing \
         socket storage when the socket goes) and run time per operation. The statistics add \
         two clock reads to every run.\n"
    )?;
    writeln!(
        w,
        "| proxy | program | runs on | enrolled runs/op | enrolled ns/run | enrolled ns/op | \
         ebpf runs/op | ebpf ns/run | ebpf ns/op |"
    )?;
    writeln!(w, "|---|---|---|---|---|---|---|---|---|")?;
    for proxy in proxies {
        let mut total = [0.0f64; 2];
        for ((p, program), by_step) in &rows {
            if p != proxy {
                continue;
            }
            let mut cells = Vec::new();
            for (i, step) in steps.iter().enumerate() {
                match by_step.get(step) {
                    Some((runs, ns_run, ns_op)) => {
                        total[i] += ns_op;
                        cells.push(format!("{} | {:.0} | {:.0}", fmt_num(*runs), ns_run, ns_op));
                    }
                    None => cells.push("0 | | 0".to_owned()),
                }
            }
            writeln!(
                w,
                "| {proxy} | `{program}` | {} | {} | {} |",
                hook_of(program),
                cells[0],
                cells[1]
            )?;
        }
        writeln!(
            w,
            "| {proxy} | **all** | | | | **{:.0}** | | | **{:.0}** |",
            total[0], total[1]
        )?;
    }
    writeln!(w)?;
    Ok(())
}

/// The N values of the scale sweep present in the results, ascending.
pub fn rule_counts(results: &Value) -> Vec<u64> {
    let mut ns: Vec<u64> = results["samples"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["phase"] == "rules")
        .filter_map(|s| s["rules"].as_u64())
        .collect();
    ns.sort_unstable();
    ns.dedup();
    ns
}

fn scale(
    w: &mut String,
    results: &Value,
    g: &Groups,
    charts: &crate::charts::Charts,
    rel: &dyn Fn(&Path) -> String,
) -> Result<()> {
    let ns = rule_counts(results);
    if ns.is_empty() {
        return Ok(());
    }
    writeln!(
        w,
        "## Scale sweep: N excluded outbound CIDRs and N excluded inbound ports\n"
    )?;
    writeln!(
        w,
        "`crr-1B` with the test proxy. Both pods get N `excludeOutboundIPRanges` (/32s that the \
         traffic does not match) and N `excludeInboundPorts` (not the application's): iptables \
         installs 2N more rules per pod that every new connection walks; redirect puts them in \
         an LPM trie and a hash map. Setup is the time to install the rules or enroll both pods.\n"
    )?;
    if let Some(c) = &charts.scale {
        writeln!(w, "![scale sweep]({})\n", rel(c))?;
    }
    let modes = ["iptables-nft", "iptables-legacy", "ebpf"];
    write!(w, "| N |")?;
    for m in modes {
        write!(w, " {m} p50 µs | {m} rate /s | {m} setup ms |")?;
    }
    writeln!(w)?;
    writeln!(w, "|---|{}", "---|".repeat(modes.len() * 3))?;
    for n in &ns {
        write!(w, "| {n} |")?;
        for m in modes {
            let c = format!("{m}/test-proxy");
            write!(
                w,
                " {} | {} | {} |",
                cell(g.agg("rules", &c, "crr-1B", *n, 0, "p50")),
                fmt_num(g.agg("rules", &c, "crr-1B", *n, 0, "rate").med),
                fmt_num(g.agg("rules", &c, "crr-1B", *n, 0, "setup_ms").med),
            )?;
        }
        writeln!(w)?;
    }
    writeln!(w)?;
    let first = ns[0];
    let last = *ns.last().expect("non-empty");
    for m in modes {
        let c = format!("{m}/test-proxy");
        let a = g.agg("rules", &c, "crr-1B", first, 0, "p50").med;
        let b = g.agg("rules", &c, "crr-1B", last, 0, "p50").med;
        let i = g.ratio(
            &Key::new("rules", &c, "crr-1B", last, 0),
            &Key::new("rules", &c, "crr-1B", first, 0),
            "p50",
        );
        writeln!(
            w,
            "- `{m}`: crr p50 {} µs at N={first} → {} µs at N={last}: ratio {} (\"slower\": \
             N={last} costs more).",
            fmt_num(a),
            fmt_num(b),
            ratio_cell(i, Better::Lower)
        )?;
    }
    writeln!(w)?;
    Ok(())
}

fn pods(w: &mut String, results: &Value, g: &Groups) -> Result<()> {
    let crowd = &results["crowd"];
    let extra = crowd["extra_pods"].as_u64().unwrap_or(0);
    if extra == 0 {
        return Ok(());
    }
    writeln!(w, "## Node scale: 2 against {} pods enrolled\n", extra + 2)?;
    writeln!(
        w,
        "{extra} more pods (a bare network namespace with an address on `lo`, and a cgroup) \
         enrolled with `redirect-agent enroll`, one CLI call each: created in {:.1} s, enrolled \
         in {:.1} s ({:.1} ms per pod), unenrolled in {:.1} s. The same `explicit`, \
         `iptables-nft` and `ebpf` configurations (test proxy) were measured again, interleaved, \
         with them in place. iptables rules are per network namespace, so other pods cannot \
         change their cost; the row is there as a control for drift between the two phases.\n",
        crowd["create_s"].as_f64().unwrap_or(0.0),
        crowd["enroll_s"].as_f64().unwrap_or(0.0),
        crowd["enroll_s"].as_f64().unwrap_or(0.0) * 1e3 / extra as f64,
        crowd["unenroll_s"].as_f64().unwrap_or(0.0),
    )?;
    writeln!(
        w,
        "| config | workload | p50 µs, 2 pods | p50 µs, {} pods | rate, 2 pods | rate, {} pods | p50 ratio to explicit, 2 pods | p50 ratio to explicit, {} pods |",
        extra + 2,
        extra + 2,
        extra + 2
    )?;
    writeln!(w, "|---|---|---|---|---|---|---|---|")?;
    for wl in ["rr-1B", "crr-1B"] {
        for mode in ["explicit", "iptables-nft", "ebpf"] {
            let c = format!("{mode}/test-proxy");
            let a = g.agg("main", &c, wl, 0, 0, "p50");
            let b = g.agg("pods", &c, wl, 0, extra, "p50");
            writeln!(
                w,
                "| `{c}` | {wl} | {} | {} | {} | {} | {} | {} |",
                cell(a),
                cell(b),
                fmt_num(g.agg("main", &c, wl, 0, 0, "rate").med),
                fmt_num(g.agg("pods", &c, wl, 0, extra, "rate").med),
                ratio_cell(
                    g.ratio(
                        &Key::main(&c, wl),
                        &Key::main("explicit/test-proxy", wl),
                        "p50"
                    ),
                    Better::Lower
                ),
                ratio_cell(
                    g.ratio(
                        &Key::new("pods", &c, wl, 0, extra),
                        &Key::new("pods", "explicit/test-proxy", wl, 0, extra),
                        "p50"
                    ),
                    Better::Lower
                ),
            )?;
        }
    }
    writeln!(w)?;
    Ok(())
}

fn bpf(w: &mut String, results: &Value) -> Result<()> {
    let stats = results["bpf_stats"].as_array().cloned().unwrap_or_default();
    if stats.is_empty() {
        return Ok(());
    }
    writeln!(
        w,
        "## BPF program run time (kernel BPF statistics, ebpf mode)\n"
    )?;
    writeln!(
        w,
        "One pass per workload with statistics on. Calls per operation count both pods' \
         programs over every operation of the pass (warm-up included); ns per call is \
         `run_time_ns / run_cnt`. rr and bulk run on one kept connection, so their programs \
         run only at connection setup; for bulk an operation is one byte.\n"
    )?;
    writeln!(
        w,
        "| config | workload | program | calls | calls/op | ns/call |"
    )?;
    writeln!(w, "|---|---|---|---|---|---|")?;
    let mut total: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    for s in &stats {
        let cnt = s["run_cnt"].as_f64().unwrap_or(0.0);
        if cnt == 0.0 {
            continue;
        }
        let ns = s["run_time_ns"].as_f64().unwrap_or(0.0);
        let ops = s["ops"].as_f64().unwrap_or(f64::NAN);
        let cfg = s["config"].as_str().unwrap_or("").to_owned();
        let wl = s["workload"].as_str().unwrap_or("").to_owned();
        let e = total.entry((cfg.clone(), wl.clone())).or_default();
        e.0 += ns;
        e.1 = ops;
        writeln!(
            w,
            "| `{cfg}` | {wl} | `{}` | {} | {} | {:.0} |",
            s["program"].as_str().unwrap_or(""),
            cnt,
            fmt_num(cnt / ops),
            ns / cnt
        )?;
    }
    writeln!(w)?;
    writeln!(w, "BPF time per operation, all programs of both pods:\n")?;
    writeln!(w, "| config | workload | ns/op |")?;
    writeln!(w, "|---|---|---|")?;
    for ((cfg, wl), (ns, ops)) in &total {
        writeln!(w, "| `{cfg}` | {wl} | {} |", fmt_num(ns / ops))?;
    }
    writeln!(w)?;
    Ok(())
}

fn path_checks(w: &mut String, results: &Value) -> Result<()> {
    let samples = results["samples"].as_array().cloned().unwrap_or_default();
    let bad: Vec<&Value> = samples.iter().filter(|s| s["path_ok"] != true).collect();
    writeln!(w, "## Path checks\n")?;
    writeln!(
        w,
        "Every measurement checks that its traffic took the path its mode claims: in the \
         iptables modes the packet counters of the client's `REDIRECT --to-ports 15001`, the \
         server's `REDIRECT --to-ports 15006` and (1.10+ rules) the `127.0.0.6 RETURN` rule grew \
         by at least one per connection, and conntrack has entries; in the ebpf mode redirect's \
         per-pod counters `outbound_captured`, `inbound_captured` and `delivered_pod_ip` grew by \
         at least one per connection, and both pods have **zero** conntrack entries; `direct` \
         and `explicit` have zero conntrack entries.\n"
    )?;
    if bad.is_empty() {
        writeln!(w, "All {} measurements passed. Examples:\n", samples.len())?;
        let mut seen = Vec::new();
        for s in &samples {
            let c = s["config"].as_str().unwrap_or("");
            if s["workload"] == "crr-1B" && s["phase"] == "main" && !seen.contains(&c) {
                seen.push(c);
                writeln!(w, "- `{c}` crr-1B: {}", s["path"].as_str().unwrap_or(""))?;
            }
        }
    } else {
        writeln!(w, "**{} measurements failed:**\n", bad.len())?;
        for s in bad {
            writeln!(
                w,
                "- `{}` {} rep {}: {}",
                s["config"].as_str().unwrap_or(""),
                s["workload"].as_str().unwrap_or(""),
                s["rep"],
                s["path"].as_str().unwrap_or("")
            )?;
        }
    }
    let errs: Vec<String> = samples
        .iter()
        .filter(|s| s["load"]["errors"].as_u64().unwrap_or(0) > 0)
        .map(|s| {
            format!(
                "- `{}` {} rep {}: {} failed operations ({})",
                s["config"].as_str().unwrap_or(""),
                s["workload"].as_str().unwrap_or(""),
                s["rep"],
                s["load"]["errors"],
                s["load"]["first_error"].as_str().unwrap_or("")
            )
        })
        .collect();
    if !errs.is_empty() {
        writeln!(
            w,
            "\nOperations that failed (timed out after 10 s) inside otherwise valid measurements:\n"
        )?;
        writeln!(w, "{}", errs.join("\n"))?;
    }
    writeln!(w)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let a = Agg::of(vec![3.0, 1.0, 2.0, f64::NAN]);
        assert_eq!((a.med, a.min, a.max, a.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Agg::of(vec![1.0, 2.0, 3.0, 4.0]).med, 2.5);
        assert!(Agg::of(vec![]).med.is_nan());
    }
}
