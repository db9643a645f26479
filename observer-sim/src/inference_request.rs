//! What an inference request asks for, read from the body of `/api/chat`, `/api/generate` or
//! `/v1/chat/completions` with Go's decoding rules (`api.ChatRequest`, `api.GenerateRequest`,
//! `openai.ChatCompletionRequest`), so type mistakes get Ollama's 400 texts.
//!
//! `truncate` and `shift` are fields of the native requests only (`api.GenerateRequest`,
//! `api.ChatRequest`); the OpenAI middleware sets neither, so those requests get the defaults.
//! Only the fields the simulator acts on are read; the rest of the body is ignored like
//! unknown JSON fields in Go.

use serde_json::{Map, Value};

use super::generation::{PromptFit, PromptText};
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
    pub texts: Vec<PromptText>,
    /// `options.num_ctx`: the context the model must be loaded with.
    pub num_ctx: Option<u32>,
    /// `truncate`, `shift` and `options.num_keep`.
    pub fit: PromptFit,
    /// No messages / empty prompt: Ollama only loads the model.
    pub load_only: bool,
    /// A `raw` generate request gets no `context`.
    pub raw: bool,
    /// OpenAI `stream_options.include_usage`.
    pub include_usage: bool,
    /// `think` (a level counts as true; OpenAI: `reasoning_effort`); `None`: the model's default.
    pub think: Option<bool>,
    /// The request's tools, for the calls a reply makes.
    pub tools: Vec<ToolSpec>,
    /// The last message is a tool's result: the model answers instead of calling again.
    pub after_tool_result: bool,
}

/// A tool a request offers, with the arguments the simulated model calls it with: each
/// required parameter (all when none is marked required) set to a value of its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSpec {
    pub name: String,
    pub arguments: Map<String, Value>,
}

/// `tools` of a native or OpenAI chat request (`[{"type":"function","function":{…}}]`).
fn tools(obj: &Map<String, Value>, path: &str) -> Result<Vec<ToolSpec>, DecodeError> {
    Ok(tools_from(gojson::opt_array(
        obj,
        "tools",
        path,
        "api.Tools",
    )?))
}

/// Tools of `[{"type":"function","function":{"name":…,"parameters":{…}}}]`.
pub fn tools_from(tools: &[Value]) -> Vec<ToolSpec> {
    tools
        .iter()
        .filter_map(|tool| tool.get("function"))
        .map(|function| {
            let name = function.get("name").and_then(Value::as_str).unwrap_or("");
            let parameters = function.get("parameters");
            let properties = parameters
                .and_then(|p| p.get("properties"))
                .and_then(Value::as_object);
            let required: Option<Vec<&str>> = parameters
                .and_then(|p| p.get("required"))
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect());
            let arguments = properties
                .into_iter()
                .flatten()
                .filter(|(key, _)| required.as_ref().is_none_or(|r| r.contains(&key.as_str())))
                .map(|(key, schema)| (key.clone(), argument_value(schema)))
                .collect();
            ToolSpec {
                name: name.to_owned(),
                arguments,
            }
        })
        .collect()
}

/// A plausible value for a parameter of this JSON schema.
fn argument_value(schema: &Value) -> Value {
    match schema.get("type").and_then(Value::as_str) {
        Some("integer" | "number") => Value::from(1),
        Some("boolean") => Value::Bool(true),
        Some("array") => Value::Array(Vec::new()),
        Some("object") => Value::Object(Map::new()),
        _ => match schema
            .get("enum")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        {
            Some(first) => first.clone(),
            None => Value::from("sim"),
        },
    }
}

/// `think` of a native request: a bool, or a level ("low", "medium", "high") meaning true.
fn think(obj: &Map<String, Value>) -> Option<bool> {
    match obj.get("think") {
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::String(level)) => Some(!level.is_empty()),
        _ => None,
    }
}

/// `thinkFromReasoningEffort` (openai/openai.go): the think value of an OpenAI effort.
pub fn think_from_effort(effort: &str) -> Result<Option<bool>, String> {
    match effort {
        "" => Ok(None),
        "none" => Ok(Some(false)),
        "minimal" | "low" | "medium" | "high" | "max" | "xhigh" | "ultra" => Ok(Some(true)),
        other => Err(format!(
            "invalid reasoning value: {other:?} (must be \"minimal\", \"low\", \"medium\", \"high\", \
             \"xhigh\", \"ultra\", \"max\", or \"none\")"
        )),
    }
}

