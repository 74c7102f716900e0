//! `redirect-cni`: a chained CNI plugin (type `redirect-cni`, CNI spec 0.3.0 to 1.1.0).
//!
//! The container runtime runs it after the plugins that give the pod its network. For a pod
//! that should be redirected (Istio's injection status or `redirect.dev/enabled: "true"`, see
//! `redirect_agent::annotations::select`), ADD hands the pod to the node agent over its socket
//! and returns only once the agent enrolled or refused it, so the pod's containers never run
//! unredirected. It prints the previous plugin's result unchanged; on failure a CNI error
//! object and a non-zero exit (`failurePolicy: fail`, the default), or, with
//! `failurePolicy: ignore`, the unchanged result and a count in the agent's
//! `redirect_cni_ignored_total{reason}` (told at once, or spooled beside the agent's socket when
//! it cannot be reached, and counted when the agent next reads the spool).
//!
//! DEL never fails: a pod the agent cannot be told about is collected by the agent once its
//! cgroup or network namespace is gone. See `docs/DESIGN.md`, "Pods from the runtime".

mod conf;

use std::{
    io::{Read as _, Write as _},
    path::Path,
    process::ExitCode,
    time::Duration,
};

use conf::{code, CniError, FailurePolicy, NetConf, VersionInfo, NEWEST, SUPPORTED_VERSIONS};
use redirect_agent::{
    agent::proto::{self, Request, Response},
    annotations,
    kubepods::{self, CniRequest, CniResponse, Ignored, KubePod},
};

/// How long the plugin waits for the agent's answer: ADD waits for the pod's cgroup (5 s at
/// most) and for its turn behind other enrollments.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Telling the agent about an ignored pod is best effort: the spool takes it otherwise.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// The `CNI_*` environment.
#[derive(Debug, Default)]
struct Env {
    command: Option<String>,
    container_id: Option<String>,
    netns: Option<String>,
    ifname: Option<String>,
    args: Option<String>,
}

impl Env {
    fn from_os() -> Env {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Env {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
        }
    }
}

/// What the plugin prints.
#[derive(Debug)]
enum Out {
    /// A result (the previous plugin's, or VERSION's); exit 0.
    Print(String),
    /// Success with nothing to print (DEL, CHECK, STATUS, GC); exit 0.
    Nothing,
    /// A CNI error object; exit 1.
    Error(CniError),
}

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    // Whatever cannot be read is an empty configuration, refused below with its reason.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let out = run(&Env::from_os(), &stdin);
    let mut stdout = std::io::stdout().lock();
    let (text, code) = match out {
        Out::Print(s) => (s, ExitCode::SUCCESS),
        Out::Nothing => (String::new(), ExitCode::SUCCESS),
        Out::Error(e) => (
            serde_json::to_string(&e).expect("errors serialize"),
            ExitCode::FAILURE,
        ),
    };
    if stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    code
}

fn error(version: &str, code: u32, msg: impl Into<String>, details: impl Into<String>) -> Out {
    Out::Error(CniError {
        cni_version: version.to_owned(),
        code,
        msg: msg.into(),
        details: details.into(),
    })
}

/// The version named in a configuration we could not decode, if any, for the error object.
fn version_of(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| NEWEST.to_owned())
}

