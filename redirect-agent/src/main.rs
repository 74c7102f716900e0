//! `redirect-agent`: the command line over the redirect library. Each command acts once and
//! exits; enrolled pods stay redirected because their links and maps are pinned on bpffs.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

mod cli;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cli::table::{print_table, Format};
use redirect_agent::{
    datapath::{self, Datapath},
    enroll, gc, spec,
    state::{self, StateStore},
    stats,
};
use redirect_common::InboundPolicy;

/// redirect: Istio-style sidecar traffic redirection in eBPF, with inbound traffic delivered
/// to the application at its original pod-IP destination.
///
/// Enroll a pod (its cgroup v2 directory and network namespace) and its proxy's traffic is
/// redirected as Istio's iptables rules would do, with no iptables rule, no NAT and no
/// conntrack. Every command but `list` needs root.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// bpffs directory holding the pinned programs, maps and links.
    #[arg(long, global = true, env = "REDIRECT_PIN_ROOT", default_value = datapath::DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// Directory holding one record per enrolled pod, and the lock.
    #[arg(long, global = true, env = "REDIRECT_STATE_DIR", default_value = state::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Redirect a pod's traffic through its proxy. Enrolling an enrolled name again updates the
    /// pod in place; established connections are not touched.
    ///
    /// Example:
    ///   redirect-agent enroll --name web-0 --cgroup /sys/fs/cgroup/kubepods/pod1234
    ///     --netns /var/run/netns/web-0 --pod-ip 198.18.0.10 --pod-ip 2001:db8::10
    ///     --port-policy 9000=localhost --exclude-outbound-cidrs 198.18.100.0/24
    Enroll(EnrollArgs),
    /// Remove exactly one pod's redirection; the pod behaves as if redirect had never been there.
    Unenroll {
        /// Name given at enroll.
        #[arg(long)]
        name: String,
    },
    /// List enrolled pods, with what the machine says of each: `ok`, `gone` (its cgroup or
    /// network namespace no longer exists; `gc` removes it), `interrupted` (a command changing
    /// it was killed; the next command rolls it back), `incomplete` (links missing; root only).
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show per-pod counters: what the datapath did with each connection.
    Stats {
        /// Only this pod.
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Remove pods whose cgroup or network namespace is gone, roll back interrupted commands,
    /// and clear pins and rows that no record owns (after a lost state directory).
    Gc,
    /// Check the kernel features the datapath needs.
    Probe(cli::probe::ProbeArgs),
    /// Find listeners that the pod-IP delivery change affects.
    Detect(cli::detect::DetectCli),
}

