//! The listener and the per-connection loop: accept, read requests in order, decide each
//! request's faults, answer, keep the connection alive or close it.
//!
//! Requests on one connection are answered strictly in order (pipelining falls out of the
//! sequential loop). Accepted sockets get `TCP_NODELAY` as Go sets it, so every flushed chunk
//! leaves as its own segment. On shutdown the listener stops and open connections are dropped.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::config::SimConfig;
use super::faults::{Dice, FAULT_HEADER, FaultPlan};
use super::models::{ModelCatalog, SchedulerSettings};
use super::request::{Request, RequestError, RequestReader};
use super::response::{ResponseWriter, WriteError};
use super::routes::{self, Exchange, Resolution, native_error};
use super::runner::RequestTimeline;

/// A running simulator seen from outside (a test, or `observer sim`'s SIGUSR1/SIGUSR2): it
/// switches it between serving and stalling, and keeps the timelines of its last inference
/// requests. While stalled, inference requests are read and never answered, as by an Ollama
/// whose GPU hung; listing routes keep answering.
#[derive(Debug, Clone, Default)]
pub struct SimControl {
    stalled: Arc<AtomicBool>,
    timelines: Arc<Mutex<VecDeque<RequestTimeline>>>,
}

/// Timelines kept; older ones are dropped.
const TIMELINES_KEPT: usize = 1024;

impl SimControl {
    /// The timelines of the last inference requests that got a model (not those refused or
    /// rejected before), oldest first.
    pub fn timelines(&self) -> Vec<RequestTimeline> {
        self.lock_timelines().iter().cloned().collect()
    }

    pub(super) fn record(&self, timeline: RequestTimeline) {
        let mut timelines = self.lock_timelines();
        if timelines.len() == TIMELINES_KEPT {
            timelines.pop_front();
        }
        timelines.push_back(timeline);
    }

    fn lock_timelines(&self) -> std::sync::MutexGuard<'_, VecDeque<RequestTimeline>> {
        // Plain data: a poisoned lock still holds usable timelines.
        self.timelines.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stall(&self) {
        self.stalled.store(true, Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.stalled.store(false, Ordering::Relaxed);
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }
}

/// State shared by all connections of one simulator.
#[derive(Debug)]
pub struct SimState {
    pub config: SimConfig,
    pub models: ModelCatalog,
    dice: Mutex<Dice>,
    pub control: SimControl,
}

impl SimState {
    pub fn new(config: SimConfig, control: SimControl) -> Self {
        let seed = config.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Self {
            models: ModelCatalog::new(
                &config.models,
                SystemTime::now(),
                SchedulerSettings {
                    num_parallel: config.num_parallel,
                    max_queue: config.max_queue,
                    max_loaded_models: config.max_loaded_models,
                },
            ),
            dice: Mutex::new(Dice::new(seed)),
            config,
            control,
        }
    }

    fn dice(&self) -> std::sync::MutexGuard<'_, Dice> {
        // The dice hold no invariant a panic could break.
        self.dice.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Uniform in `0..n`.
    pub fn roll_below(&self, n: u64) -> u64 {
        self.dice().below(n)
    }

    /// The request's faults: forced by its header, else rolled for inference routes.
    fn plan_for(&self, request: &Request) -> Result<FaultPlan, super::faults::FaultHeaderError> {
        let route = routes::resolve(&request.method, &request.path);
        if self.control.is_stalled() && matches!(route, Resolution::Found(r) if r.is_inference()) {
            return Ok(FaultPlan {
                hang: true,
                ..FaultPlan::default()
            });
        }
        if let Some(forced) = request.header(FAULT_HEADER) {
            return FaultPlan::from_header(forced);
        }
        match route {
            Resolution::Found(route) if route.is_inference() => {
                Ok(FaultPlan::roll(&self.config.faults, &mut self.dice()))
            }
            _ => Ok(FaultPlan::default()),
        }
    }
}

/// A simulator running on its own task.
#[derive(Debug)]
pub struct SimServer {
    local_addr: SocketAddr,
    control: SimControl,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl SimServer {
    /// The address actually bound (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The switch that stalls and resumes this simulator.
    pub fn control(&self) -> SimControl {
        self.control.clone()
    }

    /// Stops accepting, drops open connections, and waits for the server task.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.context("simulator task failed")?
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        // Without an explicit shutdown the server must not outlive its handle.
        self.task.abort();
    }
}

/// Starts a simulator on `listener` in a background task (needs a Tokio runtime).
pub fn spawn(listener: TcpListener, config: SimConfig) -> std::io::Result<SimServer> {
    let local_addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let control = SimControl::default();
    let task = tokio::spawn(serve_controlled(
        listener,
        config,
        control.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(SimServer {
        local_addr,
        control,
        stop: Some(stop),
        task,
    })
}

/// Serves until the task is cancelled.
pub async fn serve(listener: TcpListener, config: SimConfig) -> anyhow::Result<()> {
    serve_with_shutdown(listener, config, std::future::pending()).await
}

/// Serves until `shutdown` completes, then drops all connections.
pub async fn serve_with_shutdown(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serve_controlled(listener, config, SimControl::default(), shutdown).await
}

/// Serves until `shutdown` completes, stalling while `control` says so.
pub async fn serve_controlled(
    listener: TcpListener,
    config: SimConfig,
    control: SimControl,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let sim = Arc::new(SimState::new(config, control));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let sim = sim.clone();
                    connections.spawn(async move { serve_connection(&sim, stream, peer).await });
                }
                Err(err) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    info!(open = connections.len(), "simulator stopping");
    connections.shutdown().await;
    Ok(())
}

async fn serve_connection(sim: &SimState, mut stream: TcpStream, peer: SocketAddr) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(%peer, error = %err, "cannot set TCP_NODELAY");
    }
    let mut reader = RequestReader::new(sim.config.limits);
    loop {
        let request = match reader.next(&mut stream).await {
            Ok(request) => request,
            Err(RequestError::Closed) => return,
            Err(err) => {
                debug!(%peer, error = %err, "bad request, closing");
                if let Some(reply) = err.reply() {
                    let _ = stream.write_all(reply.as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
                return;
            }
        };
        let received_at = Instant::now();
        debug!(%peer, method = %request.method, path = %request.path, "request");
        let (plan, header_error) = match sim.plan_for(&request) {
            Ok(plan) => (plan, None),
            Err(err) => (FaultPlan::default(), Some(err)),
        };
        if plan.hang {
            debug!(%peer, path = %request.path, "hanging on purpose");
            hang(&mut stream).await;
            return;
        }
        let mut writer = ResponseWriter::new(&mut stream, &request, &plan);
        let exchange = Exchange {
            sim,
            request: &request,
            plan: &plan,
            received_at,
        };
        let answered = match &header_error {
            Some(err) => native_error(&mut writer, 400, &err.to_string()).await,
            None => routes::respond(&exchange, &mut writer).await,
        };
        let close = writer.must_close();
        match answered {
            Ok(()) if close => {
                let _ = stream.shutdown().await;
                return;
            }
            Ok(()) => {}
            Err(WriteError::ResetInjected) => {
                debug!(%peer, path = %request.path, "connection reset on purpose");
                return;
            }
            Err(WriteError::Io(err)) => {
                debug!(%peer, error = %err, "client went away");
                return;
            }
        }
    }
}

/// Never answers: reads and discards until the client gives up.
async fn hang(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}
