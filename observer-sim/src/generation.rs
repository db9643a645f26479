//! Simulated inference: what a reply says, when each token comes out, and the metrics Ollama
//! reports for it, measured from the real delays so they agree with what a client observes.
//!
//! Timeline of one request: received → (scheduler queue and model load, when not loaded) →
//! loaded → (wait for a parallel slot) → slot → prompt evaluation (the time to first token) →
//! token 1 → token 2 after one token interval → … → token n → one more interval for the
//! end-of-sequence step → done. So `eval_count` = n and `eval_duration` ≈ n × the token
//! interval; `load_duration` is received → loaded and `prompt_eval_duration` slot → first
//! token, so the slot wait shows only in `total_duration`, as in Ollama (its runner takes the
//! slot after `checkpointLoaded`, and llama-server times only the prompt and the tokens).
//! The prompt is fitted to the context here too ([`fit_prompt`]). No HTTP or JSON here.

use std::time::{Duration, Instant};

/// Delays of a simulated model. Every value may be zero (tests use tiny values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Load delay on a model's first use (and after its keep-alive ran out).
    pub load: Duration,
    /// Prompt evaluation: from the model being ready to the first token.
    pub first_token: Duration,
    /// Between tokens.
    pub token_interval: Duration,
    /// Tokens in a full reply; a request's `num_predict` / `max_tokens` may cap it.
    pub tokens_per_reply: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            load: Duration::from_millis(800),
            first_token: Duration::from_millis(150),
            token_interval: Duration::from_millis(20),
            tokens_per_reply: 32,
        }
    }
}

/// Why generation stopped: Ollama's `done_reason`, OpenAI's `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoneReason {
    /// The model ended its reply.
    Stop,
    /// The token limit of the request was reached.
    Length,
}

impl DoneReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What a reply is made of besides its answer: thinking tokens first, then either tool calls
/// (and no answer) or the answer's `tokens_per_reply` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplyShape {
    pub thinking: u32,
    pub tool_calls: u32,
}

/// Tokens a model spends on one tool call (its JSON), emitted as one piece when complete.
pub const TOOL_CALL_TOKENS: u32 = 12;

/// One emitted piece of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    Thinking(&'static str),
    Content(&'static str),
    /// The tool call with this index (0-based) is complete.
    ToolCall(u32),
}

/// How many tokens a reply has and why it ends there. `limit` is the request's
/// `num_predict`/`max_tokens`; zero or negative means no limit (Ollama: -1 infinite, -2 fill).
pub fn reply_length(tokens_per_reply: u32, limit: Option<i64>) -> (u32, DoneReason) {
    match limit {
        Some(n) if n > 0 && n < i64::from(tokens_per_reply) => (n as u32, DoneReason::Length),
        _ => (tokens_per_reply, DoneReason::Stop),
    }
}

/// The prompt size reported as `prompt_eval_count`: about four bytes per token for each text,
/// plus four template tokens per message (role markers), at least one token per text.
pub fn prompt_tokens<'a>(texts: impl IntoIterator<Item = &'a str>) -> u32 {
    texts
        .into_iter()
        .map(|t| 4 + (t.len() as u32).div_ceil(4).max(1))
        .sum()
}

const WORDS: &[&str] = &[
    "The",
    " sky",
    " appears",
    " blue",
    " because",
    " molecules",
    " in",
    " the",
    " air",
    " scatter",
    " short",
    " wavelengths",
    " of",
    " sunlight",
    " more",
    " strongly",
    " than",
    " long",
    " ones",
    ",",
    " a",
    " process",
    " called",
    " Rayleigh",
    " scattering",
    ".",
    " At",
    " sunset",
    " light",
    " travels",
    " farther",
    ",",
    " so",
    " reds",
    " remain",
    ".",
];

const THOUGHTS: &[&str] = &[
    "Okay",
    ",",
    " the",
    " user",
    " asks",
    " about",
    " the",
    " sky",
    ".",
    " Let",
    " me",
    " explain",
    " Rayleigh",
    " scattering",
    " simply",
    ".",
];

/// Token `index` of every simulated reply (a fixed text, repeated as needed).
pub fn token_text(index: u32) -> &'static str {
    WORDS[index as usize % WORDS.len()]
}

/// Thinking token `index` of every simulated reply.
pub fn thinking_text(index: u32) -> &'static str {
    THOUGHTS[index as usize % THOUGHTS.len()]
}

/// The whole thinking text of `tokens` tokens.
pub fn thinking_reply(tokens: u32) -> String {
    (0..tokens).map(thinking_text).collect()
}

