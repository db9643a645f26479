//! OpenAI's Responses API: `/v1/responses`, Ollama's `ResponsesMiddleware` in front of the
//! chat handler.
//!
//! From Ollama v0.32.15 (`openai/responses.go`: `ResponsesRequest`, `FromResponsesRequest`,
//! `ToResponse`, `ResponsesResponse`, `ResponsesOutputItem`, `ResponsesStreamConverter`;
//! `middleware/openai.go`: `ResponsesWriter`, `ResponsesMiddleware`): ids are `resp_N` and
//! `msg_N` (N < 999999); `reasoning.effort` maps to `think` as for chat completions;
//! `max_output_tokens` is `num_predict`. The non-streamed answer is one `response` object (Go
//! struct order, `Encode`). A stream (`Cache-Control: no-cache`, `Connection: keep-alive`)
//! is `event: T\ndata: {…}\n\n` events, each flushed on its own, whose data are Go maps, so
//! their keys are sorted (as `serde_json`'s maps sort them): `response.created`,
//! `response.in_progress`, then per output item `response.output_item.added`, its deltas
//! (`response.reasoning_summary_text.delta`, `response.output_text.delta`,
//! `response.function_call_arguments.delta`) and closing events, and `response.completed`
//! with the usage; every event has a `sequence_number`.

use std::time::SystemTime;

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::generation::{Piece, PromptFit, PromptText};
use super::gojson::{self, DecodeError};
use super::inference_request::{InferenceRequest, think_from_effort, tools_from};
use super::openai::{ToolCallJson, error_json, handler_error, middleware_error, send_encoded};
use super::response::{ResponseWriter, WriteError};
use super::routes::{Exchange, MID_STREAM_ERROR};
use super::runner::{self, Run};
use crate::wallclock::unix_seconds;

/// What the response echoes of the request.
struct Echo {
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    truncation: Option<String>,
    background: bool,
    effort: String,
    summary: String,
    tools: Vec<Value>,
}

struct Responses {
    inner: InferenceRequest,
    echo: Echo,
}

/// Go prints an integral float64 without a fraction (`1`, not `1.0`).
fn go_float(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        Value::from(f as i64)
    } else {
        Value::from(f)
    }
}

/// Text of an input item's `content`: a string or parts with `text`.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// `ResponsesRequest` as the middleware decodes and converts it.
fn parse(body: &[u8]) -> Result<Responses, String> {
    const T: &str = "ResponsesRequest";
    let decode = |e: DecodeError| e.to_string();
    let obj = gojson::decode_object(body, "openai.ResponsesRequest").map_err(decode)?;
    let model = gojson::opt_str(&obj, "model", &format!("{T}.model")).map_err(decode)?;
    let stream = gojson::opt_bool(&obj, "stream", &format!("{T}.stream")).map_err(decode)?;
    let max_output_tokens =
        gojson::opt_int(&obj, "max_output_tokens", &format!("{T}.max_output_tokens"))
            .map_err(decode)?;
    let instructions = gojson::opt_str(&obj, "instructions", &format!("{T}.instructions"))
        .map_err(decode)?
        .filter(|i| !i.is_empty());
    let reasoning = obj.get("reasoning");
    let text_of = |v: Option<&Value>, key: &str| {
        v.and_then(|r| r.get(key))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let effort = text_of(reasoning, "effort");
    let mut texts: Vec<PromptText> = instructions
        .map(|i| PromptText {
            text: i.to_owned(),
            system: true,
        })
        .into_iter()
        .collect();
    let mut after_tool_result = false;
    match obj.get("input") {
        Some(Value::String(s)) => texts.push(PromptText {
            text: s.clone(),
            system: false,
        }),
        Some(Value::Array(items)) => {
            for item in items {
                let kind = item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message");
                after_tool_result = kind == "function_call_output";
                let text = match kind {
                    "function_call_output" => content_text(item.get("output")),
                    _ => content_text(item.get("content")),
                };
                let role = item.get("role").and_then(Value::as_str).unwrap_or("");
                texts.push(PromptText {
                    text,
                    system: matches!(role, "system" | "developer"),
                });
            }
        }
        _ => {}
    }
    let request_tools: Vec<Value> = obj
        .get("tools")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let function_tools: Vec<Value> = request_tools
        .iter()
        .map(|t| json!({ "type": "function", "function": { "name": t.get("name"), "parameters": t.get("parameters") } }))
        .collect();
    let number = |key: &str| obj.get(key).and_then(Value::as_f64);
    Ok(Responses {
        inner: InferenceRequest {
            model: model.unwrap_or_default().to_owned(),
            stream: stream.unwrap_or(false),
            limit: max_output_tokens,
            messages: texts.len(),
            load_only: false,
            num_ctx: None,
            fit: PromptFit::default(),
            raw: false,
            include_usage: false,
            think: think_from_effort(&effort)?,
            tools: tools_from(&function_tools),
            after_tool_result,
            texts,
        },
        echo: Echo {
            instructions: instructions.map(str::to_owned),
            max_output_tokens,
            temperature: number("temperature"),
            top_p: number("top_p"),
            truncation: obj
                .get("truncation")
                .and_then(Value::as_str)
                .map(str::to_owned),
            background: obj
                .get("background")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            summary: text_of(reasoning, "summary"),
            effort,
            tools: request_tools,
        },
    })
}

/// `ResponsesTool` as the non-streamed response echoes it.
#[derive(Serialize)]
struct ToolJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    name: &'a str,
    description: Option<&'a str>,
    strict: Option<bool>,
    parameters: Option<&'a Value>,
}

