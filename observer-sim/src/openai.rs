//! Ollama's OpenAI-compatible chat: `/v1/chat/completions` (SSE stream or one
//! `chat.completion`), and the OpenAI error shape shared with `/v1/models`.
//!
//! Shapes follow `openai/openai.go` (`ChatCompletionChunk`, `ChatCompletion`, `Usage`,
//! `ErrorResponse`) and the writers of `middleware/openai.go`: a role on the first delta only,
//! a separate finish chunk with an empty delta, a usage chunk with empty `choices` when
//! `stream_options.include_usage` is set, then `data: [DONE]`. The middleware has no error
//! event: a mid-stream `{"error":…}` from the chat handler is rewritten into an empty-content
//! chunk with an empty `model`, and the stream just ends (no finish chunk, no `[DONE]`).

use std::time::SystemTime;

use serde::Serialize;

use super::generation::{DoneReason, Metrics, Piece};
use super::gojson;
use super::inference_request::{InferenceRequest, parse_chat_completion};
use super::response::{ResponseWriter, WriteError};
use super::routes::{Exchange, JSON_UTF8, MID_STREAM_ERROR};
use super::runner::{self, Run, ToolCall};
use crate::wallclock::unix_seconds;

pub const FINGERPRINT: &str = "fp_ollama";

/// `openai.Error`.
#[derive(Debug, Serialize)]
pub struct ErrorJson<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<()>,
    code: Option<()>,
}

#[derive(Debug, Serialize)]
pub struct ErrorResponseJson<'a> {
    error: ErrorJson<'a>,
}

/// `openai.NewError`.
pub fn error_json(status: u16, message: &str) -> ErrorResponseJson<'_> {
    let kind = match status {
        400 => "invalid_request_error",
        404 => "not_found_error",
        _ => "api_error",
    };
    ErrorResponseJson {
        error: ErrorJson {
            message,
            kind,
            param: None,
            code: None,
        },
    }
}

/// An error from the wrapped Ollama handler, as the middleware's `writeError` rewrites it:
/// `Content-Type: application/json` and `Encode`'s trailing newline.
pub async fn handler_error(
    w: &mut ResponseWriter<'_>,
    status: u16,
    message: &str,
) -> Result<(), WriteError> {
    send_encoded(w, status, &error_json(status, message)).await
}

/// How Ollama's OpenAI middleware writes a body: `json.NewEncoder(w).Encode(v)` (a trailing
/// newline) with a plain `application/json` content type.
pub async fn send_encoded<T: serde::Serialize>(
    w: &mut ResponseWriter<'_>,
    status: u16,
    value: &T,
) -> Result<(), WriteError> {
    let body = gojson::encode_line(value);
    w.send(
        status,
        &[("Content-Type", "application/json".to_owned())],
        &body,
    )
    .await
}

/// An error from the middleware itself (`c.AbortWithStatusJSON`): gin's JSON, no newline.
pub async fn middleware_error(
    w: &mut ResponseWriter<'_>,
    status: u16,
    message: &str,
) -> Result<(), WriteError> {
    let body = gojson::marshal(&error_json(status, message));
    w.send(status, &[("Content-Type", JSON_UTF8.to_owned())], &body)
        .await
}

/// `openai.Usage`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct UsageJson {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl From<Metrics> for UsageJson {
    fn from(m: Metrics) -> Self {
        Self {
            prompt_tokens: m.prompt_eval_count,
            completion_tokens: m.eval_count,
            total_tokens: m.prompt_eval_count + m.eval_count,
        }
    }
}

/// `openai.Delta` (`content` is `any`: nil is dropped, `""` kept).
#[derive(Debug, Default, Serialize)]
struct DeltaJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    reasoning: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallJson>,
}

/// `openai.ToolCall`: the arguments as a JSON text (`ToToolCalls`).
#[derive(Debug, Serialize)]
pub struct ToolCallJson {
    id: String,
    index: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionJson,
}

#[derive(Debug, Serialize)]
struct FunctionJson {
    name: String,
    arguments: String,
}

impl ToolCallJson {
    /// The call's id, function name and arguments (JSON text).
    pub fn parts(&self) -> (&str, &str, &str) {
        (&self.id, &self.function.name, &self.function.arguments)
    }
}

impl From<ToolCall> for ToolCallJson {
    fn from(call: ToolCall) -> Self {
        let arguments = gojson::marshal(&call.arguments);
        Self {
            id: call.id,
            index: call.index,
            kind: "function",
            function: FunctionJson {
                name: call.name,
                arguments: String::from_utf8_lossy(&arguments).into_owned(),
            },
        }
    }
}

