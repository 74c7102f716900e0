//! A fake Kubernetes API server, enough of one for the node agent's pod watch: no real API
//! server can run on the test machines.
//!
//! It serves pods and accepts Events, over plain HTTP on loopback, as the real server does on
//! the wire:
//! - discovery (`/api`, `/api/v1`, `/apis`, `/version`), so that `kubectl` finds `pods`;
//! - `GET /api/v1/pods` and `/api/v1/namespaces/NS/pods` (with `fieldSelector` on
//!   `spec.nodeName`, `metadata.name`, `metadata.namespace`): a `PodList` carrying the
//!   current `resourceVersion`;
//! - the same with `watch=true`: `ADDED`/`MODIFIED`/`DELETED` lines for every change after
//!   the given `resourceVersion` (or the current objects as `ADDED` without one), `BOOKMARK`s
//!   every [`BOOKMARK_EVERY`] when `allowWatchBookmarks=true`, the stream ends after
//!   `timeoutSeconds`; a `resourceVersion` older than the history kept ([`FakeApi::compact`])
//!   gets the `ERROR` event with a `410 Gone` Status, as etcd compaction does;
//! - `GET .../namespaces/NS/pods/NAME`, `POST .../namespaces/NS/events` (kept for tests).
//!
//! [`FakeApi::stop`] closes the listener and every connection (the API server going away);
//! [`FakeApi::resume`] serves again on the same port with the same objects and history.
//! `tests/fakeapi.rs` keeps it honest: Debian's `kubectl` lists and watches through it.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::{body::Frame, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

/// How often a watch that allows bookmarks gets one.
pub const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

type Body = BoxBody<Bytes, Infallible>;

/// One change, as a watch line carries it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: &'static str,
    pod: Value,
}

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    pods: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get `410 Gone`.
    oldest: u64,
    events: Vec<Value>,
    next_uid: u64,
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
}

/// The fake API server; dropping it stops it.
pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    rt: tokio::runtime::Runtime,
    stop: Option<watch::Sender<bool>>,
}

