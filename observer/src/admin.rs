//! The admin HTTP server (docs/DESIGN.md#operating-admin-server), on its own listener apart from
//! any traffic port: `/metrics` (optionally behind a bearer token), `/healthz`, `/readyz` (the
//! daemon itself), `/ready/model` and `/ready/model/{name}` (the readiness probe's verdict, for
//! load balancers), `/status`; 404 for any other path, 405 for another method on one of these.
//!
//! Owns the routes and the [`StatusBoard`] the daemon writes its state into. It reads metrics
//! and state and never changes them; it must not serve anything from the traffic it observes.

use std::{
    future::Future,
    path::Path,
    sync::{
        Arc, OnceLock, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, ensure};
use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::base::Role;
use crate::{
    metrics::{ExpositionFormat, Metrics},
    probe::Readiness,
};

/// How the admin server is protected.
#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    /// When set, `/metrics` answers only requests carrying `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// Reads a bearer token from a file: its content without surrounding whitespace.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let content = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = content.trim();
    ensure!(
        !token.is_empty(),
        "the token file {} is empty",
        path.display()
    );
    ensure!(
        !token.chars().any(|c| c.is_whitespace() || c.is_control()),
        "the token file {} holds more than one word; a bearer token has no spaces",
        path.display()
    );
    Ok(token.to_owned())
}

/// What the daemon is doing, written by the pipeline and read by `/readyz` and `/status`.
#[derive(Debug)]
pub struct StatusBoard {
    mode: &'static str,
    watched: Vec<(u16, Role)>,
    started_at: SystemTime,
    started: Instant,
    programs_attached: AtomicUsize,
    ready: AtomicBool,
    not_ready_reason: RwLock<Option<String>>,
    events: AtomicU64,
    exchanges: AtomicU64,
    connections_open: AtomicU64,
    /// The probe's verdicts and the upstream it probes, once the probe runs.
    probe: OnceLock<(Readiness, String)>,
    /// Who answers on the watched ports (eBPF mode).
    hops: RwLock<crate::pipeline::Hops>,
}

impl StatusBoard {
    /// A board for a daemon in `mode` (`ebpf` or `proxy`) watching `watched`; not ready yet.
    pub fn new(mode: &'static str, watched: Vec<(u16, Role)>) -> StatusBoard {
        StatusBoard {
            mode,
            watched,
            started_at: SystemTime::now(),
            started: Instant::now(),
            programs_attached: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            not_ready_reason: RwLock::new(None),
            events: AtomicU64::new(0),
            exchanges: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            probe: OnceLock::new(),
            hops: RwLock::new(crate::pipeline::Hops::default()),
        }
    }

    /// Who answers on the watched ports now ([`crate::pipeline::Pipeline::hops`]).
    pub fn set_hops(&self, hops: crate::pipeline::Hops) {
        *self.hops.write().unwrap_or_else(PoisonError::into_inner) = hops;
    }

    /// Makes `/ready/model` answer from the probe's verdicts (once; later calls are ignored).
    pub fn attach_probe(&self, readiness: Readiness, upstream: String) {
        let _ = self.probe.set((readiness, upstream));
    }

    pub fn set_programs_attached(&self, n: usize) {
        self.programs_attached.store(n, Ordering::Relaxed);
    }

    /// Whether the pipeline is running.
    pub fn set_ready(&self, ready: bool) {
        if ready {
            *self.reason_slot() = None;
        }
        self.ready.store(ready, Ordering::Release);
    }

