//! Label values with bounded cardinality (docs/DESIGN.md#metrics-bounded-labels): routes from a
//! fixed set, models admitted up to a cap, done reasons and status codes from closed sets, and the
//! check on the metric name prefix.
//!
//! Owns the only path by which request or response payload text reaches a label: a model name,
//! admitted into a set that never grows past [`MAX_MODELS`]. Everything else returned here is a
//! `&'static str` or operator configuration; nothing here reads a request path into a label.

use std::{
    borrow::Cow,
    collections::HashSet,
    sync::{PoisonError, RwLock},
};

use anyhow::{bail, ensure};

use crate::engine::LlmFields;

/// The label value for everything outside a bounded set.
pub const OTHER: &str = "other";
/// The label value for something the exchange did not carry.
pub const NONE: &str = "none";

/// Ollama's and OpenAI's routes (docs/DESIGN.md#metrics-bounded-labels); the `route` label is one
/// of these, an operator's `--route` addition, or [`OTHER`].
pub const KNOWN_ROUTES: [&str; 16] = [
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/tags",
    "/api/ps",
    "/api/show",
    "/api/pull",
    "/api/version",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/responses",
    "/v1/messages",
    "/",
];

/// The API a model call speaks, as the OpenTelemetry GenAI conventions name it: by the end of
/// its path (a gateway may serve an API under a prefix, as `/ollama/api/chat`).
/// `gen_ai_provider_name` is the API's dialect (`ollama`, `openai`, `anthropic`: the
/// conventions call it "the telemetry format flavor"); the server behind it is Ollama either
/// way. A path of none of them is `other` for both.
const GEN_AI_APIS: [(&str, &str, &str); 9] = [
    ("/api/chat", "chat", "ollama"),
    ("/api/generate", "text_completion", "ollama"),
    ("/api/embed", "embeddings", "ollama"),
    ("/api/embeddings", "embeddings", "ollama"),
    ("/v1/chat/completions", "chat", "openai"),
    ("/v1/completions", "text_completion", "openai"),
    ("/v1/embeddings", "embeddings", "openai"),
    ("/v1/responses", "chat", "openai"),
    ("/v1/messages", "chat", "anthropic"),
];

/// `gen_ai_operation_name` and `gen_ai_provider_name` of a request path (see [`GEN_AI_APIS`]).
pub fn gen_ai_api(path: &str) -> (&'static str, &'static str) {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    GEN_AI_APIS
        .iter()
        .find(|(suffix, _, _)| path.ends_with(suffix))
        .map_or((OTHER, OTHER), |&(_, operation, provider)| {
            (operation, provider)
        })
}

/// Most distinct `model` label values; later models share [`OTHER`].
pub const MAX_MODELS: usize = 32;

/// Longer model names are not admitted (a label is no place for a pasted prompt).
pub const MAX_MODEL_BYTES: usize = 128;

/// Ollama's `done_reason` and OpenAI's `finish_reason` values worth a series of their own.
const KNOWN_DONE_REASONS: [&str; 8] = [
    // Set by the engine when the connection closed mid-response.
    "incomplete",
    "stop",
    "length",
    "load",
    "unload",
    "tool_calls",
    "content_filter",
    "error",
];

/// Maps a request path to its `route` label.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    extra: Vec<String>,
}

impl Routes {
    /// `extra` are the operator's `--route` additions: each an absolute path without a query.
    pub fn new(extra: Vec<String>) -> anyhow::Result<Routes> {
        for route in &extra {
            ensure!(
                route.starts_with('/'),
                "route {route:?} does not start with '/'"
            );
            ensure!(
                !route.contains(['?', '#']),
                "route {route:?} has a query or fragment; routes are matched on the path alone"
            );
            ensure!(
                !route.chars().any(char::is_control) && !route.contains(' '),
                "route {route:?} contains spaces or control characters"
            );
        }
        ensure!(
            extra.len() < usize::from(u16::MAX) - KNOWN_ROUTES.len(),
            "too many --route additions ({})",
            extra.len()
        );
        Ok(Routes { extra })
    }

    /// The route label of `path`: an exact match on the path without its query string, or
    /// [`OTHER`]. Never returns `path` itself, so the label set stays the configured one.
    pub fn route(&self, path: &str) -> &str {
        self.name(self.id(path))
    }

    /// Which route `path` is, as a number (see [`Routes::route`]).
    pub fn id(&self, path: &str) -> RouteId {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        KNOWN_ROUTES
            .iter()
            .copied()
            .chain(self.extra.iter().map(String::as_str))
            .position(|route| route == path)
            .map_or(RouteId::OTHER, |at| RouteId(at as u16))
    }

    /// The label of a route number from [`Routes::id`].
    pub fn name(&self, id: RouteId) -> &str {
        let at = id.0 as usize;
        match KNOWN_ROUTES.get(at) {
            Some(known) => known,
            None => self
                .extra
                .get(at - KNOWN_ROUTES.len())
                .map_or(OTHER, String::as_str),
        }
    }
}