/// The whole text of a reply of `tokens` tokens.
pub fn reply_text(tokens: u32) -> String {
    (0..tokens).map(token_text).collect()
}

/// When a request arrived, got its loaded model, and got a parallel slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phases {
    pub received_at: Instant,
    pub loaded_at: Instant,
    pub started_at: Instant,
}

/// One prompt text for the token estimate; system messages survive chat truncation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptText {
    pub text: String,
    pub system: bool,
}

/// How a request lets its prompt be fitted to the context (`truncate`, `shift`, `num_keep`;
/// Ollama's defaults: true, true, 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptFit {
    pub truncate: bool,
    pub shift: bool,
    pub num_keep: i64,
}

impl Default for PromptFit {
    fn default() -> Self {
        Self {
            truncate: true,
            shift: true,
            num_keep: 4,
        }
    }
}

/// A prompt that cannot be evaluated in the context: answered 400 with [`PromptTooLong::message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptTooLong {
    /// `truncate: false`: llama-server refuses it (`exceed_context_size_error`).
    Refused { tokens: u32, context: u32 },
    /// `shift: false`: Ollama's runner will not cut it.
    NoShift,
}

impl PromptTooLong {
    /// Ollama's error text. For a refusal Ollama passes llama-server's whole error body on as
    /// the message (`statusErrorMessage`, llm/llama_server.go).
    pub fn message(&self) -> String {
        match self {
            Self::Refused { tokens, context } => format!(
                "{{\"error\":{{\"code\":400,\"message\":\"request ({tokens} tokens) exceeds the available \
                 context size ({context} tokens), try increasing it\",\"type\":\"exceed_context_size_error\",\
                 \"n_prompt_tokens\":{tokens},\"n_ctx\":{context}}}}}"
            ),
            Self::NoShift => "the prompt is longer than the context length currently available to the \
                 model; shorten the prompt, adjust the context length in settings, or use a model with a \
                 longer context length"
                .to_owned(),
        }
    }
}

/// The `prompt_eval_count` of `texts` in a context of `context` tokens, as Ollama fits a prompt
/// (v0.32.15): `chatPrompt` (server/prompt.go) drops the oldest messages, keeping system
/// messages and the last message, until the rest fits `context`; then the runner
/// (`completionPromptForRequest`, llm/llama_server.go) cuts a prompt still over `context` − 1
/// tokens to `context − max((context − keep) / 2, 1)`, `keep` being `num_keep` plus the BOS
/// token. Without `truncate` nothing is cut and llama-server refuses a prompt of `context`
/// tokens or more.
pub fn fit_prompt(
    texts: &[PromptText],
    context: u32,
    fit: PromptFit,
) -> Result<u32, PromptTooLong> {
    let count = |from: usize| {
        let kept = texts[..from].iter().filter(|t| t.system);
        prompt_tokens(kept.chain(&texts[from..]).map(|t| t.text.as_str()))
    };
    let last = texts.len().saturating_sub(1);
    let from = if fit.truncate {
        (0..=last).find(|&i| count(i) <= context).unwrap_or(last)
    } else {
        0
    };
    let tokens = count(from.min(texts.len()));
    if !fit.truncate {
        return if tokens >= context {
            Err(PromptTooLong::Refused { tokens, context })
        } else {
            Ok(tokens)
        };
    }
    let full_limit = context.saturating_sub(1);
    if context <= 1 || tokens <= full_limit {
        return Ok(tokens);
    }
    if !fit.shift {
        return Err(PromptTooLong::NoShift);
    }
    let keep = if fit.num_keep < 0 {
        tokens
    } else {
        u32::try_from(fit.num_keep).unwrap_or(u32::MAX)
    };
    let keep = keep.saturating_add(1).min(full_limit);
    Ok(context - ((context - keep) / 2).max(1))
}

/// Durations Ollama reports in the final message, in nanoseconds on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Metrics {
    pub total: Duration,
    pub load: Duration,
    pub prompt_eval_count: u32,
    pub prompt_eval: Duration,
    pub eval_count: u32,
    pub eval: Duration,
}

/// One reply being generated. Call [`Generation::next_token`] until it returns `None`.
#[derive(Debug)]
pub struct Generation {
    timing: Timing,
    shape: ReplyShape,
    /// Tokens to generate in all (thinking, tool calls, answer), and why it ends there.
    tokens: u32,
    done_reason: DoneReason,
    /// Tokens generated so far.
    generated: u32,
    prompt_eval_count: u32,
    received_at: Instant,
    loaded_at: Instant,
    started_at: Instant,
    prompt_done_at: Option<Instant>,
    emitted: u32,
    done_at: Option<Instant>,
}