/// The `options` the simulator acts on: `num_predict`, `num_ctx`, `num_keep`.
struct Options {
    num_predict: Option<i64>,
    num_ctx: Option<u32>,
    num_keep: Option<i64>,
}

fn options(obj: &Map<String, Value>, path: &str) -> Result<Options, DecodeError> {
    let options = gojson::opt_object(obj, "options", path, "map[string]interface {}")?;
    // Options.FromMap accepts any JSON number for an int option.
    let int = |key: &str| {
        options
            .and_then(|o| o.get(key))
            .and_then(Value::as_f64)
            .map(|n| n as i64)
    };
    Ok(Options {
        num_predict: int("num_predict"),
        // getRunner (server/sched.go) raises a context below 4 to 4.
        num_ctx: int("num_ctx").map(|n| n.clamp(4, i64::from(u32::MAX)) as u32),
        num_keep: int("num_keep"),
    })
}

/// `truncate` and `shift` (both default true) of a native request, with its `num_keep`.
fn prompt_fit(
    obj: &Map<String, Value>,
    go_type: &str,
    num_keep: Option<i64>,
) -> Result<PromptFit, DecodeError> {
    let truncate = gojson::opt_bool(obj, "truncate", &format!("{go_type}.truncate"))?;
    let shift = gojson::opt_bool(obj, "shift", &format!("{go_type}.shift"))?;
    let default = PromptFit::default();
    Ok(PromptFit {
        truncate: truncate.unwrap_or(default.truncate),
        shift: shift.unwrap_or(default.shift),
        num_keep: num_keep.unwrap_or(default.num_keep),
    })
}

fn prompt_text(text: &str, system: bool) -> PromptText {
    PromptText {
        text: text.to_owned(),
        system,
    }
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
    let mut last_role = String::new();
    for message in gojson::opt_array(&obj, "messages", "ChatRequest.messages", "[]api.Message")? {
        let Value::Object(message) = message else {
            return Err(gojson::type_error(
                "ChatRequest.messages",
                message,
                "api.Message",
            ));
        };
        let role = gojson::opt_str(message, "role", "ChatRequest.messages.role")?;
        let content = gojson::opt_str(message, "content", "ChatRequest.messages.content")?;
        // api.Message's UnmarshalJSON lowercases the role.
        last_role = role.unwrap_or_default().to_ascii_lowercase();
        texts.push(prompt_text(
            content.unwrap_or_default(),
            last_role == "system",
        ));
    }
    let options = options(&obj, "ChatRequest.options")?;
    Ok(InferenceRequest {
        model: model(&obj, "ChatRequest.model")?,
        stream: gojson::opt_bool(&obj, "stream", "ChatRequest.stream")?.unwrap_or(true),
        limit: options.num_predict,
        messages: texts.len(),
        load_only: texts.is_empty(),
        texts,
        num_ctx: options.num_ctx,
        fit: prompt_fit(&obj, "ChatRequest", options.num_keep)?,
        raw: false,
        include_usage: false,
        think: think(&obj),
        tools: tools(&obj, "ChatRequest.tools")?,
        after_tool_result: last_role == "tool",
    })
}

/// An `/api/generate` body (`api.GenerateRequest`; `stream` defaults to true).
pub fn parse_generate(body: &[u8]) -> Result<InferenceRequest, DecodeError> {
    let obj = gojson::decode_object(body, "api.GenerateRequest")?;
    let prompt = gojson::opt_str(&obj, "prompt", "GenerateRequest.prompt")?.unwrap_or_default();
    let system = gojson::opt_str(&obj, "system", "GenerateRequest.system")?;
    let options = options(&obj, "GenerateRequest.options")?;
    Ok(InferenceRequest {
        model: model(&obj, "GenerateRequest.model")?,
        stream: gojson::opt_bool(&obj, "stream", "GenerateRequest.stream")?.unwrap_or(true),
        limit: options.num_predict,
        messages: 1,
        load_only: prompt.is_empty(),
        texts: system
            .map(|s| prompt_text(s, true))
            .into_iter()
            .chain([prompt_text(prompt, false)])
            .collect(),
        num_ctx: options.num_ctx,
        fit: prompt_fit(&obj, "GenerateRequest", options.num_keep)?,
        raw: gojson::opt_bool(&obj, "raw", "GenerateRequest.raw")?.unwrap_or(false),
        include_usage: false,
        think: think(&obj),
        tools: Vec::new(),
        after_tool_result: false,
    })
}