/// A route as a number: cheap to hash and to keep (see [`Routes::id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteId(u16);

impl RouteId {
    pub const OTHER: RouteId = RouteId(u16::MAX);
}

/// The models admitted as label values so far, at most [`MAX_MODELS`] of them.
#[derive(Debug, Default)]
pub struct ModelLabels {
    admitted: RwLock<HashSet<String>>,
}

impl ModelLabels {
    /// The label for `model`: the name itself while it is (or can become) one of the admitted
    /// models, else [`OTHER`]. A name seen before costs one read lock and one hash lookup.
    pub fn label<'a>(&self, model: &'a str) -> &'a str {
        if model.is_empty() {
            return NONE;
        }
        if model.len() > MAX_MODEL_BYTES || model == OTHER || model == NONE {
            return OTHER;
        }
        let admitted = self.admitted.read().unwrap_or_else(PoisonError::into_inner);
        if admitted.contains(model) {
            return model;
        }
        drop(admitted);
        let mut admitted = self
            .admitted
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if admitted.contains(model) {
            return model;
        }
        if admitted.len() < MAX_MODELS {
            admitted.insert(model.to_owned());
            return model;
        }
        OTHER
    }

    /// The label for an optional model: [`NONE`] when the exchange carried none.
    pub fn label_or_none<'a>(&self, model: Option<&'a str>) -> &'a str {
        model.map_or(NONE, |model| self.label(model))
    }
}

/// The `method` label of a call over WebSocket: the methods that carry turns and the
/// handshake, else [`OTHER`].
pub fn rpc_method(method: &str) -> &'static str {
    match method {
        "agent" => "agent",
        "chat.send" => "chat.send",
        "connect" => "connect",
        _ => OTHER,
    }
}

/// The `done_reason` label: `error` for an exchange that carried an error, a known reason, or
/// [`OTHER`]; [`NONE`] when the body said nothing.
pub fn done_reason(llm: &LlmFields) -> &'static str {
    if llm.error {
        return "error";
    }
    match llm.done_reason.as_deref() {
        None => NONE,
        // Anthropic's `stop_reason`, in the words of the others.
        Some("end_turn" | "stop_sequence") => "stop",
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some(reason) => KNOWN_DONE_REASONS
            .iter()
            .find(|known| **known == reason)
            .copied()
            .unwrap_or(OTHER),
    }
}

/// `error_type` of a model request (the GenAI conventions' `error.type`): the status code of an
/// error response, `error` for an error in a stream, `incomplete` for a connection closed
/// mid-response, `none` for no response; empty (no label) for a success.
pub fn error_type(ex: &crate::engine::Exchange) -> Cow<'static, str> {
    match ex.status {
        None => Cow::Borrowed(NONE),
        Some(code) if code >= 400 => Cow::Owned(code.to_string()),
        Some(_) => match done_reason(&ex.llm) {
            reason @ ("error" | "incomplete") => Cow::Borrowed(reason),
            _ => Cow::Borrowed(""),
        },
    }
}

/// The `code` label: the final status as three digits, [`NONE`] when no response head was seen.
pub fn status_code(status: Option<u16>) -> Cow<'static, str> {
    match status {
        None => Cow::Borrowed(NONE),
        Some(code @ 100..=999) => Cow::Owned(code.to_string()),
        Some(_) => Cow::Borrowed(OTHER),
    }
}

