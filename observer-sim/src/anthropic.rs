//! Ollama's Anthropic-compatible API: `/v1/messages` (SSE events or one `message`), Ollama's
//! `AnthropicMessagesMiddleware` in front of the chat handler.
//!
//! From Ollama v0.32.15 (`anthropic/anthropic.go`: `MessagesRequest`, `MessagesResponse`,
//! `ContentBlock`, the event types, `StreamConverter.Process`, `ToMessagesResponse`,
//! `mapStopReason`, `NewError`, `EstimateInputTokens`; `middleware/anthropic.go`:
//! `AnthropicWriter`, `writeSSE`): the middleware refuses a body without `model`, with
//! `max_tokens` ≤ 0 or without `messages` (400); a streamed request gets `Cache-Control:
//! no-cache` and `Connection: keep-alive` too, and every event is `event: T\ndata: {…}\n\n`,
//! flushed on its own. The stream opens with `message_start` (its `input_tokens` is the
//! middleware's estimate, ⌊characters/4⌋, as the first chat line has no counts), then per
//! block `content_block_start`, `content_block_delta`s (`thinking_delta`, `text_delta`,
//! `input_json_delta` for a tool call's whole input), `content_block_stop`; then
//! `message_delta` with `stop_reason` (`end_turn`, `max_tokens`, `tool_use`) and the real
//! usage, and `message_stop`. Ids are `msg_` and 24 hex digits. `thinking: {"type":"enabled"}`
//! is `think: true`, which the middleware relaxes (no 400) on a model that cannot think.
//! Errors are `{"type":"error","error":{"type":…,"message":…},"request_id":"req_…"}`.

use serde::Serialize;
use serde_json::{Map, Value};

use super::generation::{Piece, PromptFit, PromptText};
use super::gojson::{self, DecodeError};
use super::inference_request::{InferenceRequest, tools_from};
use super::openai::send_encoded;
use super::response::{ResponseWriter, WriteError};
use super::routes::{Exchange, JSON_UTF8, MID_STREAM_ERROR};
use super::runner::{self, Run, ToolCall};

/// `anthropic.Error` in `anthropic.ErrorResponse`.
#[derive(Debug, Serialize)]
struct ErrorJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

#[derive(Debug, Serialize)]
struct ErrorResponseJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    error: ErrorJson<'a>,
    request_id: String,
}

/// `anthropic.NewError`.
fn error_json<'a>(ex: &Exchange<'_>, status: u16, message: &'a str) -> ErrorResponseJson<'a> {
    let kind = match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    };
    ErrorResponseJson {
        kind: "error",
        error: ErrorJson { kind, message },
        request_id: hex_id(ex, "req"),
    }
}

/// `generateID`: the prefix, `_` and 12 random bytes in hex.
fn hex_id(ex: &Exchange<'_>, prefix: &str) -> String {
    let bytes: String = (0..12)
        .map(|_| format!("{:02x}", ex.sim.roll_below(256)))
        .collect();
    format!("{prefix}_{bytes}")
}

/// The headers the middleware sets before the handler for a streamed request.
fn stream_headers(content_type: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Cache-Control", "no-cache".to_owned()),
        ("Connection", "keep-alive".to_owned()),
        ("Content-Type", content_type.to_owned()),
    ]
}

/// An error from the middleware itself (`c.AbortWithStatusJSON`): gin's JSON, no newline.
async fn middleware_error(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    status: u16,
    message: &str,
) -> Result<(), WriteError> {
    let body = gojson::marshal(&error_json(ex, status, message));
    w.send(status, &[("Content-Type", JSON_UTF8.to_owned())], &body)
        .await
}

/// An error from the chat handler, through `AnthropicWriter.writeError` (`Encode`).
async fn handler_error(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    req: &Messages,
    status: u16,
    message: &str,
) -> Result<(), WriteError> {
    let body = gojson::encode_line(&error_json(ex, status, message));
    if req.inner.stream {
        // Before any content a streamed error is the handler's status, flushed once.
        w.begin_stream_with(status, stream_headers("application/json"));
        w.chunk(&body).await?;
        return w.finish().await;
    }
    w.send(
        status,
        &[("Content-Type", "application/json".to_owned())],
        &body,
    )
    .await
}

