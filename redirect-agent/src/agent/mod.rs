//! The node agent, `redirect-agent run`: one long-lived process per node that serves the CLI's
//! commands over a unix socket, exports metrics and health over HTTP, and collects pods that
//! disappear.
//!
//! It is a control plane only: the datapath is pinned and works without it. At start it
//! reconciles ([`reconcile`]): rolls back what a killed command left pending, takes over the
//! pinned datapath (upgrading programs of another build in place, with `BPF_LINK_UPDATE`),
//! and checks every recorded pod against the kernel. Pods found intact are adopted without
//! touching anything. Only then does `/readyz` answer 200.
//!
//! Every change goes through [`crate::commands::Writer`], the same functions the CLI calls
//! without an agent, each holding the state store's lock for the request: there is never a
//! second writer. The agent keeps one writer for its life: the datapath is loaded once and
//! its handles kept, the records are read once and kept in memory (read again only when
//! another process has held the lock since), so a change is map updates and link creation.

mod http;
pub mod metrics;
pub mod proto;
mod reconcile;
mod watch;

use std::{
    io,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{watch as tokio_watch, Mutex, Notify},
    task::JoinSet,
};

use crate::{
    commands::{self, CommandError, Writer},
    state::{self, PodRecord, Snapshot},
};
pub use proto::{Request, Response, DEFAULT_SOCKET};
pub use reconcile::{reconcile, Reconciled};

/// Default address of the metrics and health endpoint: loopback only, on a port that neither
/// Istio (15000-15090, 15353, 15443, 15010-15017) nor Cilium (4240, 4244, 4245, 9234, 9876,
/// 9878, 9879, 9890, 9891, 9962-9965, 6060-6062) uses, nor Prometheus (9090), the node
/// exporter (9100), the kubelet (10248, 10250) or kube-proxy (10249, 10256).
pub const DEFAULT_HTTP_ADDRESS: &str = "127.0.0.1:9977";

/// How long requests in flight may take to finish after SIGTERM before the agent exits anyway.
const DRAIN: Duration = Duration::from_millis(1500);

