//! Black-box tests of `observer sim`'s API: every route answers with the status, headers and
//! JSON shapes Ollama's Go server (and its OpenAI-compatible middleware) would send.

mod support;

use std::time::Duration;

use observer_sim::{prompt_tokens, reply_text};
use serde_json::Value;
use support::sim_client::*;

#[tokio::test]
async fn root_answers_like_ollama_for_get_and_head() {
    let sim = start(fast_config()).await;
    let reply = exchange(sim.local_addr(), &get("/")).await;
    assert_eq!(
        reply.head,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nDate: <date>\r\nContent-Length: 17\r\n"
    );
    assert_eq!(reply.text(), "Ollama is running");

    let mut client = Client::connect(sim.local_addr()).await;
    client.send(b"HEAD / HTTP/1.1\r\nHost: sim\r\n\r\n").await;
    let head = client.reply_to_head_request().await;
    assert_eq!(head.head, reply.head);
    // No body follows a HEAD response: the next response starts right after it.
    client.send(&get("/api/version")).await;
    assert_eq!(client.reply().await.text(), r#"{"version":"0.32.15"}"#);
}

#[tokio::test]
async fn version_tags_and_models_have_ollamas_shapes() {
    let sim = start(fast_config()).await;
    let addr = sim.local_addr();
    let version = exchange(addr, &get("/api/version")).await;
    assert_eq!(
        version.head,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nDate: <date>\r\nContent-Length: 21\r\n"
    );

    let tags = exchange(addr, &get("/api/tags")).await;
    let text = redact(&tags.text(), &["modified_at"]);
    assert!(text.starts_with(
        r#"{"models":[{"name":"llama3.2:1b","model":"llama3.2:1b","modified_at":_,"size":1321098329,"digest":"baf6a787fdffd633537aa2eb51cfd54cb93ff08e28040095462bb63daf552878","details":{"parent_model":"","format":"gguf","family":"llama","families":["llama"],"parameter_size":"1.2B","quantization_level":"Q8_0"},"capabilities":["completion"]},{"name":"qwen2.5:0.5b""#
    ), "{text}");
    let tags = tags.json();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["llama3.2:1b", "qwen2.5:0.5b"]);

    let models = exchange(addr, &get("/v1/models")).await;
    assert_eq!(
        models.head,
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: <date>\r\nContent-Length: {}\r\n",
            models.body.len()
        )
    );
    let text = redact(&models.text(), &["created"]);
    assert!(text.starts_with(r#"{"object":"list","data":[{"id":"llama3.2:1b","object":"model","created":_,"owned_by":"library"},"#), "{text}");
    assert!(text.ends_with("}]}\n"));
}

#[tokio::test]
async fn ps_lists_a_model_only_after_its_first_use() {
    let sim = start(fast_config()).await;
    let addr = sim.local_addr();
    assert_eq!(
        exchange(addr, &get("/api/ps")).await.text(),
        r#"{"models":[]}"#
    );
    exchange(addr, &post("/api/chat", CHAT)).await;
    let ps = exchange(addr, &get("/api/ps")).await;
    assert_eq!(
        redact(&ps.text(), &["expires_at"]),
        r#"{"models":[{"name":"llama3.2:1b","model":"llama3.2:1b","size":1919808367,"digest":"baf6a787fdffd633537aa2eb51cfd54cb93ff08e28040095462bb63daf552878","details":{"parent_model":"","format":"gguf","family":"llama","families":["llama"],"parameter_size":"1.2B","quantization_level":"Q8_0"},"expires_at":_,"size_vram":1919808367,"context_length":4096}]}"#
    );
}

#[tokio::test]
async fn streamed_chat_is_ndjson_one_line_per_chunk_with_consistent_metrics() {
    let sim = start(fast_config()).await;
    let reply = exchange(sim.local_addr(), &post("/api/chat", CHAT)).await;
    assert_eq!(
        reply.head,
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nDate: <date>\r\nTransfer-Encoding: chunked\r\n"
    );
    assert_eq!(reply.ending, Ending::Complete);
    assert_eq!(reply.chunks.len(), TOKENS as usize + 1);
    let lines: Vec<String> = reply
        .chunks
        .iter()
        .map(|c| String::from_utf8(c.clone()).unwrap())
        .collect();
    for line in &lines {
        assert_eq!(
            line.matches('\n').count(),
            1,
            "one line per chunk: {line:?}"
        );
        assert!(line.ends_with('\n'));
    }
    assert_eq!(
        redact(&lines[0], &["created_at"]),
        "{\"model\":\"llama3.2:1b\",\"created_at\":_,\"message\":{\"role\":\"assistant\",\"content\":\"The\"},\"done\":false}\n"
    );
    let last = lines.last().unwrap();
    assert_eq!(
        redact(
            last,
            &[
                "created_at",
                "total_duration",
                "load_duration",
                "prompt_eval_duration",
                "eval_duration"
            ]
        ),
        format!(
            "{{\"model\":\"llama3.2:1b\",\"created_at\":_,\"message\":{{\"role\":\"assistant\",\"content\":\"\"}},\"done\":true,\"done_reason\":\"stop\",\"total_duration\":_,\"load_duration\":_,\"prompt_eval_count\":{},\"prompt_eval_duration\":_,\"eval_count\":4,\"eval_duration\":_}}\n",
            prompt_tokens(["Why is the sky blue?"])
        )
    );
    let text: String = lines[..TOKENS as usize]
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(text, reply_text(TOKENS));

    let done: Value = serde_json::from_str(last).unwrap();
    let (total, load) = (
        duration(&done, "total_duration"),
        duration(&done, "load_duration"),
    );
    let (prompt, eval) = (
        duration(&done, "prompt_eval_duration"),
        duration(&done, "eval_duration"),
    );
    assert!(
        load >= Duration::from_millis(5),
        "first use pays the load delay: {done}"
    );
    assert!(prompt >= Duration::from_millis(5), "{done}");
    assert!(eval >= Duration::from_millis(u64::from(TOKENS)), "{done}");
    // As in Ollama, the total also holds the (here instant) wait for a parallel slot.
    let parts = load + prompt + eval;
    assert!(
        total >= parts && total - parts < Duration::from_millis(5),
        "{done}"
    );
}

#[tokio::test]
async fn a_loaded_model_does_not_pay_the_load_delay_again() {
    let mut config = fast_config();
    config.timing.load = Duration::from_millis(300);
    let sim = start(config).await;
    let body =
        r#"{"model":"qwen2.5:0.5b","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    let first = exchange(sim.local_addr(), &post("/api/chat", body))
        .await
        .json();
    let second = exchange(sim.local_addr(), &post("/api/chat", body))
        .await
        .json();
    assert!(
        duration(&first, "load_duration") >= Duration::from_millis(300),
        "{first}"
    );
    assert!(
        duration(&second, "load_duration") < Duration::from_millis(300),
        "{second}"
    );
}

#[tokio::test]
async fn non_streamed_chat_is_one_object_with_content_length() {
    let sim = start(fast_config()).await;
    let body =
        r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    let reply = exchange(sim.local_addr(), &post("/api/chat", body)).await;
    assert_eq!(
        reply.head,
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nDate: <date>\r\nContent-Length: {}\r\n",
            reply.body.len()
        )
    );
    let keys = [
        "created_at",
        "total_duration",
        "load_duration",
        "prompt_eval_duration",
        "eval_duration",
    ];
    assert_eq!(
        redact(&reply.text(), &keys),
        r#"{"model":"llama3.2:1b","created_at":_,"message":{"role":"assistant","content":"The sky appears blue"},"done":true,"done_reason":"stop","total_duration":_,"load_duration":_,"prompt_eval_count":5,"prompt_eval_duration":_,"eval_count":4,"eval_duration":_}"#
    );
}

