//! The plugin's stdin/stdout for every command and spec version, against golden files
//! (`tests/golden/*.txt`; `UPDATE_GOLDEN=1` rewrites them). Runs as any user.
//!
//! Where the plugin must reach an agent, the socket is either absent (agent down) or served by
//! a thread of this test that answers with the agent's own protocol types: what is pinned here
//! is the plugin's side (what it sends, what it prints for each answer). The real agent behind
//! the socket is exercised in `redirect-agent/tests/cni.rs`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use redirect_agent::{
    agent::proto::{Request, Response},
    kubepods::{CniRequest, CniResponse},
};

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("redirect-cni-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The previous plugin's result in the layout of `v` (0.3/0.4 name each IP's version),
/// deliberately with a field no spec defines and odd spacing: it must come out unchanged.
fn prev_result(v: &str) -> String {
    let ipv = |n: &str| {
        if v.starts_with("0.") {
            format!("\"version\":\"{n}\",")
        } else {
            String::new()
        }
    };
    format!(
        r#"{{"cniVersion":"{v}", "interfaces":[{{"name":"eth0","mac":"0a:58:c6:12:00:05","sandbox":"/var/run/netns/cni-1"}}],"ips":[{{{}"address":"198.18.0.5/24","gateway":"198.18.0.1","interface":0}},{{{}"address":"2001:db8::5/64","interface":0}}],"routes":[{{"dst":"0.0.0.0/0"}}],"dns":{{}},"x-vendor":{{"kept":true}}}}"#,
        ipv("4"),
        ipv("6")
    )
}

/// The plugin's configuration. `failurePolicy` comes before `agentSocket`: a decoding error's
/// column must not depend on the length of the test's socket path.
fn conf(v: &str, socket: &Path, policy: &str, annotations: &str, prev: bool) -> String {
    let prev = if prev {
        format!(r#","prevResult":{}"#, prev_result(v))
    } else {
        String::new()
    };
    format!(
        r#"{{"cniVersion":"{v}","name":"k8s-pod-network","type":"redirect-cni","failurePolicy":"{policy}","agentSocket":"{}","logLevel":"off","capabilities":{{"io.kubernetes.cri.pod-annotations":true}},"runtimeConfig":{{"io.kubernetes.cri.pod-annotations":{annotations}}}{prev}}}"#,
        socket.display()
    )
}

const ISTIO: &str = r#"{"sidecar.istio.io/status":"{\"containers\":[\"istio-proxy\"]}"}"#;
const ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=sb1;K8S_POD_UID=0f8e5c1a-2b3c-4d5e-8f90-123456789abc";

struct Case {
    title: String,
    command: &'static str,
    stdin: String,
    env: Vec<(&'static str, String)>,
}

fn case(title: impl Into<String>, command: &'static str, stdin: String) -> Case {
    Case {
        title: title.into(),
        command,
        stdin,
        env: vec![
            ("CNI_CONTAINERID", "sb1".into()),
            ("CNI_NETNS", "/var/run/netns/cni-1".into()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_PATH", "/opt/cni/bin".into()),
            ("CNI_ARGS", ARGS.into()),
        ],
    }
}

/// Runs the plugin; returns (stdout, exit code).
fn run(c: &Case) -> (String, i32) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_redirect-cni"));
    cmd.env_clear()
        .env("CNI_COMMAND", c.command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in &c.env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(c.stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        out.status.code().unwrap_or(-1),
    )
}

/// Every case's output, one section each, with the socket path written `$SOCKET`.
fn transcript(cases: &[Case], socket: &Path) -> String {
    let mut out = String::new();
    for c in cases {
        let (stdout, code) = run(c);
        let stdout = stdout.replace(&socket.display().to_string(), "$SOCKET");
        out.push_str(&format!(
            "### {} (CNI_COMMAND={})\nexit: {code}\nstdout: {stdout}\n\n",
            c.title, c.command
        ));
    }
    out
}

fn golden(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(got, want, "output differs from {}", path.display());
}

/// A socket answering each request with the next of `answers`, recording the requests.
fn fake_agent(socket: &Path, answers: Vec<Response>) -> Arc<Mutex<Vec<Request>>> {
    let l = UnixListener::bind(socket).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut answers = answers.into_iter();
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                continue;
            }
            s.lock()
                .unwrap()
                .push(serde_json::from_str(&line).expect("the plugin sends requests"));
            let Some(a) = answers.next() else { return };
            let mut w = conn;
            let _ = writeln!(w, "{}", serde_json::to_string(&a).unwrap());
        }
    });
    seen
}