/// What the agent needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub socket: PathBuf,
    pub http_address: SocketAddr,
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
    /// Pods from the container runtime (CNI, CRI): defaults and kubelet's cgroup layout.
    pub pods: crate::kubepods::KubeConfig,
    /// The Kubernetes API watch's kubeconfig; without one it runs in-cluster when
    /// `KUBERNETES_SERVICE_HOST` is set, and is off otherwise (see [`crate::kube`]).
    pub kubeconfig: Option<PathBuf>,
    /// The container runtime's CRI socket: its pod sandboxes are discovered at start
    /// ([`crate::cri`]); none without it.
    pub cri_socket: Option<PathBuf>,
}

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("starting the runtime")]
    Runtime(#[source] io::Error),
    #[error("must run as root (eBPF programs, cgroup and netns attachments need it)")]
    NotRoot,
    #[error(transparent)]
    Capabilities(#[from] crate::caps::CapsError),
    #[error("serving HTTP on {addr}")]
    Http { addr: SocketAddr, source: io::Error },
    #[error("socket {path}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("another agent is serving {0}")]
    AlreadyRunning(PathBuf),
    #[error("waiting for signals")]
    Signal(#[source] io::Error),
}

/// Readiness: `None` when ready, else why not.
type NotReady = RwLock<Option<String>>;

/// What the agent's tasks share.
pub(crate) struct Shared {
    cfg: Config,
    not_ready: NotReady,
    metrics: metrics::Metrics,
    /// The agent's one writer. Requests that change the datapath wait here for their turn, in
    /// the order they came, instead of each holding a thread blocked on the state lock.
    writer: Arc<Mutex<Writer>>,
    /// The records, for readers that must not wait for the writer's turn.
    pods: Arc<PodsView>,
    /// Pods were enrolled or unenrolled: the watcher re-reads the records.
    pods_changed: Notify,
    /// The Kubernetes API watch's health.
    pub(crate) kube: crate::kube::WatchStatus,
}

/// The enrolled pods as the agent's readers (metrics, the watcher) see them: the writer's
/// snapshot, published after each change, as long as no other process has changed the
/// records since; else the record files.
pub(crate) struct PodsView {
    state_dir: PathBuf,
    published: RwLock<Option<Arc<Snapshot>>>,
    taken: Arc<AtomicU64>,
}

impl PodsView {
    fn publish(&self, snapshot: Option<Snapshot>) {
        *self.published.write().unwrap_or_else(|e| e.into_inner()) = snapshot.map(Arc::new);
    }

    /// Every usable record, sorted by name.
    pub(crate) fn pods(&self) -> Result<Vec<PodRecord>, state::StateError> {
        let published = self
            .published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(s) = published {
            // The file holds the snapshot's generation, or the one of the writer's turn in
            // progress: nobody else has had the lock since.
            let now = state::generation(&self.state_dir)?;
            if now == s.generation() || now == self.taken.load(Ordering::Acquire) {
                return Ok(s.pods().cloned().collect());
            }
        }
        Ok(state::list_records(&self.state_dir)?.pods)
    }
}

impl Shared {
    fn set_not_ready(&self, why: Option<String>) {
        *self.not_ready.write().unwrap_or_else(|e| e.into_inner()) = why;
    }

    pub(crate) fn readiness(&self) -> Option<String> {
        self.not_ready
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .or_else(|| self.kube.not_ready())
    }

    pub(crate) fn node_name(&self) -> &str {
        &self.cfg.node_name
    }

    pub(crate) fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }

    pub(crate) fn pods_config(&self) -> &crate::kubepods::KubeConfig {
        &self.cfg.pods
    }
}

/// Runs the agent until SIGTERM or SIGINT; returns once requests in flight finished (or
/// [`DRAIN`] passed). Pins and records stay: a new agent adopts them.
pub fn run(cfg: Config) -> Result<(), AgentError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AgentError::NotRoot);
    }
    // Before anything else, so that a deployment missing one fails here naming it.
    crate::caps::require()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let result = rt.block_on(serve(cfg));
    // A request still in its blocking part after the drain is abandoned: the process exits,
    // and what it left pending is rolled back by the next agent's reconcile.
    rt.shutdown_timeout(Duration::from_millis(200));
    result
}

