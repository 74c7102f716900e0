//! `redirect-agent`: the command line over the redirect library. Each command acts once and
//! exits; enrolled pods stay redirected because their links and maps are pinned on bpffs.
//! `run` is the node agent; while one runs, `enroll`, `unenroll`, `list`, `stats` and `gc`
//! are sent to it over its socket and print exactly what they print without it.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

mod cli;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cli::{
    render::{self, Printed},
    table::Format,
};
use redirect_agent::{
    agent::{self, proto, Request, Response},
    annotations::{self, Wildcard},
    commands, datapath, spec, state,
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
    /// The node agent's unix socket: commands go to the agent listening there, if one does.
    #[arg(long, global = true, env = "REDIRECT_SOCKET", default_value = proto::DEFAULT_SOCKET)]
    socket: PathBuf,
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
    /// Run the node agent: serve the other commands over --socket, metrics and health over
    /// HTTP (GET /metrics, /healthz, /readyz), collect pods whose cgroup or network namespace
    /// disappears. Exits on SIGTERM, leaving every pod enrolled for the next agent to adopt.
    Run(RunArgs),
    /// Install the CNI plugin: copy `redirect-cni` into --cni-bin-dir and append it to the
    /// chain of the runtime's configuration in --cni-conf-dir (the first .conf, .conflist or
    /// .json in libcni's order; a .conf becomes a .conflist). Installing again changes nothing.
    InstallCni {
        #[command(flatten)]
        dirs: CniDirs,
        #[command(flatten)]
        settings: CniSettings,
        /// Keep watching --cni-conf-dir and re-insert the plugin when the primary CNI rewrites
        /// its configuration (until killed).
        #[arg(long)]
        watch: bool,
    },
    /// Remove exactly what install-cni added: the plugin's entries (a converted .conflist
    /// becomes its .conf again) and the binary.
    UninstallCni {
        #[command(flatten)]
        dirs: CniDirs,
    },
    /// Make the pin root ready: mount bpffs at /sys/fs/bpf when the pin root is below it and
    /// nothing is mounted there (else at the pin root itself), create the pin root. Run by the
    /// DaemonSet's privileged init container so that the mount is the host's, not the agent
    /// container's (pins must outlive the container). Does nothing when all is in place.
    MountBpffs {
        /// The agent's configuration file (its `pinRoot` is used); --pin-root given
        /// explicitly takes precedence.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Remove everything redirect put on this node: every pod (links, rows; established
    /// connections are left as they are), every pin and the pin root (with its bpffs mount when
    /// redirect mounted bpffs there), the state directory. Refuses while a node agent runs on
    /// --socket: stop it first. Running it again finds nothing to remove.
    Uninstall {
        /// The agent's configuration file (`socket`, `pinRoot`, `stateDir`, `cniBinDir`,
        /// `cniConfDir` are used); flags and environment variables given explicitly take
        /// precedence.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also remove the CNI plugin that `run --cni-bin-dir`/`install-cni` put here (its
        /// binary), first of all, so that no new sandbox is handed to the agent meanwhile.
        #[arg(long, requires = "cni_conf_dir")]
        cni_bin_dir: Option<PathBuf>,
        /// The CNI configuration directory the plugin's entry is removed from (with
        /// --cni-bin-dir): every file of it gets back what it had before the install.
        #[arg(long, requires = "cni_bin_dir")]
        cni_conf_dir: Option<PathBuf>,
    },
    /// Check the kernel features the datapath needs.
    Probe(cli::probe::ProbeArgs),
    /// Find listeners that the pod-IP delivery change affects.
    Detect(cli::detect::DetectCli),
}

#[derive(Debug, Clone, clap::Args)]
struct CniDirs {
    /// The runtime's CNI plugin directory (containerd's `bin_dir`, usually /opt/cni/bin).
    #[arg(long)]
    cni_bin_dir: PathBuf,
    /// The runtime's CNI configuration directory (usually /etc/cni/net.d).
    #[arg(long)]
    cni_conf_dir: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
struct CniSettings {
    /// The plugin binary to install [default: redirect-cni beside this program].
    #[arg(long)]
    cni_plugin: Option<PathBuf>,
    /// What the plugin does when a pod cannot be enrolled: fail its sandbox, or let it start
    /// unenrolled (counted in redirect_cni_ignored_total).
    #[arg(long, default_value = "fail", value_parser = ["fail", "ignore"])]
    cni_failure_policy: String,
    /// Namespaces whose pods the plugin never enrolls.
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    cni_exclude_namespaces: Vec<String>,
    /// The plugin's log level (on the runtime's log).
    #[arg(long, default_value = "warn")]
    cni_log_level: String,
}

impl CniSettings {
    fn plugin(&self) -> anyhow::Result<PathBuf> {
        match &self.cni_plugin {
            Some(p) => Ok(p.clone()),
            None => Ok(std::env::current_exe()
                .context("finding this program")?
                .with_file_name(redirect_agent::cni_install::PLUGIN_TYPE)),
        }
    }

    fn settings(&self, socket: &std::path::Path) -> redirect_agent::cni_install::PluginSettings {
        redirect_agent::cni_install::PluginSettings {
            agent_socket: socket.to_owned(),
            failure_policy: self.cni_failure_policy.clone(),
            exclude_namespaces: self.cni_exclude_namespaces.clone(),
            log_level: self.cni_log_level.clone(),
        }
    }
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Install the CNI plugin into this bin directory at start (with --cni-conf-dir), and keep
    /// it in the runtime's configuration while running.
    #[arg(long, requires = "cni_conf_dir")]
    cni_bin_dir: Option<PathBuf>,
    /// The CNI configuration directory for --cni-bin-dir.
    #[arg(long, requires = "cni_bin_dir")]
    cni_conf_dir: Option<PathBuf>,
    #[command(flatten)]
    cni: CniSettings,
    /// The node's name (logged and reported by the agent).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Address of the metrics and health endpoint [default: 127.0.0.1:9977].
    #[arg(long, env = "REDIRECT_HTTP_ADDRESS")]
    http_address: Option<std::net::SocketAddr>,
    /// A YAML file with any of `nodeName`, `socket`, `httpAddress`, `pinRoot`, `stateDir`,
    /// `kubeconfig`, `criSocket`, `cniBinDir`, `cniConfDir`, `podDefaults`,
    /// `kubeletCgroupRoots`;
    /// flags and environment variables given explicitly take precedence.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kubeconfig of the API watch of this node's pods [default: in-cluster when
    /// KUBERNETES_SERVICE_HOST is set, else no watch].
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The container runtime's CRI socket (containerd: /run/containerd/containerd.sock): the
    /// pod sandboxes it has are discovered at start and the selected ones enrolled.
    #[arg(long, env = "REDIRECT_CRI_SOCKET")]
    cri_socket: Option<PathBuf>,
    /// Read the configuration (file, flags, environment), print what the agent would run
    /// with, and exit without starting it.
    #[arg(long)]
    check_config: bool,
}

/// The agent's configuration file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigFile {
    node_name: Option<String>,
    socket: Option<PathBuf>,
    http_address: Option<std::net::SocketAddr>,
    pin_root: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    /// Defaults for pods from the container runtime (CNI, CRI), where annotations say nothing.
    #[serde(default)]
    pod_defaults: redirect_agent::annotations::NodeDefaults,
    /// Where kubelet's `kubepods` / `kubepods.slice` cgroups are (default: the cgroup2 mount).
    kubelet_cgroup_roots: Option<Vec<PathBuf>>,
    kubeconfig: Option<PathBuf>,
    cri_socket: Option<PathBuf>,
    /// Where `uninstall` finds the CNI plugin to remove (as its --cni-bin-dir/--cni-conf-dir).
    cni_bin_dir: Option<PathBuf>,
    cni_conf_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct EnrollArgs {
    /// Name of the pod in redirect (1-63 characters of [A-Za-z0-9._-]).
    #[arg(long)]
    name: String,
    /// The pod's Kubernetes namespace: the `namespace` label of its metrics and logs
    /// (without it, the label is empty).
    #[arg(long)]
    namespace: Option<String>,
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
    /// Inbound ports captured, `*` (the default: all but the excluded) or a comma-separated
    /// list (only those; --exclude-inbound-ports is then ignored, as Istio does).
    #[arg(long, value_parser = annotations::parse_ports_wildcard)]
    include_inbound_ports: Option<Wildcard<u16>>,
    /// Outbound ports captured whatever the destination (with --include-outbound-cidrs).
    #[arg(long, value_delimiter = ',', value_parser = spec::parse_port)]
    include_outbound_ports: Vec<u16>,
    /// Outbound destinations captured, `*` (the default) or comma-separated CIDRs (only those,
    /// unless excluded).
    #[arg(long, value_parser = annotations::parse_cidrs_wildcard)]
    include_outbound_cidrs: Option<Wildcard<spec::Cidr>>,
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
    use clap::{CommandFactory as _, FromArgMatches as _};
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // The agent logs one line per pod event by default; a command only its warnings.
    let level = if matches!(cli.command, Command::Run(_)) {
        "info"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    match run(&cli, &matches) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Enroll(args) => {
            let spec = enroll_spec(args)?;
            through_agent_or(cli, Request::Enroll { spec: spec.clone() }, || {
                commands::enroll(&cli.state_dir, &cli.pin_root, spec)
                    .map(|r| render::render_enroll(&r))
                    .map_err(message)
            })
        }
        Command::Unenroll { name } => {
            through_agent_or(cli, Request::Unenroll { name: name.clone() }, || {
                commands::unenroll(&cli.state_dir, &cli.pin_root, name)
                    .map(|r| render::render_unenroll(&r))
                    .map_err(message)
            })
        }
        Command::List { output } => through_agent_or(cli, Request::List, || {
            let is_root = redirect_agent::enroll::require_root().is_ok();
            commands::list(&cli.state_dir, &cli.pin_root, is_root)
                .map(|r| render::render_list(&r, *output))
                .map_err(message)
        }),
        Command::Gc => through_agent_or(cli, Request::Gc, || {
            commands::gc(&cli.state_dir, &cli.pin_root)
                .map(|r| render::render_gc(&r))
                .map_err(message)
        }),
        Command::Stats { name, output } => {
            let req = Request::Stats { name: name.clone() };
            through_agent_or(cli, req, || {
                commands::stats(&cli.state_dir, &cli.pin_root, name.as_deref())
                    .map(|r| render::render_stats(&r, *output))
                    .map_err(message)
            })
        }
        Command::Run(args) => run_agent(cli, matches, args),
        Command::Uninstall {
            config,
            cni_bin_dir,
            cni_conf_dir,
        } => {
            let file = config_file(config.as_deref())?;
            let socket = pick(matches, "socket", &cli.socket, file.socket);
            let pin_root = pick(matches, "pin_root", &cli.pin_root, file.pin_root);
            let state_dir = pick(matches, "state_dir", &cli.state_dir, file.state_dir);
            let cni = match (
                cni_bin_dir.clone().or(file.cni_bin_dir),
                cni_conf_dir.clone().or(file.cni_conf_dir),
            ) {
                (Some(bin_dir), Some(conf_dir)) => {
                    Some(redirect_agent::cni_install::InstalledPlugin { bin_dir, conf_dir })
                }
                (None, None) => None,
                _ => anyhow::bail!(
                    "the CNI directories go together: give both cniBinDir and cniConfDir (or \
                     --cni-bin-dir and --cni-conf-dir), or neither"
                ),
            };
            let extra: Vec<&dyn commands::Installed> = cni
                .as_ref()
                .map(|c| c as &dyn commands::Installed)
                .into_iter()
                .collect();
            match commands::uninstall(&state_dir, &pin_root, &socket, &extra) {
                Ok(r) => {
                    render::render_uninstall(&r).emit();
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {}", redirect_agent::error_chain(&e));
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::InstallCni {
            dirs,
            settings,
            watch,
        } => install_cni(cli, dirs, settings, *watch),
        Command::UninstallCni { dirs } => {
            let u = redirect_agent::cni_install::uninstall(&dirs.cni_bin_dir, &dirs.cni_conf_dir)?;
            for c in &u.confs {
                println!("removed redirect-cni from {}", c.display());
            }
            for r in &u.restored {
                println!("restored {}", r.display());
            }
            if let Some(b) = &u.binary {
                println!("removed {}", b.display());
            }
            if u.confs.is_empty() && u.restored.is_empty() && u.binary.is_none() {
                println!("nothing to remove");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::MountBpffs { config } => {
            let file = config_file(config.as_deref())?;
            let pin_root = pick(matches, "pin_root", &cli.pin_root, file.pin_root);
            datapath::ensure_bpffs(&pin_root)
                .map_err(|e| anyhow::anyhow!(redirect_agent::error_chain(&e)))?;
            println!("pin root {} is on bpffs", pin_root.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe(args) => cli::probe::run(args),
        Command::Detect(args) => cli::detect::run(args),
    }
}

/// Sends `req` to the running agent and prints its answer as the command would; without an
/// agent (no socket, or nobody accepting on it), runs `direct` instead. Only root talks to
/// the agent: it serves root only, and what the others may do (`list`) they do directly.
fn through_agent_or(
    cli: &Cli,
    req: Request,
    direct: impl FnOnce() -> Result<Printed, String>,
) -> anyhow::Result<ExitCode> {
    let answer = if nix::unistd::geteuid().is_root() {
        ask_agent(cli, &req)?
    } else {
        None
    };
    let printed = match answer {
        None => direct(),
        Some(resp) => rendered(cli, resp),
    };
    match printed {
        Ok(p) => {
            p.emit();
            Ok(ExitCode::SUCCESS)
        }
        Err(message) => {
            eprintln!("error: {message}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The agent's answer to `req`, if an agent serving this command's state directory and pin
/// root listens on the socket. An agent serving other directories is not asked: the command
/// is for a datapath it does not own (a test's, say), and runs directly.
fn ask_agent(cli: &Cli, req: &Request) -> anyhow::Result<Option<Response>> {
    let Some(mut client) = proto::Client::connect(&cli.socket)? else {
        return Ok(None);
    };
    match client.call(&Request::Status)? {
        Response::Status {
            state_dir,
            pin_root,
            ..
        } if proto::same_dir(&state_dir, &cli.state_dir)
            && proto::same_dir(&pin_root, &cli.pin_root) =>
        {
            Ok(Some(client.call(req)?))
        }
        Response::Status { .. } => Ok(None),
        Response::Error { message } => anyhow::bail!("{message}"),
        other => anyhow::bail!("the agent answered {other:?} to a status request"),
    }
}

/// The line an error prints after `error: `, its causes included.
fn message(e: commands::CommandError) -> String {
    redirect_agent::error_chain(&e)
}

/// What the command prints for the agent's answer.
fn rendered(cli: &Cli, resp: Response) -> Result<Printed, String> {
    let format = match &cli.command {
        Command::List { output } | Command::Stats { output, .. } => *output,
        _ => Format::Table,
    };
    match resp {
        Response::Enrolled(r) => Ok(render::render_enroll(&r)),
        Response::Unenrolled(r) => Ok(render::render_unenroll(&r)),
        Response::List(r) => Ok(render::render_list(&r, format)),
        Response::Stats(r) => Ok(render::render_stats(&r, format)),
        Response::Gc(r) => Ok(render::render_gc(&r)),
        Response::Error { message } => Err(message),
        Response::Status { .. } => Err("the agent answered a status to a command".into()),
        Response::Cni(_) => Err("the agent answered a CNI response to a command".into()),
    }
}

fn install_cni(
    cli: &Cli,
    dirs: &CniDirs,
    settings: &CniSettings,
    watch: bool,
) -> anyhow::Result<ExitCode> {
    let s = settings.settings(&cli.socket);
    let done = redirect_agent::cni_install::install(
        &settings.plugin()?,
        &dirs.cni_bin_dir,
        &dirs.cni_conf_dir,
        &s,
    )?;
    println!(
        "{} {}",
        if done.binary_updated {
            "installed"
        } else {
            "unchanged"
        },
        done.binary.display()
    );
    match (&done.converted_from, done.conf_updated) {
        (Some(from), _) => println!(
            "converted {} into {} with redirect-cni last",
            from.display(),
            done.conf.display()
        ),
        (None, true) => println!("inserted redirect-cni into {}", done.conf.display()),
        (None, false) => println!("redirect-cni already in {}", done.conf.display()),
    }
    if watch {
        redirect_agent::cni_install::watch(&dirs.cni_conf_dir, &s)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The agent's configuration file, if one is given.
fn config_file(path: Option<&std::path::Path>) -> anyhow::Result<ConfigFile> {
    Ok(match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_norway::from_str::<ConfigFile>(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => ConfigFile::default(),
    })
}

/// A value given on the command line or in the environment wins over the file, the file
/// over the defaults.
fn pick(
    matches: &clap::ArgMatches,
    id: &str,
    explicit: &std::path::Path,
    from_file: Option<PathBuf>,
) -> PathBuf {
    use clap::parser::ValueSource;
    let given = matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    );
    if given {
        explicit.to_owned()
    } else {
        from_file.unwrap_or_else(|| explicit.to_owned())
    }
}

fn run_agent(cli: &Cli, matches: &clap::ArgMatches, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let file = config_file(args.config.as_deref())?;
    let pick = |id: &str, explicit: &PathBuf, from_file: Option<PathBuf>| {
        pick(matches, id, explicit, from_file)
    };
    let node_name = args
        .node_name
        .clone()
        .or(file.node_name)
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let http_address = match args.http_address.or(file.http_address) {
        Some(a) => a,
        None => agent::DEFAULT_HTTP_ADDRESS
            .parse()
            .expect("a valid default"),
    };
    let cni_dirs = match (
        args.cni_bin_dir.clone().or(file.cni_bin_dir),
        args.cni_conf_dir.clone().or(file.cni_conf_dir),
    ) {
        (Some(bin), Some(conf)) => Some((bin, conf)),
        (None, None) => None,
        _ => anyhow::bail!(
            "the CNI directories go together: give both cniBinDir and cniConfDir (or \
             --cni-bin-dir and --cni-conf-dir), or neither"
        ),
    };
    let mut pods = redirect_agent::kubepods::KubeConfig {
        defaults: file.pod_defaults,
        ..Default::default()
    };
    if let Some(roots) = file.kubelet_cgroup_roots {
        pods.cgroup_roots = roots;
    }
    let cfg = agent::Config {
        pods,
        node_name,
        socket: pick("socket", &cli.socket, file.socket),
        http_address,
        pin_root: pick("pin_root", &cli.pin_root, file.pin_root),
        state_dir: pick("state_dir", &cli.state_dir, file.state_dir),
        kubeconfig: args.kubeconfig.clone().or(file.kubeconfig),
        cri_socket: args.cri_socket.clone().or(file.cri_socket),
    };
    if args.check_config {
        println!("{cfg:#?}");
        return Ok(ExitCode::SUCCESS);
    }
    if let Some((bin, conf)) = &cni_dirs {
        let settings = args.cni.settings(&cfg.socket);
        let done = redirect_agent::cni_install::install(&args.cni.plugin()?, bin, conf, &settings)?;
        log::info!(
            "CNI plugin installed: {} (binary {}), configuration {}",
            done.binary.display(),
            if done.binary_updated {
                "updated"
            } else {
                "unchanged"
            },
            done.conf.display()
        );
        // The primary CNI may rewrite its configuration at any time (its own restart): keep
        // our entry in it for as long as the agent runs.
        let conf = conf.clone();
        std::thread::Builder::new()
            .name("cni-watch".into())
            .spawn(move || {
                if let Err(e) = redirect_agent::cni_install::watch(&conf, &settings) {
                    log::error!(
                        "watching the CNI configuration: {}",
                        redirect_agent::error_chain(&e)
                    );
                }
            })
            .context("starting the CNI configuration watch")?;
    }
    log::info!("starting the node agent: {cfg:?}");
    agent::run(cfg)?;
    Ok(ExitCode::SUCCESS)
}

fn enroll_spec(a: &EnrollArgs) -> anyhow::Result<spec::PodSpec> {
    Ok(spec::PodSpec {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
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
        include_inbound_ports: a
            .include_inbound_ports
            .clone()
            .and_then(Wildcard::into_option),
        include_outbound_ports: a.include_outbound_ports.clone(),
        include_outbound_cidrs: a
            .include_outbound_cidrs
            .clone()
            .and_then(Wildcard::into_option),
        kube: None,
    })
}
