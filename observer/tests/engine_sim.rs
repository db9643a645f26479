//! The engine on streams exactly as Ollama writes them: `observer sim` serves real requests
//! over loopback, every read the client makes is recorded as a segment, and the recording is
//! fed to the engine whole, re-split at random, and partially captured (head and tail of each
//! read only, as the kernel captures them). The engine's fields must equal what the body says
//! (the final NDJSON line or the SSE usage chunk, parsed here with serde_json).

mod support;

use observer::base::{Direction, Role, Side};
use observer::engine::{ConnMeta, Engine, EngineConfig, Exchange, Outcome};
use serde_json::Value;
use support::sim_client::{fast_config, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENT: ConnMeta = ConnMeta {
    conn_id: 7,
    role: Role::Upstream,
    side: Side::Client,
    port: 11434,
    tgid: 1,
};

/// One recorded syscall: direction, timestamp, bytes.
type Segment = (Direction, u64, Vec<u8>);

/// Sends `request` and records every read until the response is complete (the body ends
/// with the chunked terminator or `Content-Length` is met), on one keep-alive connection.
async fn record(stream: &mut TcpStream, request: &[u8], clock: &mut u64, out: &mut Vec<Segment>) {
    *clock += 1000;
    stream.write_all(request).await.unwrap();
    out.push((Direction::Egress, *clock, request.to_vec()));
    let mut response = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap();
        assert!(n > 0, "sim closed the connection");
        *clock += 1000;
        out.push((Direction::Ingress, *clock, buf[..n].to_vec()));
        response.extend_from_slice(&buf[..n]);
        if complete(&response) {
            return;
        }
    }
}

fn complete(response: &[u8]) -> bool {
    let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&response[..head_end]).to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        return response.ends_with(b"0\r\n\r\n");
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    response.len() >= head_end + 4 + length
}

fn post(path: &str, body: &Value, extra: &str) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The response bytes of a recording, in order.
fn response_of(segments: &[Segment]) -> Vec<u8> {
    segments
        .iter()
        .filter(|s| s.0 == Direction::Ingress)
        .flat_map(|s| s.2.clone())
        .collect()
}

/// A chunk of a chunked body: its data's start and end, and the chunk's end (after its CRLF),
/// as offsets into the response.
type Chunk = (usize, usize, usize);

/// A response's head length and, where its body is chunked, its chunks, the terminating
/// zero-length one last.
fn chunks(raw: &[u8]) -> (usize, Option<Vec<Chunk>>) {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    if !String::from_utf8_lossy(&raw[..head_end])
        .to_ascii_lowercase()
        .contains("chunked")
    {
        return (head_end, None);
    }
    let mut out = Vec::new();
    let mut at = head_end;
    loop {
        let line_end = at + raw[at..].windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[at..line_end]).unwrap(), 16).unwrap();
        let data = line_end + 2;
        let end = data + size + 2;
        out.push((data, data + size, end));
        if size == 0 {
            return (head_end, Some(out));
        }
        at = end;
    }
}

/// The dechunked body of a recorded response.
fn body_of(segments: &[Segment]) -> Vec<u8> {
    let raw = response_of(segments);
    match chunks(&raw) {
        (head_end, None) => raw[head_end..].to_vec(),
        (_, Some(chunks)) => chunks
            .iter()
            .flat_map(|&(start, end, _)| raw[start..end].to_vec())
            .collect(),
    }
}

/// The recording as the server wrote it: reads that took in several of its writes (one
/// chunk each, as Ollama's Go server flushes every line) split where each chunk ends, each
/// piece keeping its read's timestamp. The client's reads coalesce when it is late (a busy
/// machine); the server's writes, where the kernel captures an exchange's counted side, do
/// not.
fn as_written(segments: &[Segment]) -> Vec<Segment> {
    let raw = response_of(segments);
    let ends: Vec<usize> = match chunks(&raw) {
        (_, Some(chunks)) => chunks.iter().map(|c| c.2).collect(),
        (_, None) => Vec::new(),
    };
    let mut out = Vec::new();
    let mut offset = 0;
    for (dir, ts, bytes) in segments {
        if *dir != Direction::Ingress {
            out.push((*dir, *ts, bytes.clone()));
            continue;
        }
        let mut from = 0;
        for &end in ends
            .iter()
            .filter(|&&e| e > offset && e < offset + bytes.len())
        {
            out.push((*dir, *ts, bytes[from..end - offset].to_vec()));
            from = end - offset;
        }
        out.push((*dir, *ts, bytes[from..].to_vec()));
        offset += bytes.len();
    }
    out
}

