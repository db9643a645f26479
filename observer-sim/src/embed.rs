//! Embeddings: `/api/embed`, the legacy `/api/embeddings`, and the OpenAI `/v1/embeddings`
//! (Ollama's `EmbeddingsMiddleware` in front of `/api/embed`'s handler).
//!
//! From Ollama v0.32.15 (`server/routes.go` `EmbedHandler`, `EmbeddingsHandler`;
//! `middleware/openai.go` `EmbeddingsMiddleware`, `EmbedWriter`; `openai/openai.go`
//! `ToEmbeddingList`; `api/types.go` `EmbedResponse`, `EmbeddingResponse`): inputs are a string
//! or a list of strings ("invalid input type" otherwise); an empty input only loads the model;
//! each input is cut to the context less 2 (BOS and EOS) tokens, or with `"truncate": false`
//! refused with 400 "the input length exceeds the context length"; vectors are normalized,
//! `dimensions` cuts and renormalizes them. The simulator counts ⌈bytes/4⌉ tokens per input
//! (at least one), evaluates each in one `--first-token-ms` holding a slot, and makes unit
//! vectors of the model's embedding length from the text (same text, same vector).

use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use super::faults::Dice;
use super::gojson::{self, DecodeError};
use super::openai::{handler_error, middleware_error, send_encoded};
use super::response::{ResponseWriter, WriteError};
use super::routes::{Exchange, JSON_UTF8, native_error};
use super::runner;

/// Which API an embedding request came by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Embed,
    OpenAi { base64: bool },
}

/// An embedding request, whichever route it came by.
struct EmbedRequest {
    model: String,
    inputs: Vec<String>,
    truncate: bool,
    dimensions: usize,
    num_ctx: Option<u32>,
}

/// Why an embedding request failed, with its status.
struct Failure(u16, String);

/// `api.EmbedResponse`.
#[derive(Serialize)]
struct EmbedResponseJson<'a> {
    model: &'a str,
    embeddings: &'a [Vec<f32>],
    #[serde(skip_serializing_if = "is_zero")]
    total_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    load_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    prompt_eval_count: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `openai.Embedding`: the vector (float32s, printed as Go prints them), or its
/// little-endian bytes in base64.
#[derive(Serialize)]
struct OpenAiEmbeddingJson<'a> {
    object: &'a str,
    embedding: EmbeddingValue<'a>,
    index: usize,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingValue<'a> {
    Floats(&'a [f32]),
    Base64(String),
}

/// `openai.EmbeddingList`.
#[derive(Serialize)]
struct EmbeddingListJson<'a> {
    object: &'a str,
    data: Vec<OpenAiEmbeddingJson<'a>>,
    model: &'a str,
    usage: EmbeddingUsageJson,
}