#[derive(Debug, Serialize)]
struct ChunkChoiceJson<'a> {
    index: u32,
    delta: DeltaJson<'a>,
    finish_reason: Option<&'a str>,
}

/// `openai.ChatCompletionChunk`.
#[derive(Debug, Serialize)]
struct ChunkJson<'a> {
    id: &'a str,
    object: &'a str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'a str,
    choices: Vec<ChunkChoiceJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageJson>,
}

/// `openai.Message` of a reply.
#[derive(Debug, Serialize)]
struct ChoiceMessageJson<'a> {
    role: &'a str,
    content: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    reasoning: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallJson>,
}

#[derive(Debug, Serialize)]
struct ChoiceJson<'a> {
    index: u32,
    message: ChoiceMessageJson<'a>,
    finish_reason: Option<&'a str>,
}

/// `openai.ChatCompletion` (Go's `omitempty` does not drop a struct, so `usage` is always there).
#[derive(Debug, Serialize)]
struct CompletionJson<'a> {
    id: &'a str,
    object: &'a str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'a str,
    choices: [ChoiceJson<'a>; 1],
    usage: UsageJson,
}

/// `FinishChunk` and `ToChatCompletion`: `stop` becomes `tool_calls` once a call was sent.
fn finish_reason(reason: DoneReason, tool_called: bool) -> &'static str {
    match reason {
        DoneReason::Stop if tool_called => "tool_calls",
        other => other.as_str(),
    }
}

/// One SSE event as the middleware writes it.
fn sse(chunk: &ChunkJson<'_>) -> Vec<u8> {
    [b"data: ".as_slice(), &gojson::marshal(chunk), b"\n\n"].concat()
}

/// A content chunk; `role` only on the stream's first.
fn content_chunk<'a>(
    id: &'a str,
    created: u64,
    model: &'a str,
    content: &'a str,
    first: bool,
) -> ChunkJson<'a> {
    let delta = DeltaJson {
        content: Some(content),
        ..DeltaJson::default()
    };
    delta_chunk(id, created, model, delta, first)
}

/// A chunk of one delta (`toChunk`); `role` only on the stream's first.
fn delta_chunk<'a>(
    id: &'a str,
    created: u64,
    model: &'a str,
    delta: DeltaJson<'a>,
    first: bool,
) -> ChunkJson<'a> {
    ChunkJson {
        id,
        object: "chat.completion.chunk",
        created,
        model,
        system_fingerprint: FINGERPRINT,
        choices: vec![ChunkChoiceJson {
            index: 0,
            delta: DeltaJson {
                role: first.then_some("assistant"),
                ..delta
            },
            finish_reason: None,
        }],
        usage: None,
    }
}