#[tokio::test]
async fn generate_bodies_over_2048_bytes_are_chunked_like_go() {
    let sim = start(fast_config()).await;
    let addr = sim.local_addr();
    let small = exchange(
        addr,
        &post(
            "/api/generate",
            r#"{"model":"llama3.2:1b","prompt":"hi","stream":false}"#,
        ),
    )
    .await;
    assert!(small.body.len() <= 2048);
    assert_eq!(
        small.header("Content-Length"),
        Some(small.body.len().to_string().as_str())
    );
    assert_eq!(small.json()["response"], "The sky appears blue");
    assert_eq!(small.json()["context"].as_array().unwrap().len(), 5 + 4);

    // 300 tokens of context push the object past Go's 2048-byte buffer.
    let big = exchange(
        addr,
        &post_with(
            "/api/generate",
            "X-Sim-Fault: tokens=300, token-ms=0\r\n",
            r#"{"model":"llama3.2:1b","prompt":"hi","stream":false}"#,
        ),
    )
    .await;
    assert_eq!(
        big.head,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nDate: <date>\r\nTransfer-Encoding: chunked\r\n"
    );
    assert!(big.body.len() > 2048);
    assert_eq!(big.chunks.len(), 1, "the whole object is one chunk");
    assert_eq!(big.json()["eval_count"], 300);
}

