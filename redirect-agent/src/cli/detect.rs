//! `redirect-agent detect`: the command line of the detection library.

use std::{path::PathBuf, process::ExitCode};

use redirect_agent::detect::{
    check_privileges, detect, exit_status, parse_ports, DetectArgs, Output, PortList, Sources,
    Status,
};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputArg {
    /// Readable table grouped by namespace.
    #[default]
    Table,
    /// The stable JSON schema (see `docs/detect.md`).
    Json,
}

/// Arguments of `redirect-agent detect`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DetectCli {
    /// Scan the network namespace at PATH (repeatable).
    #[arg(long = "netns", value_name = "PATH")]
    pub netns: Vec<PathBuf>,
    /// Scan the network namespace of process PID (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pid: Vec<u32>,
    /// Scan every pod enrolled with redirect.
    #[arg(long)]
    pub enrolled: bool,
    /// Scan every network namespace on the node (the default when no target is given).
    #[arg(long)]
    pub all: bool,
    /// Exposed TCP ports, e.g. `80,8080,9000-9010`.
    #[arg(long, value_name = "LIST", value_parser = parse_ports)]
    pub ports: Option<PortList>,
    /// Kubernetes YAML with Pods and Services whose targetPorts are the exposed ports.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputArg,
}

impl From<&DetectCli> for DetectArgs {
    fn from(c: &DetectCli) -> DetectArgs {
        DetectArgs {
            netns: c.netns.clone(),
            pid: c.pid.clone(),
            enrolled: c.enrolled,
            all: c.all,
            ports: c.ports.clone(),
            manifest: c.manifest.clone(),
            output: match c.output {
                OutputArg::Table => Output::Table,
                OutputArg::Json => Output::Json,
            },
        }
    }
}

/// Runs the detection and returns the process exit code (0 ok, 1 errors found, 2 usage or
/// permission problem).
pub fn run(cli: &DetectCli) -> anyhow::Result<ExitCode> {
    let args = &DetectArgs::from(cli);
    let report = match check_privileges().and_then(|()| detect(args, &Sources::default())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}", redirect_agent::error_chain(&e));
            return Ok(ExitCode::from(2));
        }
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print!("{}", report.table()),
    }
    for n in report
        .namespaces
        .iter()
        .filter(|n| matches!(n.status, Status::Denied | Status::Failed))
    {
        eprintln!(
            "error: network namespace {} (inode {}): {}",
            n.path.display(),
            n.inode,
            n.error.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::from(exit_status(&report)))
}