impl FakeApi {
    /// Serves on a free port of 127.0.0.1.
    pub fn start() -> Result<FakeApi> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("fake API runtime")?;
        let (changes, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1,
                oldest: 1,
                ..Store::default()
            }),
            changes,
        });
        let mut api = FakeApi {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            shared,
            rt,
            stop: None,
        };
        api.serve()?;
        Ok(api)
    }

    fn serve(&mut self) -> Result<()> {
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .with_context(|| format!("binding the fake API server on {}", self.addr))?;
        self.addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        self.stop = Some(stop_tx);
        let shared = self.shared.clone();
        self.rt.spawn(accept(listener, shared, stop_rx));
        Ok(())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig for this server (no credentials: it checks none).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    \
             namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The API server goes away: the listener and every open connection (watches) close.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        // Let the tasks see it and drop their sockets.
        self.rt
            .block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    }

    /// Serves again, on the same port, with the same objects and history.
    pub fn resume(&mut self) -> Result<()> {
        if self.stop.is_none() {
            self.serve()?;
        }
        Ok(())
    }

    /// Adds a pod or replaces it (same namespace and name): `ADDED` or `MODIFIED`. The server
    /// fills `metadata.uid` (when absent), `namespace` (`default`), `resourceVersion`,
    /// `creationTimestamp`. Returns the stored object.
    pub fn apply_pod(&self, mut pod: Value) -> Value {
        let mut s = self.shared.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let meta = pod["metadata"].as_object_mut().expect("a pod has metadata");
        let name = meta["name"].as_str().expect("metadata.name").to_owned();
        let ns = meta
            .entry("namespace")
            .or_insert_with(|| json!("default"))
            .as_str()
            .expect("metadata.namespace")
            .to_owned();
        let key = (ns, name);
        let old_uid = s.pods.get(&key).map(|p| p["metadata"]["uid"].clone());
        let meta = pod["metadata"].as_object_mut().unwrap();
        if !meta.contains_key("uid") {
            let uid = match old_uid {
                Some(uid) => uid,
                None => {
                    s.next_uid += 1;
                    json!(format!("00000000-0000-4000-8000-{:012x}", s.next_uid))
                }
            };
            meta.insert("uid".into(), uid);
        }
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.entry("creationTimestamp")
            .or_insert_with(|| json!("2026-12-01T00:00:00Z"));
        let obj = pod.as_object_mut().unwrap();
        obj.insert("kind".into(), json!("Pod"));
        obj.insert("apiVersion".into(), json!("v1"));
        let kind = if s.pods.insert(key, pod.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(
            &mut s,
            Change {
                rv,
                kind,
                pod: pod.clone(),
            },
        );
        pod
    }

    /// Deletes a pod: `DELETED`. Returns whether it was there.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        let mut s = self.shared.store.lock().unwrap();
        let Some(mut pod) = s.pods.remove(&(namespace.to_owned(), name.to_owned())) else {
            return false;
        };
        s.rv += 1;
        let rv = s.rv;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(
            &mut s,
            Change {
                rv,
                kind: "DELETED",
                pod,
            },
        );
        true
    }

    fn record(&self, s: &mut Store, change: Change) {
        s.history.push(change.clone());
        // Sent under the lock, so a watch starting now gets a change either from the history
        // or from the channel, never both, never neither.
        let _ = self.shared.changes.send(change);
    }

    /// Forgets the history (etcd compaction): a watch from any resourceVersion before now
    /// gets `410 Gone` and the client must list again.
    pub fn compact(&self) {
        let mut s = self.shared.store.lock().unwrap();
        s.history.clear();
        s.oldest = s.rv;
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().rv
    }

    /// Events posted so far (as the client sent them).
    pub fn events(&self) -> Vec<Value> {
        self.shared.store.lock().unwrap().events.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            _ = stop.changed() => return,
        };
        let shared = shared.clone();
        let for_requests = stop.clone();
        let mut for_conn = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let stop = for_requests.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req, stop).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            // Stopping drops the connection (its socket) whatever it is doing.
            tokio::select! {
                _ = conn => {}
                _ = for_conn.changed() => {}
            }
        });
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a valid response")
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    full(
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            url_pairs(q)
                .into_iter()
                .collect::<BTreeMap<String, String>>()
        })
        .unwrap_or_default()
}

/// `a=b&c=d` with percent-decoding (`+` is a space).
fn url_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A field selector: `field=value` / `field==value` / `field!=value`, comma-separated.
#[derive(Debug, Default)]
struct Fields(Vec<(String, bool, String)>);

impl Fields {
    fn parse(s: Option<&String>) -> Result<Fields, String> {
        let Some(s) = s.filter(|s| !s.is_empty()) else {
            return Ok(Fields::default());
        };
        let mut reqs = Vec::new();
        for part in s.split(',') {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector {part:?}"));
            };
            if !matches!(
                field,
                "spec.nodeName" | "metadata.name" | "metadata.namespace"
            ) {
                return Err(format!("field label not supported: {field}"));
            }
            reqs.push((field.to_owned(), eq, value.to_owned()));
        }
        Ok(Fields(reqs))
    }

    fn matches(&self, pod: &Value) -> bool {
        self.0.iter().all(|(field, eq, value)| {
            let got = match field.as_str() {
                "spec.nodeName" => &pod["spec"]["nodeName"],
                "metadata.name" => &pod["metadata"]["name"],
                _ => &pod["metadata"]["namespace"],
            };
            (got.as_str().unwrap_or("") == value) == *eq
        })
    }
}

