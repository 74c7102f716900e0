//! The report: the matrix on the terminal, the JSON, KERNELS.md.

use std::{fmt::Write as _, time::Duration};

use crate::console::{truncate, Outcome};
use crate::matrix::Column;
use crate::payload::TestBin;

fn short_test(bin: &str, test: &str) -> String {
    let target = bin.rsplit(':').next().unwrap_or(bin);
    format!("{target}::{test}")
}

pub fn render_matrix(bins: &[TestBin], cols: &[Column]) -> String {
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

pub fn to_json(bins: &[TestBin], cols: &[Column]) -> serde_json::Value {
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

pub fn render_markdown(
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