#[tokio::test]
async fn streamed_generate_honours_num_predict() {
    let sim = start(fast_config()).await;
    let body = r#"{"model":"llama3.2:1b","prompt":"Why?","options":{"num_predict":2}}"#;
    let reply = exchange(sim.local_addr(), &post("/api/generate", body)).await;
    assert_eq!(reply.chunks.len(), 3);
    assert_eq!(
        redact(
            std::str::from_utf8(&reply.chunks[1]).unwrap(),
            &["created_at"]
        ),
        "{\"model\":\"llama3.2:1b\",\"created_at\":_,\"response\":\" sky\",\"done\":false}\n"
    );
    let done: Value = serde_json::from_slice(&reply.chunks[2]).unwrap();
    assert_eq!(
        (done["done_reason"].as_str(), done["eval_count"].as_u64()),
        (Some("length"), Some(2))
    );
    assert_eq!(done["prompt_eval_count"], 5);
    assert_eq!(done["response"], "");
}

#[tokio::test]
async fn empty_messages_or_prompt_only_load_the_model() {
    let sim = start(fast_config()).await;
    let reply = exchange(
        sim.local_addr(),
        &post("/api/chat", r#"{"model":"llama3.2:1b","messages":[]}"#),
    )
    .await;
    assert_eq!(
        redact(&reply.text(), &["created_at"]),
        r#"{"model":"llama3.2:1b","created_at":_,"message":{"role":"assistant","content":""},"done":true,"done_reason":"load"}"#
    );
    let reply = exchange(
        sim.local_addr(),
        &post("/api/generate", r#"{"model":"qwen2.5:0.5b"}"#),
    )
    .await;
    assert_eq!(
        redact(&reply.text(), &["created_at"]),
        r#"{"model":"qwen2.5:0.5b","created_at":_,"response":"","done":true,"done_reason":"load"}"#
    );
}

#[tokio::test]
async fn openai_stream_has_role_first_finish_chunk_usage_and_done() {
    let sim = start(fast_config()).await;
    let body = r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"Why is the sky blue?"}],"stream":true,"stream_options":{"include_usage":true}}"#;
    let reply = exchange(sim.local_addr(), &post("/v1/chat/completions", body)).await;
    assert_eq!(
        reply.head,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nDate: <date>\r\nTransfer-Encoding: chunked\r\n"
    );
    assert_eq!(reply.chunks.len(), TOKENS as usize + 1);
    let first = String::from_utf8(reply.chunks[0].clone()).unwrap();
    let id = first
        .split("\"id\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    assert!(
        id.strip_prefix("chatcmpl-")
            .unwrap()
            .parse::<u32>()
            .unwrap()
            < 999
    );
    assert_eq!(
        redact(&first, &["id", "created"]),
        "data: {\"id\":_,\"object\":\"chat.completion.chunk\",\"created\":_,\"model\":\"llama3.2:1b\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"The\"},\"finish_reason\":null}]}\n\n"
    );
    let second = String::from_utf8(reply.chunks[1].clone()).unwrap();
    assert!(
        second.contains(r#""delta":{"content":" sky"},"finish_reason":null"#),
        "{second}"
    );
    let tail = String::from_utf8(reply.chunks[TOKENS as usize].clone()).unwrap();
    let events: Vec<&str> = tail.split_terminator("\n\n").collect();
    assert_eq!(events.len(), 3, "{tail}");
    assert_eq!(
        redact(events[0], &["id", "created"]),
        r#"data: {"id":_,"object":"chat.completion.chunk","created":_,"model":"llama3.2:1b","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#
    );
    assert_eq!(
        redact(events[1], &["id", "created"]),
        r#"data: {"id":_,"object":"chat.completion.chunk","created":_,"model":"llama3.2:1b","system_fingerprint":"fp_ollama","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}"#
    );
    assert_eq!(events[2], "data: [DONE]");
}