async fn serve(cfg: Config) -> Result<(), AgentError> {
    let stale = check_socket(&cfg.socket)?;
    let writer = Writer::new(&cfg.state_dir, &cfg.pin_root);
    let pods = Arc::new(PodsView {
        state_dir: cfg.state_dir.clone(),
        published: RwLock::new(None),
        taken: writer.taken(),
    });
    let metrics = metrics::Metrics::new(pods.clone(), &cfg.pin_root);
    let api_source = crate::kube::ApiSource::pick(cfg.kubeconfig.as_deref());
    let shared = Arc::new(Shared {
        kube: crate::kube::WatchStatus::new(metrics.kube_watch_up.clone(), &api_source),
        metrics,
        not_ready: RwLock::new(Some(
            "reconciling the pinned datapath with the records (waiting for the state lock)".into(),
        )),
        writer: Arc::new(Mutex::new(writer)),
        pods,
        pods_changed: Notify::new(),
        cfg,
    });
    let (stop_tx, stop_rx) = tokio_watch::channel(false);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signal)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(AgentError::Signal)?;

    let addr = shared.cfg.http_address;
    let http_listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Http { addr, source })?;
    log::info!(
        "node {}: serving metrics and health on http://{}",
        shared.cfg.node_name,
        http_listener.local_addr().unwrap_or(addr)
    );
    let http = tokio::spawn(http::serve(http_listener, shared.clone(), stop_rx.clone()));

    // Reconcile before accepting: meanwhile the CLI finds no socket and works directly, taking
    // the same lock, so the two are serialised.
    let reconciled = loop {
        let r = write(&shared, |w| w.locked(reconcile)).await;
        match r {
            Ok(r) => break r,
            Err(e) => {
                let why = format!("reconcile failed: {}", crate::error_chain(&e));
                log::error!("{why}; retrying in 2 s");
                shared.set_not_ready(Some(why));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = sigterm.recv() => return stop(stop_tx, http, JoinSet::new()).await,
                    _ = sigint.recv() => return stop(stop_tx, http, JoinSet::new()).await,
                }
            }
        }
    };
    shared.metrics.set_adopted(reconciled.adopted.len());
    for _ in &reconciled.collected {
        shared.metrics.pod_collected();
    }

    if stale {
        // A socket nobody accepts on: the file of a killed agent.
        remove_socket(&shared.cfg.socket);
    }
    let listener = bind_socket(&shared.cfg.socket)?;
    // Counted before ready: once /readyz says 200, /metrics holds what the plugin spooled.
    count_spooled(&shared);
    shared.set_not_ready(None);
    log::info!(
        "ready: {} pod(s) adopted, {} repaired, {} collected; serving {}",
        reconciled.adopted.len(),
        reconciled.repaired.len(),
        reconciled.collected.len(),
        shared.cfg.socket.display()
    );
    let watcher = tokio::spawn(watch::run(shared.clone(), stop_rx.clone()));
    let discovery = shared
        .cfg
        .cri_socket
        .clone()
        .map(|socket| tokio::spawn(discover(shared.clone(), socket, stop_rx.clone())));
    let kube_watch = tokio::spawn(crate::kube::run(
        shared.clone(),
        api_source,
        stop_rx.clone(),
    ));

    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(connection(shared.clone(), stream, stop_rx.clone()));
                }
                Err(e) => log::warn!("accepting on {}: {e}", shared.cfg.socket.display()),
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    log::info!("stopping: no new requests; finishing those in flight");
    shared.set_not_ready(Some("shutting down".into()));
    drop(listener);
    remove_socket(&shared.cfg.socket);
    let stopped = stop(stop_tx, http, conns).await;
    let _ = tokio::time::timeout(Duration::from_millis(100), watcher).await;
    let _ = tokio::time::timeout(Duration::from_millis(100), kube_watch).await;
    if let Some(d) = discovery {
        let _ = tokio::time::timeout(Duration::from_millis(100), d).await;
    }
    stopped
}

/// Tells every task to stop and waits (at most [`DRAIN`]) for requests in flight.
async fn stop(
    stop_tx: tokio_watch::Sender<bool>,
    http: tokio::task::JoinHandle<()>,
    mut conns: JoinSet<()>,
) -> Result<(), AgentError> {
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + DRAIN;
    let drained = tokio::time::timeout_at(deadline.into(), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        log::warn!("{} request(s) still in flight at exit", conns.len());
    }
    let _ = tokio::time::timeout_at(deadline.into(), http).await;
    log::info!("stopped; pins and records left in place for the next agent");
    Ok(())
}

/// Whether a socket file is there and nobody accepts on it (`Ok(true)`: a stale file);
/// refuses to start when another agent answers.
fn check_socket(path: &Path) -> Result<bool, AgentError> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(AgentError::AlreadyRunning(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
        Err(source) => Err(AgentError::Socket {
            path: path.to_owned(),
            source,
        }),
    }
}

fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("removing {}: {e}", path.display()),
    }
}