/// Every command in every version with no agent listening: what passes through, what fails
/// (fail policy), what starts unenrolled (ignore policy), what never fails (DEL).
#[test]
fn every_command_and_version_without_an_agent() {
    let dir = tmpdir("noagent");
    let socket = dir.join("agent.sock");
    for v in VERSIONS {
        let mut cases = vec![
            case("VERSION", "VERSION", format!(r#"{{"cniVersion":"{v}"}}"#)),
            case(
                "ADD, pod not selected: prevResult unchanged",
                "ADD",
                conf(v, &socket, "fail", "{}", true),
            ),
            // containerd marshals a pod without annotations as a nil map: `null`.
            case(
                "ADD, pod without annotations (the runtime sends null): not selected",
                "ADD",
                conf(v, &socket, "fail", "null", true),
            ),
            case(
                "ADD, selected, agent down, failurePolicy fail",
                "ADD",
                conf(v, &socket, "fail", ISTIO, true),
            ),
            case(
                "ADD, selected, agent down, failurePolicy ignore",
                "ADD",
                conf(v, &socket, "ignore", ISTIO, true),
            ),
            case(
                "ADD, excluded namespace",
                "ADD",
                conf(v, &socket, "fail", ISTIO, true),
            ),
            case(
                "ADD, bad annotation, failurePolicy fail",
                "ADD",
                conf(v, &socket, "fail", r#"{"redirect.dev/enabled":"yes"}"#, true),
            ),
            case(
                "ADD without prevResult",
                "ADD",
                conf(v, &socket, "fail", ISTIO, false),
            ),
            case(
                "DEL, agent down: never fails",
                "DEL",
                conf(v, &socket, "fail", ISTIO, false),
            ),
            case(
                "DEL, pod without annotations (null): never fails",
                "DEL",
                conf(v, &socket, "fail", "null", false),
            ),
            case(
                "CHECK, selected, agent down, failurePolicy fail",
                "CHECK",
                conf(v, &socket, "fail", ISTIO, true),
            ),
            case(
                "CHECK, not selected",
                "CHECK",
                conf(v, &socket, "fail", "{}", true),
            ),
            case(
                "STATUS, agent down, failurePolicy fail",
                "STATUS",
                conf(v, &socket, "fail", "{}", false),
            ),
            case(
                "STATUS, agent down, failurePolicy ignore",
                "STATUS",
                conf(v, &socket, "ignore", "{}", false),
            ),
            case(
                "GC, agent down",
                "GC",
                conf(v, &socket, "fail", "{}", false).replace(
                    r#""runtimeConfig""#,
                    r#""cni.dev/valid-attachments":[{"containerID":"sb1","ifname":"eth0"}],"runtimeConfig""#,
                ),
            ),
        ];
        let excluded = cases
            .iter_mut()
            .find(|c| c.title == "ADD, excluded namespace")
            .expect("the excluded-namespace case");
        excluded.env[4].1 = ARGS.replace("=default;", "=kube-system;");
        let got = transcript(&cases, &socket);
        // The ignored ADD left one spool file for the agent to count.
        let spool = redirect_agent::kubepods::drain_spool(&socket);
        assert_eq!(spool.len(), 1, "{v}: one ignored pod spooled: {spool:?}");
        assert_eq!(spool[0].reason, "agent_unreachable");
        assert_eq!(
            (spool[0].namespace.as_str(), spool[0].name.as_str()),
            ("default", "web-0")
        );
        golden(&format!("v{v}"), &got);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The plugin's side of each agent answer, and what it sends.
#[test]
fn add_check_del_against_agent_answers() {
    let dir = tmpdir("answers");
    let socket = dir.join("agent.sock");
    let seen = fake_agent(
        &socket,
        vec![
            Response::Cni(CniResponse::Enrolled {
                name: "default.web-0".into(),
                slot: 3,
            }),
            Response::Error {
                message: "pod default/web-0: no cgroup for pod UID 0f8e5c1a-2b3c-4d5e-8f90-123456789abc after 5s".into(),
            },
            Response::Error {
                message: "pod default/web-0: refused: annotation traffic.sidecar.istio.io/excludeInboundPorts: \"80,\": an empty item in the list".into(),
            },
            Response::Cni(CniResponse::Counted),
            Response::Cni(CniResponse::Checked {
                name: "default.web-0".into(),
            }),
            Response::Error {
                message: "pod default/web-0: not enrolled as its annotations say: record default.web-0 was enrolled with other settings".into(),
            },
            Response::Cni(CniResponse::Removed {
                name: Some("default.web-0".into()),
            }),
            Response::Cni(CniResponse::Ready),
            Response::Cni(CniResponse::Collected { names: vec![] }),
        ],
    );
    let v = "1.1.0";
    let cases = vec![
        case("ADD, enrolled", "ADD", conf(v, &socket, "fail", ISTIO, true)),
        case("ADD, refused, fail", "ADD", conf(v, &socket, "fail", ISTIO, true)),
        case("ADD, refused, ignore", "ADD", conf(v, &socket, "ignore", ISTIO, true)),
        case("CHECK, as annotated", "CHECK", conf(v, &socket, "fail", ISTIO, true)),
        case("CHECK, settings differ", "CHECK", conf(v, &socket, "fail", ISTIO, true)),
        case("DEL", "DEL", conf(v, &socket, "fail", ISTIO, false)),
        case("STATUS", "STATUS", conf(v, &socket, "fail", "{}", false)),
        case(
            "GC",
            "GC",
            conf(v, &socket, "fail", "{}", false).replace(
                r#""runtimeConfig""#,
                r#""cni.dev/valid-attachments":[{"containerID":"sb1","ifname":"eth0"},{"containerID":"sb2","ifname":"eth0"}],"runtimeConfig""#,
            ),
        ),
    ];
    let mut got = transcript(&cases, &socket);
    got.push_str("### requests the agent received\n");
    for r in seen.lock().unwrap().iter() {
        got.push_str(&serde_json::to_string(r).unwrap());
        got.push('\n');
    }
    golden("agent_answers", &got);
    // What ADD sends is the pod as the runtime described it.
    let seen = seen.lock().unwrap();
    let Request::Cni(CniRequest::Add { pod }) = &seen[0] else {
        panic!("first request is ADD: {:?}", seen[0]);
    };
    assert_eq!(pod.uid, "0f8e5c1a-2b3c-4d5e-8f90-123456789abc");
    assert_eq!(pod.ips.len(), 2);
    assert!(pod.annotations.contains_key("sidecar.istio.io/status"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Inputs no runtime should send: each gets an error object naming what is wrong.
#[test]
fn error_objects() {
    let dir = tmpdir("errors");
    let socket = dir.join("agent.sock");
    let mut no_netns = case(
        "ADD without CNI_NETNS",
        "ADD",
        conf("1.0.0", &socket, "fail", "{}", true),
    );
    no_netns.env.retain(|(k, _)| *k != "CNI_NETNS");
    let mut bad_args = case(
        "ADD with a bad CNI_ARGS pair",
        "ADD",
        conf("1.0.0", &socket, "fail", "{}", true),
    );
    bad_args.env[4].1 = "K8S_POD_NAME".into();
    let mut no_uid = case(
        "ADD of a selected pod without K8S_POD_UID",
        "ADD",
        conf("1.0.0", &socket, "fail", ISTIO, true),
    );
    no_uid.env[4].1 = ARGS.replace(";K8S_POD_UID=0f8e5c1a-2b3c-4d5e-8f90-123456789abc", "");
    let cases = vec![
        case(
            "unsupported version",
            "ADD",
            conf("0.2.0", &socket, "fail", "{}", true),
        ),
        case("not JSON", "ADD", "{not json".into()),
        case(
            "no CNI_COMMAND",
            "",
            conf("1.0.0", &socket, "fail", "{}", true),
        ),
        case(
            "unknown command",
            "FROB",
            conf("1.0.0", &socket, "fail", "{}", true),
        ),
        case(
            "CHECK in 0.3.1",
            "CHECK",
            conf("0.3.1", &socket, "fail", ISTIO, true),
        ),
        case(
            "STATUS in 1.0.0",
            "STATUS",
            conf("1.0.0", &socket, "fail", "{}", false),
        ),
        case(
            "GC in 0.4.0",
            "GC",
            conf("0.4.0", &socket, "fail", "{}", false),
        ),
        case(
            "bad failurePolicy",
            "ADD",
            conf("1.0.0", &socket, "maybe", "{}", true),
        ),
        no_netns,
        bad_args,
        no_uid,
    ];
    golden("errors", &transcript(&cases, &socket));
    let _ = std::fs::remove_dir_all(&dir);
}