impl Generation {
    /// A generation of a reply of `shape` for a request with these `phases`.
    pub fn new(
        timing: Timing,
        limit: Option<i64>,
        prompt_eval_count: u32,
        phases: Phases,
        shape: ReplyShape,
    ) -> Self {
        let answer = if shape.tool_calls > 0 {
            shape.tool_calls.saturating_mul(TOOL_CALL_TOKENS)
        } else {
            timing.tokens_per_reply
        };
        let (tokens, done_reason) = reply_length(shape.thinking.saturating_add(answer), limit);
        Self {
            timing,
            shape,
            tokens,
            done_reason,
            generated: 0,
            prompt_eval_count,
            received_at: phases.received_at,
            loaded_at: phases.loaded_at,
            started_at: phases.started_at,
            prompt_done_at: None,
            emitted: 0,
            done_at: None,
        }
    }

    pub fn done_reason(&self) -> DoneReason {
        self.done_reason
    }

    /// Pieces emitted so far.
    pub fn emitted(&self) -> u32 {
        self.emitted
    }

    /// What generated token `index` is: `None` for a token inside a tool call's JSON.
    fn piece(&self, index: u32) -> Option<Piece> {
        let thinking = self.shape.thinking;
        if index < thinking {
            return Some(Piece::Thinking(thinking_text(index)));
        }
        let answer = index - thinking;
        if self.shape.tool_calls == 0 {
            return Some(Piece::Content(token_text(answer)));
        }
        (answer + 1)
            .is_multiple_of(TOOL_CALL_TOKENS)
            .then_some(Piece::ToolCall(answer / TOOL_CALL_TOKENS))
    }

    /// Waits until the next piece is due and returns it; `None` once the reply is complete.
    pub async fn next_token(&mut self) -> Option<Piece> {
        loop {
            if self.done_at.is_some() {
                return None;
            }
            self.next_step().await;
            if self.generated < self.tokens {
                let piece = self.piece(self.generated);
                self.generated += 1;
                if let Some(piece) = piece {
                    self.emitted += 1;
                    return Some(piece);
                }
            } else {
                self.done_at = Some(Instant::now());
            }
        }
    }

    /// Waits for the next token step: the prompt first, then one interval per token.
    async fn next_step(&mut self) {
        let prompt_done_at = match self.prompt_done_at {
            Some(at) => at,
            None => {
                tokio::time::sleep(self.timing.first_token).await;
                *self.prompt_done_at.insert(Instant::now())
            }
        };
        // Deadlines from one origin keep the rate exact however late each wake-up is.
        // Absurd configured delays saturate (tokio treats an overlong sleep as "forever").
        let offset = self.timing.token_interval.checked_mul(self.generated);
        match offset.and_then(|o| prompt_done_at.checked_add(o)) {
            Some(due) => tokio::time::sleep_until(due.into()).await,
            None => tokio::time::sleep(Duration::MAX).await,
        }
    }

    /// Time between the model being ready and the slot being free.
    pub fn slot_wait(&self) -> Duration {
        self.started_at - self.loaded_at
    }