/// Binds the socket, root's only (mode 0600; peers are checked with `SO_PEERCRED` too).
fn bind_socket(path: &Path) -> Result<UnixListener, AgentError> {
    let err = |source| AgentError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
        }
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// One client connection: requests one per line until EOF or shutdown; a request that has
/// started is always answered.
async fn connection(
    shared: Arc<Shared>,
    stream: UnixStream,
    mut stop: tokio_watch::Receiver<bool>,
) {
    let (read, mut write) = stream.into_split();
    let uid = read.as_ref().peer_cred().map(|c| c.uid());
    if uid.as_ref().ok() != Some(&0) {
        let who = match uid {
            Ok(u) => format!("uid {u}"),
            Err(e) => format!("unknown peer ({e})"),
        };
        log::warn!("refused a connection from {who}: the agent serves root only");
        // Read (and drop) what the peer sends first, briefly, so that it is there to read the
        // refusal instead of writing into a closed socket.
        let mut sink = vec![0u8; 4096];
        let mut read = read;
        let _ = tokio::time::timeout(Duration::from_millis(500), read.read(&mut sink)).await;
        let resp = Response::Error {
            message: format!("refused: the agent serves root only, and the peer is {who}"),
        };
        let _ = write_response(&mut write, &resp).await;
        return;
    }
    let mut lines = BufReader::new(read.take(proto::MAX_LINE as u64));
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::select! {
            n = lines.read_line(&mut line) => n,
            _ = stop.changed() => return,
        };
        match n {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                log::debug!("reading a request: {e}");
                return;
            }
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => dispatch(&shared, req).await,
            Err(e) => Response::Error {
                message: format!("not a request: {e}"),
            },
        };
        if write_response(&mut write, &resp).await.is_err() {
            return;
        }
    }
}

async fn write_response(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
) -> io::Result<()> {
    let mut s = serde_json::to_string(resp).expect("responses serialize");
    s.push('\n');
    w.write_all(s.as_bytes()).await
}

/// Runs a command's blocking body (file locks, bpf syscalls) off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("commands do not panic")
}

/// Runs `f` with the agent's writer when its turn comes (in the order requests came), off
/// the runtime's threads, and publishes the records it leaves for the readers.
pub(crate) async fn write<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&mut Writer) -> T + Send + 'static,
) -> T {
    let mut w = shared.writer.clone().lock_owned().await;
    let pods = shared.pods.clone();
    blocking(move || {
        let t = f(&mut w);
        pods.publish(w.snapshot().cloned());
        t
    })
    .await
}

fn error(e: &CommandError) -> Response {
    Response::Error {
        message: crate::error_chain(e),
    }
}

/// How a pod is named in logs: namespace and pod, as its metrics are labelled.
pub(crate) fn pod_log_name(spec: &crate::spec::PodSpec) -> String {
    let (ns, pod) = spec.labels();
    format!("namespace={ns:?} pod={pod:?}")
}

impl Shared {
    /// [`pod_log_name`] of an enrolled pod known by name only (its record, as last
    /// published, has its namespace); an unknown one has none.
    fn log_name(&self, name: &str) -> String {
        let published = self
            .pods
            .published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match published.as_ref().and_then(|s| s.get(name)) {
            Some(r) => pod_log_name(&r.spec),
            None => format!("namespace=\"\" pod={name:?}"),
        }
    }
}

