//! One inference request through Ollama's scheduler and runner, whichever API it came by:
//! what Ollama checks before it runs one ([`admit`]: the model, the reply's shape, the
//! scheduler's queue and the model load, 503 when the queue is full), a
//! parallel slot, the prompt fitted to the context ([`Loaded::start`], 400 when it cannot be),
//! tokens until the reply is done or the client goes ([`Run`]), and the request's
//! [`RequestTimeline`]. The API modules render what happens here in their own shapes.
//!
//! As in Ollama (v0.32.15, `llm/llama_server.go`), the slot is taken after the model is loaded
//! and released when generation ends or the request's context is cancelled, which a client's
//! disconnect does at once (Go's background read): a request waiting for a slot, or a stream
//! whose client left, frees its place without waiting for a failed write.

use std::time::{Duration, Instant};

use tokio::sync::SemaphorePermit;

use serde_json::{Map, Value};

use super::generation::{Generation, Phases, Piece, PromptTooLong, ReplyShape, fit_prompt};
use super::inference_request::InferenceRequest;
use super::models::{Model, QueueFull};
use super::response::{ResponseWriter, WriteError};
use super::routes::Exchange;

/// What happened to one inference request that got its model, for tests (nothing of it goes
/// on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTimeline {
    pub path: String,
    pub model: String,
    /// Received → model ready: the scheduler's queue and the load (`load_duration`).
    pub load: Duration,
    /// Model ready → parallel slot free (in `total_duration` only).
    pub slot_wait: Duration,
    pub prompt_eval: Duration,
    pub eval: Duration,
    /// Received → done, or → the client's disconnect.
    pub total: Duration,
    pub prompt_eval_count: u32,
    pub eval_count: u32,
    /// The client disconnected (or the connection failed) before the reply was done.
    pub client_gone: bool,
}

/// What the reply will hold: thinking tokens (`X-Sim-Fault: think=N`, else half the reply's
/// tokens when the request's `think`, or the model's default, asks for thinking), then tool
/// calls (`tool-calls=N`, else one when the request offers tools and its last message is not a
/// tool's result) instead of the answer. `Err`: Ollama's 400 for `think` on a model that
/// cannot think.
fn reply_shape(
    ex: &Exchange<'_>,
    req: &InferenceRequest,
    model: &Model,
) -> Result<ReplyShape, String> {
    let thinking = match ex.plan.think {
        Some(forced) => forced,
        None => {
            let wanted = req.think.unwrap_or(model.info.thinks);
            if wanted && !model.info.thinks {
                return Err(format!("{:?} does not support thinking", req.model));
            }
            if wanted {
                ex.timing().tokens_per_reply.div_ceil(2).max(1)
            } else {
                0
            }
        }
    };
    let tool_calls = ex.plan.tool_calls.unwrap_or(u32::from(
        ex.sim.config.tool_calls && !req.tools.is_empty() && !req.after_tool_result,
    ));
    Ok(ReplyShape {
        thinking,
        tool_calls,
    })
}

/// One tool call of a reply: the request's tools in turn (`sim_tool` without any), with an id
/// as Ollama makes them (`toolCallId`: `call_` and 8 of `[a-z0-9]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub index: u32,
    pub name: String,
    pub arguments: Map<String, Value>,
}

pub fn tool_call(ex: &Exchange<'_>, req: &InferenceRequest, index: u32) -> ToolCall {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let id: String = (0..8)
        .map(|_| char::from(LETTERS[ex.sim.roll_below(LETTERS.len() as u64) as usize]))
        .collect();
    let spec = (!req.tools.is_empty()).then(|| &req.tools[index as usize % req.tools.len()]);
    ToolCall {
        id: format!("call_{id}"),
        index,
        name: spec.map_or("sim_tool", |s| s.name.as_str()).to_owned(),
        arguments: spec.map(|s| s.arguments.clone()).unwrap_or_default(),
    }
}

/// Why a request was refused before it ran: its status and Ollama's message, which each API
/// renders in its own error shape.
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

/// Ollama's handlers before a generation runs, in their order: the model (404 when it is not
/// there), the reply's shape (400 for thinking the model cannot do; with `relax_thinking`, as
/// the Anthropic middleware's `relax_thinking`, such thinking is dropped instead), the
/// scheduler (503 when its queue is full; else the model loaded).
pub async fn admit<'a>(
    ex: &Exchange<'a>,
    req: &InferenceRequest,
    relax_thinking: bool,
) -> Result<(Loaded<'a>, ReplyShape), Refusal> {
    let refuse = |status, message| Refusal { status, message };
    let Some(model) = ex.sim.models.find(&req.model) else {
        return Err(refuse(404, format!("model '{}' not found", req.model)));
    };
    let shape = if relax_thinking && req.think == Some(true) && !model.info.thinks {
        let relaxed = InferenceRequest {
            think: None,
            ..req.clone()
        };
        reply_shape(ex, &relaxed, model)
    } else {
        reply_shape(ex, req, model)
    }
    .map_err(|message| refuse(400, message))?;
    // handleScheduleError: c.JSON(503, …).
    let loaded = schedule(ex, model, req.num_ctx)
        .await
        .map_err(|full| refuse(503, full.to_string()))?;
    Ok((loaded, shape))
}

