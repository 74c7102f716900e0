//! The matrix: every kernel's guest (and the host) run, their columns collected.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use redirect_devtools::{self as dev, header};

use crate::apt::{cache_root, fetch_busybox, fetch_kernel, Apt, Kernel, KERNELS};
use crate::console::{cells, parse_console, Outcome, RunEnd, M_TEST_BEGIN, M_TEST_END};
use crate::modules::module_plan;
use crate::payload::{build_initramfs, build_tests, host_payload, init_script, Payload, TestBin};
use crate::qemu::{boot, run_with_timeout};
use crate::report::{render_markdown, render_matrix, to_json};
use crate::{Args, DEFAULT_TESTS};

pub struct Column {
    pub label: String,
    pub detail: String,
    pub end: RunEnd,
    pub boot: Option<Duration>,
    pub total: Duration,
    pub probe: Option<serde_json::Value>,
    pub module_failures: Vec<String>,
    pub missing_modules: Vec<String>,
    pub cells: BTreeMap<(String, String), Outcome>,
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
    let log = work.join(format!("console-{}.log", k.label));
    let start = Instant::now();
    let (text, end, boot) = boot(
        &k.vmlinuz,
        &initrd,
        args.memory,
        Duration::from_secs(args.timeout),
        &log,
    )?;
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
    let agent = dev::target_dir()?.join("debug").join("redirect-agent");
    let work = dev::target_dir()?.join("kernels");
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
    fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("JSON: {}", json_path.display());
    let md_path = args
        .markdown
        .clone()
        .unwrap_or_else(|| dev::workspace_root().join("KERNELS.md"));
    if md_path != Path::new("-") {
        // `--markdown target/kernels/KERNELS.md` (what `cargo xtask test` passes) names a
        // directory that does not exist when the target directory is elsewhere.
        if let Some(dir) = md_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fs::write(
            &md_path,
            render_markdown(
                &bins,
                &columns,
                &payload.notes,
                args.timeout,
                start.elapsed(),
            ),
        )
        .with_context(|| format!("writing {}", md_path.display()))?;
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