fn tool_json(tool: &Value) -> ToolJson<'_> {
    let text = |key: &str| tool.get(key).and_then(Value::as_str);
    ToolJson {
        kind: text("type").unwrap_or(""),
        name: text("name").unwrap_or(""),
        description: text("description"),
        strict: tool.get("strict").and_then(Value::as_bool),
        parameters: tool.get("parameters").filter(|p| p.is_object()),
    }
}

/// `ResponsesUsage`.
#[derive(Serialize)]
struct UsageJson {
    input_tokens: u32,
    output_tokens: u32,
    total_tokens: u32,
    input_tokens_details: CachedJson,
    output_tokens_details: ReasoningTokensJson,
}

#[derive(Serialize)]
struct CachedJson {
    cached_tokens: u32,
}

#[derive(Serialize)]
struct ReasoningTokensJson {
    reasoning_tokens: u32,
}

#[derive(Serialize)]
struct ReasoningJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    effort: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<&'a str>,
}

/// `ResponsesResponse`, in its field order.
#[derive(Serialize)]
struct ResponseJson<'a> {
    id: &'a str,
    object: &'a str,
    created_at: u64,
    completed_at: u64,
    status: &'a str,
    incomplete_details: Option<()>,
    model: &'a str,
    previous_response_id: Option<()>,
    instructions: Option<&'a str>,
    output: Vec<OutputItemJson<'a>>,
    error: Option<()>,
    tools: Vec<ToolJson<'a>>,
    tool_choice: &'a str,
    truncation: &'a str,
    parallel_tool_calls: bool,
    text: Value,
    top_p: Value,
    presence_penalty: u32,
    frequency_penalty: u32,
    top_logprobs: u32,
    temperature: Value,
    reasoning: Option<ReasoningJson<'a>>,
    usage: UsageJson,
    max_output_tokens: Option<i64>,
    max_tool_calls: Option<()>,
    store: bool,
    background: bool,
    service_tier: &'a str,
    metadata: Map<String, Value>,
    safety_identifier: Option<()>,
    prompt_cache_key: Option<()>,
}

/// `ResponsesOutputItem` (omitempty fields left out), in its field order.
#[derive(Serialize)]
struct OutputItemJson<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    status: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    role: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    content: Vec<OutputTextJson<'a>>,
    #[serde(skip_serializing_if = "str::is_empty")]
    call_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    arguments: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    summary: Vec<SummaryJson<'a>>,
    #[serde(skip_serializing_if = "str::is_empty")]
    encrypted_content: &'a str,
}

