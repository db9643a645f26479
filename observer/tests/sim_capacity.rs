//! Black-box tests of `observer sim`'s capacity as Ollama has it: NUM_PARALLEL slots per model
//! (the wait for one is in `total_duration` only), the scheduler's MAX_QUEUE (503 beyond it),
//! a client's disconnect freeing its slot at once, and prompts fitted to the context length.

mod support;

use std::time::Duration;

use observer_sim::{RequestTimeline, SimConfig, Timing};
use serde_json::Value;
use support::sim_client::*;

fn config(tokens: u32, token_ms: u64) -> SimConfig {
    SimConfig {
        timing: Timing {
            load: Duration::from_millis(5),
            first_token: Duration::from_millis(5),
            token_interval: Duration::from_millis(token_ms),
            tokens_per_reply: tokens,
        },
        seed: Some(7),
        ..SimConfig::default()
    }
}

const WHOLE_CHAT: &str = r#"{"model":"llama3.2:1b","stream":false,"messages":[{"role":"user","content":"Why is the sky blue?"}]}"#;

fn timeline_of(timelines: &[RequestTimeline], index: usize) -> &RequestTimeline {
    timelines
        .get(index)
        .unwrap_or_else(|| panic!("no timeline {index} in {timelines:?}"))
}

#[tokio::test]
async fn with_one_slot_a_second_request_waits_and_only_its_total_shows_it() {
    let sim = start(config(10, 20)).await;
    let addr = sim.local_addr();
    let first = tokio::spawn(async move { exchange(addr, &post("/api/chat", WHOLE_CHAT)).await });
    tokio::time::sleep(Duration::from_millis(60)).await;
    let second = exchange(addr, &post("/api/chat", WHOLE_CHAT)).await;
    assert!(first.await.unwrap().head.starts_with("HTTP/1.1 200"));
    let done = second.json();
    let parts = duration(&done, "load_duration")
        + duration(&done, "prompt_eval_duration")
        + duration(&done, "eval_duration");
    let unexplained = duration(&done, "total_duration") - parts;
    assert!(unexplained >= Duration::from_millis(100), "{done}");

    let timelines = sim.control().timelines();
    let waited = timeline_of(&timelines, 1);
    assert!(timeline_of(&timelines, 0).slot_wait < Duration::from_millis(5));
    assert!(
        unexplained.abs_diff(waited.slot_wait) < Duration::from_millis(5),
        "{unexplained:?} vs {waited:?}"
    );
    // The load was paid by the first request only; the second found the model loaded.
    assert!(
        duration(&done, "load_duration") < Duration::from_millis(5),
        "{done}"
    );
}