/// Recorded conversations, one per request kind, each on its own connection.
async fn conversations() -> Vec<(String, Vec<Segment>)> {
    let sim = start(fast_config()).await;
    let chat = serde_json::json!({"model": "llama3.2:1b", "messages": [{"role": "user", "content": "why is the sky blue?"}]});
    let requests = vec![
        ("chat stream", post("/api/chat", &chat, "")),
        (
            "chat whole",
            post(
                "/api/chat",
                &serde_json::json!({"model": "llama3.2:1b", "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
                "",
            ),
        ),
        (
            "generate stream",
            post(
                "/api/generate",
                &serde_json::json!({"model": "qwen2.5:0.5b", "prompt": "hello"}),
                "",
            ),
        ),
        (
            "chat mid-stream error",
            post("/api/chat", &chat, "X-Sim-Fault: error-after=2\r\n"),
        ),
        (
            "openai stream usage",
            post(
                "/v1/chat/completions",
                &serde_json::json!({"model": "llama3.2:1b", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}),
                "",
            ),
        ),
        (
            "openai stream",
            post(
                "/v1/chat/completions",
                &serde_json::json!({"model": "llama3.2:1b", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
                "",
            ),
        ),
        (
            "openai whole",
            post(
                "/v1/chat/completions",
                &serde_json::json!({"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]}),
                "",
            ),
        ),
        (
            "openai mid-stream error",
            post(
                "/v1/chat/completions",
                &serde_json::json!({"model": "llama3.2:1b", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
                "X-Sim-Fault: error-after=2\r\n",
            ),
        ),
        (
            "missing model",
            post(
                "/api/chat",
                &serde_json::json!({"model": "nope", "messages": []}),
                "",
            ),
        ),
        (
            "tags",
            b"GET /api/tags HTTP/1.1\r\nHost: sim\r\n\r\n".to_vec(),
        ),
    ];
    let mut out = Vec::new();
    for (name, request) in requests {
        let mut stream = TcpStream::connect(sim.local_addr()).await.unwrap();
        let mut clock = 0;
        let mut segments = Vec::new();
        record(&mut stream, &request, &mut clock, &mut segments).await;
        out.push((name.to_string(), segments));
    }
    out
}

fn run(segments: &[Segment], head: usize, tail: usize) -> Exchange {
    let mut engine = Engine::new(EngineConfig::default());
    engine.open(CLIENT, 0, false);
    for (dir, ts, bytes) in segments {
        let len = bytes.len();
        if head + tail >= len {
            engine.data(CLIENT, *dir, *ts, len as u64, bytes, &[]);
        } else {
            engine.data(
                CLIENT,
                *dir,
                *ts,
                len as u64,
                &bytes[..head],
                &bytes[len - tail..],
            );
        }
    }
    let out: Vec<Exchange> = engine.drain_finished().collect();
    assert_eq!(engine.errors().total(), 0, "{:?}", engine.errors());
    assert_eq!(out.len(), 1, "{out:#?}");
    out.into_iter().next().unwrap()
}

/// What the body itself says: Ollama's last line, or OpenAI's usage.
fn expected(body: &[u8]) -> (Option<u64>, Option<u64>, bool) {
    let text = String::from_utf8_lossy(body);
    let mut prompt = None;
    let mut completion = None;
    let mut error = false;
    for line in text.lines() {
        let json = line.strip_prefix("data: ").unwrap_or(line);
        let Ok(v) = serde_json::from_str::<Value>(json) else {
            continue;
        };
        error |= v.get("error").is_some();
        if let Some(n) = v.get("prompt_eval_count").and_then(Value::as_u64) {
            prompt = Some(n);
        }
        if let Some(n) = v.get("eval_count").and_then(Value::as_u64) {
            completion = Some(n);
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            prompt = u["prompt_tokens"].as_u64();
            completion = u["completion_tokens"].as_u64();
        }
    }
    (prompt, completion, error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_reads_the_simulators_streams_exactly() {
    for (name, segments) in conversations().await {
        let ex = run(&segments, usize::MAX / 4, 0);
        let body = body_of(&segments);
        let (prompt, completion, error) = expected(&body);
        assert_eq!(ex.outcome, Outcome::Complete, "{name}");
        assert!(ex.exact, "{name}");
        assert_eq!(ex.response_body_bytes, body.len() as u64, "{name}");
        assert_eq!(
            (ex.llm.prompt_tokens, ex.llm.completion_tokens),
            (prompt, completion),
            "{name}"
        );
        let openai_error = name == "openai mid-stream error";
        assert_eq!(
            ex.llm.error,
            error || openai_error || name == "missing model",
            "{name}"
        );
        match name.as_str() {
            "chat stream" | "generate stream" | "openai stream usage" | "openai stream" => {
                assert_eq!(ex.status, Some(200));
                assert_eq!(ex.llm.stream, Some(true), "{name}");
                // Four tokens, each in its own read: the first chunk is the first token's read.
                assert_eq!(
                    ex.llm.chunks,
                    u64::from(support::sim_client::TOKENS),
                    "{name}"
                );
                // Go writes the head with the first chunk, as Ollama does.
                assert!(ex.ts.first_chunk >= ex.ts.response_first, "{name}");
                assert_eq!(ex.llm.done_reason.as_deref(), Some("stop"), "{name}");
            }
            "chat whole" | "openai whole" => {
                assert_eq!(ex.llm.stream, Some(false), "{name}");
                assert_eq!(ex.llm.chunks, 1, "{name}");
            }
            "missing model" => assert_eq!(ex.status, Some(404)),
            "chat mid-stream error" | "openai mid-stream error" => {
                assert_eq!(ex.status, Some(200), "{name}");
                assert_eq!(ex.llm.chunks, 2, "{name}");
                assert_eq!(ex.llm.done_reason.as_deref(), Some("error"), "{name}");
            }
            _ => {}
        }
        if name != "tags" {
            assert!(ex.llm.model.is_some(), "{name}");
        }

        // Re-split into 1..40-byte reads: the same fields (timestamps are per read, so the
        // recorded ones are kept by splitting within each read).
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut split = Vec::new();
        for (dir, ts, bytes) in &segments {
            let mut at = 0;
            while at < bytes.len() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let end = (at + 1 + (rng % 40) as usize).min(bytes.len());
                split.push((*dir, *ts, bytes[at..end].to_vec()));
                at = end;
            }
        }
        assert_eq!(run(&split, usize::MAX / 4, 0), ex, "{name}: re-split");

        // Captured as the kernel does by default at the server: 1 KiB head, 256 B tail of each
        // of its writes.
        let written = as_written(&segments);
        assert_eq!(run(&written, usize::MAX / 4, 0), ex, "{name}: as written");
        let partial = run(&written, 1024, 256);
        assert_eq!(partial.status, ex.status, "{name}: partial");
        assert_eq!(partial.ts, ex.ts, "{name}: partial");
        assert_eq!(partial.llm, ex.llm, "{name}: partial");
        assert_eq!(
            partial.response_body_bytes, ex.response_body_bytes,
            "{name}: partial"
        );

        // The same when the client's reads took in the whole response at once (a late
        // client): the server's writes, captured partially, still give every field.
        let mut late: Vec<Segment> = segments
            .iter()
            .filter(|s| s.0 == Direction::Egress)
            .cloned()
            .collect();
        let end = segments.last().unwrap().1;
        late.push((Direction::Ingress, end, response_of(&segments)));
        let written = as_written(&late);
        let whole = run(&written, usize::MAX / 4, 0);
        let partial = run(&written, 1024, 256);
        assert_eq!(
            (
                partial.status,
                partial.ts,
                &partial.llm,
                partial.response_body_bytes
            ),
            (
                whole.status,
                whole.ts,
                &whole.llm,
                whole.response_body_bytes
            ),
            "{name}: a late client's recording, partial"
        );
        assert_eq!(whole.llm.done_reason, ex.llm.done_reason, "{name}: late");
    }
}