#[derive(Serialize)]
struct OutputTextJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    text: &'a str,
    annotations: [(); 0],
    logprobs: [(); 0],
}

#[derive(Serialize)]
struct SummaryJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    text: &'a str,
}

impl<'a> OutputItemJson<'a> {
    fn of(id: String, kind: &'a str) -> Self {
        Self {
            id,
            kind,
            status: "",
            role: "",
            content: Vec::new(),
            call_id: "",
            name: "",
            arguments: "",
            summary: Vec::new(),
            encrypted_content: "",
        }
    }
}

/// The stream's `response` object (`buildResponseObject`): a Go map, keys sorted.
fn response_object(
    echo: &Echo,
    id: &str,
    model: &str,
    status: &str,
    output: Vec<Value>,
    usage: Value,
) -> Value {
    let tools: Vec<Value> = echo
        .tools
        .iter()
        .map(|t| {
            json!({
                "type": t.get("type"),
                "name": t.get("name"),
                "description": t.get("description"),
                "strict": t.get("strict"),
                "parameters": t.get("parameters"),
            })
        })
        .collect();
    let reasoning = if echo.effort.is_empty() && echo.summary.is_empty() {
        Value::Null
    } else {
        let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        json!({ "effort": text(&echo.effort), "summary": text(&echo.summary) })
    };
    json!({
        "id": id,
        "object": "response",
        "created_at": unix_seconds(SystemTime::now()),
        "completed_at": null,
        "status": status,
        "incomplete_details": null,
        "model": model,
        "previous_response_id": null,
        "instructions": echo.instructions,
        "output": output,
        "error": null,
        "tools": tools,
        "tool_choice": "auto",
        "truncation": echo.truncation.as_deref().unwrap_or("disabled"),
        "parallel_tool_calls": true,
        "text": { "format": { "type": "text" } },
        "top_p": go_float(echo.top_p.unwrap_or(1.0)),
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_logprobs": 0,
        "temperature": go_float(echo.temperature.unwrap_or(1.0)),
        "reasoning": reasoning,
        "usage": usage,
        "max_output_tokens": echo.max_output_tokens,
        "max_tool_calls": null,
        "store": false,
        "background": echo.background,
        "service_tier": "default",
        "metadata": {},
        "safety_identifier": null,
        "prompt_cache_key": null,
    })
}

fn stream_headers(content_type: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Cache-Control", "no-cache".to_owned()),
        ("Connection", "keep-alive".to_owned()),
        ("Content-Type", content_type.to_owned()),
    ]
}

/// An error of the chat handler through `writeError`; for a stream, flushed with the
/// middleware's stream headers.
async fn error(
    w: &mut ResponseWriter<'_>,
    stream: bool,
    status: u16,
    message: &str,
) -> Result<(), WriteError> {
    if !stream {
        return handler_error(w, status, message).await;
    }
    w.begin_stream_with(status, stream_headers("application/json"));
    w.chunk(&gojson::encode_line(&error_json(status, message)))
        .await?;
    w.finish().await
}

pub async fn responses(ex: &Exchange<'_>, w: &mut ResponseWriter<'_>) -> Result<(), WriteError> {
    let req = match parse(&ex.request.body) {
        Ok(req) => req,
        Err(message) => return middleware_error(w, 400, &message).await,
    };
    let inner = &req.inner;
    if inner.model.trim().is_empty() {
        return error(w, inner.stream, 400, "model is required").await;
    }
    let (loaded, shape) = match runner::admit(ex, inner, false).await {
        Ok(admitted) => admitted,
        Err(refusal) => return error(w, inner.stream, refusal.status, &refusal.message).await,
    };
    let mut run = match loaded.start(ex, w, inner, shape).await? {
        Ok(run) => run,
        Err(too_long) => return error(w, inner.stream, 400, &too_long.message()).await,
    };
    let id = format!("resp_{}", ex.sim.roll_below(999_999));
    let item_id = format!("msg_{}", ex.sim.roll_below(999_999));
    let result = if inner.stream {
        stream(ex, w, &req, &id, &item_id, &mut run).await
    } else {
        whole(ex, w, &req, &id, &item_id, &mut run).await
    };
    run.finish(ex, &inner.model, &result);
    result
}