#[tokio::test]
async fn two_slots_run_two_requests_at_once() {
    let sim = start(SimConfig {
        num_parallel: 2,
        ..config(10, 20)
    })
    .await;
    let addr = sim.local_addr();
    let first = tokio::spawn(async move { exchange(addr, &post("/api/chat", WHOLE_CHAT)).await });
    tokio::time::sleep(Duration::from_millis(60)).await;
    exchange(addr, &post("/api/chat", WHOLE_CHAT)).await;
    first.await.unwrap();
    let timelines = sim.control().timelines();
    assert!(
        timelines
            .iter()
            .all(|t| t.slot_wait < Duration::from_millis(5)),
        "{timelines:?}"
    );
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once_with_503() {
    let sim = start(SimConfig {
        max_queue: 1,
        timing: Timing {
            load: Duration::from_millis(300),
            ..config(2, 1).timing
        },
        ..config(2, 1)
    })
    .await;
    let addr = sim.local_addr();
    // The first request is being loaded, the second waits in the queue: the third is refused.
    let loading = tokio::spawn(async move { exchange(addr, &post("/api/chat", WHOLE_CHAT)).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let queued = tokio::spawn(async move { exchange(addr, &post("/api/chat", WHOLE_CHAT)).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let started = std::time::Instant::now();
    let refused = exchange(
        addr,
        &post("/api/generate", r#"{"model":"llama3.2:1b","prompt":"hi"}"#),
    )
    .await;
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(
        refused.head,
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n\
         Date: <date>\r\nContent-Length: 77\r\n"
    );
    assert_eq!(
        refused.text(),
        r#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#
    );
    let openai = exchange(
        addr,
        &post(
            "/v1/chat/completions",
            r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await;
    assert!(openai.head.starts_with("HTTP/1.1 503"), "{}", openai.head);
    assert_eq!(
        openai.text(),
        "{\"error\":{\"message\":\"server busy, please try again.  maximum pending requests exceeded\",\
         \"type\":\"api_error\",\"param\":null,\"code\":null}}\n"
    );
    assert!(loading.await.unwrap().head.starts_with("HTTP/1.1 200"));
    assert!(queued.await.unwrap().head.starts_with("HTTP/1.1 200"));
    // Once the model is loaded, requests no longer go through the queue.
    let after = exchange(addr, &post("/api/chat", WHOLE_CHAT)).await;
    assert!(after.head.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_frees_its_slot_at_once() {
    let sim = start(config(50, 20)).await;
    let addr = sim.local_addr();
    let mut leaver = Client::connect(addr).await;
    leaver.send(&post("/api/chat", CHAT)).await;
    leaver.head().await;
    let waiter = tokio::spawn(async move { exchange(addr, &post("/api/chat", WHOLE_CHAT)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(leaver);
    let done = waiter.await.unwrap().json();
    let timelines = sim.control().timelines();
    let (left, waited) = (timeline_of(&timelines, 0), timeline_of(&timelines, 1));
    assert!(left.client_gone && left.eval_count < 50, "{left:?}");
    // The leaver had ~1 s of tokens to go; the waiter waited about the 100 ms until it left.
    assert!(waited.slot_wait < Duration::from_millis(400), "{waited:?}");
    assert!(!waited.client_gone);
    assert_eq!(done["done"], true);
}

fn chat_body(content: &str, extra: &str) -> String {
    let message = serde_json::json!([{ "role": "user", "content": content }]);
    format!(r#"{{"model":"llama3.2:1b","stream":false,"messages":{message}{extra}}}"#)
}

#[tokio::test]
async fn prompts_over_the_context_are_truncated_or_refused_like_ollama() {
    let sim = start(SimConfig {
        context_length: 64,
        ..config(2, 1)
    })
    .await;
    let addr = sim.local_addr();
    let long = "x".repeat(1000); // 4 + 250 tokens
    let cut = exchange(addr, &post("/api/chat", &chat_body(&long, "")))
        .await
        .json();
    // The runner keeps num_keep (4) + BOS and half of the rest: 64 - (64 - 5) / 2.
    assert_eq!(cut["prompt_eval_count"], 35, "{cut}");

    let refused = exchange(
        addr,
        &post("/api/chat", &chat_body(&long, r#","truncate":false"#)),
    )
    .await;
    assert!(refused.head.starts_with("HTTP/1.1 400"), "{}", refused.head);
    assert_eq!(
        refused.json()["error"],
        r#"{"error":{"code":400,"message":"request (254 tokens) exceeds the available context size (64 tokens), try increasing it","type":"exceed_context_size_error","n_prompt_tokens":254,"n_ctx":64}}"#
    );
    let no_shift = exchange(
        addr,
        &post(
            "/api/generate",
            &format!(r#"{{"model":"llama3.2:1b","stream":false,"shift":false,"prompt":"{long}"}}"#),
        ),
    )
    .await;
    assert!(
        no_shift.head.starts_with("HTTP/1.1 400"),
        "{}",
        no_shift.head
    );
    assert!(
        no_shift.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("the prompt is longer than the context length")
    );

    // A streamed request gets the error as its status, like any error before content.
    let streamed = exchange(
        addr,
        &post(
            "/api/generate",
            &format!(r#"{{"model":"llama3.2:1b","truncate":false,"prompt":"{long}"}}"#),
        ),
    )
    .await;
    assert!(
        streamed.head.starts_with("HTTP/1.1 400"),
        "{}",
        streamed.head
    );
    assert_eq!(streamed.header("Content-Type"), Some("application/json"));
}

#[tokio::test]
async fn a_requested_context_reloads_the_model_and_shows_in_ps() {
    let sim = start(config(2, 1)).await;
    let addr = sim.local_addr();
    exchange(addr, &post("/api/chat", WHOLE_CHAT)).await;
    let ps = exchange(addr, &get("/api/ps")).await.json();
    assert_eq!(ps["models"][0]["context_length"], 4096, "{ps}");
    let body = chat_body("hi", r#","options":{"num_ctx":8192}"#);
    let done = exchange(addr, &post("/api/chat", &body)).await.json();
    assert!(
        duration(&done, "load_duration") >= Duration::from_millis(5),
        "{done}"
    );
    let ps = exchange(addr, &get("/api/ps")).await.json();
    assert_eq!(ps["models"][0]["context_length"], 8192, "{ps}");
    let models: &Vec<Value> = ps["models"].as_array().unwrap();
    assert_eq!(models.len(), 1);
}