#[tokio::test]
async fn openai_non_streamed_completion_carries_usage() {
    let sim = start(fast_config()).await;
    let body =
        r#"{"model":"qwen2.5:0.5b","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
    let reply = exchange(sim.local_addr(), &post("/v1/chat/completions", body)).await;
    assert_eq!(reply.header("Content-Type"), Some("application/json"));
    assert_eq!(
        redact(&reply.text(), &["id", "created"]),
        "{\"id\":_,\"object\":\"chat.completion\",\"created\":_,\"model\":\"qwen2.5:0.5b\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"The sky appears\"},\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n"
    );
}

#[tokio::test]
async fn errors_have_ollamas_status_and_text() {
    let sim = start(fast_config()).await;
    let addr = sim.local_addr();
    let missing = exchange(
        addr,
        &post(
            "/api/chat",
            r#"{"model":"nope:1b","messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await;
    assert_eq!(
        missing.head,
        "HTTP/1.1 404 Not Found\r\nContent-Type: application/json; charset=utf-8\r\nDate: <date>\r\nContent-Length: 37\r\n"
    );
    assert_eq!(missing.text(), r#"{"error":"model 'nope:1b' not found"}"#);
    let generate = exchange(
        addr,
        &post("/api/generate", r#"{"model":"nope","prompt":"x"}"#),
    )
    .await;
    assert_eq!(generate.text(), r#"{"error":"model 'nope' not found"}"#);

    let cases: &[(&str, &str, &str)] = &[
        ("/api/chat", "", r#"{"error":"missing request body"}"#),
        ("/api/chat", "{\"model\":", r#"{"error":"unexpected EOF"}"#),
        (
            "/api/chat",
            "hello",
            r#"{"error":"invalid character 'h' looking for beginning of value"}"#,
        ),
        (
            "/api/chat",
            r#"{"messages":[]}"#,
            r#"{"error":"model is required"}"#,
        ),
        (
            "/api/chat",
            r#"{"model":1}"#,
            r#"{"error":"json: cannot unmarshal number into Go struct field ChatRequest.model of type string"}"#,
        ),
    ];
    for (path, body, expected) in cases {
        let reply = exchange(addr, &post(path, body)).await;
        assert!(
            reply.head.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{body}: {}",
            reply.head
        );
        assert_eq!(reply.text(), *expected, "{body}");
    }

    let openai = exchange(
        addr,
        &post(
            "/v1/chat/completions",
            r#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await;
    assert!(
        openai
            .head
            .starts_with("HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"),
        "{}",
        openai.head
    );
    assert_eq!(
        openai.text(),
        "{\"error\":{\"message\":\"model 'nope' not found\",\"type\":\"not_found_error\",\"param\":null,\"code\":null}}\n"
    );
    let no_messages = exchange(
        addr,
        &post(
            "/v1/chat/completions",
            r#"{"model":"llama3.2:1b","messages":[]}"#,
        ),
    )
    .await;
    assert!(no_messages.head.starts_with(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json; charset=utf-8\r\n"
    ));
    assert_eq!(
        no_messages.text(),
        r#"{"error":{"message":"[] is too short - 'messages'","type":"invalid_request_error","param":null,"code":null}}"#
    );
}

#[tokio::test]
async fn unknown_routes_get_gins_404_and_405() {
    let sim = start(fast_config()).await;
    let addr = sim.local_addr();
    let not_found = exchange(addr, &get("/api/nothing?x=1")).await;
    assert_eq!(
        not_found.head,
        "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nDate: <date>\r\nContent-Length: 18\r\n"
    );
    assert_eq!(not_found.text(), "404 page not found");
    let not_allowed = exchange(addr, &get("/api/chat")).await;
    assert_eq!(
        not_allowed.head,
        "HTTP/1.1 405 Method Not Allowed\r\nAllow: POST\r\nContent-Type: text/plain\r\nDate: <date>\r\nContent-Length: 22\r\n"
    );
    assert_eq!(not_allowed.text(), "405 method not allowed");
    assert_eq!(
        exchange(addr, &post("/api/tags", "")).await.header("Allow"),
        Some("HEAD, GET")
    );
}