/// Writes events, each flushed on its own, numbering them.
struct Events {
    sequence: u64,
}

impl Events {
    async fn send(
        &mut self,
        w: &mut ResponseWriter<'_>,
        kind: &str,
        mut data: Value,
    ) -> Result<(), WriteError> {
        if let Value::Object(map) = &mut data {
            map.insert("type".into(), Value::from(kind));
            map.insert("sequence_number".into(), Value::from(self.sequence));
        }
        self.sequence += 1;
        let line = [
            format!("event: {kind}\ndata: ").as_bytes(),
            &gojson::marshal(&data),
            b"\n\n",
        ]
        .concat();
        w.chunk(&line).await
    }
}

fn output_text(text: &str) -> Value {
    json!({ "type": "output_text", "text": text, "annotations": [], "logprobs": [] })
}

fn message_item(id: &str, status: &str, text: Option<&str>) -> Value {
    let content: Vec<Value> = text.map(output_text).into_iter().collect();
    json!({ "id": id, "type": "message", "status": status, "role": "assistant", "content": content })
}

/// The stream's open reasoning or message item.
enum Open {
    None,
    Reasoning { id: String, text: String },
    Message { text: String },
}

/// `ResponsesStreamConverter.Process` over the reply's pieces.
async fn stream(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    req: &Responses,
    id: &str,
    item_id: &str,
    run: &mut Run<'_>,
) -> Result<(), WriteError> {
    let inner = &req.inner;
    w.begin_stream_with(200, stream_headers("text/event-stream"));
    let mut events = Events { sequence: 0 };
    let mut output_index = 0u32;
    let mut open = Open::None;
    let mut completed: Vec<Value> = Vec::new();
    let mut started = false;
    loop {
        let token = run.next_token(w).await?;
        let sent = run.sent_before(token);
        if ex.plan.error_after == Some(sent) && sent == 0 {
            return error(w, true, 500, MID_STREAM_ERROR).await;
        }
        if !started {
            started = true;
            for kind in ["response.created", "response.in_progress"] {
                let response = response_object(
                    &req.echo,
                    id,
                    &inner.model,
                    "in_progress",
                    Vec::new(),
                    Value::Null,
                );
                events
                    .send(w, kind, json!({ "response": response }))
                    .await?;
            }
        }
        if ex.plan.error_after == Some(sent) {
            // The error line converts to no event: the stream just ends.
            return w.finish().await;
        }
        let Some(piece) = token else { break };
        match piece {
            Piece::Thinking(delta) => {
                if !matches!(open, Open::Reasoning { .. }) {
                    let reasoning_id = format!("rs_{}", ex.sim.roll_below(999_999));
                    let item = json!({ "id": reasoning_id, "type": "reasoning", "summary": [] });
                    let added = json!({ "output_index": output_index, "item": item });
                    events.send(w, "response.output_item.added", added).await?;
                    open = Open::Reasoning {
                        id: reasoning_id,
                        text: String::new(),
                    };
                }
                if let Open::Reasoning {
                    id: reasoning_id,
                    text,
                } = &mut open
                {
                    text.push_str(delta);
                    let data = json!({ "item_id": reasoning_id, "output_index": output_index, "summary_index": 0, "delta": delta });
                    events
                        .send(w, "response.reasoning_summary_text.delta", data)
                        .await?;
                }
            }
            Piece::Content(delta) => {
                finish_reasoning(w, &mut events, &mut open, &mut output_index, &mut completed)
                    .await?;
                if !matches!(open, Open::Message { .. }) {
                    let added = json!({ "output_index": output_index, "item": message_item(item_id, "in_progress", None) });
                    events.send(w, "response.output_item.added", added).await?;
                    let part = json!({ "item_id": item_id, "output_index": output_index, "content_index": 0, "part": output_text("") });
                    events.send(w, "response.content_part.added", part).await?;
                    open = Open::Message {
                        text: String::new(),
                    };
                }
                if let Open::Message { text } = &mut open {
                    text.push_str(delta);
                }
                let data = json!({ "item_id": item_id, "output_index": output_index, "content_index": 0, "delta": delta, "logprobs": [] });
                events.send(w, "response.output_text.delta", data).await?;
            }
            Piece::ToolCall(index) => {
                finish_reasoning(w, &mut events, &mut open, &mut output_index, &mut completed)
                    .await?;
                let call = ToolCallJson::from(runner::tool_call(ex, inner, index));
                let fc_id = format!("fc_{}_0", ex.sim.roll_below(999_999));
                let (call_id, name, arguments) = call.parts();
                let item = |status: &str, arguments: &str| json!({ "id": fc_id, "type": "function_call", "status": status, "call_id": call_id, "name": name, "arguments": arguments });
                let done_item = item("completed", arguments);
                let added =
                    json!({ "output_index": output_index, "item": item("in_progress", "") });
                events.send(w, "response.output_item.added", added).await?;
                let delta =
                    json!({ "item_id": fc_id, "output_index": output_index, "delta": arguments });
                events
                    .send(w, "response.function_call_arguments.delta", delta)
                    .await?;
                let args = json!({ "item_id": fc_id, "output_index": output_index, "arguments": arguments });
                events
                    .send(w, "response.function_call_arguments.done", args)
                    .await?;
                let done = json!({ "output_index": output_index, "item": done_item });
                events.send(w, "response.output_item.done", done).await?;
                completed.push(done_item);
                output_index += 1;
            }
        }
    }
    finish_reasoning(w, &mut events, &mut open, &mut output_index, &mut completed).await?;
    if let Open::Message { text } = &open {
        let done = json!({ "item_id": item_id, "output_index": output_index, "content_index": 0, "text": text, "logprobs": [] });
        events.send(w, "response.output_text.done", done).await?;
        let part = json!({ "item_id": item_id, "output_index": output_index, "content_index": 0, "part": output_text(text) });
        events.send(w, "response.content_part.done", part).await?;
        let item = json!({ "output_index": output_index, "item": message_item(item_id, "completed", Some(text)) });
        events.send(w, "response.output_item.done", item).await?;
        completed.push(message_item(item_id, "completed", Some(text)));
    }
    let metrics = run.generation.metrics();
    let usage = json!({
        "input_tokens": metrics.prompt_eval_count,
        "output_tokens": metrics.eval_count,
        "total_tokens": metrics.prompt_eval_count + metrics.eval_count,
        "input_tokens_details": { "cached_tokens": 0 },
        "output_tokens_details": { "reasoning_tokens": 0 },
    });
    let mut response = response_object(&req.echo, id, &inner.model, "completed", completed, usage);
    if let Value::Object(map) = &mut response {
        map.insert(
            "completed_at".into(),
            Value::from(unix_seconds(SystemTime::now())),
        );
    }
    events
        .send(w, "response.completed", json!({ "response": response }))
        .await?;
    w.finish().await
}

