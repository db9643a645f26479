//! Black-box tests of `observer sim`'s embedding routes and the OpenAI and Anthropic
//! compatibility routes beyond chat: each answers with bodies its API's clients parse.

mod support;

use observer_sim::{SimConfig, reply_text};
use serde_json::Value;
use support::sim_client::*;

fn events(reply: &Reply) -> Vec<String> {
    reply
        .text()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}

fn data(event: &str) -> Value {
    let line = event
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[tokio::test]
async fn api_embed_returns_unit_vectors_and_metrics() {
    let sim = start(fast_config()).await;
    let body = r#"{"model":"llama3.2:1b","input":["why is the sky blue?","hi"]}"#;
    let reply = exchange(sim.local_addr(), &post("/api/embed", body)).await;
    assert!(reply.head.starts_with("HTTP/1.1 200"), "{}", reply.head);
    assert_eq!(reply.header("Transfer-Encoding"), Some("chunked"));
    let json = reply.json();
    let embeddings = json["embeddings"].as_array().unwrap();
    assert_eq!(embeddings.len(), 2);
    assert_eq!(embeddings[0].as_array().unwrap().len(), 2048);
    assert_eq!(json["prompt_eval_count"], 5 + 1);
    assert!(json["total_duration"].as_u64().unwrap() >= json["load_duration"].as_u64().unwrap());
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 5, "{keys:?}");

    let body = r#"{"model":"llama3.2:1b","input":"x","dimensions":4}"#;
    let json = exchange(sim.local_addr(), &post("/api/embed", body))
        .await
        .json();
    let v: Vec<f64> = serde_json::from_value(json["embeddings"][0].clone()).unwrap();
    assert_eq!(v.len(), 4);
    assert!((v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4);

    let empty = exchange(
        sim.local_addr(),
        &post("/api/embed", r#"{"model":"llama3.2:1b"}"#),
    )
    .await;
    assert_eq!(empty.text(), r#"{"model":"llama3.2:1b","embeddings":[]}"#);
    let bad = exchange(
        sim.local_addr(),
        &post("/api/embed", r#"{"model":"llama3.2:1b","input":[1]}"#),
    )
    .await;
    assert_eq!(bad.text(), r#"{"error":"invalid input type"}"#);
}

#[tokio::test]
async fn api_embed_truncates_or_refuses_long_inputs() {
    let sim = start(SimConfig {
        context_length: 64,
        ..fast_config()
    })
    .await;
    let long = "x".repeat(1000);
    let body = format!(r#"{{"model":"llama3.2:1b","input":"{long}"}}"#);
    let json = exchange(sim.local_addr(), &post("/api/embed", &body))
        .await
        .json();
    assert_eq!(json["prompt_eval_count"], 62);
    let body = format!(r#"{{"model":"llama3.2:1b","input":"{long}","truncate":false}}"#);
    let refused = exchange(sim.local_addr(), &post("/api/embed", &body)).await;
    assert!(refused.head.starts_with("HTTP/1.1 400"));
    assert_eq!(
        refused.text(),
        r#"{"error":"the input length exceeds the context length"}"#
    );
}

#[tokio::test]
async fn legacy_embeddings_and_openai_embeddings() {
    let sim = start(fast_config()).await;
    let body = r#"{"model":"qwen2.5:0.5b","prompt":"hi"}"#;
    let json = exchange(sim.local_addr(), &post("/api/embeddings", body))
        .await
        .json();
    assert_eq!(json["embedding"].as_array().unwrap().len(), 896);
    let empty = exchange(
        sim.local_addr(),
        &post("/api/embeddings", r#"{"model":"qwen2.5:0.5b"}"#),
    )
    .await;
    assert_eq!(empty.text(), r#"{"embedding":[]}"#);

    let body = r#"{"model":"qwen2.5:0.5b","input":["a","b"]}"#;
    let reply = exchange(sim.local_addr(), &post("/v1/embeddings", body)).await;
    assert_eq!(reply.header("Content-Type"), Some("application/json"));
    let json = reply.json();
    assert_eq!(json["object"], "list");
    assert_eq!(json["data"][1]["object"], "embedding");
    assert_eq!(json["data"][1]["index"], 1);
    assert_eq!(
        json["usage"],
        serde_json::json!({"prompt_tokens": 2, "total_tokens": 2})
    );
    let body = r#"{"model":"qwen2.5:0.5b","input":"a","encoding_format":"base64"}"#;
    let json = exchange(sim.local_addr(), &post("/v1/embeddings", body))
        .await
        .json();
    assert_eq!(
        json["data"][0]["embedding"].as_str().unwrap().len(),
        (896 * 4_usize).div_ceil(3) * 4
    );
    let body = r#"{"model":"qwen2.5:0.5b","input":[]}"#;
    let bad = exchange(sim.local_addr(), &post("/v1/embeddings", body)).await;
    assert_eq!(
        bad.text(),
        r#"{"error":{"message":"invalid input","type":"invalid_request_error","param":null,"code":null}}"#
    );
}

#[tokio::test]
async fn openai_completions_stream_and_whole() {
    let sim = start(fast_config()).await;
    let body = r#"{"model":"llama3.2:1b","prompt":"Why?","stream":true,"stream_options":{"include_usage":true}}"#;
    let reply = exchange(sim.local_addr(), &post("/v1/completions", body)).await;
    assert_eq!(reply.header("Content-Type"), Some("text/event-stream"));
    let events = events(&reply);
    assert_eq!(events.len(), TOKENS as usize + 3, "{events:?}");
    assert_eq!(events.last().unwrap(), "data: [DONE]");
    let text: String = events[..TOKENS as usize]
        .iter()
        .map(|e| data(e)["choices"][0]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, reply_text(TOKENS));
    let last = data(&events[TOKENS as usize]);
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["usage"]["total_tokens"], 0);
    let usage = data(&events[TOKENS as usize + 1]);
    assert_eq!(usage["choices"], serde_json::json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], TOKENS);

    let body = r#"{"model":"llama3.2:1b","prompt":"Why?","max_tokens":2}"#;
    let json = exchange(sim.local_addr(), &post("/v1/completions", body))
        .await
        .json();
    assert_eq!(json["object"], "text_completion");
    assert!(json["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(json["choices"][0]["text"], reply_text(2));
    assert_eq!(json["choices"][0]["finish_reason"], "length");
    assert_eq!(json["usage"]["completion_tokens"], 2);
}

fn event_names(reply: &Reply) -> Vec<String> {
    events(reply)
        .iter()
        .map(|e| {
            e.lines()
                .next()
                .unwrap()
                .trim_start_matches("event: ")
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn anthropic_messages_stream_events_with_usage() {
    let sim = start(fast_config()).await;
    let body = r#"{"model":"llama3.2:1b","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"Why is the sky blue?"}]}"#;
    let request = post_with("/v1/messages", "X-Sim-Fault: think=2\r\n", body);
    let reply = exchange(sim.local_addr(), &request).await;
    assert!(reply.head.contains("Cache-Control: no-cache\r\nConnection: keep-alive\r\nContent-Type: text/event-stream\r\n"), "{}", reply.head);
    let names = event_names(&reply);
    let mut expected = vec![
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
    ];
    expected.extend(std::iter::repeat_n("content_block_delta", TOKENS as usize));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    // Every event is its own flush.
    assert_eq!(reply.chunks.len(), expected.len());
    let events = events(&reply);
    let start = data(&events[0]);
    assert!(start["message"]["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(start["message"]["usage"]["input_tokens"], (4 + 20) / 4);
    assert_eq!(
        data(&events[1])["content_block"],
        serde_json::json!({"type": "thinking", "thinking": ""})
    );
    assert_eq!(data(&events[2])["delta"]["type"], "thinking_delta");
    assert_eq!(data(&events[5])["index"], 1);
    assert_eq!(
        data(&events[6])["delta"],
        serde_json::json!({"type": "text_delta", "text": "The"})
    );
    let delta = data(&events[events.len() - 2]);
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 2 + TOKENS);
}

#[tokio::test]
async fn anthropic_messages_whole_with_tool_use_and_errors() {
    let sim = start(fast_config()).await;
    let body = r#"{"model":"llama3.2:1b","max_tokens":100,"messages":[{"role":"user","content":"Weather?"}],"tools":[{"name":"get_weather","description":"d","input_schema":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}]}"#;
    let reply = exchange(sim.local_addr(), &post("/v1/messages", body)).await;
    assert_eq!(reply.header("Content-Type"), Some("application/json"));
    let json = reply.json();
    assert_eq!(json["type"], "message");
    assert_eq!(json["stop_reason"], "tool_use");
    let block = &json["content"][0];
    assert_eq!(block["type"], "tool_use");
    assert_eq!(block["input"], serde_json::json!({"city": "sim"}));
    let body = r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"hi"}]}"#;
    let bad = exchange(sim.local_addr(), &post("/v1/messages", body))
        .await
        .json();
    assert_eq!(bad["type"], "error");
    assert_eq!(bad["error"]["type"], "invalid_request_error");
    assert_eq!(
        bad["error"]["message"],
        "max_tokens is required and must be positive"
    );
    let body = r#"{"model":"nope","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
    let missing = exchange(sim.local_addr(), &post("/v1/messages", body))
        .await
        .json();
    assert_eq!(missing["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn openai_responses_stream_events_and_whole_response() {
    let sim = start(fast_config()).await;
    let body = r#"{"model":"llama3.2:1b","input":"Why is the sky blue?","stream":true}"#;
    let request = post_with("/v1/responses", "X-Sim-Fault: think=2\r\n", body);
    let reply = exchange(sim.local_addr(), &request).await;
    assert_eq!(reply.header("Content-Type"), Some("text/event-stream"));
    let names = event_names(&reply);
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n(
        "response.output_text.delta",
        TOKENS as usize,
    ));
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names, expected);
    let events = events(&reply);
    for (i, event) in events.iter().enumerate() {
        assert_eq!(data(event)["sequence_number"], i, "{event}");
    }
    let completed = data(events.last().unwrap());
    let response = &completed["response"];
    assert_eq!(response["status"], "completed");
    assert_eq!(response["output"][0]["type"], "reasoning");
    assert_eq!(
        response["output"][1]["content"][0]["text"],
        reply_text(TOKENS)
    );
    assert_eq!(response["usage"]["output_tokens"], 2 + TOKENS);
    // Go maps: keys sorted.
    let raw = events.last().unwrap();
    assert!(
        raw.contains(r#"data: {"response":{"background":false,"completed_at":"#),
        "{raw}"
    );

    let body =
        r#"{"model":"llama3.2:1b","input":[{"role":"user","content":"hi"}],"max_output_tokens":2}"#;
    let reply = exchange(sim.local_addr(), &post("/v1/responses", body)).await;
    let text = reply.text();
    assert!(text.starts_with(r#"{"id":"resp_"#), "{text}");
    let json = reply.json();
    assert_eq!(json["object"], "response");
    assert_eq!(json["output"][0]["content"][0]["text"], reply_text(2));
    assert_eq!(json["max_output_tokens"], 2);
    assert_eq!(json["top_p"], 1);
}
