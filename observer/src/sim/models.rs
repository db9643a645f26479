//! The simulated model store: which models exist (`/api/tags`, `/v1/models`), which are loaded
//! (`/api/ps`), and the load step that makes the first request to a model slow.
//!
//! A model is loaded by its first request and stays loaded for the keep-alive time after its
//! last use, like Ollama's scheduler; concurrent first requests wait for the same load. The
//! facts reported for a model (size, digest, family) are realistic constants for a few known
//! models and derived from the name for others. No JSON or HTTP here.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

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
    pub context_length: u32,
    pub modified_at: SystemTime,
}

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

/// Context length Ollama loads models with by default.
const CONTEXT_LENGTH: u32 = 4096;

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
            name: canonical,
            digest,
            size,
            loaded_size: size + size / 4 + 256 * 1024 * 1024,
            format: "gguf",
            family,
            parameter_size,
            quantization_level,
            context_length: CONTEXT_LENGTH,
            modified_at,
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

/// One model and its residency.
#[derive(Debug)]
pub struct Model {
    pub info: ModelInfo,
    /// Serializes loads, so concurrent first requests share one load delay.
    load_gate: tokio::sync::Mutex<()>,
    /// When the loaded model is due to be unloaded; `None` when not loaded.
    expires: Mutex<Option<(Instant, SystemTime)>>,
}

impl Model {
    fn resident(&self, now: Instant) -> bool {
        self.lock_expires().is_some_and(|(until, _)| now < until)
    }

    fn lock_expires(&self) -> std::sync::MutexGuard<'_, Option<(Instant, SystemTime)>> {
        // The guarded value is plain data; a poisoned lock still holds a usable value.
        self.expires.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the model if it is not resident, taking `delay`; returns when it is ready. Whether
    /// this request paid for the load shows in the measured time.
    pub async fn load(&self, delay: Duration, keep_alive: Duration) -> Instant {
        let _gate = self.load_gate.lock().await;
        if !self.resident(Instant::now()) {
            tokio::time::sleep(delay).await;
        }
        self.touch(keep_alive);
        Instant::now()
    }

    /// Restarts the keep-alive clock (Ollama counts it from the end of the last request).
    pub fn touch(&self, keep_alive: Duration) {
        // An absurd keep-alive saturates at a century instead of overflowing the clocks.
        let keep_alive = keep_alive.min(Duration::from_secs(100 * 365 * 86_400));
        *self.lock_expires() = Some((Instant::now() + keep_alive, SystemTime::now() + keep_alive));
    }
}

/// The configured models.
#[derive(Debug)]
pub struct ModelCatalog {
    models: Vec<Model>,
}

impl ModelCatalog {
    /// Models in the given order, which is also `/api/tags` order (newest first): the first
    /// was "pulled" a day before `now`, each next one a day earlier.
    pub fn new(names: &[String], now: SystemTime) -> Self {
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
                load_gate: tokio::sync::Mutex::new(()),
                expires: Mutex::new(None),
            });
        }
        Self { models }
    }

    pub fn find(&self, requested: &str) -> Option<&Model> {
        let wanted = canonical_name(requested);
        self.models.iter().find(|m| m.info.name == wanted)
    }

    /// All models, newest first.
    pub fn listed(&self) -> impl Iterator<Item = &ModelInfo> {
        self.models.iter().map(|m| &m.info)
    }

    /// Loaded models with their expiry, longest remaining first (as `/api/ps` sorts).
    pub fn loaded(&self) -> Vec<(&ModelInfo, SystemTime)> {
        let now = Instant::now();
        let mut loaded: Vec<_> = self
            .models
            .iter()
            .filter_map(|m| match *m.lock_expires() {
                Some((until, wall)) if now < until => Some((&m.info, wall)),
                _ => None,
            })
            .collect();
        loaded.sort_by_key(|&(_, expires)| std::cmp::Reverse(expires));
        loaded
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

    #[tokio::test]
    async fn a_model_is_loaded_by_first_use_and_unloaded_after_keep_alive() {
        let names = ["llama3.2:1b".to_owned(), "qwen2.5:0.5b".to_owned()];
        let catalog = ModelCatalog::new(&names, SystemTime::now());
        assert!(catalog.loaded().is_empty());
        let model = catalog.find("llama3.2:1b").unwrap();
        let keep_alive = Duration::from_millis(150);
        let start = Instant::now();
        model.load(Duration::from_millis(40), keep_alive).await;
        assert!(start.elapsed() >= Duration::from_millis(40));
        // A second use does not load again.
        let again = Instant::now();
        model.load(Duration::from_millis(40), keep_alive).await;
        assert!(again.elapsed() < Duration::from_millis(40));
        let loaded: Vec<_> = catalog
            .loaded()
            .iter()
            .map(|(m, _)| m.name.clone())
            .collect();
        assert_eq!(loaded, ["llama3.2:1b"]);
        tokio::time::sleep(keep_alive).await;
        assert!(catalog.loaded().is_empty());
    }
}
