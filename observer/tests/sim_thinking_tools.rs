//! Black-box tests of thinking and tool calls in `observer sim`'s replies: the native API's
//! `thinking` and `tool_calls` fields, streamed as Ollama streams them, and their OpenAI forms
//! (`reasoning`, `tool_calls` with JSON-text arguments, `finish_reason: tool_calls`).

mod support;

use observer_sim::{SimConfig, TOOL_CALL_TOKENS, reply_text, thinking_reply};
use serde_json::Value;
use support::sim_client::*;

fn lines(reply: &Reply) -> Vec<Value> {
    reply
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const TOOLS: &str = r#""tools":[{"type":"function","function":{"name":"get_weather","description":"Weather","parameters":{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"},"unit":{"type":"string"}},"required":["city","days"]}}}]"#;

#[tokio::test]
async fn forced_thinking_streams_first_then_the_answer() {
    let sim = start(fast_config()).await;
    let request = post_with("/api/chat", "X-Sim-Fault: think=3\r\n", CHAT);
    let lines = lines(&exchange(sim.local_addr(), &request).await);
    assert_eq!(lines.len(), 3 + TOKENS as usize + 1);
    let thinking: String = lines[..3]
        .iter()
        .map(|l| {
            assert_eq!(l["message"]["content"], "", "{l}");
            l["message"]["thinking"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(thinking, thinking_reply(3));
    let answer: String = lines[3..3 + TOKENS as usize]
        .iter()
        .map(|l| {
            assert!(l["message"].get("thinking").is_none(), "{l}");
            l["message"]["content"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(answer, reply_text(TOKENS));
    let done = lines.last().unwrap();
    assert_eq!(done["eval_count"], 3 + TOKENS, "{done}");

    let body = r#"{"model":"llama3.2:1b","prompt":"hi","stream":false}"#;
    let request = post_with("/api/generate", "X-Sim-Fault: think=2\r\n", body);
    let whole = exchange(sim.local_addr(), &request).await.json();
    assert_eq!(whole["thinking"], thinking_reply(2), "{whole}");
    assert_eq!(whole["response"], reply_text(TOKENS), "{whole}");
}

#[tokio::test]
async fn think_is_refused_by_a_model_that_cannot_and_default_for_one_that_can() {
    let sim = start(SimConfig {
        models: vec!["llama3.2:1b".into(), "qwen3:0.6b".into()],
        ..fast_config()
    })
    .await;
    let body =
        r#"{"model":"llama3.2:1b","think":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let refused = exchange(sim.local_addr(), &post("/api/chat", body)).await;
    assert!(refused.head.starts_with("HTTP/1.1 400"), "{}", refused.head);
    assert_eq!(
        refused.text(),
        r#"{"error":"\"llama3.2:1b\" does not support thinking"}"#
    );

    let body =
        r#"{"model":"qwen3:0.6b","stream":false,"messages":[{"role":"user","content":"hi"}]}"#;
    let thought = exchange(sim.local_addr(), &post("/api/chat", body))
        .await
        .json();
    assert_eq!(
        thought["message"]["thinking"],
        thinking_reply(TOKENS / 2),
        "{thought}"
    );
    let body = r#"{"model":"qwen3:0.6b","think":false,"stream":false,"messages":[{"role":"user","content":"hi"}]}"#;
    let plain = exchange(sim.local_addr(), &post("/api/chat", body))
        .await
        .json();
    assert!(plain["message"].get("thinking").is_none(), "{plain}");

    // OpenAI: reasoning_effort maps to think; the thinking is `reasoning`.
    let body = r#"{"model":"qwen3:0.6b","reasoning_effort":"high","messages":[{"role":"user","content":"hi"}]}"#;
    let completion = exchange(sim.local_addr(), &post("/v1/chat/completions", body))
        .await
        .json();
    let message = &completion["choices"][0]["message"];
    assert_eq!(
        message["reasoning"],
        thinking_reply(TOKENS / 2),
        "{completion}"
    );
    let body = r#"{"model":"qwen3:0.6b","reasoning_effort":"huge","messages":[{"role":"user","content":"hi"}]}"#;
    let bad = exchange(sim.local_addr(), &post("/v1/chat/completions", body)).await;
    assert!(bad.head.starts_with("HTTP/1.1 400"), "{}", bad.head);
    assert!(
        bad.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid reasoning value: \"huge\"")
    );
}

#[tokio::test]
async fn tools_get_one_call_then_an_answer_after_the_result() {
    let sim = start(fast_config()).await;
    let body = format!(
        r#"{{"model":"llama3.2:1b","messages":[{{"role":"user","content":"Weather in Paris?"}}],{TOOLS}}}"#
    );
    let lines = lines(&exchange(sim.local_addr(), &post("/api/chat", &body)).await);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let call = &lines[0]["message"]["tool_calls"][0];
    assert_eq!(lines[0]["message"]["content"], "");
    let id = call["id"].as_str().unwrap();
    assert!(id.starts_with("call_") && id.len() == 13, "{call}");
    assert_eq!(
        call["function"],
        serde_json::json!({"index": 0, "name": "get_weather", "arguments": {"city": "sim", "days": 1}})
    );
    assert_eq!(lines[1]["done_reason"], "stop");
    assert_eq!(lines[1]["eval_count"], TOOL_CALL_TOKENS);

    let after = format!(
        r#"{{"model":"llama3.2:1b","stream":false,"messages":[{{"role":"user","content":"Weather?"}},{{"role":"tool","content":"sunny"}}],{TOOLS}}}"#
    );
    let answer = exchange(sim.local_addr(), &post("/api/chat", &after))
        .await
        .json();
    assert_eq!(answer["message"]["content"], reply_text(TOKENS), "{answer}");
    assert!(answer["message"].get("tool_calls").is_none());
}

#[tokio::test]
async fn openai_tool_calls_stream_as_deltas_and_finish_with_tool_calls() {
    let sim = start(fast_config()).await;
    let body = format!(
        r#"{{"model":"llama3.2:1b","stream":true,"messages":[{{"role":"user","content":"Weather?"}}],{TOOLS}}}"#
    );
    let reply = exchange(sim.local_addr(), &post("/v1/chat/completions", &body)).await;
    let events: Vec<Value> = reply
        .text()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    let delta = &events[0]["choices"][0]["delta"];
    assert_eq!(delta["role"], "assistant");
    assert_eq!(delta["content"], "");
    let call = &delta["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["index"], 0);
    assert_eq!(call["function"]["arguments"], r#"{"city":"sim","days":1}"#);
    assert_eq!(events[1]["choices"][0]["finish_reason"], "tool_calls");

    let forced = post_with(
        "/v1/chat/completions",
        "X-Sim-Fault: tool-calls=2\r\n",
        r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"hi"}]}"#,
    );
    let completion = exchange(sim.local_addr(), &forced).await.json();
    let choice = &completion["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{completion}");
    assert_eq!(
        choice["message"]["tool_calls"][1]["function"]["name"],
        "sim_tool"
    );
    assert_eq!(
        completion["usage"]["completion_tokens"],
        2 * TOOL_CALL_TOKENS
    );
}