/// A status fault on `/v1/messages`, as the chat handler's error through `writeError`.
pub async fn fault_error(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    status: u16,
    message: &str,
) -> Result<(), WriteError> {
    send_encoded(w, status, &error_json(ex, status, message)).await
}

/// A `/v1/messages` request: the chat request it becomes, and the middleware's estimate.
struct Messages {
    inner: InferenceRequest,
    estimated_input_tokens: u32,
}

/// Text of a `content` (a string or blocks) for the prompt, and the characters
/// `countAnyContent` counts in it.
fn content_text(content: Option<&Value>) -> (String, usize) {
    match content {
        Some(Value::String(s)) => (s.clone(), s.len()),
        Some(Value::Array(blocks)) => blocks.iter().fold((String::new(), 0), |(text, n), b| {
            let part = b
                .get("text")
                .or_else(|| b.get("thinking"))
                .and_then(Value::as_str);
            let counted = match b.get("type").and_then(Value::as_str) {
                Some("tool_use" | "tool_result") => gojson::marshal(b).len(),
                _ => part.map_or(0, str::len),
            };
            let inner = b.get("content").map(|c| content_text(Some(c)).0);
            let text = text + part.unwrap_or_default() + inner.as_deref().unwrap_or_default();
            (text, n + counted)
        }),
        _ => (String::new(), 0),
    }
}

/// `MessagesRequest` as the middleware checks it and `FromMessagesRequest` converts it.
fn parse(body: &[u8]) -> Result<Messages, String> {
    const T: &str = "MessagesRequest";
    let decode = |e: DecodeError| e.to_string();
    let obj = gojson::decode_object(body, "anthropic.MessagesRequest").map_err(decode)?;
    let model = gojson::opt_str(&obj, "model", &format!("{T}.model")).map_err(decode)?;
    let max_tokens =
        gojson::opt_int(&obj, "max_tokens", &format!("{T}.max_tokens")).map_err(decode)?;
    let messages = gojson::opt_array(
        &obj,
        "messages",
        &format!("{T}.messages"),
        "[]anthropic.MessageParam",
    )
    .map_err(decode)?;
    let stream = gojson::opt_bool(&obj, "stream", &format!("{T}.stream")).map_err(decode)?;
    let model = model.unwrap_or_default();
    if model.is_empty() {
        return Err("model is required".to_owned());
    }
    let max_tokens = max_tokens.unwrap_or(0);
    if max_tokens <= 0 {
        return Err("max_tokens is required and must be positive".to_owned());
    }
    if messages.is_empty() {
        return Err("messages is required".to_owned());
    }
    let (system, mut chars) = content_text(obj.get("system"));
    let mut texts: Vec<PromptText> = Vec::new();
    if !system.is_empty() {
        texts.push(PromptText {
            text: system,
            system: true,
        });
    }
    let mut last_has_tool_result = false;
    for message in messages {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let (text, counted) = content_text(message.get("content"));
        chars += role.len() + counted;
        texts.push(PromptText {
            text,
            system: false,
        });
        last_has_tool_result = message
            .get("content")
            .and_then(Value::as_array)
            .is_some_and(|b| {
                b.iter()
                    .any(|b| b.get("type") == Some(&Value::from("tool_result")))
            });
    }
    let tools: Vec<Value> = obj
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|t| {
            chars += ["name", "description"]
                .iter()
                .filter_map(|k| t.get(k).and_then(Value::as_str))
                .map(str::len)
                .sum::<usize>()
                + t.get("input_schema")
                    .map_or(0, |s| gojson::marshal(s).len());
            let mut function = Map::new();
            function.insert("name".into(), t.get("name").cloned().unwrap_or_default());
            if let Some(schema) = t.get("input_schema") {
                function.insert("parameters".into(), schema.clone());
            }
            serde_json::json!({ "type": "function", "function": function })
        })
        .collect();
    let think = match obj
        .get("thinking")
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
    {
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        _ => None,
    };
    let estimated = u32::try_from(chars / 4).unwrap_or(u32::MAX).max(1);
    Ok(Messages {
        inner: InferenceRequest {
            model: model.to_owned(),
            stream: stream.unwrap_or(false),
            limit: Some(max_tokens),
            messages: messages.len(),
            load_only: false,
            texts,
            num_ctx: None,
            fit: PromptFit::default(),
            raw: false,
            include_usage: false,
            think,
            tools: tools_from(&tools),
            after_tool_result: last_has_tool_result,
        },
        estimated_input_tokens: estimated,
    })
}

