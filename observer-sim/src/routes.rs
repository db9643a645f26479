//! Routing one request the way Ollama's gin router does, and the error replies shared by the
//! handlers.
//!
//! Known path with another method → 405 with `Allow` (Ollama sets `HandleMethodNotAllowed`);
//! unknown path → gin's plain-text 404. Paths are matched exactly, without the query string.
//! A forced or rolled status fault is answered here, in the error shape of the route's API.
//! Routes Ollama has but the simulator does not implement (`/api/show`, `/api/pull`, …)
//! answer 404 like an unknown path.

use std::time::Instant;

use super::faults::FaultPlan;
use super::generation::Timing;
use super::gojson;
use super::request::Request;
use super::response::{ResponseWriter, WriteError, status_text};
use super::server::SimState;
use super::{anthropic, completions, embed, listing, ollama, openai, responses};

/// The routes the simulator answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Root,
    Version,
    Tags,
    Ps,
    Generate,
    Chat,
    ChatCompletions,
    Models,
    Embed,
    Embeddings,
    OpenAiEmbeddings,
    Completions,
    Messages,
    Responses,
}

/// Ollama's routes for these paths, in registration order (which orders `Allow`).
const TABLE: &[(&str, &str, Route)] = &[
    ("HEAD", "/", Route::Root),
    ("GET", "/", Route::Root),
    ("HEAD", "/api/version", Route::Version),
    ("GET", "/api/version", Route::Version),
    ("HEAD", "/api/tags", Route::Tags),
    ("GET", "/api/tags", Route::Tags),
    ("GET", "/api/ps", Route::Ps),
    ("POST", "/api/generate", Route::Generate),
    ("POST", "/api/chat", Route::Chat),
    ("POST", "/api/embed", Route::Embed),
    ("POST", "/api/embeddings", Route::Embeddings),
    ("POST", "/v1/chat/completions", Route::ChatCompletions),
    ("POST", "/v1/completions", Route::Completions),
    ("POST", "/v1/embeddings", Route::OpenAiEmbeddings),
    ("POST", "/v1/responses", Route::Responses),
    ("POST", "/v1/messages", Route::Messages),
    ("GET", "/v1/models", Route::Models),
];

/// gin keeps one tree per method in the order methods were first registered by Ollama.
const METHOD_ORDER: &[&str] = &["HEAD", "GET", "POST", "DELETE"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Found(Route),
    /// The path exists for these methods (the `Allow` value).
    MethodNotAllowed(String),
    NotFound,
}

pub fn resolve(method: &str, path: &str) -> Resolution {
    if let Some(&(_, _, route)) = TABLE.iter().find(|(m, p, _)| *m == method && *p == path) {
        return Resolution::Found(route);
    }
    let allowed: Vec<&str> = METHOD_ORDER
        .iter()
        .copied()
        .filter(|m| TABLE.iter().any(|(tm, tp, _)| tm == m && *tp == path))
        .collect();
    if allowed.is_empty() {
        Resolution::NotFound
    } else {
        Resolution::MethodNotAllowed(allowed.join(", "))
    }
}

impl Route {
    /// Inference routes are the ones rolled faults and timing apply to.
    pub fn is_inference(self) -> bool {
        matches!(
            self,
            Self::Generate
                | Self::Chat
                | Self::ChatCompletions
                | Self::Embed
                | Self::Embeddings
                | Self::OpenAiEmbeddings
                | Self::Completions
                | Self::Messages
                | Self::Responses
        )
    }

    fn is_openai(self) -> bool {
        matches!(
            self,
            Self::ChatCompletions
                | Self::Models
                | Self::OpenAiEmbeddings
                | Self::Completions
                | Self::Responses
        )
    }
}

/// One request in the hands of a handler.
pub struct Exchange<'a> {
    pub sim: &'a SimState,
    pub request: &'a Request,
    pub plan: &'a FaultPlan,
    /// When the whole request had arrived (Ollama's `checkpointStart`).
    pub received_at: Instant,
}

impl Exchange<'_> {
    /// The configured timing with this request's overrides.
    pub fn timing(&self) -> Timing {
        let base = self.sim.config.timing;
        Timing {
            load: self.plan.load.unwrap_or(base.load),
            first_token: self.plan.first_token.unwrap_or(base.first_token),
            token_interval: self.plan.token_interval.unwrap_or(base.token_interval),
            tokens_per_reply: self.plan.tokens.unwrap_or(base.tokens_per_reply),
        }
    }
}

