//! The fake API server (src/fakeapi.rs) against a real client: Debian's `kubectl` discovers
//! `pods`, lists them (with a field selector) and watches them through it, and is refused a
//! watch from a compacted resourceVersion with the API server's own `410 Gone` message.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::Duration,
};

use redirect_testbed::fakeapi::FakeApi;
use serde_json::json;

/// How long a kubectl line may take to come.
const PATIENCE: Duration = Duration::from_secs(20);

fn pod(name: &str, node: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": "198.18.7.1"},
    })
}

struct Kubectl {
    dir: PathBuf,
}

impl Kubectl {
    fn new(api: &FakeApi) -> Kubectl {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "redirect-fakeapi-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        api.write_kubeconfig(&dir.join("kubeconfig")).unwrap();
        Kubectl { dir }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.arg("--kubeconfig")
            .arg(self.dir.join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .args(args)
            .env("HOME", &self.dir)
            .stdin(Stdio::null());
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap_or_else(|e| {
            panic!("cannot run kubectl ({e}); `cargo xtask setup` installs it")
        });
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `kubectl ... -w`, its stdout lines arriving on a channel.
struct Watching {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Watching {
    fn start(k: &Kubectl, args: &[&str]) -> Watching {
        let mut child = k
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kubectl");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Watching { child, lines }
    }

    fn next(&self, what: &str) -> String {
        self.lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("kubectl printed no line for {what}"))
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn kubectl_lists_through_the_fake() {
    let api = FakeApi::start().unwrap();
    api.apply_pod(pod("web-0", "node-a"));
    api.apply_pod(pod("db-0", "node-b"));
    let k = Kubectl::new(&api);
    assert_eq!(
        k.ok(&["get", "pods", "-o", "name"]),
        "pod/db-0\npod/web-0\n"
    );
    assert_eq!(
        k.ok(&[
            "get",
            "pods",
            "-o",
            "name",
            "--field-selector",
            "spec.nodeName=node-a"
        ]),
        "pod/web-0\n"
    );
    assert_eq!(
        k.ok(&[
            "get",
            "pods",
            "--all-namespaces",
            "-o",
            "name",
            "--field-selector",
            "spec.nodeName=node-b"
        ]),
        "pod/db-0\n"
    );
    let one = k.ok(&[
        "get",
        "pod",
        "web-0",
        "-o",
        "jsonpath={.spec.nodeName} {.metadata.uid}",
    ]);
    assert!(one.starts_with("node-a 00000000-"), "{one}");
    // The default table output (kubectl asks for a Table and takes the plain list).
    let table = k.ok(&["get", "pods"]);
    assert!(table.contains("web-0") && table.contains("db-0"), "{table}");
}

#[test]
fn kubectl_watches_through_the_fake() {
    let api = FakeApi::start().unwrap();
    api.apply_pod(pod("web-0", "node-a"));
    api.apply_pod(pod("db-0", "node-b"));
    let k = Kubectl::new(&api);
    let w = Watching::start(
        &k,
        &[
            "get",
            "pods",
            "--watch",
            "--output-watch-events",
            "-o",
            "jsonpath={.type} {.object.metadata.name} {.object.metadata.annotations.step}{\"\\n\"}",
            "--field-selector",
            "spec.nodeName=node-a",
        ],
    );
    assert_eq!(w.next("the list").trim(), "ADDED web-0");
    // The watch kubectl starts from the list's resourceVersion sees each change once.
    let mut changed = pod("web-0", "node-a");
    changed["metadata"]["annotations"] = json!({"step": "one"});
    // kubectl's watch may start a moment after the list: the change is after it either way,
    // since the watch resumes from the list's resourceVersion.
    api.apply_pod(changed);
    assert_eq!(w.next("the annotation change").trim(), "MODIFIED web-0 one");
    api.apply_pod(pod("db-1", "node-b")); // another node: not seen
    api.apply_pod(pod("web-1", "node-a"));
    assert_eq!(w.next("a new pod").trim(), "ADDED web-1");
    assert!(api.delete_pod("default", "web-0"));
    assert_eq!(w.next("the deletion").trim(), "DELETED web-0 one");
}

#[test]
fn a_watch_from_a_compacted_resource_version_is_gone() {
    let api = FakeApi::start().unwrap();
    api.apply_pod(pod("web-0", "node-a"));
    let old = api.resource_version();
    api.apply_pod(pod("web-1", "node-a"));
    let k = Kubectl::new(&api);
    let watch = |rv: u64| {
        // kubectl's raw GET prints the watch stream as it comes; the fake ends the watch
        // after timeoutSeconds.
        k.ok(&[
            "get",
            "--raw",
            &format!("/api/v1/pods?watch=true&resourceVersion={rv}&timeoutSeconds=1"),
        ])
    };
    // Before compaction the history is there: web-1 was added after `old`.
    let before = watch(old);
    assert!(
        before.contains(r#""type":"ADDED""#) && before.contains("web-1"),
        "{before}"
    );
    assert!(!before.contains("web-0"), "{before}");
    api.compact();
    let after = watch(old);
    let event: serde_json::Value = serde_json::from_str(after.trim())
        .unwrap_or_else(|e| panic!("one event after compaction ({e}): {after}"));
    assert_eq!(event["type"], "ERROR", "{after}");
    assert_eq!(event["object"]["code"], 410, "{after}");
    assert_eq!(event["object"]["reason"], "Expired", "{after}");
    // A new list works, and a watch from its resourceVersion is accepted.
    assert_eq!(
        k.ok(&["get", "pods", "-o", "name"]),
        "pod/web-0\npod/web-1\n"
    );
    let fresh = watch(api.resource_version());
    assert!(!fresh.contains("ERROR"), "{fresh}");
}
