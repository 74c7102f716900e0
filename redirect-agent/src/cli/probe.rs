//! `redirect-agent probe`: the kernel's features, as a table or JSON.

use std::process::ExitCode;

use redirect_agent::probe::{probe, Report};

use super::table::{print_table, Format};

/// Arguments of `redirect-agent probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// Runs `probe` and prints its report.
pub fn run(args: &ProbeArgs) -> anyhow::Result<ExitCode> {
    // Most checks load programs and create a cgroup and a network namespace: as another user
    // every one would fail, and a report of everything "missing" would be a lie.
    redirect_agent::enroll::require_root().map_err(|e| {
        anyhow::Error::new(e).context("probe cannot check this kernel as a non-root user")
    })?;
    let report = probe();
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Table => print_report(&report),
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(report: &Report) {
    println!("kernel {}", report.kernel);
    let rows: Vec<Vec<String>> = report
        .features
        .iter()
        .map(|s| {
            vec![
                s.name.to_string(),
                s.kind.as_str().to_string(),
                match (s.mandatory, s.dns_capture) {
                    (true, true) => "mandatory, dns-capture",
                    (true, false) => "mandatory",
                    (false, true) => "dns-capture",
                    (false, false) => "optional",
                }
                .to_string(),
                if s.present { "present" } else { "MISSING" }.to_string(),
                s.since.to_string(),
                match (&s.detail, s.present) {
                    (_, true) => String::new(),
                    (Some(d), false) => format!("{}: {}", s.impact, first_line(d)),
                    (None, false) => s.impact.to_string(),
                },
            ]
        })
        .collect();
    print_table(
        &[
            "FEATURE",
            "KIND",
            "REQUIRED",
            "STATUS",
            "SINCE",
            "IF MISSING",
        ],
        &rows,
    );
    if report.ok {
        println!("\nall mandatory features present");
        if !report.missing_optional.is_empty() {
            println!(
                "optional features missing: {}",
                report.missing_optional.join(", ")
            );
        }
    } else {
        println!(
            "\nmissing mandatory features: {}",
            report.missing_mandatory.join(", ")
        );
    }
}

fn first_line(s: &str) -> &str {
    let s = s.lines().next().unwrap_or("");
    if s.len() > 160 {
        let mut end = 160;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        &s[..end]
    } else {
        s
    }
}