#[derive(Serialize)]
struct EmbeddingUsageJson {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// Tokens of one embedding input.
fn input_tokens(text: &str) -> u32 {
    u32::try_from(text.len().div_ceil(4))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// A unit vector of `length` derived from `text`; every component is at least 0.2/√length in
/// size, so Go and serde print them alike (no exponent notation).
pub fn embedding(text: &str, length: usize) -> Vec<f32> {
    let seed = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut dice = Dice::new(seed);
    let raw: Vec<f32> = (0..length)
        .map(|_| {
            let bits = dice.next_u64();
            let magnitude = 0.2 + 0.8 * ((bits >> 11) as f32 / (1u64 << 53) as f32);
            if bits & 1 == 0 { magnitude } else { -magnitude }
        })
        .collect();
    normalize(raw)
}

/// Ollama's `normalize`.
fn normalize(vector: Vec<f32>) -> Vec<f32> {
    let sum: f32 = vector.iter().map(|v| v * v).sum();
    let norm = (1.0 / f64::from(sum).sqrt().max(1e-12)) as f32;
    vector.into_iter().map(|v| v * norm).collect()
}

/// `floatsToBase64`: the vector's little-endian bytes in standard base64.
fn base64_floats(vector: &[f32]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `input` of `api.EmbedRequest`: a string (empty: none) or a list of strings.
fn inputs(value: Option<&Value>) -> Result<Vec<String>, Failure> {
    let invalid = || Failure(400, "invalid input type".to_owned());
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(invalid))
            .collect(),
        Some(_) => Err(invalid()),
    }
}

fn decode_failure(err: DecodeError) -> Failure {
    match err {
        DecodeError::Empty => Failure(400, "missing request body".to_owned()),
        other => Failure(400, other.to_string()),
    }
}

/// An `/api/embed` body.
fn parse_embed(body: &[u8]) -> Result<EmbedRequest, Failure> {
    let obj = gojson::decode_object(body, "api.EmbedRequest").map_err(decode_failure)?;
    let model = gojson::opt_str(&obj, "model", "EmbedRequest.model").map_err(decode_failure)?;
    let truncate =
        gojson::opt_bool(&obj, "truncate", "EmbedRequest.truncate").map_err(decode_failure)?;
    let dimensions =
        gojson::opt_int(&obj, "dimensions", "EmbedRequest.dimensions").map_err(decode_failure)?;
    let num_ctx = obj
        .get("options")
        .and_then(|o| o.get("num_ctx"))
        .and_then(Value::as_f64)
        .map(|n| n.clamp(4.0, f64::from(u32::MAX)) as u32);
    Ok(EmbedRequest {
        model: model.unwrap_or_default().to_owned(),
        inputs: inputs(obj.get("input"))?,
        truncate: truncate.unwrap_or(true),
        dimensions: usize::try_from(dimensions.unwrap_or(0)).unwrap_or(0),
        num_ctx,
    })
}

/// A `/v1/embeddings` body as `EmbeddingsMiddleware` checks and converts it.
fn parse_openai(body: &[u8]) -> Result<(EmbedRequest, bool), Failure> {
    let obj = gojson::decode_object(body, "openai.EmbedRequest").map_err(decode_failure)?;
    let format = gojson::opt_str(&obj, "encoding_format", "EmbedRequest.encoding_format")
        .map_err(decode_failure)?
        .unwrap_or("");
    let base64 = format.eq_ignore_ascii_case("base64");
    if !format.is_empty() && !base64 && !format.eq_ignore_ascii_case("float") {
        let message = format!(
            "Invalid value for 'encoding_format' = {format}. Supported values: ['float', 'base64']."
        );
        return Err(Failure(400, message));
    }
    let inputs = match obj.get("input") {
        Some(Value::String(s)) if s.is_empty() => vec![String::new()],
        None | Some(Value::Null) => return Err(Failure(400, "invalid input".to_owned())),
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(Failure(400, "invalid input".to_owned()));
        }
        other => inputs(other)?,
    };
    let model = gojson::opt_str(&obj, "model", "EmbedRequest.model").map_err(decode_failure)?;
    let dimensions =
        gojson::opt_int(&obj, "dimensions", "EmbedRequest.dimensions").map_err(decode_failure)?;
    let req = EmbedRequest {
        model: model.unwrap_or_default().to_owned(),
        inputs,
        truncate: true,
        dimensions: usize::try_from(dimensions.unwrap_or(0)).unwrap_or(0),
        num_ctx: None,
    };
    Ok((req, base64))
}

pub async fn embed(ex: &Exchange<'_>, w: &mut ResponseWriter<'_>) -> Result<(), WriteError> {
    match parse_embed(&ex.request.body) {
        Ok(req) => answer(ex, w, Api::Embed, &req).await,
        Err(Failure(status, message)) => native_error(w, status, &message).await,
    }
}

pub async fn openai_embeddings(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
) -> Result<(), WriteError> {
    match parse_openai(&ex.request.body) {
        Ok((req, base64)) => answer(ex, w, Api::OpenAi { base64 }, &req).await,
        Err(Failure(status, message)) => middleware_error(w, status, &message).await,
    }
}

/// An error of `EmbedHandler`, in the route's shape.
async fn failure(
    w: &mut ResponseWriter<'_>,
    api: Api,
    status: u16,
    message: &str,
) -> Result<(), WriteError> {
    match api {
        Api::Embed => native_error(w, status, message).await,
        Api::OpenAi { .. } => handler_error(w, status, message).await,
    }
}

/// `EmbedHandler`, and for OpenAI what `EmbedWriter` makes of its answer.
async fn answer(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
    api: Api,
    req: &EmbedRequest,
) -> Result<(), WriteError> {
    let Some(model) = ex.sim.models.find(&req.model) else {
        let message = format!("model '{}' not found", req.model);
        return failure(w, api, 404, &message).await;
    };
    let loaded = match runner::schedule(ex, model, req.num_ctx).await {
        Ok(loaded) => loaded,
        Err(full) => return failure(w, api, 503, &full.to_string()).await,
    };
    let mut embeddings = Vec::with_capacity(req.inputs.len());
    let mut tokens = 0u64;
    if !req.inputs.is_empty() {
        let _slot = loaded.slot(w).await?;
        // The input's tokens may fill the context less BOS and EOS.
        let limit = loaded.context_length.saturating_sub(2);
        for text in &req.inputs {
            let count = input_tokens(text);
            if count > limit && !req.truncate {
                let message = "the input length exceeds the context length";
                return failure(w, api, 400, message).await;
            }
            tokio::time::sleep(ex.timing().first_token).await;
            tokens += u64::from(count.min(limit));
            let mut vector = embedding(text, model.info.embedding_length);
            if req.dimensions > 0 && req.dimensions < vector.len() {
                vector.truncate(req.dimensions);
                vector = normalize(vector);
            }
            embeddings.push(vector);
        }
    }
    let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let (total, load) = if req.inputs.is_empty() {
        (0, 0)
    } else {
        (
            ns(Instant::now() - ex.received_at),
            ns(loaded.loaded_at() - ex.received_at),
        )
    };
    loaded.release(ex);
    match api {
        Api::Embed => {
            let body = gojson::marshal(&EmbedResponseJson {
                model: &req.model,
                embeddings: &embeddings,
                total_duration: total,
                load_duration: load,
                prompt_eval_count: tokens,
            });
            w.send(200, &[("Content-Type", JSON_UTF8.to_owned())], &body)
                .await
        }
        Api::OpenAi { base64 } => {
            let data = embeddings
                .iter()
                .enumerate()
                .map(|(index, vector)| OpenAiEmbeddingJson {
                    object: "embedding",
                    embedding: if base64 {
                        EmbeddingValue::Base64(base64_floats(vector))
                    } else {
                        EmbeddingValue::Floats(vector)
                    },
                    index,
                })
                .collect();
            let list = EmbeddingListJson {
                object: "list",
                data,
                model: &req.model,
                usage: EmbeddingUsageJson {
                    prompt_tokens: tokens,
                    total_tokens: tokens,
                },
            };
            send_encoded(w, 200, &list).await
        }
    }
}

