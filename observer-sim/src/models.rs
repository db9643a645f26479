//! The simulated model store: which models exist (`/api/tags`, `/v1/models`), which are loaded
//! (`/api/ps`), and the load step that makes the first request to a model slow.
//!
//! A model is loaded by its first request and stays loaded for the keep-alive time after its
//! last use, like Ollama's scheduler; requests queue for loads and for the parallel slots of a
//! loaded model as in Ollama ([`ModelCatalog`] has the rules). The
//! facts reported for a model (size, digest, family) are realistic constants for a few known
//! models and derived from the name for others. No JSON or HTTP here.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Semaphore, SemaphorePermit};

/// What `/api/tags` and `/api/ps` report about a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    pub digest: String,
    /// Bytes on disk.
    pub size: u64,
    /// Bytes in memory once loaded (weights, KV cache, compute graph), all of it in VRAM.
    pub loaded_size: u64,
    pub format: &'static str,
    pub family: String,
    pub parameter_size: String,
    pub quantization_level: &'static str,
    pub modified_at: SystemTime,
    /// Has Ollama's `thinking` capability (thinks unless a request says `think: false`).
    pub thinks: bool,
    /// Length of the model's embedding vectors (`embedding_length` of its GGUF).
    pub embedding_length: usize,
}

/// Model names (without namespace) whose models think.
const THINKING: &[&str] = &[
    "qwen3",
    "deepseek-r1",
    "gpt-oss",
    "magistral",
    "phi4-reasoning",
];

/// Embedding lengths of the known models; others get 768.
const EMBEDDING_LENGTHS: &[(&str, usize)] = &[
    ("llama3.2:1b", 2048),
    ("qwen2.5:0.5b", 896),
    ("llama3.2:3b", 3072),
];

/// Known models: (name, size on disk, digest, family, parameter size, quantization).
const KNOWN: &[(&str, u64, &str, &str, &str, &str)] = &[
    (
        "llama3.2:1b",
        1_321_098_329,
        "baf6a787fdffd633537aa2eb51cfd54cb93ff08e28040095462bb63daf552878",
        "llama",
        "1.2B",
        "Q8_0",
    ),
    (
        "qwen2.5:0.5b",
        397_821_319,
        "a8b0c51577010a279d933d14c2a8ab4b268079d44c5c8830c0a93900f1827c67",
        "qwen2",
        "494.03M",
        "Q4_K_M",
    ),
    (
        "llama3.2:3b",
        2_019_393_189,
        "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
        "llama",
        "3.2B",
        "Q4_K_M",
    ),
];

impl ModelInfo {
    /// Facts for `name`: the known constants, else plausible values derived from the name.
    pub fn for_name(name: &str, modified_at: SystemTime) -> Self {
        let canonical = canonical_name(name);
        let (size, digest, family, parameter_size, quantization_level) =
            match KNOWN.iter().find(|k| k.0 == canonical) {
                Some(&(_, size, digest, family, params, quant)) => (
                    size,
                    digest.to_owned(),
                    family.to_owned(),
                    params.to_owned(),
                    quant,
                ),
                None => derived_facts(&canonical),
            };
        Self {
            digest,
            size,
            loaded_size: size + size / 4 + 256 * 1024 * 1024,
            format: "gguf",
            family,
            parameter_size,
            quantization_level,
            modified_at,
            thinks: {
                let base = canonical.rsplit('/').next().unwrap_or(&canonical);
                THINKING.iter().any(|t| base.starts_with(t))
            },
            embedding_length: EMBEDDING_LENGTHS
                .iter()
                .find(|(n, _)| *n == canonical)
                .map_or(768, |&(_, len)| len),
            name: canonical,
        }
    }
}

fn derived_facts(canonical: &str) -> (u64, String, String, String, &'static str) {
    let (base, tag) = canonical.split_once(':').unwrap_or((canonical, "latest"));
    let base = base.rsplit('/').next().unwrap_or(base);
    let family = base.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    let family = if family.is_empty() { base } else { family };
    // A tag like "7b" or "0.5b" gives the parameter count in billions.
    let billions = tag
        .strip_suffix('b')
        .and_then(|n| n.parse::<f64>().ok())
        .filter(|b| *b > 0.0)
        .unwrap_or(7.0);
    let parameter_size = if billions < 1.0 {
        format!("{:.0}M", billions * 1000.0)
    } else {
        format!("{billions:.1}B")
    };
    // Q4_K_M stores about 4.85 bits per weight.
    let size = (billions * 1e9 * 4.85 / 8.0).round() as u64;
    let digest = (0..4u64)
        .map(|i| format!("{:016x}", fnv1a(canonical.as_bytes(), i)))
        .collect();
    (size, digest, family.to_owned(), parameter_size, "Q4_K_M")
}