/// `finishReasoning`: closes an open reasoning item.
async fn finish_reasoning(
    w: &mut ResponseWriter<'_>,
    events: &mut Events,
    open: &mut Open,
    output_index: &mut u32,
    completed: &mut Vec<Value>,
) -> Result<(), WriteError> {
    if !matches!(open, Open::Reasoning { .. }) {
        return Ok(());
    }
    let Open::Reasoning { id, text } = std::mem::replace(open, Open::None) else {
        return Ok(());
    };
    let item = json!({
        "id": id,
        "type": "reasoning",
        "summary": [{ "type": "summary_text", "text": text }],
        "encrypted_content": text,
    });
    let done =
        json!({ "item_id": id, "output_index": *output_index, "summary_index": 0, "text": text });
    events
        .send(w, "response.reasoning_summary_text.done", done)
        .await?;
    let item_done = json!({ "output_index": *output_index, "item": item });
    events
        .send(w, "response.output_item.done", item_done)
        .await?;
    completed.push(item);
    *output_index += 1;
    Ok(())
}

/// `ToResponse`: reasoning, then tool calls or the message.
async fn whole(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    req: &Responses,
    id: &str,
    item_id: &str,
    run: &mut Run<'_>,
) -> Result<(), WriteError> {
    let inner = &req.inner;
    let Some(reply) = run.whole_reply(w, ex.plan.error_after).await? else {
        return handler_error(w, 500, MID_STREAM_ERROR).await;
    };
    let calls: Vec<ToolCallJson> = reply
        .tool_calls
        .iter()
        .map(|&index| runner::tool_call(ex, inner, index).into())
        .collect();
    let mut output = Vec::new();
    if !reply.thinking.is_empty() {
        let mut item = OutputItemJson::of(format!("rs_{id}"), "reasoning");
        item.summary = vec![SummaryJson {
            kind: "summary_text",
            text: &reply.thinking,
        }];
        item.encrypted_content = &reply.thinking;
        output.push(item);
    }
    if calls.is_empty() {
        let mut item = OutputItemJson::of(item_id.to_owned(), "message");
        item.status = "completed";
        item.role = "assistant";
        item.content = vec![OutputTextJson {
            kind: "output_text",
            text: &reply.content,
            annotations: [],
            logprobs: [],
        }];
        output.push(item);
    }
    for (i, call) in calls.iter().enumerate() {
        let (call_id, name, arguments) = call.parts();
        let mut item = OutputItemJson::of(format!("fc_{id}_{i}"), "function_call");
        item.status = "completed";
        item.call_id = call_id;
        item.name = name;
        item.arguments = arguments;
        output.push(item);
    }
    let echo = &req.echo;
    let metrics = run.generation.metrics();
    let now = unix_seconds(SystemTime::now());
    let reasoning = (!echo.effort.is_empty() || !echo.summary.is_empty()).then(|| ReasoningJson {
        effort: (!echo.effort.is_empty()).then_some(echo.effort.as_str()),
        summary: (!echo.summary.is_empty()).then_some(echo.summary.as_str()),
    });
    let response = ResponseJson {
        id,
        object: "response",
        created_at: now,
        completed_at: now,
        status: "completed",
        incomplete_details: None,
        model: &inner.model,
        previous_response_id: None,
        instructions: echo.instructions.as_deref(),
        output,
        error: None,
        tools: echo.tools.iter().map(tool_json).collect(),
        tool_choice: "auto",
        truncation: echo.truncation.as_deref().unwrap_or("disabled"),
        parallel_tool_calls: true,
        text: json!({ "format": { "type": "text" } }),
        top_p: go_float(echo.top_p.unwrap_or(1.0)),
        presence_penalty: 0,
        frequency_penalty: 0,
        top_logprobs: 0,
        temperature: go_float(echo.temperature.unwrap_or(1.0)),
        reasoning,
        usage: UsageJson {
            input_tokens: metrics.prompt_eval_count,
            output_tokens: metrics.eval_count,
            total_tokens: metrics.prompt_eval_count + metrics.eval_count,
            input_tokens_details: CachedJson { cached_tokens: 0 },
            output_tokens_details: ReasoningTokensJson {
                reasoning_tokens: 0,
            },
        },
        max_output_tokens: echo.max_output_tokens,
        max_tool_calls: None,
        store: false,
        background: echo.background,
        service_tier: "default",
        metadata: Map::new(),
        safety_identifier: None,
        prompt_cache_key: None,
    };
    send_encoded(w, 200, &response).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_go() {
        assert_eq!(go_float(1.0).to_string(), "1");
        assert_eq!(go_float(0.7).to_string(), "0.7");
    }

    #[test]
    fn requests_convert_like_from_responses_request() {
        let req = parse(
            br#"{"model":"m","instructions":"be brief","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}],"max_output_tokens":7,"reasoning":{"effort":"none"}}"#,
        )
        .unwrap();
        assert_eq!(req.inner.limit, Some(7));
        assert_eq!(req.inner.think, Some(false));
        assert_eq!(req.inner.texts.len(), 2);
        assert!(req.inner.texts[0].system);
        assert!(parse(br#"{"model":"m","input":"x","reasoning":{"effort":"huge"}}"#).is_err());
    }
}
