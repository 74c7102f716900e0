//! PNG charts with plotters' bitmap backend; text is drawn with DejaVu Sans read at run time
//! (Debian `fonts-dejavu-core`), so no system font library is linked.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use plotters::prelude::*;
use serde_json::Value;

use crate::report::Groups;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub struct Charts {
    pub latency: Vec<PathBuf>,
    pub scale: Option<PathBuf>,
}

fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e}"))?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into()))
            .map_err(|_| format!("{FONT}: not a usable font"))
    })
    .clone()
    .map_err(|e| anyhow!("{e} (apt-get install fonts-dejavu-core)"))
}

pub fn draw(results: &Value, groups: &Groups, dir: &Path) -> Result<Charts> {
    register_font()?;
    std::fs::create_dir_all(dir)?;
    let mut latency = Vec::new();
    for wl in ["rr-1B", "crr-1B"] {
        let path = dir.join(format!("latency-{wl}.png"));
        latency_chart(results, groups, wl, &path)
            .with_context(|| format!("drawing {}", path.display()))?;
        latency.push(path);
    }
    let path = dir.join("scale-rules.png");
    let scale = scale_chart(results, groups, &path)
        .with_context(|| format!("drawing {}", path.display()))?
        .then_some(path);
    Ok(Charts { latency, scale })
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("{e:?}")
}

/// Horizontal bars: p50, p90, p99 per configuration.
fn latency_chart(results: &Value, g: &Groups, wl: &str, path: &Path) -> Result<()> {
    let configs = Groups::configs(results, "main");
    let rows: Vec<(String, [f64; 3])> = configs
        .iter()
        .map(|c| {
            let a = |m: &str| g.agg("main", c, wl, 0, 0, m).med;
            (c.clone(), [a("p50"), a("p90"), a("p99")])
        })
        .collect();
    let xmax = rows
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|x| x.is_finite())
        .fold(1.0f64, f64::max)
        * 1.08;
    let n = rows.len().max(1);
    let height = 120 + 46 * n as u32;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{wl}: latency per mode (µs, median of repetitions)"),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(250)
        .build_cartesian_2d(0.0..xmax, 0.0..n as f64)
        .map_err(err)?;
    let labels: Vec<String> = rows.iter().map(|(c, _)| c.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            let i = (*y - 0.5).round();
            if (y - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                labels[labels.len() - 1 - i as usize].clone()
            } else {
                String::new()
            }
        })
        .x_desc("µs")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    let colors = [
        RGBColor(46, 117, 182),
        RGBColor(242, 142, 43),
        RGBColor(200, 60, 60),
    ];
    let names = ["p50", "p90", "p99"];
    for (j, (color, name)) in colors.into_iter().zip(names).enumerate() {
        let bars = rows.iter().enumerate().filter_map(move |(i, (_, v))| {
            let x = v[j];
            if !x.is_finite() {
                return None;
            }
            let y0 = (n - 1 - i) as f64 + 0.12 + j as f64 * 0.26;
            Some(Rectangle::new([(0.0, y0), (x, y0 + 0.24)], color.filled()))
        });
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// crr-1B p50 against N (log scale), one line per mode, min–max as error bars.
fn scale_chart(results: &Value, g: &Groups, path: &Path) -> Result<bool> {
    let ns = crate::report::rule_counts(results);
    if ns.is_empty() {
        return Ok(false);
    }
    let modes = [
        ("iptables-nft", RGBColor(200, 60, 60)),
        ("iptables-legacy", RGBColor(242, 142, 43)),
        ("ebpf", RGBColor(46, 117, 182)),
    ];
    // (N, median, min, max) per mode.
    type Points = Vec<(f64, f64, f64, f64)>;
    let series: Vec<(&str, RGBColor, Points)> = modes
        .iter()
        .map(|(m, c)| {
            let pts = ns
                .iter()
                .map(|n| {
                    let a = g.agg("rules", &format!("{m}/test-proxy"), "crr-1B", *n, 0, "p50");
                    (*n as f64, a.med, a.min, a.max)
                })
                .filter(|p| p.1.is_finite())
                .collect();
            (*m, *c, pts)
        })
        .collect();
    let ymax = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|x| x.3))
        .fold(1.0f64, f64::max)
        * 1.1;
    let xmin = *ns.first().expect("non-empty") as f64;
    let xmax = (*ns.last().expect("non-empty") as f64).max(xmin * 10.0);
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "crr-1B p50 latency vs N excluded CIDRs + N excluded ports (test proxy)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((xmin * 0.8..xmax * 1.25).log_scale(), 0.0..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("N (log scale)")
        .y_desc("p50 µs")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (name, color, pts) in &series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                color.stroke_width(3),
            ))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.0, p.1), 5, color.filled())),
            )
            .map_err(err)?;
        chart
            .draw_series(
                pts.iter()
                    .map(|p| PathElement::new(vec![(p.0, p.2), (p.0, p.3)], color.stroke_width(2))),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(true)
}