#[derive(Debug, clap::Args)]
struct EnrollArgs {
    /// Name of the pod in redirect (1-63 characters of [A-Za-z0-9._-]).
    #[arg(long)]
    name: String,
    /// The pod's cgroup v2 directory; every process below it is the pod.
    #[arg(long)]
    cgroup: PathBuf,
    /// The pod's network namespace file (/var/run/netns/NAME or /proc/PID/ns/net).
    #[arg(long)]
    netns: PathBuf,
    /// An address of the pod (repeat for IPv4 and IPv6); it must be assigned in the namespace.
    #[arg(long = "pod-ip", required = true)]
    pod_ips: Vec<IpAddr>,
    /// The proxy's uid: its connections are the proxy's, all others the application's.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// Where inbound traffic ends: passthrough = POD_IP:P from 127.0.0.6 (Istio >= 1.10),
    /// localhost = 127.0.0.1:P (Istio < 1.10).
    #[arg(long, default_value_t = InboundPolicy::Passthrough)]
    inbound_policy: InboundPolicy,
    /// A per-port override of --inbound-policy, PORT=passthrough|localhost (repeatable).
    #[arg(long = "port-policy", value_parser = spec::parse_port_policy)]
    port_policies: Vec<(u16, InboundPolicy)>,
    /// Inbound ports never captured, comma-separated (15008,15020,15021,15090 always are).
    #[arg(long, value_delimiter = ',', value_parser = spec::parse_port)]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound ports never captured, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = spec::parse_port)]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations never captured, comma-separated CIDRs (IPv4 and IPv6).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<spec::Cidr>,
    /// The proxy's inbound listener port.
    #[arg(long, value_parser = spec::parse_port, default_value = "15006")]
    proxy_inbound_port: u16,
    /// The proxy's outbound listener port.
    #[arg(long, value_parser = spec::parse_port, default_value = "15001")]
    proxy_outbound_port: u16,
    /// Capture the application's DNS (UDP and TCP port 53) to the proxy's DNS port.
    #[arg(long)]
    dns_capture: bool,
    /// The proxy's DNS listener port (used with --dns-capture).
    #[arg(long, value_parser = spec::parse_port, default_value = "15053")]
    proxy_dns_port: u16,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Enroll(args) => enroll(cli, args),
        Command::Unenroll { name } => {
            enroll::require_root()?;
            let store = StateStore::open(&cli.state_dir)?;
            let rec = enroll::unenroll(&store, &cli.pin_root, name)?;
            println!(
                "unenrolled {} (cgroup {})",
                rec.name(),
                rec.cgroup.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::List { output } => list(cli, *output),
        Command::Gc => {
            enroll::require_root()?;
            let store = StateStore::open(&cli.state_dir)?;
            let done = gc::gc(&store, &cli.pin_root)?;
            for n in &done.recovered {
                println!("rolled back an interrupted change of {n}");
            }
            for n in &done.gone {
                println!("removed {n}: its cgroup or network namespace is gone");
            }
            for b in &done.bad_records {
                println!("removed unusable record {b}");
            }
            for d in &done.orphan_links {
                println!("removed links of {d}: no record owns them");
            }
            for s in &done.orphan_slots {
                println!("cleared slot {s}: no record owns it");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { name, output } => stats_cmd(cli, name.as_deref(), *output),
        Command::Probe(args) => cli::probe::run(args),
        Command::Detect(args) => cli::detect::run(args),
    }
}

/// One pod as `list` shows it: the record and its status.
#[derive(serde::Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    record: &'a state::PodRecord,
    status: &'static str,
}

fn list(cli: &Cli, output: Format) -> anyhow::Result<ExitCode> {
    let records = state::list_records(&cli.state_dir)?;
    let is_root = enroll::require_root().is_ok();
    let status = |r: &state::PodRecord| -> &'static str {
        let h = gc::health(r);
        if h == gc::Health::Ok && is_root && !enroll::links_complete(&cli.pin_root, r) {
            return "incomplete";
        }
        h.name()
    };
    let pods: Vec<Listed> = records
        .pods
        .iter()
        .map(|r| Listed {
            record: r,
            status: status(r),
        })
        .collect();
    let orphans = if is_root {
        enroll::orphan_link_dirs(&cli.pin_root, &records.pods)
    } else {
        Vec::new()
    };
    match output {
        Format::Json => {
            let mut doc = serde_json::json!({ "pods": pods });
            if !records.bad.is_empty() {
                doc["unusable_records"] = serde_json::to_value(&records.bad)?;
            }
            if !orphans.is_empty() {
                doc["orphaned_links"] = serde_json::to_value(&orphans)?;
            }
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = pods
                .iter()
                .map(|p| {
                    let r = p.record;
                    vec![
                        r.name().to_owned(),
                        r.pod_ips
                            .iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        r.inbound_policy.to_string(),
                        r.proxy_uid.to_string(),
                        p.status.to_owned(),
                        r.cgroup.display().to_string(),
                        r.netns.display().to_string(),
                    ]
                })
                .collect();
            print_table(
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
            );
            for b in &records.bad {
                eprintln!(
                    "warning: unusable record {}: {}",
                    b.path.display(),
                    b.reason
                );
            }
            for o in &orphans {
                eprintln!(
                    "warning: links {o} belong to no record; `redirect-agent gc` removes them"
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn enroll(cli: &Cli, a: &EnrollArgs) -> anyhow::Result<ExitCode> {
    enroll::require_root()?;
    let spec = spec::PodSpec {
        name: a.name.clone(),
        cgroup: a.cgroup.clone(),
        netns: a.netns.clone(),
        pod_ips: a.pod_ips.clone(),
        proxy_uid: a.proxy_uid,
        inbound_policy: a.inbound_policy,
        port_policies: spec::port_policies(&a.port_policies)?,
        exclude_inbound_ports: a.exclude_inbound_ports.clone(),
        exclude_outbound_ports: a.exclude_outbound_ports.clone(),
        exclude_outbound_cidrs: a.exclude_outbound_cidrs.clone(),
        proxy_inbound_port: a.proxy_inbound_port,
        proxy_outbound_port: a.proxy_outbound_port,
        dns_capture: a.dns_capture,
        proxy_dns_port: a.proxy_dns_port,
    };
    // Everything that can be checked without the lock is, so nothing blocks while holding it.
    let checked = enroll::inspect(spec)?;
    let store = StateStore::open(&cli.state_dir)?;
    let done = enroll::enroll(&store, &cli.pin_root, checked)?;
    let verb = if done.updated { "updated" } else { "enrolled" };
    let listener = match &done.adopted_listeners {
        Ok(0) => "proxy not listening yet: it is captured as soon as it listens".to_owned(),
        Ok(n) => format!("adopted {n} running proxy listener(s)"),
        Err(e) => {
            eprintln!(
                "warning: could not adopt the running proxy's inbound listener ({e}); \
                 inbound capture starts when the proxy listens again (adoption needs \
                 pidfd_getfd, Linux 5.6)"
            );
            "proxy listener not adopted".to_owned()
        }
    };
    println!(
        "{verb} {} (slot {}); {listener}",
        done.record.name(),
        done.record.slot
    );
    Ok(ExitCode::SUCCESS)
}

fn stats_cmd(cli: &Cli, name: Option<&str>, output: Format) -> anyhow::Result<ExitCode> {
    enroll::require_root()?;
    let mut pods = state::list_records(&cli.state_dir)?.pods;
    if let Some(name) = name {
        pods.retain(|p| p.name == name);
        anyhow::ensure!(!pods.is_empty(), "no such enrolled pod: {name}");
    }
    let mut rows = Vec::new();
    if !pods.is_empty() {
        // Read-only: a reader never creates, loads or pins anything (a reader racing the last
        // unenroll must not resurrect programs bound to orphaned maps).
        let mut dp = Datapath::open_read_only(&cli.pin_root)
            .context("opening the datapath")?
            .with_context(|| {
                format!(
                    "pods are recorded but no datapath is pinned at {}; `redirect-agent gc` cleans up",
                    cli.pin_root.display()
                )
            })?;
        for p in &pods {
            rows.push((p.name.clone(), stats::pod_counters(&mut dp, p.slot)?));
        }
    }
    match output {
        Format::Json => {
            let pods: Vec<_> = rows
                .iter()
                .map(|(n, c)| serde_json::json!({ "name": n, "counters": c }))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "pods": pods }))?
            );
        }
        Format::Table => {
            // One column per pod, one row per counter: 14 counters fit a terminal's height
            // better than its width.
            let mut header = vec!["COUNTER"];
            header.extend(rows.iter().map(|(n, _)| n.as_str()));
            let table: Vec<Vec<String>> = redirect_common::Counter::ALL
                .iter()
                .map(|k| {
                    let mut r = vec![k.name().to_owned()];
                    r.extend(rows.iter().map(|(_, c)| c[k.name()].to_string()));
                    r
                })
                .collect();
            print_table(&header, &table);
        }
    }
    Ok(ExitCode::SUCCESS)
}