/// The delta of one piece: thinking is `reasoning` (with `content: ""`), a tool call comes
/// whole in `tool_calls`.
fn piece_delta(ex: &Exchange<'_>, req: &InferenceRequest, piece: Piece) -> DeltaJson<'static> {
    match piece {
        Piece::Thinking(reasoning) => DeltaJson {
            content: Some(""),
            reasoning,
            ..DeltaJson::default()
        },
        Piece::Content(content) => DeltaJson {
            content: Some(content),
            ..DeltaJson::default()
        },
        Piece::ToolCall(index) => DeltaJson {
            content: Some(""),
            tool_calls: vec![runner::tool_call(ex, req, index).into()],
            ..DeltaJson::default()
        },
    }
}

pub async fn chat_completions(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
) -> Result<(), WriteError> {
    let req = match parse_chat_completion(&ex.request.body) {
        Ok(req) => req,
        Err(err) => return middleware_error(w, 400, &err.to_string()).await,
    };
    if req.messages == 0 {
        return middleware_error(w, 400, "[] is too short - 'messages'").await;
    }
    if req.model.trim().is_empty() {
        return handler_error(w, 400, "model is required").await;
    }
    let (loaded, shape) = match runner::admit(ex, &req, false).await {
        Ok(admitted) => admitted,
        Err(refusal) => return handler_error(w, refusal.status, &refusal.message).await,
    };
    let id = format!("chatcmpl-{}", ex.sim.roll_below(999));
    let mut run = match loaded.start(ex, w, &req, shape).await? {
        Ok(run) => run,
        Err(too_long) if req.stream => return stream_error(w, 400, &too_long.message()).await,
        Err(too_long) => return handler_error(w, 400, &too_long.message()).await,
    };
    let result = if req.stream {
        stream(ex, w, &req, &id, &mut run).await
    } else {
        whole(ex, w, &req, &id, &mut run).await
    };
    run.finish(ex, &req.model, &result);
    result
}

/// An error before any streamed content: the handler's error status goes out through the
/// middleware's `writeError`, flushed by the handler's stream.
pub async fn stream_error(
    w: &mut ResponseWriter<'_>,
    status: u16,
    message: &str,
) -> Result<(), WriteError> {
    w.begin_stream(status, "application/json");
    w.chunk(&gojson::encode_line(&error_json(status, message)))
        .await?;
    w.finish().await
}

async fn stream(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    req: &InferenceRequest,
    id: &str,
    run: &mut Run<'_>,
) -> Result<(), WriteError> {
    w.begin_stream(200, "text/event-stream");
    // Every chunk carries the timestamp of the first response.
    let mut created = None;
    let mut tool_call_sent = false;
    loop {
        let token = run.next_token(w).await?;
        let sent = run.sent_before(token);
        let created = *created.get_or_insert_with(|| unix_seconds(SystemTime::now()));
        if ex.plan.error_after == Some(sent) {
            if sent == 0 {
                // Nothing written yet: the error goes out as a 500 through writeError.
                return stream_error(w, 500, MID_STREAM_ERROR).await;
            } else {
                w.chunk(&sse(&content_chunk(id, created, "", "", false)))
                    .await?;
            }
            return w.finish().await;
        }
        let Some(piece) = token else { break };
        tool_call_sent |= matches!(piece, Piece::ToolCall(_));
        let delta = piece_delta(ex, req, piece);
        w.chunk(&sse(&delta_chunk(
            id,
            created,
            &req.model,
            delta,
            sent == 0,
        )))
        .await?;
    }
    // The final Ollama message becomes the finish chunk, the usage chunk and [DONE], written
    // together and flushed once. An empty reply still opens with a role chunk.
    let generation = &run.generation;
    let created = created.unwrap_or_default();
    let mut tail = Vec::new();
    if generation.emitted() == 0 {
        tail.extend(sse(&content_chunk(id, created, &req.model, "", true)));
    }
    let mut finish = ChunkJson {
        id,
        object: "chat.completion.chunk",
        created,
        model: &req.model,
        system_fingerprint: FINGERPRINT,
        choices: vec![ChunkChoiceJson {
            index: 0,
            delta: DeltaJson::default(),
            finish_reason: Some(finish_reason(generation.done_reason(), tool_call_sent)),
        }],
        usage: None,
    };
    tail.extend(sse(&finish));
    if req.include_usage {
        finish.choices.clear();
        finish.usage = Some(generation.metrics().into());
        tail.extend(sse(&finish));
    }
    tail.extend_from_slice(b"data: [DONE]\n\n");
    w.chunk(&tail).await?;
    w.finish().await
}

async fn whole(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    req: &InferenceRequest,
    id: &str,
    run: &mut Run<'_>,
) -> Result<(), WriteError> {
    let Some(reply) = run.whole_reply(w, ex.plan.error_after).await? else {
        return handler_error(w, 500, MID_STREAM_ERROR).await;
    };
    let generation = &run.generation;
    let tool_calls: Vec<ToolCallJson> = reply
        .tool_calls
        .iter()
        .map(|&index| runner::tool_call(ex, req, index).into())
        .collect();
    let completion = CompletionJson {
        id,
        object: "chat.completion",
        created: unix_seconds(SystemTime::now()),
        model: &req.model,
        system_fingerprint: FINGERPRINT,
        choices: [ChoiceJson {
            index: 0,
            finish_reason: Some(finish_reason(
                generation.done_reason(),
                !tool_calls.is_empty(),
            )),
            message: ChoiceMessageJson {
                role: "assistant",
                content: &reply.content,
                reasoning: &reply.thinking,
                tool_calls,
            },
        }],
        usage: generation.metrics().into(),
    };
    send_encoded(w, 200, &completion).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_match_the_middleware_output() {
        assert_eq!(
            String::from_utf8(sse(&content_chunk(
                "chatcmpl-7",
                1_700_000_000,
                "m",
                "Hi",
                true
            )))
            .unwrap(),
            "data: {\"id\":\"chatcmpl-7\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"m\",\
             \"system_fingerprint\":\"fp_ollama\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\
             \"finish_reason\":null}]}\n\n"
        );
    }

    #[test]
    fn errors_use_openai_shape() {
        assert_eq!(
            String::from_utf8(gojson::encode_line(&error_json(404, "model 'x' not found")))
                .unwrap(),
            "{\"error\":{\"message\":\"model 'x' not found\",\"type\":\"not_found_error\",\"param\":null,\"code\":null}}\n"
        );
        assert_eq!(error_json(500, "x").error.kind, "api_error");
        assert_eq!(error_json(400, "x").error.kind, "invalid_request_error");
    }
}
