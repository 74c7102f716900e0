//! How the commands print their results, whether the CLI ran them itself or the agent did
//! ([`redirect_agent::commands`]): one function per result, so both print the same bytes.

use std::fmt::Write as _;

use redirect_agent::commands::{
    EnrollReport, GcReport, ListReport, StatsReport, UnenrollReport, UninstallReport,
};

use super::table::{table, Format};

/// What the CLI prints for a result: stdout and stderr, each complete.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Printed {
    pub stdout: String,
    pub stderr: String,
}

impl Printed {
    /// Writes both to the process's stdout and stderr.
    pub fn emit(&self) {
        use std::io::Write as _;
        // A closed pipe (`| head`) is not worth a panic; the exit code says the rest.
        let _ = std::io::stdout().write_all(self.stdout.as_bytes());
        let _ = std::io::stderr().write_all(self.stderr.as_bytes());
    }
}

/// `enroll`.
pub fn render_enroll(r: &EnrollReport) -> Printed {
    let mut p = Printed::default();
    let verb = if r.updated { "updated" } else { "enrolled" };
    let listener = match &r.adopted_listeners {
        Ok(0) => "proxy not listening yet: it is captured as soon as it listens".to_owned(),
        Ok(n) => format!("adopted {n} running proxy listener(s)"),
        Err(e) => {
            let _ = writeln!(
                p.stderr,
                "warning: could not adopt the running proxy's inbound listener ({e}); \
                 inbound capture starts when the proxy listens again (adoption needs \
                 pidfd_getfd, Linux 5.6)"
            );
            "proxy listener not adopted".to_owned()
        }
    };
    let _ = writeln!(p.stdout, "{verb} {} (slot {}); {listener}", r.name, r.slot);
    p
}

pub fn render_unenroll(r: &UnenrollReport) -> Printed {
    Printed {
        stdout: format!("unenrolled {} (cgroup {})\n", r.name, r.cgroup.display()),
        stderr: String::new(),
    }
}

pub fn render_list(r: &ListReport, output: Format) -> Printed {
    let mut p = Printed::default();
    match output {
        Format::Json => {
            let mut doc = serde_json::json!({ "pods": r.pods });
            if !r.unusable.is_empty() {
                doc["unusable_records"] = serde_json::json!(r.unusable);
            }
            if !r.orphans.is_empty() {
                doc["orphaned_links"] = serde_json::json!(r.orphans);
            }
            let _ = writeln!(
                p.stdout,
                "{}",
                serde_json::to_string_pretty(&doc).expect("JSON values serialize")
            );
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = r
                .pods
                .iter()
                .map(|p| {
                    let r = &p.record;
                    vec![
                        r.name().to_owned(),
                        r.pod_ips
                            .iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        r.inbound_policy.to_string(),
                        r.proxy_uid.to_string(),
                        p.status.clone(),
                        r.cgroup.display().to_string(),
                        r.netns.display().to_string(),
                    ]
                })
                .collect();
            p.stdout.push_str(&table(
                &[
                    "NAME",
                    "POD IPS",
                    "POLICY",
                    "PROXY UID",
                    "STATUS",
                    "CGROUP",
                    "NETNS",
                ],
                &rows,
            ));
            for b in &r.unusable {
                let _ = writeln!(
                    p.stderr,
                    "warning: unusable record {}: {}",
                    b.path.display(),
                    b.reason
                );
            }
            for o in &r.orphans {
                let _ = writeln!(
                    p.stderr,
                    "warning: links {o} belong to no record; `redirect-agent gc` removes them"
                );
            }
        }
    }
    p
}

pub fn render_stats(r: &StatsReport, output: Format) -> Printed {
    let mut p = Printed::default();
    match output {
        Format::Json => {
            let pods: Vec<_> = r
                .pods
                .iter()
                .map(|(n, c)| serde_json::json!({ "name": n, "counters": c }))
                .collect();
            let _ = writeln!(
                p.stdout,
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "pods": pods }))
                    .expect("JSON values serialize")
            );
        }
        Format::Table => {
            // One column per pod, one row per counter: 18 counters fit a terminal's height
            // better than its width.
            let mut header = vec!["COUNTER"];
            header.extend(r.pods.iter().map(|(n, _)| n.as_str()));
            let rows: Vec<Vec<String>> = redirect_common::Counter::ALL
                .iter()
                .map(|k| {
                    let mut row = vec![k.name().to_owned()];
                    row.extend(
                        r.pods
                            .iter()
                            .map(|(_, c)| c.get(k.name()).copied().unwrap_or(0).to_string()),
                    );
                    row
                })
                .collect();
            p.stdout.push_str(&table(&header, &rows));
        }
    }
    p
}

pub fn render_uninstall(r: &UninstallReport) -> Printed {
    let mut p = Printed::default();
    for x in &r.removed {
        let _ = writeln!(p.stdout, "removed {x}");
    }
    for n in &r.unenrolled {
        let _ = writeln!(p.stdout, "unenrolled {n}");
    }
    p.stdout.push_str(&render_gc(&r.collected).stdout);
    if let Some(d) = &r.pin_root {
        let _ = writeln!(p.stdout, "removed the pins under {}", d.display());
    }
    if let Some(d) = &r.state_dir {
        let _ = writeln!(p.stdout, "removed the state directory {}", d.display());
    }
    if let Some(s) = &r.socket {
        let _ = writeln!(p.stdout, "removed the stale socket {}", s.display());
    }
    if p.stdout.is_empty() {
        let _ = writeln!(p.stdout, "nothing of redirect is installed");
    }
    p
}

pub fn render_gc(r: &GcReport) -> Printed {
    let mut p = Printed::default();
    for n in &r.recovered {
        let _ = writeln!(p.stdout, "rolled back an interrupted change of {n}");
    }
    for n in &r.gone {
        let _ = writeln!(
            p.stdout,
            "removed {n}: its cgroup or network namespace is gone"
        );
    }
    for b in &r.bad_records {
        let _ = writeln!(p.stdout, "removed unusable record {b}");
    }
    for d in &r.orphan_links {
        let _ = writeln!(p.stdout, "removed links of {d}: no record owns them");
    }
    for s in &r.orphan_slots {
        let _ = writeln!(p.stdout, "cleared slot {s}: no record owns it");
    }
    p
}
