//! OpenAI legacy completions: `/v1/completions`, Ollama's `CompletionsMiddleware` in front of
//! the generate handler.
//!
//! From Ollama v0.32.15 (`middleware/openai.go` `CompleteWriter`, `openai/openai.go`
//! `ToCompleteChunk`, `ToCompletion`, `CompletionChunk`, `Completion`): ids are `cmpl-N`
//! (N < 999); every generate line becomes one `text_completion` chunk stamped with the time it
//! is written (thinking lines become chunks with empty text); with
//! `stream_options.include_usage` every chunk carries an all-zero `usage`, and the last is
//! followed by a chunk with empty `choices` and the real usage; then `data: [DONE]`. The
//! non-streamed answer is one `text_completion` with `usage`. Errors take the OpenAI shape.

use std::time::SystemTime;

use serde::Serialize;

use super::generation::{Metrics, Piece};
use super::gojson;
use super::inference_request::{InferenceRequest, parse_completion};
use super::openai::{
    FINGERPRINT, UsageJson, handler_error, middleware_error, send_encoded, stream_error,
};
use super::response::{ResponseWriter, WriteError};
use super::routes::{Exchange, MID_STREAM_ERROR};
use super::runner::{self, Run};
use crate::wallclock::unix_seconds;

/// `openai.CompleteChunkChoice`.
#[derive(Debug, Serialize)]
struct ChoiceJson<'a> {
    text: &'a str,
    index: u32,
    finish_reason: Option<&'a str>,
}

/// `openai.CompletionChunk` (its fields are in another order than `Completion`'s).
#[derive(Debug, Serialize)]
struct ChunkJson<'a> {
    id: &'a str,
    object: &'a str,
    created: u64,
    choices: Vec<ChoiceJson<'a>>,
    model: &'a str,
    system_fingerprint: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageJson>,
}

/// `openai.Completion`.
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

/// One chunk of text (and a finish reason on the last), as `ToCompleteChunk` makes it.
fn chunk<'a>(
    id: &'a str,
    req: &'a InferenceRequest,
    model: &'a str,
    text: &'a str,
    finish_reason: Option<&'a str>,
) -> Vec<u8> {
    let chunk = ChunkJson {
        id,
        object: "text_completion",
        created: unix_seconds(SystemTime::now()),
        choices: vec![ChoiceJson {
            text,
            index: 0,
            finish_reason,
        }],
        model,
        system_fingerprint: FINGERPRINT,
        usage: req.include_usage.then(UsageJson::default),
    };
    sse(&chunk)
}

fn sse<T: Serialize>(value: &T) -> Vec<u8> {
    [b"data: ".as_slice(), &gojson::marshal(value), b"\n\n"].concat()
}

/// The last chunk, the usage chunk when asked for, and `[DONE]`: one write.
fn tail(id: &str, req: &InferenceRequest, finish_reason: &str, metrics: Metrics) -> Vec<u8> {
    let mut tail = chunk(id, req, &req.model, "", Some(finish_reason));
    if req.include_usage {
        tail.extend(sse(&ChunkJson {
            id,
            object: "text_completion",
            created: unix_seconds(SystemTime::now()),
            choices: Vec::new(),
            model: &req.model,
            system_fingerprint: FINGERPRINT,
            usage: Some(metrics.into()),
        }));
    }
    tail.extend_from_slice(b"data: [DONE]\n\n");
    tail
}

pub async fn completions(ex: &Exchange<'_>, w: &mut ResponseWriter<'_>) -> Result<(), WriteError> {
    let req = match parse_completion(&ex.request.body) {
        Ok(req) => req,
        Err(err) => return middleware_error(w, 400, &err.to_string()).await,
    };
    let (loaded, shape) = match runner::admit(ex, &req, false).await {
        Ok(admitted) => admitted,
        Err(refusal) => return handler_error(w, refusal.status, &refusal.message).await,
    };
    let id = format!("cmpl-{}", ex.sim.roll_below(999));
    if req.load_only {
        loaded.release(ex);
        return load_only(w, &req, &id).await;
    }
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

/// An empty prompt: the generate handler's `done_reason: load` answer, converted unflushed.
async fn load_only(
    w: &mut ResponseWriter<'_>,
    req: &InferenceRequest,
    id: &str,
) -> Result<(), WriteError> {
    if req.stream {
        let body = tail(id, req, "load", Metrics::default());
        return w
            .send(
                200,
                &[("Content-Type", "text/event-stream".to_owned())],
                &body,
            )
            .await;
    }
    send_encoded(w, 200, &completion(id, req, "", "load", Metrics::default())).await
}

fn completion<'a>(
    id: &'a str,
    req: &'a InferenceRequest,
    text: &'a str,
    finish_reason: &'a str,
    metrics: Metrics,
) -> CompletionJson<'a> {
    CompletionJson {
        id,
        object: "text_completion",
        created: unix_seconds(SystemTime::now()),
        model: &req.model,
        system_fingerprint: FINGERPRINT,
        choices: [ChoiceJson {
            text,
            index: 0,
            finish_reason: Some(finish_reason),
        }],
        usage: metrics.into(),
    }
}

async fn stream(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    req: &InferenceRequest,
    id: &str,
    run: &mut Run<'_>,
) -> Result<(), WriteError> {
    w.begin_stream(200, "text/event-stream");
    loop {
        let token = run.next_token(w).await?;
        let sent = run.sent_before(token);
        if ex.plan.error_after == Some(sent) {
            if sent == 0 {
                return stream_error(w, 500, MID_STREAM_ERROR).await;
            }
            // The error line decodes as an empty generate response: a model-less chunk.
            w.chunk(&chunk(id, req, "", "", None)).await?;
            return w.finish().await;
        }
        let text = match token {
            Some(Piece::Content(text)) => text,
            // Thinking lines carry no `response`; generate has no tool-call lines.
            Some(Piece::Thinking(_)) => "",
            Some(Piece::ToolCall(_)) => continue,
            None => break,
        };
        w.chunk(&chunk(id, req, &req.model, text, None)).await?;
    }
    let generation = &run.generation;
    let reason = generation.done_reason().as_str();
    w.chunk(&tail(id, req, reason, generation.metrics()))
        .await?;
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
    let reason = generation.done_reason().as_str();
    let body = completion(id, req, &reply.content, reason, generation.metrics());
    send_encoded(w, 200, &body).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference_request::parse_completion;

    #[test]
    fn chunks_carry_zero_usage_when_usage_is_asked_for() {
        let req = parse_completion(
            br#"{"model":"m","prompt":"p","stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        let text = String::from_utf8(chunk("cmpl-1", &req, "m", "Hi", None)).unwrap();
        let created = text
            .split("\"created\":")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap();
        assert_eq!(
            text,
            format!(
                "data: {{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":{created},\
                 \"choices\":[{{\"text\":\"Hi\",\"index\":0,\"finish_reason\":null}}],\"model\":\"m\",\
                 \"system_fingerprint\":\"fp_ollama\",\"usage\":{{\"prompt_tokens\":0,\
                 \"completion_tokens\":0,\"total_tokens\":0}}}}\n\n"
            )
        );
    }
}