    /// Marks the pipeline not running, saying why (one line, shown by `/readyz`).
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        let reason: String = reason.into();
        *self.reason_slot() = Some(reason.lines().next().unwrap_or_default().to_owned());
        self.ready.store(false, Ordering::Release);
    }

    pub fn add_events(&self, n: u64) {
        self.events.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_exchanges(&self, n: u64) {
        self.exchanges.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set_connections_open(&self, n: u64) {
        self.connections_open.store(n, Ordering::Relaxed);
    }

    /// For the proxy, whose connections are counted by each pair as it opens and closes.
    pub fn add_connections_open(&self, delta: i64) {
        if delta >= 0 {
            self.connections_open
                .fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.connections_open
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    fn reason_slot(&self) -> std::sync::RwLockWriteGuard<'_, Option<String>> {
        self.not_ready_reason
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Ready when the pipeline runs and, in eBPF mode, kernel programs are attached; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::Acquire) {
            let reason = self
                .not_ready_reason
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            return Err(reason.unwrap_or_else(|| "the pipeline is not running".into()));
        }
        if self.mode == "ebpf" && self.programs_attached.load(Ordering::Relaxed) == 0 {
            return Err("no kernel programs are attached".into());
        }
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// The `/status` document.
    pub fn snapshot(&self) -> serde_json::Value {
        let watched: Vec<_> = self
            .watched
            .iter()
            .map(|(port, role)| serde_json::json!({ "port": port, "role": role }))
            .collect();
        let readiness = self.readiness();
        let models = self.probe.get().and_then(|(probe, upstream)| {
            let report = probe.report(upstream, None)?;
            Some(
                report
                    .models
                    .iter()
                    .map(|m| serde_json::json!({ "model": m.model, "verdict": m.verdict }))
                    .collect::<Vec<_>>(),
            )
        });
        let hops = self
            .hops
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "mode": self.mode,
            "ready": readiness.is_ok(),
            "not_ready_reason": readiness.err(),
            "programs_attached": self.programs_attached.load(Ordering::Relaxed),
            "watched_ports": watched,
            "events": self.events.load(Ordering::Relaxed),
            "exchanges": self.exchanges.load(Ordering::Relaxed),
            "connections_open": self.connections_open.load(Ordering::Relaxed),
            "models": models,
            "servers": hops.servers.iter().map(describe_hop).collect::<Vec<_>>(),
            "relays": hops.relays.iter().map(describe_hop).collect::<Vec<_>>(),
            "started_at": humantime::format_rfc3339_nanos(self.started_at).to_string(),
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
        })
    }
}

/// A process on a watched port as `/status` shows it: with its name and network namespace
/// (`net:[INODE]`, as `/proc/PID/ns/net` reads; null once it has exited).
fn describe_hop(hop: &crate::pipeline::Hop) -> serde_json::Value {
    let proc = std::path::Path::new("/proc").join(hop.pid.to_string());
    let comm = std::fs::read_to_string(proc.join("comm"))
        .ok()
        .map(|c| c.trim_end().to_owned());
    let netns = std::fs::read_link(proc.join("ns/net"))
        .ok()
        .map(|l| l.to_string_lossy().into_owned());
    serde_json::json!({
        "port": hop.port,
        "role": hop.role,
        "pid": hop.pid,
        "comm": comm,
        "netns": netns,
    })
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    token: Option<Arc<str>>,
}

/// The admin server on its own task, as the daemons run it.
pub struct AdminServer {
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl AdminServer {
    /// Binds `addr` (a daemon fails here, before loading anything, when it cannot) and serves.
    pub async fn start(
        addr: std::net::SocketAddr,
        metrics: Arc<Metrics>,
        status: Arc<StatusBoard>,
        config: AdminConfig,
    ) -> anyhow::Result<AdminServer> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the admin server to {addr}"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, metrics, status, config, async move {
            let _ = stopped.await;
        }));
        Ok(AdminServer { addr, stop, task })
    }

    /// Stops accepting and waits (up to 5 s) for open requests.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await {
            Ok(Ok(Err(err))) => tracing::warn!("admin server: {err}"),
            Ok(Err(err)) => tracing::warn!("admin server task: {err}"),
            _ => {}
        }
    }
}

/// Serves the admin routes on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    config: AdminConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, token = config.token.is_some(), "admin server listening");
    }
    let state = AdminState {
        metrics,
        status,
        token: config.token.map(Arc::from),
    };
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/ready/model", get(ready_model_all))
        .route("/ready/model/{*model}", get(ready_model_one))
        .route("/status", get(status))
        .fallback(not_found)
        .with_state(state)
}

fn text(code: StatusCode, body: String) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.token
        && !bearer_matches(headers.get(header::AUTHORIZATION), token)
    {
        let mut response = text(StatusCode::UNAUTHORIZED, "unauthorized\n".into());
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"observer\""),
        );
        return response;
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = state.metrics.encode(ExpositionFormat::from_accept(accept));
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n".into())
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match state.status.readiness() {
        Ok(()) => text(StatusCode::OK, "ready\n".into()),
        Err(reason) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn ready_model_all(State(state): State<AdminState>) -> Response {
    ready_model(&state, None)
}

async fn ready_model_one(
    State(state): State<AdminState>,
    UrlPath(model): UrlPath<String>,
) -> Response {
    ready_model(&state, Some(&model))
}

/// 200 when the probed models (or the one named) are ready, 503 when not, with the verdicts as
/// JSON either way; 404 when the probe is off or does not probe that model.
fn ready_model(state: &AdminState, model: Option<&str>) -> Response {
    let Some((probe, upstream)) = state.status.probe.get() else {
        let body = serde_json::json!({ "error": "the readiness probe is off (--no-probe)" });
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    };
    match probe.report(upstream, model) {
        Some(report) => {
            let code = if report.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (code, Json(report)).into_response()
        }
        None => {
            let body = serde_json::json!({
                "error": format!("model {:?} is not probed (see --model)", model.unwrap_or_default())
            });
            (StatusCode::NOT_FOUND, Json(body)).into_response()
        }
    }
}

async fn status(State(state): State<AdminState>) -> Json<serde_json::Value> {
    Json(state.status.snapshot())
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "not found\n".into())
}