fn run(env: &Env, stdin: &[u8]) -> Out {
    let Some(command) = env.command.as_deref() else {
        eprintln!(
            "redirect-cni: a chained CNI plugin for redirect; CNI spec versions {}",
            SUPPORTED_VERSIONS.join(", ")
        );
        return error(
            &version_of(stdin),
            code::INVALID_ENV,
            "CNI_COMMAND is not set",
            "",
        );
    };
    if command == "VERSION" {
        // The answer names the version the runtime asked in, when it is one of ours.
        let info = VersionInfo {
            cni_version: version_of(stdin),
            supported_versions: SUPPORTED_VERSIONS.to_vec(),
        };
        return Out::Print(serde_json::to_string(&info).expect("serializes"));
    }
    let conf: NetConf = match serde_json::from_slice(stdin) {
        Ok(c) => c,
        Err(e) => {
            return error(
                &version_of(stdin),
                code::DECODE,
                "decoding the network configuration on stdin",
                e.to_string(),
            )
        }
    };
    let v = conf.cni_version.clone();
    if !SUPPORTED_VERSIONS.contains(&v.as_str()) {
        return error(
            NEWEST,
            code::INCOMPATIBLE_VERSION,
            format!("incompatible CNI version {v:?}"),
            format!("redirect-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
        );
    }
    init_log(conf.log_level.as_deref());
    let need = |what: &str, val: &Option<String>| -> Result<String, Out> {
        val.clone().ok_or_else(|| {
            error(
                &v,
                code::INVALID_ENV,
                format!("{what} is not set"),
                format!("required for {command}"),
            )
        })
    };
    let result = match command {
        "ADD" | "DEL" | "CHECK" => (|| {
            need("CNI_CONTAINERID", &env.container_id)?;
            need("CNI_IFNAME", &env.ifname)?;
            if command != "DEL" {
                need("CNI_NETNS", &env.netns)?;
            }
            Ok(match command {
                "ADD" => add(env, &conf),
                "DEL" => del(env, &conf),
                _ if !conf::version_at_least(&v, "0.4.0") => error(
                    &v,
                    code::INCOMPATIBLE_VERSION,
                    format!("config version {v} does not allow CHECK"),
                    "CHECK is defined from CNI 0.4.0 on",
                ),
                _ => check(env, &conf),
            })
        })(),
        "STATUS" | "GC" if !conf::version_at_least(&v, "1.1.0") => Ok(error(
            &v,
            code::INCOMPATIBLE_VERSION,
            format!("config version {v} does not allow {command}"),
            format!("{command} is defined from CNI 1.1.0 on"),
        )),
        "STATUS" => Ok(status(&conf)),
        "GC" => Ok(gc(&conf)),
        other => Ok(error(
            &v,
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
        )),
    };
    result.unwrap_or_else(|e| e)
}

fn init_log(level: Option<&str>) {
    // Logs go to stderr, which the runtime keeps in its own log.
    let _ = env_logger::Builder::new()
        .parse_filters(level.unwrap_or("warn"))
        .target(env_logger::Target::Stderr)
        .try_init();
}

/// Why talking to the agent did not give an answer of ours.
#[derive(Debug)]
enum AgentFail {
    /// Nobody listens on the socket (or it cannot be reached at all).
    Unreachable(String),
    /// The agent answered with an error: it refused.
    Refused(String),
    /// Something else: no answer, a timeout, not our protocol.
    Broken(String),
}

fn call(socket: &Path, req: CniRequest, timeout: Duration) -> Result<CniResponse, AgentFail> {
    let client = proto::Client::connect(socket)
        .map_err(|e| AgentFail::Unreachable(redirect_agent::error_chain(&e)))?;
    let Some(mut client) = client else {
        return Err(AgentFail::Unreachable(format!(
            "no agent listens on {}",
            socket.display()
        )));
    };
    client
        .set_timeout(Some(timeout))
        .map_err(|e| AgentFail::Broken(e.to_string()))?;
    match client.call(&Request::Cni(req)) {
        Ok(Response::Cni(r)) => Ok(r),
        Ok(Response::Error { message }) => Err(AgentFail::Refused(message)),
        Ok(other) => Err(AgentFail::Broken(format!("unexpected answer {other:?}"))),
        Err(e) => Err(AgentFail::Broken(redirect_agent::error_chain(&e))),
    }
}

/// The pod the runtime is asking about, from `CNI_ARGS`, if it is a Kubernetes pod.
struct Pod {
    namespace: String,
    name: String,
    uid: Option<String>,
}

fn pod_of(env: &Env) -> Result<Option<Pod>, String> {
    let a = conf::k8s_args(env.args.as_deref().unwrap_or(""))?;
    Ok(match (a.namespace, a.name) {
        (Some(namespace), Some(name)) => Some(Pod {
            namespace,
            name,
            uid: a.uid,
        }),
        _ => None,
    })
}

/// A pod that cannot be enrolled: the error under `fail`; under `ignore` the previous result,
/// with the pod counted by the agent.
#[allow(clippy::too_many_arguments)]
fn failure(
    conf: &NetConf,
    pod: &Pod,
    prev: &str,
    reason: &'static str,
    code: u32,
    msg: String,
    details: String,
) -> Out {
    match conf.failure_policy {
        FailurePolicy::Fail => {
            log::error!("{msg}: {details}");
            error(&conf.cni_version, code, msg, details)
        }
        FailurePolicy::Ignore => {
            log::warn!("{msg}: {details}; starting the pod unenrolled (failurePolicy ignore)");
            report_ignored(conf, pod, reason);
            Out::Print(prev.to_owned())
        }
    }
}

/// Tells the agent about a pod started unenrolled, or leaves it in the spool for the agent.
fn report_ignored(conf: &NetConf, pod: &Pod, reason: &'static str) {
    let req = CniRequest::Ignored {
        reason: reason.to_owned(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
    };
    if call(&conf.agent_socket, req, REPORT_TIMEOUT).is_ok() {
        return;
    }
    let ignored = Ignored {
        reason: reason.to_owned(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
    };
    if let Err(e) = kubepods::spool_ignored(&conf.agent_socket, &ignored) {
        log::error!(
            "pod {}/{}: could not spool the ignored enrollment for the agent: {e}",
            pod.namespace,
            pod.name
        );
    }
}

fn add(env: &Env, conf: &NetConf) -> Out {
    let v = &conf.cni_version;
    let Some(prev) = conf.prev_result.as_deref() else {
        return error(
            v,
            code::INVALID_CONFIG,
            "redirect-cni is a chained plugin: no prevResult",
            "list it after the plugins that set up the pod's network",
        );
    };
    let prev_text = prev.get();
    let pod = match pod_of(env) {
        Ok(Some(p)) => p,
        Ok(None) => {
            log::info!("not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME): left alone");
            return Out::Print(prev_text.to_owned());
        }
        Err(e) => return error(v, code::INVALID_ENV, e, ""),
    };
    let who = format!("pod {}/{}", pod.namespace, pod.name);
    let ann = &conf.runtime_config.pod_annotations;
    let fail = |reason, code, msg: String, details: String| {
        failure(conf, &pod, prev_text, reason, code, msg, details)
    };
    match annotations::select(&pod.namespace, ann, &conf.exclude_namespaces) {
        Ok(Ok(())) => {}
        Ok(Err(skip)) => {
            log::info!("{who}: not enrolled: {}", skip.name());
            return Out::Print(prev_text.to_owned());
        }
        Err(e) => {
            return fail(
                "enroll_failed",
                code::ENROLL_REFUSED,
                format!("redirect: {who} not enrolled: bad annotation"),
                e.to_string(),
            )
        }
    }
    let Some(uid) = pod.uid.clone() else {
        return fail(
            "enroll_failed",
            code::ENROLL_REFUSED,
            format!("redirect: {who} not enrolled: CNI_ARGS has no K8S_POD_UID"),
            "the agent finds the pod's cgroup from its UID".into(),
        );
    };
    let ips = match conf::result_ips(prev) {
        Ok(ips) if !ips.is_empty() => ips,
        Ok(_) => {
            return fail(
                "enroll_failed",
                code::ENROLL_REFUSED,
                format!("redirect: {who} not enrolled: prevResult has no IP address"),
                String::new(),
            )
        }
        Err(e) => {
            return fail(
                "enroll_failed",
                code::ENROLL_REFUSED,
                format!("redirect: {who} not enrolled"),
                e,
            )
        }
    };
    let kpod = KubePod {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid,
        sandbox_id: env.container_id.clone().unwrap_or_default(),
        netns: env.netns.clone().unwrap_or_default().into(),
        ips,
        annotations: ann.clone(),
    };
    let socket = conf.agent_socket.display();
    match call(
        &conf.agent_socket,
        CniRequest::Add { pod: kpod },
        AGENT_TIMEOUT,
    ) {
        Ok(CniResponse::Enrolled { name, slot }) => {
            log::info!("{who}: enrolled as {name} (slot {slot})");
            Out::Print(prev_text.to_owned())
        }
        Ok(CniResponse::Skipped { reason }) => {
            log::info!("{who}: the agent did not enroll it: {}", reason.name());
            Out::Print(prev_text.to_owned())
        }
        Ok(other) => fail(
            "agent_error",
            code::ENROLL_REFUSED,
            format!("redirect: {who} not enrolled: the agent at {socket} answered {other:?}"),
            String::new(),
        ),
        Err(AgentFail::Unreachable(d)) => fail(
            "agent_unreachable",
            code::TRY_AGAIN,
            format!("redirect: {who} not enrolled: the agent at {socket} is unreachable"),
            d,
        ),
        Err(AgentFail::Refused(m)) => fail(
            "enroll_failed",
            code::ENROLL_REFUSED,
            format!("redirect: {who} not enrolled: the agent refused it"),
            m,
        ),
        Err(AgentFail::Broken(m)) => fail(
            "agent_error",
            code::TRY_AGAIN,
            format!("redirect: {who} not enrolled: no answer from the agent at {socket}"),
            m,
        ),
    }
}

fn del(env: &Env, conf: &NetConf) -> Out {
    // DEL never fails (the spec requires it to succeed for missing state, and a DEL that
    // fails blocks the sandbox's removal forever). A pod the agent is not told about is
    // collected by the agent when its cgroup or network namespace goes.
    let pod = match pod_of(env) {
        Ok(Some(p)) => p,
        Ok(None) => return Out::Nothing,
        Err(e) => {
            log::warn!("DEL: {e}; nothing to do");
            return Out::Nothing;
        }
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Out::Nothing;
    }
    let req = CniRequest::Del {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        sandbox_id: env.container_id.clone().unwrap_or_default(),
    };
    match call(&conf.agent_socket, req, AGENT_TIMEOUT) {
        Ok(CniResponse::Removed { name: Some(n) }) => {
            log::info!("pod {}/{}: unenrolled {n}", pod.namespace, pod.name);
        }
        Ok(_) => {}
        Err(e) => log::warn!(
            "pod {}/{}: DEL not passed to the agent ({e:?}); it collects the pod once its sandbox is gone",
            pod.namespace,
            pod.name
        ),
    }
    Out::Nothing
}

fn check(env: &Env, conf: &NetConf) -> Out {
    let v = &conf.cni_version;
    let Some(prev) = conf.prev_result.as_deref() else {
        return error(
            v,
            code::INVALID_CONFIG,
            "redirect-cni is a chained plugin: no prevResult",
            "",
        );
    };
    let pod = match pod_of(env) {
        Ok(Some(p)) => p,
        Ok(None) => return Out::Nothing,
        Err(e) => return error(v, code::INVALID_ENV, e, ""),
    };
    let who = format!("pod {}/{}", pod.namespace, pod.name);
    let ann = &conf.runtime_config.pod_annotations;
    let ignore = conf.failure_policy == FailurePolicy::Ignore;
    let failed = |code: u32, msg: String, details: String| {
        if ignore {
            log::warn!("{msg}: {details} (failurePolicy ignore)");
            Out::Nothing
        } else {
            error(v, code, msg, details)
        }
    };
    match annotations::select(&pod.namespace, ann, &conf.exclude_namespaces) {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Out::Nothing,
        Err(e) => {
            return failed(
                code::CHECK_FAILED,
                format!("redirect: {who}: bad annotation"),
                e.to_string(),
            )
        }
    }
    let kpod = KubePod {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone().unwrap_or_default(),
        sandbox_id: env.container_id.clone().unwrap_or_default(),
        netns: env.netns.clone().unwrap_or_default().into(),
        ips: conf::result_ips(prev).unwrap_or_default(),
        annotations: ann.clone(),
    };
    let socket = conf.agent_socket.display();
    match call(
        &conf.agent_socket,
        CniRequest::Check { pod: kpod },
        AGENT_TIMEOUT,
    ) {
        Ok(CniResponse::Checked { .. } | CniResponse::Skipped { .. }) => Out::Nothing,
        Ok(other) => failed(
            code::CHECK_FAILED,
            format!("redirect: {who}: the agent at {socket} answered {other:?}"),
            String::new(),
        ),
        Err(AgentFail::Refused(m)) => failed(
            code::CHECK_FAILED,
            format!("redirect: {who} is not enrolled as its annotations say"),
            m,
        ),
        Err(AgentFail::Unreachable(d) | AgentFail::Broken(d)) => failed(
            code::TRY_AGAIN,
            format!("redirect: {who}: the agent at {socket} is unreachable"),
            d,
        ),
    }
}

fn status(conf: &NetConf) -> Out {
    match call(&conf.agent_socket, CniRequest::Status, REPORT_TIMEOUT) {
        Ok(_) => Out::Nothing,
        // Under ignore ADD succeeds without the agent, so the plugin is available.
        Err(_) if conf.failure_policy == FailurePolicy::Ignore => Out::Nothing,
        Err(e) => error(
            &conf.cni_version,
            code::NOT_AVAILABLE,
            format!(
                "redirect: the agent at {} is not serving: ADD would fail",
                conf.agent_socket.display()
            ),
            match e {
                AgentFail::Unreachable(d) | AgentFail::Refused(d) | AgentFail::Broken(d) => d,
            },
        ),
    }
}

fn gc(conf: &NetConf) -> Out {
    let valid: Vec<String> = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| a.container_id.clone())
        .collect();
    log::debug!(
        "GC: {} valid attachment(s) ({} interfaces)",
        valid.len(),
        conf.valid_attachments
            .iter()
            .flatten()
            .filter(|a| !a.ifname.is_empty())
            .count()
    );
    match call(
        &conf.agent_socket,
        CniRequest::Gc {
            valid_sandboxes: valid,
        },
        AGENT_TIMEOUT,
    ) {
        Ok(_) => Out::Nothing,
        Err(AgentFail::Refused(m)) => error(
            &conf.cni_version,
            code::GC_FAILED,
            "redirect: the agent could not remove every stale pod",
            m,
        ),
        // Without an agent there is nothing to collect now; the agent collects gone pods
        // itself.
        Err(e) => {
            log::warn!("GC not passed to the agent: {e:?}");
            Out::Nothing
        }
    }
}