/// Text of Ollama's errors for a status fault.
pub fn fault_message(status: u16) -> String {
    match status {
        500 => MODEL_RUNNER_STOPPED.to_owned(),
        503 => "server busy, please try again.  maximum pending requests exceeded".to_owned(),
        499 => "request canceled".to_owned(),
        other => format!(
            "simulated fault: {}",
            status_text(other).map_or_else(|| format!("status {other}"), str::to_ascii_lowercase)
        ),
    }
}

/// Ollama's error when the runner process dies (llm/llama_server.go).
pub const MODEL_RUNNER_STOPPED: &str = "model runner has unexpectedly stopped, this may be due to resource limitations or an internal error, check ollama server logs for details";

/// Ollama's error when the runner's stream breaks mid-generation (llm/llama_server.go).
pub const MID_STREAM_ERROR: &str =
    "an error was encountered while running the model: unexpected EOF";

/// gin's `c.JSON(status, gin.H{"error": message})`.
pub async fn native_error(
    w: &mut ResponseWriter<'_>,
    status: u16,
    message: &str,
) -> Result<(), WriteError> {
    let body = gojson::marshal(&serde_json::json!({ "error": message }));
    w.send(status, &[("Content-Type", JSON_UTF8.to_owned())], &body)
        .await
}

/// Content type gin's `c.JSON` sets.
pub const JSON_UTF8: &str = "application/json; charset=utf-8";

/// Answers one request. The transport faults (hang, reset, slow head) are applied by the
/// caller and the writer.
pub async fn respond(ex: &Exchange<'_>, w: &mut ResponseWriter<'_>) -> Result<(), WriteError> {
    let route = match resolve(&ex.request.method, &ex.request.path) {
        Resolution::Found(route) => route,
        Resolution::MethodNotAllowed(allow) => {
            let headers = [("Allow", allow), ("Content-Type", "text/plain".to_owned())];
            return w.send(405, &headers, b"405 method not allowed").await;
        }
        Resolution::NotFound => {
            let headers = [("Content-Type", "text/plain".to_owned())];
            return w.send(404, &headers, b"404 page not found").await;
        }
    };
    if let Some(status) = ex.plan.status {
        let message = fault_message(status);
        return if route.is_openai() {
            openai::handler_error(w, status, &message).await
        } else if route == Route::Messages {
            anthropic::fault_error(ex, w, status, &message).await
        } else {
            native_error(w, status, &message).await
        };
    }
    match route {
        Route::Root => {
            let headers = [("Content-Type", "text/plain; charset=utf-8".to_owned())];
            w.send(200, &headers, b"Ollama is running").await
        }
        Route::Version => listing::version(ex, w).await,
        Route::Tags => listing::tags(ex, w).await,
        Route::Ps => listing::ps(ex, w).await,
        Route::Generate => ollama::generate(ex, w).await,
        Route::Chat => ollama::chat(ex, w).await,
        Route::ChatCompletions => openai::chat_completions(ex, w).await,
        Route::Models => listing::openai_models(ex, w).await,
        Route::Embed => embed::embed(ex, w).await,
        Route::Embeddings => embed::embeddings(ex, w).await,
        Route::OpenAiEmbeddings => embed::openai_embeddings(ex, w).await,
        Route::Completions => completions::completions(ex, w).await,
        Route::Messages => anthropic::messages(ex, w).await,
        Route::Responses => responses::responses(ex, w).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_gin_with_method_not_allowed() {
        assert_eq!(resolve("POST", "/api/chat"), Resolution::Found(Route::Chat));
        assert_eq!(resolve("HEAD", "/"), Resolution::Found(Route::Root));
        assert_eq!(
            resolve("GET", "/api/chat"),
            Resolution::MethodNotAllowed("POST".into())
        );
        assert_eq!(
            resolve("POST", "/api/tags"),
            Resolution::MethodNotAllowed("HEAD, GET".into())
        );
        assert_eq!(
            resolve("DELETE", "/"),
            Resolution::MethodNotAllowed("HEAD, GET".into())
        );
        assert_eq!(resolve("GET", "/api/nope"), Resolution::NotFound);
        assert_eq!(resolve("GET", "/api/tags/"), Resolution::NotFound);
    }

    #[test]
    fn fault_messages_are_ollamas() {
        assert!(fault_message(500).starts_with("model runner has unexpectedly stopped"));
        assert_eq!(
            fault_message(503),
            "server busy, please try again.  maximum pending requests exceeded"
        );
        assert_eq!(fault_message(502), "simulated fault: bad gateway");
    }
}