/// A `/v1/chat/completions` body (`openai.ChatCompletionRequest`; `stream` defaults to false);
/// the error is the middleware's 400 text.
pub fn parse_chat_completion(body: &[u8]) -> Result<InferenceRequest, String> {
    let mut req = decode_chat_completion(body).map_err(|e| e.to_string())?;
    // FromChatRequest: `reasoning.effort`, else `reasoning_effort`.
    let obj =
        gojson::decode_object(body, "openai.ChatCompletionRequest").map_err(|e| e.to_string())?;
    let effort = obj
        .get("reasoning")
        .and_then(|r| r.get("effort"))
        .or_else(|| obj.get("reasoning_effort"))
        .and_then(Value::as_str)
        .unwrap_or("");
    req.think = think_from_effort(effort)?;
    Ok(req)
}

fn decode_chat_completion(body: &[u8]) -> Result<InferenceRequest, DecodeError> {
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
        let system = message.get("role").and_then(Value::as_str) == Some("system");
        match message.get("content") {
            Some(Value::String(text)) => texts.push(prompt_text(text, system)),
            Some(Value::Array(parts)) => texts.extend(
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .map(|text| prompt_text(text, system)),
            ),
            _ => texts.push(prompt_text("", system)),
        }
    }
    let include_usage = include_usage(&obj, T)?;
    Ok(InferenceRequest {
        model: model(&obj, &format!("{T}.model"))?,
        stream: gojson::opt_bool(&obj, "stream", &format!("{T}.stream"))?.unwrap_or(false),
        limit: gojson::opt_int(&obj, "max_tokens", &format!("{T}.max_tokens"))?,
        messages: messages.len(),
        load_only: false,
        texts,
        num_ctx: None,
        fit: PromptFit::default(),
        raw: false,
        include_usage,
        think: None,
        tools: tools(&obj, &format!("{T}.tools"))?,
        after_tool_result: messages
            .last()
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            == Some("tool"),
    })
}

/// `stream_options.include_usage` of an OpenAI request body of Go type `T` (false when absent).
fn include_usage(obj: &Map<String, Value>, t: &str) -> Result<bool, DecodeError> {
    let Some(options) = gojson::opt_object(
        obj,
        "stream_options",
        &format!("{t}.stream_options"),
        "openai.StreamOptions",
    )?
    else {
        return Ok(false);
    };
    Ok(gojson::opt_bool(
        options,
        "include_usage",
        &format!("{t}.stream_options.include_usage"),
    )?
    .unwrap_or(false))
}

/// A `/v1/completions` body (`openai.CompletionRequest`; `stream` defaults to false), as
/// `FromCompleteRequest` makes it a generate request.
pub fn parse_completion(body: &[u8]) -> Result<InferenceRequest, DecodeError> {
    const T: &str = "CompletionRequest";
    let obj = gojson::decode_object(body, "openai.CompletionRequest")?;
    let prompt = gojson::opt_str(&obj, "prompt", &format!("{T}.prompt"))?.unwrap_or_default();
    let include_usage = include_usage(&obj, T)?;
    Ok(InferenceRequest {
        model: model(&obj, &format!("{T}.model"))?,
        stream: gojson::opt_bool(&obj, "stream", &format!("{T}.stream"))?.unwrap_or(false),
        limit: gojson::opt_int(&obj, "max_tokens", &format!("{T}.max_tokens"))?,
        messages: 1,
        load_only: prompt.is_empty(),
        texts: vec![prompt_text(prompt, false)],
        num_ctx: None,
        fit: PromptFit::default(),
        raw: false,
        include_usage,
        think: None,
        tools: Vec::new(),
        after_tool_result: false,
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
        let body =
            br#"{"model":"m","prompt":"p","truncate":false,"options":{"num_ctx":2,"num_keep":-1}}"#;
        let req = parse_generate(body).unwrap();
        assert_eq!(req.num_ctx, Some(4));
        assert_eq!(
            req.fit,
            PromptFit {
                truncate: false,
                shift: true,
                num_keep: -1
            }
        );
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
        assert_eq!(req.texts, [prompt_text("hi", false)]);
        assert_eq!(
            parse_chat_completion(br#"{"model":"m","stream":"yes"}"#)
                .unwrap_err()
                .to_string(),
            "json: cannot unmarshal string into Go struct field ChatCompletionRequest.stream of type bool"
        );
    }
}