pub(crate) async fn dispatch(shared: &Arc<Shared>, req: Request) -> Response {
    let (sd, pr) = (shared.cfg.state_dir.clone(), shared.cfg.pin_root.clone());
    match req {
        Request::Enroll { spec } => {
            let who = pod_log_name(&spec);
            let start = Instant::now();
            // Checked before its turn: requests wait for the writer only to change things.
            let r = match blocking(move || crate::enroll::inspect(spec)).await {
                Ok(checked) => write(shared, move |w| w.enroll_checked(checked)).await,
                Err(e) => Err(CommandError::from(e)),
            };
            shared.pods_changed.notify_one();
            match r {
                Ok(r) => {
                    shared.metrics.enrolled(start.elapsed(), None);
                    log::info!(
                        "{who}: {} (slot {})",
                        if r.updated { "updated" } else { "enrolled" },
                        r.slot
                    );
                    Response::Enrolled(r)
                }
                Err(e) => {
                    shared
                        .metrics
                        .enrolled(start.elapsed(), Some(metrics::error_reason(&e)));
                    log::warn!("{who}: enroll failed: {}", crate::error_chain(&e));
                    error(&e)
                }
            }
        }
        Request::Unenroll { name } => {
            let who = shared.log_name(&name);
            let n = name.clone();
            let r = write(shared, move |w| w.unenroll(&n)).await;
            shared.pods_changed.notify_one();
            match r {
                Ok(r) => {
                    log::info!("{who}: unenrolled");
                    Response::Unenrolled(r)
                }
                Err(e) => {
                    log::warn!("{who}: unenroll failed: {}", crate::error_chain(&e));
                    error(&e)
                }
            }
        }
        Request::Gc => {
            let before = shared.pods.pods().unwrap_or_default();
            let r = write(shared, |w| w.gc()).await;
            shared.pods_changed.notify_one();
            match r {
                Ok(r) => {
                    for n in &r.gone {
                        shared.metrics.pod_collected();
                        let who = before.iter().find(|p| &p.spec.name == n).map_or_else(
                            || format!("namespace=\"\" pod={n:?}"),
                            |p| pod_log_name(&p.spec),
                        );
                        log::info!("{who}: gone, unenrolled by gc");
                    }
                    Response::Gc(r)
                }
                Err(e) => error(&e),
            }
        }
        // Readers take no lock, as without an agent.
        Request::List => match blocking(move || commands::list(&sd, &pr, true)).await {
            Ok(r) => Response::List(r),
            Err(e) => error(&e),
        },
        Request::Stats { name } => {
            match blocking(move || commands::stats(&sd, &pr, name.as_deref())).await {
                Ok(r) => Response::Stats(r),
                Err(e) => error(&e),
            }
        }
        Request::Cni(req) => cni(shared, req).await,
        Request::Status => Response::Status {
            node_name: shared.cfg.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            state_dir: shared.cfg.state_dir.clone(),
            pin_root: shared.cfg.pin_root.clone(),
        },
    }
}

/// Counts what the CNI plugin spooled while it could not reach the agent (see
/// [`crate::kubepods::spool_ignored`]).
fn count_spooled(shared: &Shared) {
    for i in crate::kubepods::drain_spool(&shared.cfg.socket) {
        log::info!(
            "namespace={:?} pod={:?}: started unenrolled under failurePolicy ignore ({}), counted from the spool",
            i.namespace,
            i.name,
            i.reason
        );
        shared.metrics.cni_ignored(&i.reason);
    }
}

