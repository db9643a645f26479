//! Ollama's native API: `/api/chat`, `/api/generate` (NDJSON streams or one JSON object),
//! with Ollama's errors for them.
//!
//! The response structs mirror `api/types.go` (`ChatResponse`, `GenerateResponse`, `Metrics`)
//! field by field in declaration order, `omitempty` fields skipped when empty, durations in
//! nanoseconds. Streams go through `streamResponse` semantics: one flushed NDJSON line per
//! token, and an error line (or, before any content, an error status) when generation fails.
//! Errors and their texts follow `server/routes.go`.

use std::time::SystemTime;

use serde::Serialize;

use super::generation::{Generation, Metrics, Piece};
use super::gojson::{self, DecodeError};
use super::inference_request::{InferenceRequest, parse_chat, parse_generate};
use super::response::{ResponseWriter, WriteError};
use super::routes::{Exchange, JSON_UTF8, MID_STREAM_ERROR, native_error};
use super::runner::{self, Run, ToolCall};
use crate::wallclock::rfc3339_nano;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `api.Metrics`, flattened into the final message.
#[derive(Debug, Default, Serialize)]
struct MetricsJson {
    #[serde(skip_serializing_if = "is_zero")]
    total_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    load_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    prompt_eval_count: u64,
    #[serde(skip_serializing_if = "is_zero")]
    prompt_eval_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    eval_count: u64,
    #[serde(skip_serializing_if = "is_zero")]
    eval_duration: u64,
}

impl From<Metrics> for MetricsJson {
    fn from(m: Metrics) -> Self {
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Self {
            total_duration: ns(m.total),
            load_duration: ns(m.load),
            prompt_eval_count: u64::from(m.prompt_eval_count),
            prompt_eval_duration: ns(m.prompt_eval),
            eval_count: u64::from(m.eval_count),
            eval_duration: ns(m.eval),
        }
    }
}

/// `api.Message` of a reply.
#[derive(Debug, Serialize)]
struct MessageJson<'a> {
    role: &'a str,
    content: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    thinking: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tool_calls: &'a [ToolCallJson<'a>],
}

/// `api.ToolCall`.
#[derive(Debug, Serialize)]
struct ToolCallJson<'a> {
    id: &'a str,
    function: FunctionJson<'a>,
}

/// `api.ToolCallFunction`.
#[derive(Debug, Serialize)]
struct FunctionJson<'a> {
    index: u32,
    name: &'a str,
    arguments: &'a serde_json::Map<String, serde_json::Value>,
}

impl<'a> From<&'a ToolCall> for ToolCallJson<'a> {
    fn from(call: &'a ToolCall) -> Self {
        Self {
            id: &call.id,
            function: FunctionJson {
                index: call.index,
                name: &call.name,
                arguments: &call.arguments,
            },
        }
    }
}

/// What one line (or the whole object) carries of the reply.
#[derive(Debug, Default)]
struct Parts<'a> {
    content: &'a str,
    thinking: &'a str,
    tool_calls: Vec<ToolCall>,
}

/// `api.ChatResponse`.
#[derive(Debug, Serialize)]
struct ChatResponseJson<'a> {
    model: &'a str,
    created_at: String,
    message: MessageJson<'a>,
    done: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    done_reason: &'a str,
    #[serde(flatten)]
    metrics: MetricsJson,
}

/// `api.GenerateResponse`.
#[derive(Debug, Serialize)]
struct GenerateResponseJson<'a> {
    model: &'a str,
    created_at: String,
    response: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    thinking: &'a str,
    done: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    done_reason: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    context: Vec<u32>,
    #[serde(flatten)]
    metrics: MetricsJson,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tool_calls: &'a [ToolCallJson<'a>],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Generate,
}

pub async fn chat(ex: &Exchange<'_>, w: &mut ResponseWriter<'_>) -> Result<(), WriteError> {
    inference(ex, w, Api::Chat).await
}

pub async fn generate(ex: &Exchange<'_>, w: &mut ResponseWriter<'_>) -> Result<(), WriteError> {
    inference(ex, w, Api::Generate).await
}

/// One line (or the whole object) of a chat or generate response.
fn response_json(
    api: Api,
    model: &str,
    parts: &Parts<'_>,
    done_reason: &str,
    metrics: Option<Metrics>,
    context: Vec<u32>,
) -> Vec<u8> {
    let created_at = rfc3339_nano(SystemTime::now());
    let metrics = metrics.map(MetricsJson::from).unwrap_or_default();
    let done = !done_reason.is_empty();
    let tool_calls: Vec<ToolCallJson> = parts.tool_calls.iter().map(Into::into).collect();
    match api {
        Api::Chat => gojson::marshal(&ChatResponseJson {
            model,
            created_at,
            message: MessageJson {
                role: "assistant",
                content: parts.content,
                thinking: parts.thinking,
                tool_calls: &tool_calls,
            },
            done,
            done_reason,
            metrics,
        }),
        Api::Generate => gojson::marshal(&GenerateResponseJson {
            model,
            created_at,
            response: parts.content,
            thinking: parts.thinking,
            done,
            done_reason,
            context,
            metrics,
            tool_calls: &tool_calls,
        }),
    }
}