/// `anthropic.ContentBlock`, in its field order, for the blocks a reply has.
#[derive(Debug, Serialize)]
struct BlockJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<&'a Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<&'a str>,
}

impl<'a> BlockJson<'a> {
    fn text(text: &'a str) -> Self {
        Self {
            text: Some(text),
            ..Self::of("text")
        }
    }

    fn thinking(thinking: &'a str) -> Self {
        Self {
            thinking: Some(thinking),
            ..Self::of("thinking")
        }
    }

    fn tool_use(call: &'a ToolCall, input: &'a Map<String, Value>) -> Self {
        Self {
            id: &call.id,
            name: &call.name,
            input: Some(input),
            ..Self::of("tool_use")
        }
    }

    fn of(kind: &'a str) -> Self {
        Self {
            kind,
            text: None,
            id: "",
            name: "",
            input: None,
            thinking: None,
        }
    }
}

#[derive(Debug, Serialize)]
struct UsageJson {
    input_tokens: u32,
    output_tokens: u32,
}

/// `anthropic.MessagesResponse`.
#[derive(Debug, Serialize)]
struct MessageJson<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    role: &'a str,
    model: &'a str,
    content: Vec<BlockJson<'a>>,
    #[serde(skip_serializing_if = "str::is_empty")]
    stop_reason: &'a str,
    usage: UsageJson,
}

/// `message_start`.
#[derive(Debug, Serialize)]
struct MessageStartJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: MessageJson<'a>,
}

/// `content_block_start`.
#[derive(Debug, Serialize)]
struct BlockStartJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    index: u32,
    content_block: BlockJson<'a>,
}

/// `content_block_delta`.
#[derive(Debug, Serialize)]
struct BlockDeltaJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    index: u32,
    delta: DeltaJson<'a>,
}

/// `content_block_stop`, and `message_stop` without an index.
#[derive(Debug, Serialize)]
struct StopJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<u32>,
}

/// `message_delta`.
#[derive(Debug, Serialize)]
struct MessageDeltaJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    delta: StopReasonJson<'a>,
    usage: UsageJson,
}

#[derive(Debug, Serialize)]
struct StopReasonJson<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    stop_reason: &'a str,
}

/// `anthropic.Delta`.
#[derive(Debug, Serialize)]
struct DeltaJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    text: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    partial_json: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    thinking: &'a str,
}

/// `mapStopReason`.
fn stop_reason(done_reason: &str, tool_use: bool) -> &'static str {
    match done_reason {
        _ if tool_use => "tool_use",
        "stop" => "end_turn",
        "length" => "max_tokens",
        "" => "",
        _ => "stop_sequence",
    }
}

pub async fn messages(ex: &Exchange<'_>, w: &mut ResponseWriter<'_>) -> Result<(), WriteError> {
    let req = match parse(&ex.request.body) {
        Ok(req) => req,
        Err(message) => return middleware_error(ex, w, 400, &message).await,
    };
    let inner = &req.inner;
    // `relax_thinking`: thinking asked of a model that cannot think is dropped, not refused.
    let (loaded, shape) = match runner::admit(ex, inner, true).await {
        Ok(admitted) => admitted,
        Err(refusal) => {
            return handler_error(ex, w, &req, refusal.status, &refusal.message).await;
        }
    };
    let mut run = match loaded.start(ex, w, inner, shape).await? {
        Ok(run) => run,
        Err(too_long) => return handler_error(ex, w, &req, 400, &too_long.message()).await,
    };
    let id = hex_id(ex, "msg");
    let result = if inner.stream {
        stream(ex, w, &req, &id, &mut run).await
    } else {
        whole(ex, w, &req, &id, &mut run).await
    };
    run.finish(ex, &inner.model, &result);
    result
}