/// A request whose model is loaded with its context (Ollama's `checkpointLoaded`).
pub struct Loaded<'a> {
    model: &'a Model,
    pub context_length: u32,
    loaded_at: Instant,
}

/// Schedules the request's model with the request's context (`options.num_ctx`, else the
/// server's), loading it if needed.
pub async fn schedule<'a>(
    ex: &Exchange<'a>,
    model: &'a Model,
    num_ctx: Option<u32>,
) -> Result<Loaded<'a>, QueueFull> {
    let context_length = num_ctx.unwrap_or(ex.sim.config.context_length);
    let loaded_at = ex
        .sim
        .models
        .schedule(
            model,
            context_length,
            ex.timing().load,
            ex.sim.config.keep_alive,
        )
        .await?;
    Ok(Loaded {
        model,
        context_length,
        loaded_at,
    })
}

impl<'a> Loaded<'a> {
    /// Waits for a parallel slot (or the client's disconnect), then fits the prompt.
    pub async fn start(
        self,
        ex: &Exchange<'_>,
        w: &ResponseWriter<'_>,
        req: &InferenceRequest,
        shape: ReplyShape,
    ) -> Result<Result<Run<'a>, PromptTooLong>, WriteError> {
        let slot = tokio::select! {
            slot = self.model.slot() => slot,
            () = w.client_gone() => return Err(WriteError::client_gone()),
        };
        let prompt_count = match fit_prompt(&req.texts, self.context_length, req.fit) {
            Ok(count) => count,
            Err(err) => return Ok(Err(err)),
        };
        let phases = Phases {
            received_at: ex.received_at,
            loaded_at: self.loaded_at,
            started_at: Instant::now(),
        };
        Ok(Ok(Run {
            model: self.model,
            slot,
            generation: Generation::new(ex.timing(), req.limit, prompt_count, phases, shape),
        }))
    }

    /// When the model was ready (Ollama's `checkpointLoaded`).
    pub fn loaded_at(&self) -> Instant {
        self.loaded_at
    }

    /// A parallel slot for work without a generation (an embedding), or the client's
    /// disconnect.
    pub async fn slot(&self, w: &ResponseWriter<'_>) -> Result<SemaphorePermit<'a>, WriteError> {
        tokio::select! {
            slot = self.model.slot() => Ok(slot),
            () = w.client_gone() => Err(WriteError::client_gone()),
        }
    }

    /// Ends a request that ran no generation (a load, embeddings): restarts the model's
    /// keep-alive clock.
    pub fn release(self, ex: &Exchange<'_>) {
        self.model.touch(ex.sim.config.keep_alive);
    }
}

/// A non-streamed reply, gathered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WholeReply {
    pub thinking: String,
    pub content: String,
    /// Indexes of the tool calls.
    pub tool_calls: Vec<u32>,
}

/// A generation holding its slot.
pub struct Run<'a> {
    model: &'a Model,
    slot: SemaphorePermit<'a>,
    pub generation: Generation,
}

impl Run<'_> {
    /// The next piece (`None` once the reply is done), or the client's disconnect.
    pub async fn next_token(
        &mut self,
        w: &ResponseWriter<'_>,
    ) -> Result<Option<Piece>, WriteError> {
        tokio::select! {
            token = self.generation.next_token() => Ok(token),
            () = w.client_gone() => Err(WriteError::client_gone()),
        }
    }

    /// Pieces already sent before the one just returned by `next_token`.
    pub fn sent_before(&self, token: Option<Piece>) -> u32 {
        self.generation.emitted() - u32::from(token.is_some())
    }

    /// The whole reply for a non-streamed response; `None` when a planned mid-stream error
    /// interrupts it after `error_after` pieces.
    pub async fn whole_reply(
        &mut self,
        w: &ResponseWriter<'_>,
        error_after: Option<u32>,
    ) -> Result<Option<WholeReply>, WriteError> {
        let mut reply = WholeReply::default();
        loop {
            let token = self.next_token(w).await?;
            if error_after == Some(self.sent_before(token)) {
                return Ok(None);
            }
            match token {
                Some(Piece::Thinking(text)) => reply.thinking.push_str(text),
                Some(Piece::Content(text)) => reply.content.push_str(text),
                Some(Piece::ToolCall(index)) => reply.tool_calls.push(index),
                None => return Ok(Some(reply)),
            }
        }
    }

    /// Records the request's timeline, releases the slot and restarts the keep-alive clock.
    pub fn finish(self, ex: &Exchange<'_>, model_name: &str, result: &Result<(), WriteError>) {
        let Run {
            model,
            slot,
            generation,
        } = self;
        let metrics = generation.metrics();
        ex.sim.control.record(RequestTimeline {
            path: ex.request.path.clone(),
            model: model_name.to_owned(),
            load: metrics.load,
            slot_wait: generation.slot_wait(),
            prompt_eval: metrics.prompt_eval,
            eval: metrics.eval,
            total: metrics.total,
            prompt_eval_count: metrics.prompt_eval_count,
            eval_count: metrics.eval_count,
            client_gone: matches!(result, Err(WriteError::Io(_))),
        });
        drop(slot);
        model.touch(ex.sim.config.keep_alive);
    }
}