async fn handle(
    shared: &Arc<Shared>,
    req: Request<hyper::body::Incoming>,
    stop: watch::Receiver<bool>,
) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    match (method.clone(), segs.as_slice()) {
        (Method::GET, ["version"]) => full(
            StatusCode::OK,
            json!({"major": "1", "minor": "37", "gitVersion": "v1.37.0-redirect-fake",
                   "platform": "linux/amd64"}),
        ),
        (Method::GET, ["api"]) => full(
            StatusCode::OK,
            json!({"kind": "APIVersions", "versions": ["v1"],
                   "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                   "serverAddress": "127.0.0.1"}]}),
        ),
        (Method::GET, ["apis"]) => full(
            StatusCode::OK,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        ),
        (Method::GET, ["api", "v1"]) => full(
            StatusCode::OK,
            json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
                 "verbs": ["get", "list", "watch"], "shortNames": ["po"]},
                {"name": "events", "singularName": "event", "namespaced": true,
                 "kind": "Event", "verbs": ["create"], "shortNames": ["ev"]},
            ]}),
        ),
        (Method::GET, ["api", "v1", "pods"]) => pods(shared, &req, None, stop),
        (Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => {
            let ns = ns.to_string();
            pods(shared, &req, Some(ns), stop)
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            let s = shared.store.lock().unwrap();
            match s.pods.get(&(ns.to_string(), name.to_string())) {
                Some(p) => full(StatusCode::OK, p.clone()),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("pods \"{name}\" not found"),
                ),
            }
        }
        (Method::POST, ["api", "v1", "namespaces", ns, "events"]) => {
            let ns = ns.to_string();
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
            };
            let mut event: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
            };
            let mut s = shared.store.lock().unwrap();
            s.rv += 1;
            event["metadata"]["namespace"] = json!(ns);
            event["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.events.push(event.clone());
            full(StatusCode::CREATED, event)
        }
        (Method::GET, _) => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        ),
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} {path} is not served by the fake API server"),
        ),
    }
}

fn pods(
    shared: &Arc<Shared>,
    req: &Request<hyper::body::Incoming>,
    namespace: Option<String>,
    stop: watch::Receiver<bool>,
) -> Response<Body> {
    let q = query(req);
    let mut fields = match Fields::parse(q.get("fieldSelector")) {
        Ok(f) => f,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    if let Some(ns) = namespace {
        fields.0.push(("metadata.namespace".into(), true, ns));
    }
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        let s = shared.store.lock().unwrap();
        let items: Vec<Value> = s
            .pods
            .values()
            .filter(|p| fields.matches(p))
            .cloned()
            .collect();
        return full(
            StatusCode::OK,
            json!({"kind": "PodList", "apiVersion": "v1",
                   "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        );
    }
    let from: Option<u64> = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(v) => match v.parse() {
            Ok(n) => Some(n),
            Err(_) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("invalid resourceVersion {v:?}"),
                )
            }
        },
    };
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));

    // Under the lock: what happened since `from`, and a subscription for what comes next.
    let (first, rx) = {
        let s = shared.store.lock().unwrap();
        let first: Vec<Value> = match from {
            Some(rv) if rv < s.oldest => vec![json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {rv} ({})", s.oldest),
                "reason": "Expired", "code": 410}})],
            Some(rv) => s
                .history
                .iter()
                .filter(|c| c.rv > rv && fields.matches(&c.pod))
                .map(|c| json!({"type": c.kind, "object": c.pod}))
                .collect(),
            None => s
                .pods
                .values()
                .filter(|p| fields.matches(p))
                .map(|p| json!({"type": "ADDED", "object": p}))
                .collect(),
        };
        let expired = from.is_some_and(|rv| rv < s.oldest);
        let rx = (!expired).then(|| shared.changes.subscribe());
        (first, rx)
    };
    let shared = shared.clone();
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut stop = stop;
        let line = |v: &Value| Bytes::from(format!("{v}\n"));
        for v in &first {
            if tx.send(line(v)).await.is_err() {
                return;
            }
        }
        let Some(mut rx) = rx else { return };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(BOOKMARK_EVERY);
        tick.tick().await;
        loop {
            let v = tokio::select! {
                c = rx.recv() => match c {
                    // Subscribed under the store's lock: every change here is newer than
                    // what was sent first.
                    Ok(c) if fields.matches(&c.pod) => json!({"type": c.kind, "object": c.pod}),
                    Ok(_) => continue,
                    // Lagged or closed: end the watch, the client watches again.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let rv = shared.store.lock().unwrap().rv;
                    json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                        "metadata": {"resourceVersion": rv.to_string(),
                                     "annotations": {"k8s.io/initial-events-end": "true"}}}})
                }
                _ = &mut deadline => return,
                _ = stop.changed() => return,
            };
            if tx.send(line(&v)).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .expect("a valid response")
}