/// One event, flushed on its own (`writeSSE`).
async fn event<T: Serialize>(
    w: &mut ResponseWriter<'_>,
    name: &str,
    data: &T,
) -> Result<(), WriteError> {
    let line = [
        format!("event: {name}\ndata: ").as_bytes(),
        &gojson::marshal(data),
        b"\n\n",
    ]
    .concat();
    w.chunk(&line).await
}

/// Which content block is open in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Thinking,
    Text,
}

/// `StreamConverter.Process` over the reply's pieces.
async fn stream(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    req: &Messages,
    id: &str,
    run: &mut Run<'_>,
) -> Result<(), WriteError> {
    let inner = &req.inner;
    w.begin_stream_with(200, stream_headers("text/event-stream"));
    let mut index = 0u32;
    let mut open = Open::None;
    let mut tool_used = false;
    let mut started = false;
    loop {
        let token = run.next_token(w).await?;
        let sent = run.sent_before(token);
        if ex.plan.error_after == Some(sent) {
            if sent == 0 {
                return handler_error(ex, w, req, 500, MID_STREAM_ERROR).await;
            }
            // The error line converts to no event: the stream just ends.
            return w.finish().await;
        }
        if !started {
            started = true;
            let start = MessageStartJson {
                kind: "message_start",
                message: MessageJson {
                    id,
                    kind: "message",
                    role: "assistant",
                    model: &inner.model,
                    content: Vec::new(),
                    stop_reason: "",
                    usage: UsageJson {
                        input_tokens: req.estimated_input_tokens,
                        output_tokens: 0,
                    },
                },
            };
            event(w, "message_start", &start).await?;
        }
        let Some(piece) = token else { break };
        let (wanted, block, delta) = match piece {
            Piece::Thinking(thinking) => (
                Open::Thinking,
                BlockJson::thinking(""),
                DeltaJson {
                    kind: "thinking_delta",
                    text: "",
                    partial_json: "",
                    thinking,
                },
            ),
            Piece::Content(text) => (
                Open::Text,
                BlockJson::text(""),
                DeltaJson {
                    kind: "text_delta",
                    text,
                    partial_json: "",
                    thinking: "",
                },
            ),
            Piece::ToolCall(call_index) => {
                if open != Open::None {
                    stop_block(w, &mut index).await?;
                    open = Open::None;
                }
                tool_used = true;
                let call = runner::tool_call(ex, inner, call_index);
                tool_use_block(w, index, &call).await?;
                index += 1;
                continue;
            }
        };
        if open != wanted {
            if open != Open::None {
                stop_block(w, &mut index).await?;
            }
            open = wanted;
            let start = BlockStartJson {
                kind: "content_block_start",
                index,
                content_block: block,
            };
            event(w, "content_block_start", &start).await?;
        }
        let data = BlockDeltaJson {
            kind: "content_block_delta",
            index,
            delta,
        };
        event(w, "content_block_delta", &data).await?;
    }
    if open != Open::None {
        stop_block(w, &mut index).await?;
    }
    let generation = &run.generation;
    let metrics = generation.metrics();
    let reason = stop_reason(generation.done_reason().as_str(), tool_used);
    let delta = MessageDeltaJson {
        kind: "message_delta",
        delta: StopReasonJson {
            stop_reason: reason,
        },
        usage: UsageJson {
            input_tokens: metrics.prompt_eval_count,
            output_tokens: metrics.eval_count,
        },
    };
    event(w, "message_delta", &delta).await?;
    let stop = StopJson {
        kind: "message_stop",
        index: None,
    };
    event(w, "message_stop", &stop).await?;
    w.finish().await
}

async fn stop_block(w: &mut ResponseWriter<'_>, index: &mut u32) -> Result<(), WriteError> {
    block_stop(w, *index).await?;
    *index += 1;
    Ok(())
}

