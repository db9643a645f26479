//! What an inference request asks for, read from the body of `/api/chat`, `/api/generate` or
//! `/v1/chat/completions` with Go's decoding rules (`api.ChatRequest`, `api.GenerateRequest`,
//! `openai.ChatCompletionRequest`), so type mistakes get Ollama's 400 texts.
//!
//! Only the fields the simulator acts on are read; the rest of the body is ignored like
//! unknown JSON fields in Go.

use serde_json::{Map, Value};

use super::gojson::{self, DecodeError};

/// One inference request, whichever API it came through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceRequest {
    pub model: String,
    pub stream: bool,
    /// `options.num_predict` or `max_tokens`.
    pub limit: Option<i64>,
    /// Number of messages (a generate request counts its prompt as one).
    pub messages: usize,
    /// Prompt texts (messages, or system + prompt) for the prompt token estimate.
    pub texts: Vec<String>,
    /// No messages / empty prompt: Ollama only loads the model.
    pub load_only: bool,
    /// A `raw` generate request gets no `context`.
    pub raw: bool,
    /// OpenAI `stream_options.include_usage`.
    pub include_usage: bool,
}

fn num_predict(obj: &Map<String, Value>, path: &str) -> Result<Option<i64>, DecodeError> {
    let options = gojson::opt_object(obj, "options", path, "map[string]interface {}")?;
    // Options.FromMap accepts any JSON number for an int option.
    Ok(options
        .and_then(|o| o.get("num_predict"))
        .and_then(Value::as_f64)
        .map(|n| n as i64))
}

fn model(obj: &Map<String, Value>, path: &str) -> Result<String, DecodeError> {
    Ok(gojson::opt_str(obj, "model", path)?
        .unwrap_or_default()
        .to_owned())
}

/// An `/api/chat` body (`api.ChatRequest`; `stream` defaults to true).
pub fn parse_chat(body: &[u8]) -> Result<InferenceRequest, DecodeError> {
    let obj = gojson::decode_object(body, "api.ChatRequest")?;
    let mut texts = Vec::new();
    for message in gojson::opt_array(&obj, "messages", "ChatRequest.messages", "[]api.Message")? {
        let Value::Object(message) = message else {
            return Err(gojson::type_error(
                "ChatRequest.messages",
                message,
                "api.Message",
            ));
        };
        gojson::opt_str(message, "role", "ChatRequest.messages.role")?;
        let content = gojson::opt_str(message, "content", "ChatRequest.messages.content")?;
        texts.push(content.unwrap_or_default().to_owned());
    }
    Ok(InferenceRequest {
        model: model(&obj, "ChatRequest.model")?,
        stream: gojson::opt_bool(&obj, "stream", "ChatRequest.stream")?.unwrap_or(true),
        limit: num_predict(&obj, "ChatRequest.options")?,
        messages: texts.len(),
        load_only: texts.is_empty(),
        texts,
        raw: false,
        include_usage: false,
    })
}

/// An `/api/generate` body (`api.GenerateRequest`; `stream` defaults to true).
pub fn parse_generate(body: &[u8]) -> Result<InferenceRequest, DecodeError> {
    let obj = gojson::decode_object(body, "api.GenerateRequest")?;
    let prompt = gojson::opt_str(&obj, "prompt", "GenerateRequest.prompt")?.unwrap_or_default();
    let system = gojson::opt_str(&obj, "system", "GenerateRequest.system")?;
    Ok(InferenceRequest {
        model: model(&obj, "GenerateRequest.model")?,
        stream: gojson::opt_bool(&obj, "stream", "GenerateRequest.stream")?.unwrap_or(true),
        limit: num_predict(&obj, "GenerateRequest.options")?,
        messages: 1,
        load_only: prompt.is_empty(),
        texts: system
            .into_iter()
            .chain([prompt])
            .map(str::to_owned)
            .collect(),
        raw: gojson::opt_bool(&obj, "raw", "GenerateRequest.raw")?.unwrap_or(false),
        include_usage: false,
    })
}

/// A `/v1/chat/completions` body (`openai.ChatCompletionRequest`; `stream` defaults to false).
pub fn parse_chat_completion(body: &[u8]) -> Result<InferenceRequest, DecodeError> {
    const T: &str = "ChatCompletionRequest";
    let obj = gojson::decode_object(body, "openai.ChatCompletionRequest")?;
    let mut texts = Vec::new();
    let messages = gojson::opt_array(
        &obj,
        "messages",
        &format!("{T}.messages"),
        "[]openai.Message",
    )?;
    for message in messages {
        let Value::Object(message) = message else {
            return Err(gojson::type_error(
                &format!("{T}.messages"),
                message,
                "openai.Message",
            ));
        };
        // Content is a string or a list of parts; only text parts count toward the prompt.
        match message.get("content") {
            Some(Value::String(text)) => texts.push(text.clone()),
            Some(Value::Array(parts)) => texts.extend(
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .map(str::to_owned),
            ),
            _ => texts.push(String::new()),
        }
    }
    let stream_options = gojson::opt_object(
        &obj,
        "stream_options",
        &format!("{T}.stream_options"),
        "openai.StreamOptions",
    )?;
    let include_usage = match stream_options {
        Some(options) => gojson::opt_bool(
            options,
            "include_usage",
            &format!("{T}.stream_options.include_usage"),
        )?,
        None => None,
    };
    Ok(InferenceRequest {
        model: model(&obj, &format!("{T}.model"))?,
        stream: gojson::opt_bool(&obj, "stream", &format!("{T}.stream"))?.unwrap_or(false),
        limit: gojson::opt_int(&obj, "max_tokens", &format!("{T}.max_tokens"))?,
        messages: messages.len(),
        load_only: false,
        texts,
        raw: false,
        include_usage: include_usage.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_requests_follow_go_types() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"abcd"}],"options":{"num_predict":3}}"#;
        let req = parse_chat(body).unwrap();
        assert_eq!(
            (req.model.as_str(), req.stream, req.limit, req.load_only),
            ("m", true, Some(3), false)
        );
        let req = parse_generate(br#"{"model":"m","prompt":"","stream":false}"#).unwrap();
        assert!(req.load_only && !req.stream);
        let body = br#"{"model":"m","messages":[{"role":"user","content":[1]}]}"#;
        assert_eq!(
            parse_chat(body).unwrap_err().to_string(),
            "json: cannot unmarshal array into Go struct field ChatRequest.messages.content of type string"
        );
    }

    #[test]
    fn openai_requests_follow_go_types() {
        let body =
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],
            "stream":true,"stream_options":{"include_usage":true},"max_tokens":4}"#;
        let req = parse_chat_completion(body).unwrap();
        assert_eq!(
            (
                req.model.as_str(),
                req.stream,
                req.include_usage,
                req.limit,
                req.messages
            ),
            ("m", true, true, Some(4), 1)
        );
        assert_eq!(req.texts, ["hi"]);
        assert_eq!(
            parse_chat_completion(br#"{"model":"m","stream":"yes"}"#)
                .unwrap_err()
                .to_string(),
            "json: cannot unmarshal string into Go struct field ChatCompletionRequest.stream of type bool"
        );
    }
}