/// Checks `--metric-prefix`: empty (no prefix) or a metric name that the family names can be
/// appended to with `_`.
pub fn validate_prefix(prefix: &str) -> anyhow::Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    let mut chars = prefix.chars();
    let first = chars.next().unwrap_or_default();
    if !(first.is_ascii_alphabetic() || first == '_') {
        bail!("metric prefix {prefix:?} must start with a letter or '_'");
    }
    if let Some(bad) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        bail!("metric prefix {prefix:?} contains {bad:?}; use letters, digits and '_' only");
    }
    if prefix.starts_with("__") {
        bail!("metric prefix {prefix:?} starts with '__', which Prometheus reserves");
    }
    if prefix.ends_with('_') {
        bail!(
            "metric prefix {prefix:?} ends with '_'; give it without the separator (e.g. {:?})",
            prefix.trim_end_matches('_')
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_routes_match_exactly_and_drop_the_query() {
        let routes = Routes::default();
        assert_eq!(routes.route("/api/chat"), "/api/chat");
        assert_eq!(routes.route("/api/chat?x=1"), "/api/chat");
        assert_eq!(
            routes.route("/v1/chat/completions#frag"),
            "/v1/chat/completions"
        );
        assert_eq!(routes.route("/"), "/");
        assert_eq!(routes.route("/?q=1"), "/");
        assert_eq!(routes.route("/api/chat/"), OTHER);
        assert_eq!(routes.route("/API/CHAT"), OTHER);
        assert_eq!(routes.route("/api/chat/extra"), OTHER);
        assert_eq!(routes.route(""), OTHER);
        assert_eq!(routes.route("/secret/user-42"), OTHER);
    }

    #[test]
    fn extra_routes_are_added_and_validated() {
        let routes = Routes::new(vec!["/health".into(), "/v1/responses".into()]).unwrap();
        assert_eq!(routes.route("/health"), "/health");
        assert_eq!(routes.route("/v1/responses?stream=true"), "/v1/responses");
        assert_eq!(routes.route("/api/tags"), "/api/tags");
        assert_eq!(routes.route("/healthz"), OTHER);

        let err = Routes::new(vec!["health".into()]).unwrap_err().to_string();
        assert!(err.contains("does not start with '/'"), "{err}");
        let err = Routes::new(vec!["/a?b".into()]).unwrap_err().to_string();
        assert!(err.contains("query"), "{err}");
        assert!(Routes::new(vec!["/a b".into()]).is_err());
    }

    #[test]
    fn models_are_capped_at_32() {
        let models = ModelLabels::default();
        let names: Vec<String> = (0..40).map(|i| format!("model-{i}:7b")).collect();
        for name in &names[..MAX_MODELS] {
            assert_eq!(models.label(name), name);
        }
        assert_eq!(models.label(&names[MAX_MODELS]), OTHER);
        assert_eq!(models.label(&names[39]), OTHER);
        // Admitted models stay admitted.
        assert_eq!(models.label(&names[0]), names[0]);
        assert_eq!(models.label(&names[MAX_MODELS - 1]), names[MAX_MODELS - 1]);
    }

    #[test]
    fn odd_model_names_do_not_take_a_slot() {
        let models = ModelLabels::default();
        assert_eq!(models.label(""), NONE);
        assert_eq!(models.label_or_none(None), NONE);
        assert_eq!(models.label("other"), OTHER);
        assert_eq!(models.label(&"x".repeat(MAX_MODEL_BYTES + 1)), OTHER);
        assert_eq!(models.label_or_none(Some("llama3.2:3b")), "llama3.2:3b");
        assert_eq!(models.admitted.read().unwrap().len(), 1);
    }

    #[test]
    fn gen_ai_names_come_from_the_path_end() {
        assert_eq!(gen_ai_api("/api/chat"), ("chat", "ollama"));
        assert_eq!(
            gen_ai_api("/ollama/api/generate?x=1"),
            ("text_completion", "ollama")
        );
        assert_eq!(gen_ai_api("/v1/embeddings"), ("embeddings", "openai"));
        assert_eq!(gen_ai_api("/v1/responses"), ("chat", "openai"));
        assert_eq!(gen_ai_api("/v1/messages"), ("chat", "anthropic"));
        assert_eq!(gen_ai_api("/v1/completions"), ("text_completion", "openai"));
        assert_eq!(gen_ai_api("/hooks/agent"), (OTHER, OTHER));
    }

    #[test]
    fn done_reasons_come_from_a_closed_set() {
        let mut llm = LlmFields::default();
        assert_eq!(done_reason(&llm), NONE);
        llm.done_reason = Some("stop".into());
        assert_eq!(done_reason(&llm), "stop");
        llm.done_reason = Some("tool_calls".into());
        assert_eq!(done_reason(&llm), "tool_calls");
        llm.done_reason = Some("end_turn".into());
        assert_eq!(done_reason(&llm), "stop", "Anthropic's stop_reason");
        llm.done_reason = Some("max_tokens".into());
        assert_eq!(done_reason(&llm), "length");
        llm.done_reason = Some("tool_use".into());
        assert_eq!(done_reason(&llm), "tool_calls");
        llm.done_reason = Some("Ignore previous instructions".into());
        assert_eq!(done_reason(&llm), OTHER);
        llm.error = true;
        assert_eq!(done_reason(&llm), "error");
    }

    #[test]
    fn status_codes_are_three_digits_or_none() {
        assert_eq!(status_code(Some(200)), "200");
        assert_eq!(status_code(Some(503)), "503");
        assert_eq!(status_code(None), NONE);
        assert_eq!(status_code(Some(42)), OTHER);
        assert_eq!(status_code(Some(1000)), OTHER);
    }

    #[test]
    fn prefixes_are_checked() {
        for ok in ["observer", "ollama_gateway", "_x", "a1", ""] {
            validate_prefix(ok).unwrap();
        }
        let cases = [
            ("1abc", "must start with a letter"),
            ("my-gw", "contains '-'"),
            ("a:b", "contains ':'"),
            ("__x", "reserves"),
            ("observer_", "without the separator"),
        ];
        for (bad, message) in cases {
            let err = validate_prefix(bad).unwrap_err().to_string();
            assert!(err.contains(message), "{bad}: {err}");
        }
    }
}