/// A tool call: its block opens with an empty input, gets the whole input as one
/// `input_json_delta`, and closes.
async fn tool_use_block(
    w: &mut ResponseWriter<'_>,
    index: u32,
    call: &ToolCall,
) -> Result<(), WriteError> {
    let empty = Map::new();
    let start = BlockStartJson {
        kind: "content_block_start",
        index,
        content_block: BlockJson::tool_use(call, &empty),
    };
    event(w, "content_block_start", &start).await?;
    let input = String::from_utf8_lossy(&gojson::marshal(&call.arguments)).into_owned();
    let delta = DeltaJson {
        kind: "input_json_delta",
        text: "",
        partial_json: &input,
        thinking: "",
    };
    let data = BlockDeltaJson {
        kind: "content_block_delta",
        index,
        delta,
    };
    event(w, "content_block_delta", &data).await?;
    block_stop(w, index).await
}

async fn block_stop(w: &mut ResponseWriter<'_>, index: u32) -> Result<(), WriteError> {
    let stop = StopJson {
        kind: "content_block_stop",
        index: Some(index),
    };
    event(w, "content_block_stop", &stop).await
}

/// `ToMessagesResponse`: thinking, text, tool uses, in that order.
async fn whole(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    req: &Messages,
    id: &str,
    run: &mut Run<'_>,
) -> Result<(), WriteError> {
    let inner = &req.inner;
    let Some(reply) = run.whole_reply(w, ex.plan.error_after).await? else {
        return handler_error(ex, w, req, 500, MID_STREAM_ERROR).await;
    };
    let calls: Vec<ToolCall> = reply
        .tool_calls
        .iter()
        .map(|&index| runner::tool_call(ex, inner, index))
        .collect();
    let mut content = Vec::new();
    if !reply.thinking.is_empty() {
        content.push(BlockJson::thinking(&reply.thinking));
    }
    if !reply.content.is_empty() {
        content.push(BlockJson::text(&reply.content));
    }
    content.extend(calls.iter().map(|c| BlockJson::tool_use(c, &c.arguments)));
    let generation = &run.generation;
    let metrics = generation.metrics();
    let message = MessageJson {
        id,
        kind: "message",
        role: "assistant",
        model: &inner.model,
        content,
        stop_reason: stop_reason(generation.done_reason().as_str(), !calls.is_empty()),
        usage: UsageJson {
            input_tokens: metrics.prompt_eval_count,
            output_tokens: metrics.eval_count,
        },
    };
    send_encoded(w, 200, &message).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_like_the_middleware() {
        assert_eq!(
            parse(br#"{"max_tokens":5}"#).err().unwrap(),
            "model is required"
        );
        assert_eq!(
            parse(br#"{"model":"m","messages":[]}"#).err().unwrap(),
            "max_tokens is required and must be positive"
        );
        assert_eq!(
            parse(br#"{"model":"m","max_tokens":5}"#).err().unwrap(),
            "messages is required"
        );
        let req = parse(
            br#"{"model":"m","max_tokens":5,"system":"be brief","messages":[{"role":"user","content":[{"type":"text","text":"hello there"}]}]}"#,
        )
        .unwrap();
        // (8 + 4 + 11) / 4
        assert_eq!(req.estimated_input_tokens, 5);
        assert_eq!(req.inner.limit, Some(5));
        assert!(req.inner.texts[0].system);
    }

    #[test]
    fn blocks_keep_the_go_field_order() {
        let mut input = Map::new();
        input.insert("city".into(), "sim".into());
        let call = ToolCall {
            id: "call_1".into(),
            index: 0,
            name: "get_weather".into(),
            arguments: input.clone(),
        };
        assert_eq!(
            gojson::marshal(&BlockJson::tool_use(&call, &input)),
            br#"{"type":"tool_use","id":"call_1","name":"get_weather","input":{"city":"sim"}}"#
        );
        assert_eq!(
            gojson::marshal(&BlockJson::thinking("")),
            br#"{"type":"thinking","thinking":""}"#
        );
        assert_eq!(stop_reason("stop", false), "end_turn");
        assert_eq!(stop_reason("length", true), "tool_use");
        assert_eq!(stop_reason("length", false), "max_tokens");
    }
}