    /// The reported metrics; complete once `next_token` has returned `None`.
    pub fn metrics(&self) -> Metrics {
        let now = Instant::now();
        let prompt_done_at = self.prompt_done_at.unwrap_or(now);
        let done_at = self.done_at.unwrap_or(now);
        Metrics {
            total: done_at - self.received_at,
            load: self.loaded_at - self.received_at,
            prompt_eval_count: self.prompt_eval_count,
            prompt_eval: prompt_done_at - self.started_at,
            eval_count: self.generated,
            eval: done_at - prompt_done_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_below_the_reply_length_cuts_it() {
        assert_eq!(reply_length(32, None), (32, DoneReason::Stop));
        assert_eq!(reply_length(32, Some(5)), (5, DoneReason::Length));
        assert_eq!(reply_length(32, Some(32)), (32, DoneReason::Stop));
        assert_eq!(reply_length(32, Some(-1)), (32, DoneReason::Stop));
        assert_eq!(reply_length(32, Some(0)), (32, DoneReason::Stop));
    }

    #[test]
    fn prompt_tokens_follow_the_documented_estimate() {
        assert_eq!(prompt_tokens(["Why is the sky blue?"]), 4 + 5);
        assert_eq!(
            prompt_tokens(["", "abcd", "abcde"]),
            (4 + 1) + (4 + 1) + (4 + 2)
        );
    }

    fn texts(parts: &[(&str, bool)]) -> Vec<PromptText> {
        parts
            .iter()
            .map(|&(text, system)| PromptText {
                text: text.to_owned(),
                system,
            })
            .collect()
    }

    #[test]
    fn prompts_are_fitted_like_ollama() {
        let long = "x".repeat(400); // 4 + 100 tokens
        let msgs = texts(&[("sys", true), (&long, false), (&long, false), ("hi", false)]);
        let fit = PromptFit::default();
        // Everything fits: 5 + 104 + 104 + 5.
        assert_eq!(fit_prompt(&msgs, 4096, fit), Ok(218));
        // chatPrompt drops the oldest user messages but keeps the system one.
        assert_eq!(fit_prompt(&msgs, 150, fit), Ok(5 + 104 + 5));
        assert_eq!(fit_prompt(&msgs, 100, fit), Ok(5 + 5));
        // A last message alone over the context is cut by the runner.
        let one = texts(&[(&"y".repeat(4000), false)]); // 1004 tokens
        assert_eq!(fit_prompt(&one, 512, fit), Ok(512 - (512 - 5) / 2));
        let no_shift = PromptFit {
            shift: false,
            ..fit
        };
        assert_eq!(fit_prompt(&one, 512, no_shift), Err(PromptTooLong::NoShift));
        let refuse = PromptFit {
            truncate: false,
            ..fit
        };
        assert_eq!(
            fit_prompt(&msgs, 150, refuse),
            Err(PromptTooLong::Refused {
                tokens: 218,
                context: 150
            })
        );
        assert_eq!(
            PromptTooLong::Refused {
                tokens: 218,
                context: 150
            }
            .message(),
            r#"{"error":{"code":400,"message":"request (218 tokens) exceeds the available context size (150 tokens), try increasing it","type":"exceed_context_size_error","n_prompt_tokens":218,"n_ctx":150}}"#
        );
        assert_eq!(fit_prompt(&[], 4096, fit), Ok(0));
    }

    #[tokio::test]
    async fn thinking_comes_first_and_tool_calls_replace_the_answer() {
        let timing = Timing {
            load: Duration::ZERO,
            first_token: Duration::ZERO,
            token_interval: Duration::ZERO,
            tokens_per_reply: 4,
        };
        let now = Instant::now();
        let phases = Phases {
            received_at: now,
            loaded_at: now,
            started_at: now,
        };
        let shape = ReplyShape {
            thinking: 2,
            tool_calls: 2,
        };
        let mut generation = Generation::new(timing, None, 1, phases, shape);
        let mut pieces = Vec::new();
        while let Some(piece) = generation.next_token().await {
            pieces.push(piece);
        }
        assert_eq!(
            pieces,
            [
                Piece::Thinking("Okay"),
                Piece::Thinking(","),
                Piece::ToolCall(0),
                Piece::ToolCall(1)
            ]
        );
        let m = generation.metrics();
        assert_eq!(m.eval_count, 2 + 2 * TOOL_CALL_TOKENS);
        assert_eq!(generation.done_reason(), DoneReason::Stop);
        // num_predict counts thinking tokens too.
        let mut cut = Generation::new(timing, Some(3), 1, phases, shape);
        while cut.next_token().await.is_some() {}
        assert_eq!(
            (cut.metrics().eval_count, cut.done_reason()),
            (3, DoneReason::Length)
        );
    }

    #[test]
    fn reply_text_is_the_tokens_in_order() {
        assert_eq!(reply_text(4), "The sky appears blue");
        assert_eq!(token_text(WORDS.len() as u32), "The");
    }

    #[tokio::test]
    async fn metrics_agree_with_the_delays() {
        let timing = Timing {
            load: Duration::ZERO,
            first_token: Duration::from_millis(30),
            token_interval: Duration::from_millis(10),
            tokens_per_reply: 4,
        };
        let received = Instant::now();
        let phases = Phases {
            received_at: received,
            loaded_at: received,
            started_at: received,
        };
        let mut generation = Generation::new(timing, None, 9, phases, ReplyShape::default());
        let mut tokens = String::new();
        while let Some(Piece::Content(token)) = generation.next_token().await {
            tokens.push_str(token);
        }
        assert_eq!(tokens, "The sky appears blue");
        let m = generation.metrics();
        assert_eq!((m.eval_count, m.prompt_eval_count), (4, 9));
        assert!(m.prompt_eval >= Duration::from_millis(30), "{m:?}");
        // n tokens = (n - 1) intervals between them + the end-of-sequence step.
        assert!(m.eval >= Duration::from_millis(40), "{m:?}");
        assert!(m.eval < Duration::from_millis(40 + 50), "{m:?}");
        assert_eq!(m.total, m.load + m.prompt_eval + m.eval);
        assert!(generation.next_token().await.is_none());
    }
}