/// A request of the CNI plugin: enrollment of a runtime pod and its siblings, through the
/// same commands (and the same writer turn) as the CLI's.
async fn cni(shared: &Arc<Shared>, req: crate::kubepods::CniRequest) -> Response {
    use crate::kubepods::{self as kp, CniRequest as C};
    let s = shared.clone();
    let (sd, pr, kube) = (
        s.cfg.state_dir.clone(),
        s.cfg.pin_root.clone(),
        s.cfg.pods.clone(),
    );
    count_spooled(shared);
    let r = match req {
        C::Status => return Response::Cni(kp::CniResponse::Ready),
        C::Ignored {
            reason,
            namespace,
            name,
        } => {
            log::warn!(
                "namespace={namespace:?} pod={name:?}: started unenrolled under failurePolicy ignore ({reason})"
            );
            shared.metrics.cni_ignored(&reason);
            return Response::Cni(kp::CniResponse::Counted);
        }
        C::Check { pod } => blocking(move || kp::check_pod(&kube, &sd, &pr, &pod)).await,
        C::Add { pod } => {
            let log_name = format!("namespace={:?} pod={:?}", pod.namespace, pod.name);
            let start = Instant::now();
            // The spec first, outside the writer queue: it may wait for kubelet's cgroup.
            let prepared = {
                let pod = pod.clone();
                blocking(move || kp::pod_spec(&kube, &pod)).await
            };
            let r = match prepared {
                // The agent's writer, as the socket's enroll: its handles and records kept.
                Ok(Ok(spec)) => write(shared, move |w| kp::enroll_spec(w, &pod, spec)).await,
                Ok(Err(reason)) => Ok(kp::CniResponse::Skipped { reason }),
                Err(e) => Err(e),
            };
            shared.pods_changed.notify_one();
            match &r {
                Ok(kp::CniResponse::Enrolled { name, slot }) => {
                    shared.metrics.enrolled(start.elapsed(), None);
                    log::info!("{log_name}: enrolled as {name} (slot {slot}) from CNI ADD");
                }
                Ok(kp::CniResponse::Skipped { reason }) => {
                    log::info!("{log_name}: not enrolled: {}", reason.name());
                }
                Ok(_) => {}
                Err(e) => {
                    let reason = match e {
                        kp::KubeError::Command { source, .. } => metrics::error_reason(source),
                        other => other.reason(),
                    };
                    shared.metrics.enrolled(start.elapsed(), Some(reason));
                    log::warn!("{log_name}: CNI ADD failed: {}", crate::error_chain(e));
                }
            }
            r
        }
        C::Del {
            namespace,
            name,
            sandbox_id,
        } => {
            let (ns, n) = (namespace.clone(), name.clone());
            let r = write(shared, move |w| kp::del_pod(w, &ns, &n, &sandbox_id)).await;
            shared.pods_changed.notify_one();
            if let Ok(kp::CniResponse::Removed { name: Some(rec) }) = &r {
                log::info!("namespace={namespace:?} pod={name:?}: unenrolled {rec} on CNI DEL");
            }
            r
        }
        C::Gc { valid_sandboxes } => {
            let r = write(shared, move |w| kp::gc_pods(w, &valid_sandboxes)).await;
            shared.pods_changed.notify_one();
            r
        }
    };
    match r {
        Ok(r) => Response::Cni(r),
        Err(e) => Response::Error {
            message: crate::error_chain(&e),
        },
    }
}

/// Start-up discovery through the runtime's CRI socket (`--cri-socket`): the ready pod
/// sandboxes the runtime has are enrolled as a CNI ADD would have (those selected and not
/// enrolled for their sandbox yet), records of sandboxes that are gone are collected. Retried
/// (1 s, doubling to 30 s) until the runtime answers once; then done.
async fn discover(shared: Arc<Shared>, socket: PathBuf, mut stop: tokio_watch::Receiver<bool>) {
    let mut delay = Duration::from_secs(1);
    loop {
        let sd = shared.cfg.state_dir.clone();
        let before = blocking(move || crate::state::list_records(&sd).map(|r| r.pods)).await;
        let before = match before {
            Ok(b) => b,
            Err(e) => {
                log::warn!(
                    "CRI discovery: reading the records: {}",
                    crate::error_chain(&e)
                );
                Vec::new()
            }
        };
        match crate::cri::list_pods(&socket).await {
            Ok(pods) => {
                let kube = shared.cfg.pods.clone();
                let listed = pods.len();
                let d = write(&shared, move |w| {
                    crate::cri::sync(
                        &kube,
                        w,
                        &crate::cri::DEFAULT_EXCLUDED_NAMESPACES.map(String::from),
                        &before,
                        &pods,
                    )
                })
                .await;
                shared.pods_changed.notify_one();
                for name in &d.enrolled {
                    log::info!("pod {name:?}: enrolled from CRI discovery");
                }
                for name in &d.collected {
                    log::info!("pod {name:?}: collected by CRI discovery (sandbox gone)");
                }
                for f in &d.failed {
                    log::warn!("CRI discovery: {f}");
                }
                log::info!(
                    "CRI discovery on {}: {listed} ready sandbox(es) discovered, {} enrolled, {} already enrolled, {} not selected, {} failed, {} collected",
                    socket.display(),
                    d.enrolled.len(),
                    d.already,
                    d.skipped,
                    d.failed.len(),
                    d.collected.len()
                );
                return;
            }
            Err(e) => {
                log::warn!(
                    "CRI discovery: {} (retrying in {delay:?})",
                    crate::error_chain(&e)
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