/// Token ids of prompt and reply, as the `context` of a final generate message.
fn context_tokens(count: u32) -> Vec<u32> {
    (0..count)
        .map(|i| 128_000 + (i * 7_919 + 271) % 28_000)
        .collect()
}

async fn inference(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    api: Api,
) -> Result<(), WriteError> {
    let parsed = match api {
        Api::Chat => parse_chat(&ex.request.body),
        Api::Generate => parse_generate(&ex.request.body),
    };
    let req = match parsed {
        Ok(req) => req,
        Err(DecodeError::Empty) => return native_error(w, 400, "missing request body").await,
        Err(err) => return native_error(w, 400, &err.to_string()).await,
    };
    if req.model.trim().is_empty() {
        // Chat and generate word a missing model differently (routes.go).
        return match api {
            Api::Chat => native_error(w, 400, "model is required").await,
            Api::Generate => {
                native_error(w, 404, &format!("model '{}' not found", req.model)).await
            }
        };
    }
    let (loaded, shape) = match runner::admit(ex, &req, false).await {
        Ok(admitted) => admitted,
        Err(refusal) => return native_error(w, refusal.status, &refusal.message).await,
    };
    if req.load_only {
        loaded.release(ex);
        let body = response_json(api, &req.model, &Parts::default(), "load", None, Vec::new());
        return w
            .send(200, &[("Content-Type", JSON_UTF8.to_owned())], &body)
            .await;
    }
    let mut run = match loaded.start(ex, w, &req, shape).await? {
        Ok(run) => run,
        Err(too_long) if req.stream => return stream_error(w, 400, &too_long.message()).await,
        Err(too_long) => return native_error(w, 400, &too_long.message()).await,
    };
    let result = if req.stream {
        stream(ex, w, api, &req, &mut run).await
    } else {
        whole(ex, w, api, &req, &mut run).await
    };
    run.finish(ex, &req.model, &result);
    result
}

/// An error before any streamed content: `streamResponse` answers it as a status, in one
/// flushed chunk.
async fn stream_error(
    w: &mut ResponseWriter<'_>,
    status: u16,
    message: &str,
) -> Result<(), WriteError> {
    w.begin_stream(status, "application/json");
    w.chunk(&gojson::marshal(&serde_json::json!({ "error": message })))
        .await?;
    w.finish().await
}

/// NDJSON over chunked coding, one flushed line per token, then the final line with metrics.
async fn stream(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    api: Api,
    req: &InferenceRequest,
    run: &mut Run<'_>,
) -> Result<(), WriteError> {
    w.begin_stream(200, "application/x-ndjson");
    // A generate reply has no tool-call chunks: its calls come with the final line.
    let mut generate_calls = Vec::new();
    loop {
        let token = run.next_token(w).await?;
        let sent = run.sent_before(token);
        if ex.plan.error_after == Some(sent) {
            if sent == 0 {
                return stream_error(w, 500, MID_STREAM_ERROR).await;
            }
            w.chunk(&gojson::encode_line(
                &serde_json::json!({ "error": MID_STREAM_ERROR }),
            ))
            .await?;
            return w.finish().await;
        }
        let parts = match token {
            Some(Piece::Thinking(thinking)) => Parts {
                thinking,
                ..Parts::default()
            },
            Some(Piece::Content(content)) => Parts {
                content,
                ..Parts::default()
            },
            Some(Piece::ToolCall(index)) if api == Api::Generate => {
                generate_calls.push(runner::tool_call(ex, req, index));
                continue;
            }
            Some(Piece::ToolCall(index)) => Parts {
                tool_calls: vec![runner::tool_call(ex, req, index)],
                ..Parts::default()
            },
            None => Parts {
                tool_calls: std::mem::take(&mut generate_calls),
                ..Parts::default()
            },
        };
        let mut line = match token {
            Some(_) => response_json(api, &req.model, &parts, "", None, Vec::new()),
            None => final_json(api, req, &run.generation, &parts),
        };
        line.push(b'\n');
        w.chunk(&line).await?;
        if token.is_none() {
            return w.finish().await;
        }
    }
}

