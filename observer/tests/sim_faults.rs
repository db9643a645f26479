//! Black-box tests of `observer sim`'s injected faults: resets mid-stream, status faults,
//! mid-stream error lines, slow heads, first-token overrides, hangs, and configured rates.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::sim_client::*;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn reset_fault_cuts_the_stream_after_n_chunks() {
    let sim = start(fast_config()).await;
    let reply = exchange(
        sim.local_addr(),
        &post_with("/api/chat", "X-Sim-Fault: reset-after=2\r\n", CHAT),
    )
    .await;
    assert_eq!(reply.chunks.len(), 2);
    assert_eq!(reply.ending, Ending::Reset);

    // A non-streamed response has no chunk to stop after: the reset comes instead of it.
    let mut client = Client::connect(sim.local_addr()).await;
    client
        .send(&post_with(
            "/api/generate",
            "X-Sim-Fault: reset-after=1\r\n",
            r#"{"model":"llama3.2:1b","prompt":"x","stream":false}"#,
        ))
        .await;
    assert_eq!(client.fill_to(1).await, Some(Ending::Reset));
    assert!(client.buf.is_empty());
}

#[tokio::test]
async fn status_fault_answers_ollamas_error() {
    let sim = start(fast_config()).await;
    let reply = exchange(
        sim.local_addr(),
        &post_with("/api/chat", "X-Sim-Fault: status=503\r\n", CHAT),
    )
    .await;
    assert_eq!(
        reply.head,
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\nDate: <date>\r\nContent-Length: 77\r\n"
    );
    assert_eq!(
        reply.text(),
        r#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#
    );
    let openai = exchange(
        sim.local_addr(),
        &post_with(
            "/v1/chat/completions",
            "X-Sim-Fault: status=500\r\n",
            r#"{"model":"llama3.2:1b","messages":[]}"#,
        ),
    )
    .await;
    assert!(
        openai.head.starts_with(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
        )
    );
    assert_eq!(openai.json()["error"]["type"], "api_error");
    let bad = exchange(
        sim.local_addr(),
        &post_with("/api/chat", "X-Sim-Fault: explode\r\n", CHAT),
    )
    .await;
    assert!(bad.head.starts_with("HTTP/1.1 400 Bad Request\r\n"));
    assert_eq!(
        bad.text(),
        r#"{"error":"unknown fault \"explode\" in X-Sim-Fault"}"#
    );
}

#[tokio::test]
async fn mid_stream_error_is_an_error_line_after_n_chunks() {
    let sim = start(fast_config()).await;
    let addr = sim.local_addr();
    let reply = exchange(
        addr,
        &post_with("/api/chat", "X-Sim-Fault: error-after=2\r\n", CHAT),
    )
    .await;
    assert!(reply.head.starts_with("HTTP/1.1 200 OK\r\n"));
    assert_eq!(reply.ending, Ending::Complete);
    assert_eq!(reply.chunks.len(), 3);
    assert_eq!(
        reply.chunks[2],
        b"{\"error\":\"an error was encountered while running the model: unexpected EOF\"}\n"
            .to_vec()
    );

    let before_content = exchange(
        addr,
        &post_with("/api/chat", "X-Sim-Fault: error-after=0\r\n", CHAT),
    )
    .await;
    assert_eq!(
        before_content.head,
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nDate: <date>\r\nTransfer-Encoding: chunked\r\n"
    );
    assert_eq!(
        before_content.text(),
        r#"{"error":"an error was encountered while running the model: unexpected EOF"}"#
    );

    // The OpenAI middleware has no error event: the stream ends on an empty, model-less chunk.
    let body =
        r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let openai = exchange(
        addr,
        &post_with(
            "/v1/chat/completions",
            "X-Sim-Fault: error-after=1\r\n",
            body,
        ),
    )
    .await;
    assert_eq!(openai.chunks.len(), 2);
    assert_eq!(
        redact(
            std::str::from_utf8(&openai.chunks[1]).unwrap(),
            &["id", "created"]
        ),
        "data: {\"id\":_,\"object\":\"chat.completion.chunk\",\"created\":_,\"model\":\"\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"finish_reason\":null}]}\n\n"
    );
}

#[tokio::test]
async fn slow_head_and_first_token_overrides_delay_the_response() {
    let sim = start(fast_config()).await;
    let started = Instant::now();
    let mut client = Client::connect(sim.local_addr()).await;
    client
        .send(b"GET /api/version HTTP/1.1\r\nHost: sim\r\nX-Sim-Fault: slow-head-ms=150\r\n\r\n")
        .await;
    let slow = client.reply().await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(slow.text(), r#"{"version":"0.32.15"}"#);

    let started = Instant::now();
    let reply = exchange(
        sim.local_addr(),
        &post_with("/api/chat", "X-Sim-Fault: first-token-ms=300\r\n", CHAT),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    let done: Value = serde_json::from_slice(reply.chunks.last().unwrap()).unwrap();
    assert!(
        duration(&done, "prompt_eval_duration") >= Duration::from_millis(300),
        "{done}"
    );
}

#[tokio::test]
async fn hang_fault_never_answers() {
    let sim = start(fast_config()).await;
    let mut client = Client::connect(sim.local_addr()).await;
    client
        .send(&post_with("/api/chat", "X-Sim-Fault: hang\r\n", CHAT))
        .await;
    let mut byte = [0u8; 1];
    let waited =
        tokio::time::timeout(Duration::from_millis(300), client.stream.read(&mut byte)).await;
    assert!(waited.is_err(), "expected no answer, got {waited:?}");
    // Other connections are unaffected.
    assert_eq!(
        exchange(sim.local_addr(), &get("/")).await.text(),
        "Ollama is running"
    );
}

#[tokio::test]
async fn configured_fault_rates_hit_inference_routes_only() {
    let mut config = fast_config();
    config.faults.status_rate = 1.0;
    let sim = start(config).await;
    let chat = exchange(sim.local_addr(), &post("/api/chat", CHAT)).await;
    assert!(
        chat.head
            .starts_with("HTTP/1.1 500 Internal Server Error\r\n")
    );
    assert_eq!(
        chat.text(),
        r#"{"error":"model runner has unexpectedly stopped, this may be due to resource limitations or an internal error, check ollama server logs for details"}"#
    );
    assert!(
        exchange(sim.local_addr(), &get("/api/tags"))
            .await
            .head
            .starts_with("HTTP/1.1 200 OK\r\n")
    );
    // A request that names its faults is exempt from the rates.
    let clean = exchange(
        sim.local_addr(),
        &post_with("/api/chat", "X-Sim-Fault: none\r\n", CHAT),
    )
    .await;
    assert_eq!(clean.chunks.len(), TOKENS as usize + 1);
}