/// `api.EmbeddingResponse`: float64 values (of the float32 vector).
#[derive(Serialize)]
struct EmbeddingResponseJson {
    embedding: Vec<f64>,
}

/// The legacy `/api/embeddings` (`EmbeddingsHandler`): one `prompt`, no truncation flag, no
/// metrics; an empty prompt only loads the model.
pub async fn embeddings(ex: &Exchange<'_>, w: &mut ResponseWriter<'_>) -> Result<(), WriteError> {
    let obj = match gojson::decode_object(&ex.request.body, "api.EmbeddingRequest") {
        Ok(obj) => obj,
        Err(err) => {
            let Failure(status, message) = decode_failure(err);
            return native_error(w, status, &message).await;
        }
    };
    let text =
        |key: &str, path: &str| gojson::opt_str(&obj, key, path).map(Option::unwrap_or_default);
    let (model_name, prompt) = match (
        text("model", "EmbeddingRequest.model"),
        text("prompt", "EmbeddingRequest.prompt"),
    ) {
        (Ok(model), Ok(prompt)) => (model, prompt),
        (Err(err), _) | (_, Err(err)) => return native_error(w, 400, &err.to_string()).await,
    };
    if model_name.trim().is_empty() {
        return native_error(w, 400, "model is required").await;
    }
    let Some(model) = ex.sim.models.find(model_name) else {
        // getModel fails: handleScheduleError's os.ErrNotExist case.
        let message = format!("model {model_name:?} not found, try pulling it first");
        return native_error(w, 404, &message).await;
    };
    let loaded = match runner::schedule(ex, model, None).await {
        Ok(loaded) => loaded,
        Err(full) => return native_error(w, 503, &full.to_string()).await,
    };
    let mut vector = Vec::new();
    if !prompt.is_empty() {
        let _slot = loaded.slot(w).await?;
        tokio::time::sleep(ex.timing().first_token).await;
        vector = embedding(prompt, model.info.embedding_length)
            .into_iter()
            .map(f64::from)
            .collect();
    }
    loaded.release(ex);
    let body = gojson::marshal(&EmbeddingResponseJson { embedding: vector });
    w.send(200, &[("Content-Type", JSON_UTF8.to_owned())], &body)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_unit_length_and_printed_without_exponents() {
        let v = embedding("hello", 768);
        assert_eq!(v, embedding("hello", 768));
        assert_ne!(v, embedding("hullo", 768));
        let norm: f32 = v.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        let text = String::from_utf8(gojson::marshal(&v)).unwrap();
        assert!(!text.contains('e'), "{text}");
    }

    #[test]
    fn openai_vectors_print_as_float32() {
        let vector = [0.421_875_57_f32];
        let item = OpenAiEmbeddingJson {
            object: "embedding",
            embedding: EmbeddingValue::Floats(&vector),
            index: 0,
        };
        assert_eq!(
            gojson::marshal(&item),
            br#"{"object":"embedding","embedding":[0.42187557],"index":0}"#
        );
    }

    #[test]
    fn base64_is_the_little_endian_bytes() {
        assert_eq!(base64_floats(&[1.0]), "AACAPw==");
        assert_eq!(base64_floats(&[1.0, 0.0]), "AACAPwAAAAA=");
        assert_eq!(base64_floats(&[]), "");
    }

    #[test]
    fn inputs_are_a_string_or_strings() {
        assert_eq!(
            inputs(Some(&Value::from("a"))).ok(),
            Some(vec!["a".to_owned()])
        );
        assert_eq!(inputs(Some(&Value::from(""))).ok(), Some(Vec::new()));
        assert!(inputs(Some(&serde_json::json!([1]))).is_err());
        assert!(inputs(Some(&serde_json::json!(5))).is_err());
    }
}
