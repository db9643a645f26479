//! What the model servers can take: their settings (read from their environment by the
//! collectors, [`crate::server_settings`]), the models loaded and each one's context length
//! (from `/api/ps`, by the probe), and the models whose last request was cancelled.
//!
//! Owns `llm_server_info` and `llm_slots`; [`super::Metrics`] reads it for
//! `llm_requests_waiting`, the context check and the wait after a cancellation. Clones share
//! everything.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use prometheus::IntGaugeVec;

use super::families::Families;
use crate::server_settings::ServerSettings;

const NO_LABELS: &[&str] = &[];

#[derive(Debug, Clone)]
pub struct CapacityBoard {
    state: Arc<Mutex<State>>,
    server_info: IntGaugeVec,
    slots: IntGaugeVec,
}

#[derive(Debug, Default)]
struct State {
    servers: Vec<ServerSettings>,
    loaded: usize,
    contexts: HashMap<String, u64>,
    cancelled: HashSet<String>,
}

impl State {
    /// Each server's `num_parallel` per loaded model (one at least); `None` before any
    /// server's settings were read.
    fn slots(&self) -> Option<u64> {
        if self.servers.is_empty() {
            return None;
        }
        let models = self.loaded.max(1) as u64;
        Some(self.servers.iter().map(|s| s.num_parallel * models).sum())
    }
}

impl CapacityBoard {
    pub(super) fn new(families: &Families) -> CapacityBoard {
        CapacityBoard {
            state: Arc::default(),
            server_info: families.llm_server_info.clone(),
            slots: families.llm_slots.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the model servers' settings say, by server pid: `llm_server_info` and `llm_slots`
    /// follow.
    pub fn set_servers(&self, servers: &[(u32, ServerSettings)]) {
        let mut state = self.lock();
        self.server_info.reset();
        for (pid, settings) in servers {
            let pid = pid.to_string();
            let [parallel, queue, loaded, context, keep_alive] = settings.labels();
            self.server_info
                .with_label_values(&[&pid, &parallel, &queue, &loaded, &context, &keep_alive])
                .set(1);
        }
        state.servers = servers.iter().map(|(_, s)| s.clone()).collect();
        self.publish_slots(&state);
    }

    /// What `/api/ps` lists now, `(model, context_length)`: the models loaded (each has
    /// `num_parallel` slots) and each one's context, remembered after it unloads.
    pub fn set_loaded(&self, loaded: &[(String, Option<u64>)]) {
        let mut state = self.lock();
        state.loaded = loaded.len();
        for (model, context) in loaded {
            if let Some(context) = context.filter(|&c| c > 0) {
                // A request may name `llama3.2` for the `llama3.2:latest` listed.
                if let Some(bare) = model.strip_suffix(":latest") {
                    state.contexts.insert(bare.to_owned(), context);
                }
                state.contexts.insert(model.clone(), context);
            }
        }
        self.publish_slots(&state);
    }

    fn publish_slots(&self, state: &State) {
        match state.slots() {
            Some(n) => self.slots.with_label_values(NO_LABELS).set(n as i64),
            None => {
                let _ = self.slots.remove_label_values(NO_LABELS);
            }
        }
    }

    /// The slots of every server known, see [`State::slots`].
    pub fn slots(&self) -> Option<u64> {
        self.lock().slots()
    }

    /// A model's context length: `/api/ps`'s, else `OLLAMA_CONTEXT_LENGTH` where the one
    /// server known set it (Ollama's own choice from the GPU memory is not known from outside).
    pub fn context_length(&self, model: &str) -> Option<u64> {
        let state = self.lock();
        if let Some(&context) = state.contexts.get(model) {
            return Some(context);
        }
        match state.servers.as_slice() {
            [one] if one.context_length > 0 => Some(one.context_length),
            _ => None,
        }
    }

    /// One finished request of `model`: a `cancelled` one marks the model; the first request
    /// after it that reports its queue wait (`timed`) takes the mark, and `true` says its wait
    /// is the one that followed a cancellation.
    pub fn after_cancel(&self, model: &str, cancelled: bool, timed: bool) -> bool {
        let mut state = self.lock();
        if cancelled {
            state.cancelled.insert(model.to_owned());
            false
        } else {
            timed && state.cancelled.remove(model)
        }
    }
}