fn final_json(
    api: Api,
    req: &InferenceRequest,
    generation: &Generation,
    parts: &Parts<'_>,
) -> Vec<u8> {
    let metrics = generation.metrics();
    let context = if api == Api::Generate && !req.raw {
        context_tokens(metrics.prompt_eval_count + metrics.eval_count)
    } else {
        Vec::new()
    };
    response_json(
        api,
        &req.model,
        parts,
        generation.done_reason().as_str(),
        Some(metrics),
        context,
    )
}

/// `"stream": false`: the whole reply in one object once generation is done.
async fn whole(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    api: Api,
    req: &InferenceRequest,
    run: &mut Run<'_>,
) -> Result<(), WriteError> {
    let Some(reply) = run.whole_reply(w, ex.plan.error_after).await? else {
        return native_error(w, 500, MID_STREAM_ERROR).await;
    };
    let parts = Parts {
        content: &reply.content,
        thinking: &reply.thinking,
        tool_calls: reply
            .tool_calls
            .iter()
            .map(|&index| runner::tool_call(ex, req, index))
            .collect(),
    };
    let body = final_json(api, req, &run.generation, &parts);
    w.send(200, &[("Content-Type", JSON_UTF8.to_owned())], &body)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn chat_lines_have_go_field_order_and_omit_empty_fields() {
        let hi = Parts {
            content: "Hi",
            ..Parts::default()
        };
        let line = text(response_json(Api::Chat, "m", &hi, "", None, Vec::new()));
        let created = line
            .split("\"created_at\":\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(
            line,
            format!(
                r#"{{"model":"m","created_at":"{created}","message":{{"role":"assistant","content":"Hi"}},"done":false}}"#
            )
        );
        let metrics = Metrics {
            total: std::time::Duration::from_nanos(10),
            load: std::time::Duration::from_nanos(1),
            prompt_eval_count: 9,
            prompt_eval: std::time::Duration::from_nanos(2),
            eval_count: 3,
            eval: std::time::Duration::from_nanos(7),
        };
        let done = text(response_json(
            Api::Chat,
            "m",
            &Parts::default(),
            "stop",
            Some(metrics),
            Vec::new(),
        ));
        assert!(done.ends_with(
            r#""message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","total_duration":10,"load_duration":1,"prompt_eval_count":9,"prompt_eval_duration":2,"eval_count":3,"eval_duration":7}"#
        ), "{done}");
    }

    #[test]
    fn thinking_and_tool_calls_have_api_types_shapes() {
        let thinking = Parts {
            thinking: "Okay",
            ..Parts::default()
        };
        let line = text(response_json(
            Api::Chat,
            "m",
            &thinking,
            "",
            None,
            Vec::new(),
        ));
        assert!(
            line.ends_with(
                r#""message":{"role":"assistant","content":"","thinking":"Okay"},"done":false}"#
            ),
            "{line}"
        );
        let line = text(response_json(
            Api::Generate,
            "m",
            &thinking,
            "",
            None,
            Vec::new(),
        ));
        assert!(
            line.ends_with(r#""response":"","thinking":"Okay","done":false}"#),
            "{line}"
        );
        let mut arguments = serde_json::Map::new();
        arguments.insert("city".into(), "sim".into());
        let call = Parts {
            tool_calls: vec![ToolCall {
                id: "call_ab12cd34".into(),
                index: 0,
                name: "get_weather".into(),
                arguments,
            }],
            ..Parts::default()
        };
        let line = text(response_json(Api::Chat, "m", &call, "", None, Vec::new()));
        assert!(
            line.ends_with(r#""message":{"role":"assistant","content":"","tool_calls":[{"id":"call_ab12cd34","function":{"index":0,"name":"get_weather","arguments":{"city":"sim"}}}]},"done":false}"#),
            "{line}"
        );
        let metrics = Metrics {
            eval_count: 1,
            ..Metrics::default()
        };
        let done = text(response_json(
            Api::Generate,
            "m",
            &call,
            "stop",
            Some(metrics),
            Vec::new(),
        ));
        assert!(done.ends_with(r#""done_reason":"stop","eval_count":1,"tool_calls":[{"id":"call_ab12cd34","function":{"index":0,"name":"get_weather","arguments":{"city":"sim"}}}]}"#), "{done}");
    }

    #[test]
    fn generate_final_line_puts_context_before_metrics() {
        let metrics = Metrics {
            eval_count: 1,
            ..Metrics::default()
        };
        let done = text(response_json(
            Api::Generate,
            "m",
            &Parts::default(),
            "length",
            Some(metrics),
            vec![1, 2],
        ));
        assert!(done.ends_with(r#""response":"","done":true,"done_reason":"length","context":[1,2],"eval_count":1}"#), "{done}");
    }
}