/// `Authorization: Bearer <token>` with the expected token (scheme case-insensitive).
fn bearer_matches(authorization: Option<&HeaderValue>, expected: &str) -> bool {
    let Some(value) = authorization.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, presented)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && constant_time_eq(presented.trim().as_bytes(), expected.as_bytes())
}

/// Compares without returning early, so the time taken says nothing about where the first
/// difference is (only about the lengths).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked_exactly() {
        let header = |v: &'static str| HeaderValue::from_static(v);
        assert!(bearer_matches(Some(&header("Bearer s3cret")), "s3cret"));
        assert!(bearer_matches(Some(&header("bearer  s3cret ")), "s3cret"));
        assert!(!bearer_matches(Some(&header("Bearer s3cre")), "s3cret"));
        assert!(!bearer_matches(Some(&header("Bearer s3cret2")), "s3cret"));
        assert!(!bearer_matches(Some(&header("Basic s3cret")), "s3cret"));
        assert!(!bearer_matches(Some(&header("Bearer")), "s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a", b""));
        assert!(!constant_time_eq(b"a\0", b"a"));
    }

    #[test]
    fn token_files() {
        let dir = std::env::temp_dir().join(format!("observer-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "  tok3n\n").unwrap();
        assert_eq!(read_token_file(&good).unwrap(), "tok3n");
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n \n").unwrap();
        let err = read_token_file(&empty).unwrap_err().to_string();
        assert!(err.contains("is empty") && err.contains("empty"), "{err}");
        let two = dir.join("two");
        std::fs::write(&two, "a b\n").unwrap();
        assert!(read_token_file(&two).is_err());
        let missing = dir.join("missing");
        let err = format!("{:#}", read_token_file(&missing).unwrap_err());
        assert!(err.contains(&missing.display().to_string()), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn readiness_needs_the_pipeline_and_attached_programs() {
        let board = StatusBoard::new("ebpf", vec![(11434, Role::Upstream)]);
        assert_eq!(board.readiness(), Err("the pipeline is not running".into()));
        board.set_ready(true);
        assert_eq!(
            board.readiness(),
            Err("no kernel programs are attached".into())
        );
        board.set_programs_attached(9);
        assert_eq!(board.readiness(), Ok(()));
        board.set_not_ready("ring buffer reader stopped\nsecond line");
        assert_eq!(board.readiness(), Err("ring buffer reader stopped".into()));
        board.set_ready(true);
        assert!(board.is_ready());

        let proxy = StatusBoard::new("proxy", vec![(18789, Role::Gateway)]);
        proxy.set_ready(true);
        assert!(proxy.is_ready());
    }

    #[test]
    fn snapshot_fields() {
        let created = Instant::now();
        let board = StatusBoard::new(
            "ebpf",
            vec![(18789, Role::Gateway), (11434, Role::Upstream)],
        );
        board.set_programs_attached(3);
        board.add_events(5);
        board.add_events(2);
        board.add_exchanges(4);
        board.set_connections_open(6);
        let snap = board.snapshot();
        assert_eq!(snap["mode"], "ebpf");
        assert_eq!(snap["ready"], false);
        assert_eq!(snap["not_ready_reason"], "the pipeline is not running");
        assert_eq!(snap["programs_attached"], 3);
        assert_eq!(snap["events"], 7);
        assert_eq!(snap["exchanges"], 4);
        assert_eq!(snap["connections_open"], 6);
        assert_eq!(
            snap["watched_ports"],
            serde_json::json!([
                {"port": 18789, "role": "gateway"},
                {"port": 11434, "role": "upstream"},
            ])
        );
        assert_eq!(snap["version"], env!("CARGO_PKG_VERSION"));
        let uptime = snap["uptime_seconds"].as_f64().unwrap();
        assert!(
            (0.0..=created.elapsed().as_secs_f64()).contains(&uptime),
            "{uptime}"
        );
        assert!(snap["started_at"].as_str().unwrap().ends_with('Z'));
    }
}