fn fnv1a(bytes: &[u8], salt: u64) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325 ^ salt, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Ollama's name resolution, reduced to what the simulator needs: case-insensitive, the
/// default registry and namespace optional, `:latest` when no tag is given.
pub fn canonical_name(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    let mut short = lower.as_str();
    short = short.strip_prefix("registry.ollama.ai/").unwrap_or(short);
    short = short.strip_prefix("library/").unwrap_or(short);
    let last = short.rsplit('/').next().unwrap_or(short);
    if last.contains(':') {
        short.to_owned()
    } else {
        format!("{short}:latest")
    }
}

/// A loaded model: until when (monotonic and wall clock), and the context it was loaded with.
#[derive(Debug, Clone, Copy)]
struct Residency {
    until: Instant,
    wall: SystemTime,
    context_length: u32,
}

/// One model: its residency and its parallel slots.
#[derive(Debug)]
pub struct Model {
    pub info: ModelInfo,
    residency: Mutex<Option<Residency>>,
    /// The runner's `OLLAMA_NUM_PARALLEL` slots (llm/llama_server.go: `sem`, FIFO).
    slots: Semaphore,
    parallel: u32,
}

impl Model {
    fn lock_residency(&self) -> std::sync::MutexGuard<'_, Option<Residency>> {
        // The guarded value is plain data; a poisoned lock still holds a usable value.
        self.residency.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any slot is taken (a runner in use never expires in Ollama).
    fn busy(&self) -> bool {
        self.slots.available_permits() < self.parallel as usize
    }

    /// The context the resident model was loaded with; `None` when not loaded.
    fn resident_context(&self, now: Instant) -> Option<u32> {
        let residency = *self.lock_residency();
        residency
            .filter(|r| now < r.until || self.busy())
            .map(|r| r.context_length)
    }

    fn expiry(&self) -> Option<Instant> {
        self.lock_residency().map(|r| r.until)
    }

    /// Restarts the keep-alive clock (Ollama counts it from the end of the last request).
    pub fn touch(&self, keep_alive: Duration) {
        // An absurd keep-alive (infinite is `Duration::MAX`) saturates at a century.
        let keep_alive = keep_alive.min(Duration::from_secs(100 * 365 * 86_400));
        if let Some(r) = self.lock_residency().as_mut() {
            r.until = Instant::now() + keep_alive;
            r.wall = SystemTime::now() + keep_alive;
        }
    }

    fn set_loaded(&self, context_length: u32, keep_alive: Duration) {
        *self.lock_residency() = Some(Residency {
            until: Instant::now(),
            wall: SystemTime::now(),
            context_length,
        });
        self.touch(keep_alive);
    }

    /// Waits until every slot is free (Ollama unloads a runner only once its last request ended).
    async fn drain(&self) {
        // The semaphore is never closed, so acquiring cannot fail.
        if let Ok(all) = self.slots.acquire_many(self.parallel).await {
            drop(all);
        }
    }

    /// Takes one of the model's parallel slots, waiting in FIFO order for a free one.
    pub async fn slot(&self) -> SemaphorePermit<'_> {
        match self.slots.acquire().await {
            Ok(permit) => permit,
            // Never closed: unreachable, but no panic on it either.
            Err(_) => std::future::pending().await,
        }
    }
}

/// The scheduler's queue was full: Ollama's `ErrMaxQueue`, answered 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("server busy, please try again.  maximum pending requests exceeded")]
pub struct QueueFull;

/// The configured models and Ollama's scheduler over them (`server/sched.go`, v0.32.15).
///
/// A request for a resident model with the same context gets it at once (`useLoadedRunner`),
/// whatever else is going on. Any other request goes through the scheduler's pending queue, a
/// channel of `OLLAMA_MAX_QUEUE` places that one loop drains one request at a time; a request
/// that finds the loop busy and the queue full is refused at once with [`QueueFull`]. The loop
/// loads the model (after unloading it if its context differs, or unloading the idle loaded
/// model expiring first when `OLLAMA_MAX_LOADED_MODELS` are loaded, each once its requests
/// have ended), so a load delays every queued request, whatever its model.
#[derive(Debug)]
pub struct ModelCatalog {
    models: Vec<Model>,
    /// `processPending`: held while one pending request is scheduled.
    scheduler: tokio::sync::Mutex<()>,
    /// Requests in the pending channel (waiting for `scheduler`).
    queued: AtomicU32,
    max_queue: u32,
    max_loaded: u32,
}

/// How the catalog schedules: Ollama's server settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerSettings {
    pub num_parallel: u32,
    pub max_queue: u32,
    pub max_loaded_models: u32,
}

impl ModelCatalog {
    /// Models in the given order, which is also `/api/tags` order (newest first): the first
    /// was "pulled" a day before `now`, each next one a day earlier.
    pub fn new(names: &[String], now: SystemTime, settings: SchedulerSettings) -> Self {
        // sched.go: `max(NumParallel, 1)`.
        let parallel = settings.num_parallel.max(1);
        let mut models: Vec<Model> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let age = Duration::from_secs(86_400 * (i as u64 + 1))
                + Duration::from_nanos(123_456_789 * (i as u64 + 1));
            let info = ModelInfo::for_name(name, now - age);
            if models.iter().any(|m| m.info.name == info.name) {
                continue;
            }
            models.push(Model {
                info,
                residency: Mutex::new(None),
                slots: Semaphore::new(parallel as usize),
                parallel,
            });
        }
        Self {
            models,
            scheduler: tokio::sync::Mutex::new(()),
            queued: AtomicU32::new(0),
            max_queue: settings.max_queue,
            max_loaded: settings.max_loaded_models.max(1),
        }
    }

    pub fn find(&self, requested: &str) -> Option<&Model> {
        let wanted = canonical_name(requested);
        self.models.iter().find(|m| m.info.name == wanted)
    }

    /// All models, newest first.
    pub fn listed(&self) -> impl Iterator<Item = &ModelInfo> {
        self.models.iter().map(|m| &m.info)
    }

    /// Loaded models with their expiry and context length, longest remaining first (as
    /// `/api/ps` sorts).
    pub fn loaded(&self) -> Vec<(&ModelInfo, SystemTime, u32)> {
        let now = Instant::now();
        let mut loaded: Vec<_> = self
            .models
            .iter()
            .filter_map(|m| {
                let context = m.resident_context(now)?;
                let wall = m.lock_residency().map(|r| r.wall)?;
                Some((&m.info, wall, context))
            })
            .collect();
        loaded.sort_by_key(|&(_, expires, _)| std::cmp::Reverse(expires));
        loaded
    }

    /// Ollama's `getRunner` and `processPending` for one request: returns when `model` is
    /// loaded with `context_length` (Ollama's `checkpointLoaded`), loading it (`load` delay)
    /// if needed, or refuses at once when the pending queue is full.
    pub async fn schedule(
        &self,
        model: &Model,
        context_length: u32,
        load: Duration,
        keep_alive: Duration,
    ) -> Result<Instant, QueueFull> {
        if model.resident_context(Instant::now()) == Some(context_length) {
            model.touch(keep_alive);
            return Ok(Instant::now());
        }
        let _turn = match self.scheduler.try_lock() {
            // The loop was idle: the channel hands the request straight to it.
            Ok(turn) => turn,
            Err(_) => {
                let max = self.max_queue;
                self.queued
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    })
                    .map_err(|_| QueueFull)?;
                let turn = self.scheduler.lock().await;
                self.queued.fetch_sub(1, Ordering::AcqRel);
                turn
            }
        };
        match model.resident_context(Instant::now()) {
            Some(context) if context == context_length => {}
            resident => {
                if resident.is_some() {
                    model.drain().await;
                }
                self.make_room(model).await;
                tokio::time::sleep(load).await;
                model.set_loaded(context_length, keep_alive);
            }
        }
        model.touch(keep_alive);
        Ok(Instant::now())
    }

    /// Unloads idle models, the one expiring first each time, until `model` fits in
    /// `OLLAMA_MAX_LOADED_MODELS`.
    async fn make_room(&self, model: &Model) {
        loop {
            let now = Instant::now();
            let others: Vec<&Model> = self
                .models
                .iter()
                .filter(|m| !std::ptr::eq(*m, model) && m.resident_context(now).is_some())
                .collect();
            if (others.len() as u32) < self.max_loaded {
                return;
            }
            let Some(victim) = others.into_iter().min_by_key(|m| (m.busy(), m.expiry())) else {
                return;
            };
            victim.drain().await;
            *victim.lock_residency() = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_like_ollama() {
        assert_eq!(canonical_name("Llama3.2:1B"), "llama3.2:1b");
        assert_eq!(canonical_name("llama3.2"), "llama3.2:latest");
        assert_eq!(
            canonical_name("registry.ollama.ai/library/qwen2.5:0.5b"),
            "qwen2.5:0.5b"
        );
        assert_eq!(canonical_name("library/qwen2.5:0.5b"), "qwen2.5:0.5b");
        assert_eq!(canonical_name("me/custom"), "me/custom:latest");
    }

    #[test]
    fn unknown_models_get_plausible_facts() {
        let info = ModelInfo::for_name("mistral:7b", SystemTime::UNIX_EPOCH);
        assert_eq!(info.family, "mistral");
        assert_eq!(info.parameter_size, "7.0B");
        assert_eq!(info.digest.len(), 64);
        assert_eq!(info.size, 4_243_750_000);
        let small = ModelInfo::for_name("tiny:0.5b", SystemTime::UNIX_EPOCH);
        assert_eq!(small.parameter_size, "500M");
    }

    fn catalog(parallel: u32, max_queue: u32, max_loaded: u32) -> ModelCatalog {
        let names = ["llama3.2:1b".to_owned(), "qwen2.5:0.5b".to_owned()];
        let settings = SchedulerSettings {
            num_parallel: parallel,
            max_queue,
            max_loaded_models: max_loaded,
        };
        ModelCatalog::new(&names, SystemTime::now(), settings)
    }

    fn loaded_names(catalog: &ModelCatalog) -> Vec<(String, u32)> {
        let loaded = catalog.loaded();
        loaded
            .iter()
            .map(|(m, _, c)| (m.name.clone(), *c))
            .collect()
    }

    #[tokio::test]
    async fn a_model_is_loaded_by_first_use_and_unloaded_after_keep_alive() {
        let catalog = catalog(1, 512, 3);
        assert!(catalog.loaded().is_empty());
        let model = catalog.find("llama3.2:1b").unwrap();
        let keep_alive = Duration::from_millis(150);
        let load = Duration::from_millis(40);
        let start = Instant::now();
        catalog
            .schedule(model, 4096, load, keep_alive)
            .await
            .unwrap();
        assert!(start.elapsed() >= load);
        // A second use does not load again.
        let again = Instant::now();
        catalog
            .schedule(model, 4096, load, keep_alive)
            .await
            .unwrap();
        assert!(again.elapsed() < load);
        assert_eq!(loaded_names(&catalog), [("llama3.2:1b".to_owned(), 4096)]);
        // Another context reloads it.
        let reload = Instant::now();
        catalog
            .schedule(model, 8192, load, keep_alive)
            .await
            .unwrap();
        assert!(reload.elapsed() >= load);
        assert_eq!(loaded_names(&catalog), [("llama3.2:1b".to_owned(), 8192)]);
        tokio::time::sleep(keep_alive).await;
        assert!(catalog.loaded().is_empty());
    }

    #[tokio::test]
    async fn a_full_queue_refuses_while_a_load_is_under_way() {
        let catalog = catalog(1, 1, 3);
        let model = catalog.find("llama3.2:1b").unwrap();
        let (load, keep) = (Duration::from_millis(100), Duration::from_secs(60));
        let first = catalog.schedule(model, 4096, load, keep);
        let second = catalog.schedule(model, 4096, load, keep);
        let third = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            catalog.schedule(model, 4096, load, keep).await
        };
        let (first, second, third) = tokio::join!(first, second, third);
        assert!(first.is_ok() && second.is_ok());
        assert_eq!(third, Err(QueueFull));
        // Once loaded, requests bypass the queue whatever their number.
        assert!(catalog.schedule(model, 4096, load, keep).await.is_ok());
    }

    #[tokio::test]
    async fn loading_past_the_limit_unloads_the_idle_model_expiring_first() {
        let catalog = catalog(1, 512, 1);
        let (a, b) = (
            catalog.find("llama3.2:1b").unwrap(),
            catalog.find("qwen2.5:0.5b").unwrap(),
        );
        let keep = Duration::from_secs(60);
        catalog
            .schedule(a, 4096, Duration::ZERO, keep)
            .await
            .unwrap();
        catalog
            .schedule(b, 4096, Duration::ZERO, keep)
            .await
            .unwrap();
        assert_eq!(loaded_names(&catalog), [("qwen2.5:0.5b".to_owned(), 4096)]);
    }

    #[tokio::test]
    async fn slots_are_taken_in_order_and_a_busy_model_never_expires() {
        let catalog = catalog(1, 512, 3);
        let model = catalog.find("llama3.2:1b").unwrap();
        catalog
            .schedule(model, 4096, Duration::ZERO, Duration::ZERO)
            .await
            .unwrap();
        let slot = model.slot().await;
        assert_eq!(loaded_names(&catalog).len(), 1);
        let waiting = tokio::time::timeout(Duration::from_millis(30), model.slot()).await;
        assert!(waiting.is_err(), "a second slot with NUM_PARALLEL=1");
        drop(slot);
        let _next = model.slot().await;
    }
}
