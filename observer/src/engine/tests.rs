//! Byte-fixture tests of the engine: every case of docs/DESIGN.md#exchange-engine, whole, split at
//! every byte, truncated, partially captured and mixed with garbage.

use super::*;
use crate::base::Side;
use observer_sim::{LAST_CHUNK, encode_chunk};

pub(crate) const SERVER: ConnMeta = ConnMeta {
    conn_id: 1,
    role: Role::Upstream,
    side: Side::Server,
    port: 11434,
    tgid: 100,
};

const IN: Direction = Direction::Ingress;
const OUT: Direction = Direction::Egress;

/// A server-side conversation: (direction, timestamp, bytes).
type Script<'a> = &'a [(Direction, u64, &'a [u8])];

fn run(script: Script<'_>) -> (Vec<Exchange>, ErrorCounts) {
    run_on(Engine::new(EngineConfig::default()), script, true)
}

fn run_on(mut engine: Engine, script: Script<'_>, close: bool) -> (Vec<Exchange>, ErrorCounts) {
    engine.open(SERVER, 0, false);
    for &(dir, ts, bytes) in script {
        engine.data(SERVER, dir, ts, bytes.len() as u64, bytes, &[]);
    }
    if close {
        engine.close(SERVER.conn_id);
    }
    let out = engine.drain_finished().collect();
    (out, engine.errors().clone())
}

fn whole(engine: &mut Engine, dir: Direction, ts: u64, bytes: &[u8]) {
    engine.data(SERVER, dir, ts, bytes.len() as u64, bytes, &[]);
}

/// A request with a body and its Content-Length.
fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Feeds a write as the kernel captures it: its first `head` and last `tail` bytes.
fn partial(engine: &mut Engine, dir: Direction, ts: u64, bytes: &[u8], head: usize, tail: usize) {
    let len = bytes.len();
    if head + tail >= len {
        engine.data(SERVER, dir, ts, len as u64, bytes, &[]);
    } else {
        engine.data(
            SERVER,
            dir,
            ts,
            len as u64,
            &bytes[..head],
            &bytes[len - tail..],
        );
    }
}

fn chunked(parts: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = parts.iter().map(|p| encode_chunk(p)).collect();
    out.push(LAST_CHUNK.to_vec());
    out
}

const CHAT_REQUEST: &[u8] = b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 72\r\n\r\n{\"model\": \"qwen3:0.6b\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}";

const NDJSON_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nDate: Sat, 21 Nov 2026 17:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n";

fn ollama_lines() -> Vec<&'static [u8]> {
    vec![
        br#"{"model":"qwen3:0.6b","created_at":"2026-11-21T17:00:00.1Z","message":{"role":"assistant","content":"Hel"},"done":false}
"#,
        br#"{"model":"qwen3:0.6b","created_at":"2026-11-21T17:00:00.2Z","message":{"role":"assistant","content":"lo"},"done":false}
"#,
        br#"{"model":"qwen3:0.6b","created_at":"2026-11-21T17:00:00.3Z","message":{"role":"assistant","content":"!"},"done":false}
"#,
        br#"{"model":"qwen3:0.6b","created_at":"2026-11-21T17:00:00.4Z","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"total_duration":400000000,"load_duration":1000000,"prompt_eval_count":26,"prompt_eval_duration":2000000,"eval_count":3,"eval_duration":300000000}
"#,
    ]
}

/// The chat exchange as Ollama writes it: one write per chunk, the terminator alone.
fn ollama_chat_script() -> Vec<(Direction, u64, Vec<u8>)> {
    let mut script = vec![
        (IN, 1000, CHAT_REQUEST.to_vec()),
        (OUT, 2000, NDJSON_HEAD.to_vec()),
    ];
    for (i, chunk) in chunked(&ollama_lines()).into_iter().enumerate() {
        script.push((OUT, 3000 + 1000 * i as u64, chunk));
    }
    script
}

fn as_script(owned: &[(Direction, u64, Vec<u8>)]) -> Vec<(Direction, u64, &[u8])> {
    owned
        .iter()
        .map(|(d, t, b)| (*d, *t, b.as_slice()))
        .collect()
}

fn only(exchanges: Vec<Exchange>) -> Exchange {
    assert_eq!(exchanges.len(), 1, "{exchanges:#?}");
    exchanges.into_iter().next().unwrap()
}

#[test]
fn a_streamed_ollama_chat() {
    let owned = ollama_chat_script();
    let (out, errors) = run(&as_script(&owned));
    let ex = only(out);
    assert_eq!(errors.total(), 0);
    assert_eq!(
        (ex.method, ex.path.as_str(), ex.status),
        (Method::Post, "/api/chat", Some(200))
    );
    assert_eq!(
        ex.ts,
        Timestamps {
            request_first: 1000,
            request_last: 1000,
            response_first: Some(2000),
            first_chunk: Some(3000),
            response_last: Some(7000),
        }
    );
    assert_eq!((ex.outcome, ex.exact), (Outcome::Complete, true));
    assert_eq!(ex.request_body_bytes, 72);
    let lines: usize = ollama_lines().iter().map(|l| l.len()).sum();
    assert_eq!(ex.response_body_bytes, lines as u64);
    let llm = &ex.llm;
    assert_eq!(llm.model.as_deref(), Some("qwen3:0.6b"));
    assert_eq!(llm.stream, Some(true));
    assert_eq!(llm.done_reason.as_deref(), Some("stop"));
    assert_eq!(
        (llm.prompt_tokens, llm.completion_tokens),
        (Some(26), Some(3))
    );
    assert_eq!(llm.eval_duration_ns, Some(300_000_000));
    assert_eq!(llm.load_duration_ns, Some(1_000_000));
    assert_eq!(llm.total_duration_ns, Some(400_000_000));
    assert_eq!((llm.chunks, llm.last_chunk_ns), (3, Some(5000)));
    assert_eq!(llm.inter_chunk_ns(ex.ts.first_chunk), Some(1000));
    assert!(!llm.error);
}

#[test]
fn split_at_every_byte_gives_the_same_exchange() {
    let owned = ollama_chat_script();
    let whole = only(run(&as_script(&owned)).0);
    // Every write, cut in two at every position (same timestamp for both halves).
    for (which, (dir, ts, bytes)) in owned.iter().enumerate() {
        for cut in 1..bytes.len() {
            let mut script = as_script(&owned);
            script.remove(which);
            script.insert(which, (*dir, *ts, &bytes[..cut]));
            script.insert(which + 1, (*dir, *ts, &bytes[cut..]));
            let (out, errors) = run(&script);
            assert_eq!(errors.total(), 0, "write {which} cut at {cut}");
            assert_eq!(only(out), whole, "write {which} cut at {cut}");
        }
    }
    // And the whole conversation one byte per read.
    let mut script = Vec::new();
    for (dir, ts, bytes) in &owned {
        for b in bytes.chunks(1) {
            script.push((*dir, *ts, b));
        }
    }
    assert_eq!(only(run(&script).0), whole);
}

#[test]
fn openai_sse_with_usage() {
    let head: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    let events: Vec<&[u8]> = vec![
        b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
        b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"},\"finish_reason\":null}]}\n\n",
        b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"total_tokens\":13}}\n\ndata: [DONE]\n\n",
    ];
    let request = &post(
        "/v1/chat/completions",
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":true}}"#,
    );
    let body = chunked(&events);
    let mut script: Vec<(Direction, u64, &[u8])> = vec![(IN, 10, request), (OUT, 20, head)];
    for (i, c) in body.iter().enumerate() {
        script.push((OUT, 30 + i as u64 * 10, c));
    }
    let (out, errors) = run(&script);
    let ex = only(out);
    assert_eq!(errors.total(), 0);
    assert_eq!(ex.llm.model.as_deref(), Some("m"));
    assert_eq!(ex.llm.stream, Some(true));
    assert_eq!(ex.llm.done_reason.as_deref(), Some("stop"));
    assert_eq!(
        (ex.llm.prompt_tokens, ex.llm.completion_tokens),
        (Some(11), Some(2))
    );
    assert_eq!((ex.ts.first_chunk, ex.llm.chunks), (Some(30), 2));
    assert!(!ex.llm.error);
    assert_eq!(ex.ts.response_last, Some(60));

    // Without usage: no token counts, still complete and not an error.
    let mut script2 = script.clone();
    let short: Vec<u8> = chunked(&[events[0], b"data: [DONE]\n\n"]).concat();
    script2.truncate(2);
    script2.push((OUT, 30, &short));
    let ex = only(run(&script2).0);
    assert_eq!(
        (ex.llm.prompt_tokens, ex.llm.completion_tokens),
        (None, None)
    );
    assert!(!ex.llm.error);
    assert_eq!(ex.llm.chunks, 1);
}

#[test]
fn mid_stream_errors_are_errors_with_status_200() {
    // Ollama native: an {"error": ...} line.
    let lines: Vec<&[u8]> = vec![
        ollama_lines()[0],
        b"{\"error\":\"an error was encountered while running the model\"}\n",
    ];
    let mut owned = vec![
        (IN, 1, CHAT_REQUEST.to_vec()),
        (OUT, 2, NDJSON_HEAD.to_vec()),
    ];
    owned.push((OUT, 3, chunked(&lines).concat()));
    let ex = only(run(&as_script(&owned)).0);
    assert_eq!(ex.status, Some(200));
    assert!(ex.llm.error);
    assert_eq!(ex.llm.done_reason.as_deref(), Some("error"));
    assert_eq!(ex.outcome, Outcome::Complete);

    // OpenAI through Ollama's middleware: an empty chunk and the end, no [DONE].
    let head: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    let body = chunked(&[
        b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"A\"},\"finish_reason\":null}],\"model\":\"m\"}\n\n",
        b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"model\":\"\"}\n\n",
    ])
    .concat();
    let request: &[u8] = &post("/v1/chat/completions", r#"{"model":"m","stream":true}"#);
    let ex = only(run(&[(IN, 1, request), (OUT, 2, head), (OUT, 3, &body)]).0);
    assert!(ex.llm.error);
    assert_eq!(ex.llm.chunks, 1);
}

#[test]
fn keep_alive_pipelining_and_bodiless_responses() {
    let script: &[(Direction, u64, &[u8])] = &[
        // Two pipelined requests in one read, a HEAD among them.
        (IN, 1, b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n\r\n"),
        (OUT, 2, b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"models\":[HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n"),
        (IN, 3, b"GET /api/ps HTTP/1.1\r\n\r\n"),
        (OUT, 4, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"),
        (IN, 5, b"DELETE /api/delete HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"),
        (OUT, 6, b"HTTP/1.1 204 No Content\r\n\r\n"),
        (IN, 7, b"GET /api/version HTTP/1.0\r\n\r\n"),
        (OUT, 8, b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"version\":\"0.32.15\"}"),
    ];
    let (out, errors) = run(script);
    assert_eq!(errors.total(), 0);
    type Row<'a> = (&'a str, Option<u16>, Outcome, u64, Option<u64>);
    let got: Vec<Row> = out
        .iter()
        .map(|e| {
            (
                e.path.as_str(),
                e.status,
                e.outcome,
                e.response_body_bytes,
                e.ts.response_last,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("/api/tags", Some(200), Outcome::Complete, 11, Some(2)),
            ("/", Some(200), Outcome::Complete, 0, Some(2)),
            ("/api/ps", Some(304), Outcome::Complete, 0, Some(4)),
            ("/api/delete", Some(204), Outcome::Complete, 0, Some(6)),
            // Close-delimited: ends at the close, last byte at the last write.
            ("/api/version", Some(200), Outcome::Complete, 21, Some(8)),
        ]
    );
    assert_eq!(out[1].method, Method::Head);
    // Its body is not model output (issue 18: only model calls have a first chunk).
    assert_eq!(out[4].ts.first_chunk, None);
    assert_eq!(out[4].ts.response_last, Some(8));
}

#[test]
fn expect_100_continue() {
    let body: &[u8] =
        b"{\"model\":\"e5\",\"embeddings\":[[0.1]],\"total_duration\":5,\"prompt_eval_count\":4}\n";
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let script: &[(Direction, u64, &[u8])] = &[
        (
            IN,
            1,
            b"POST /api/embed HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 15\r\n\r\n",
        ),
        (OUT, 2, b"HTTP/1.1 100 Continue\r\n\r\n"),
        (IN, 3, b"{\"model\":\"e5\"}"),
        (OUT, 4, head.as_bytes()),
        (OUT, 5, body),
    ];
    let (out, errors) = run(script);
    assert_eq!(errors.total(), 0);
    let ex = only(out);
    assert_eq!(ex.status, Some(200));
    assert_eq!(
        (
            ex.ts.request_last,
            ex.ts.response_first,
            ex.ts.response_last
        ),
        (3, Some(4), Some(5))
    );
    assert_eq!(ex.llm.model.as_deref(), Some("e5"));
    assert_eq!(ex.llm.prompt_tokens, Some(4));
    assert_eq!(ex.llm.stream, Some(false));
    assert_eq!(ex.ts.first_chunk, Some(5));
}

#[test]
fn garbage_and_other_protocols_are_skipped_and_counted() {
    let script: &[(Direction, u64, &[u8])] = &[
        (
            IN,
            1,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n",
        ),
        (IN, 2, b"GET /api/tags HTTP/1.1\r\n\r\n"),
        (OUT, 3, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"),
        (
            IN,
            4,
            b"SSH-2.0-OpenSSH_9.2\r\nGET /api/ps HTTP/1.1\r\n\r\n",
        ),
        (OUT, 5, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"),
    ];
    let (out, errors) = run(script);
    let paths: Vec<&str> = out.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/api/tags", "/api/ps"]);
    assert_eq!(errors.get(Role::Upstream, ErrorReason::BadHead), 2);
    assert_eq!(errors.total(), 2);
}

#[test]
fn a_connection_seen_mid_stream_resyncs_at_the_next_request() {
    let mut engine = Engine::new(EngineConfig::default());
    // No open: the connection is picked up in the middle of a response body.
    whole(&mut engine, OUT, 1, b"lo\"},\"done\":false}\n\r\n");
    whole(&mut engine, OUT, 2, b"0\r\n\r\n");
    whole(&mut engine, IN, 3, b"GET /api/ps HTTP/1.1\r\n\r\n");
    whole(
        &mut engine,
        OUT,
        4,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    );
    let out: Vec<Exchange> = engine.drain_finished().collect();
    assert_eq!(only(out).path, "/api/ps");
    assert_eq!(
        engine.errors().get(Role::Upstream, ErrorReason::MidStream),
        1
    );
    // A seeded connection idle between messages skips nothing and counts nothing.
    let mut engine = Engine::new(EngineConfig::default());
    engine.open(SERVER, 0, true);
    whole(&mut engine, IN, 3, b"GET /api/ps HTTP/1.1\r\n\r\n");
    whole(
        &mut engine,
        OUT,
        4,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(engine.drain_finished().count(), 1);
    assert_eq!(engine.errors().total(), 0);
}

#[test]
fn a_response_begun_before_a_request_does_not_answer_it() {
    // Caught by the fuzz target's timestamp check (fuzz/): on a connection picked up
    // mid-stream, a response to a
    // request never seen is written in pieces while the client pipelines its next request.
    // It used to answer that request: the response began before the request (negative time
    // to first byte), and the request's real response was left unmatched.
    let mut engine = Engine::new(EngineConfig::default());
    engine.open(SERVER, 0, true);
    whole(&mut engine, OUT, 1, b"HTTP/1.1 200 OK\r\n");
    whole(&mut engine, IN, 2, b"GET /api/ps HTTP/1.1\r\n\r\n");
    whole(&mut engine, OUT, 3, b"Content-Length: 2\r\n\r\n{}");
    whole(
        &mut engine,
        OUT,
        4,
        b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"models\":[]}",
    );
    let ex = only(engine.drain_finished().collect());
    assert_eq!(
        (ex.path.as_str(), ex.outcome, ex.response_body_bytes),
        ("/api/ps", Outcome::Complete, 13)
    );
    assert_eq!(
        (
            ex.ts.request_first,
            ex.ts.response_first,
            ex.ts.response_last
        ),
        (2, Some(4), Some(4))
    );
    assert_eq!(
        engine
            .errors()
            .get(Role::Upstream, ErrorReason::UnmatchedResponse),
        1
    );
    assert_eq!(engine.errors().total(), 1);
}

#[test]
fn partial_capture_keeps_exact_framing_from_lengths() {
    let mut engine = Engine::new(EngineConfig::default());
    engine.open(SERVER, 0, false);
    engine.data(SERVER, IN, 1, 26, b"GET /api/tags HTTP/1.1\r\n\r\n", &[]);
    // A 100,000-byte body: the head write is whole, the body's middle is not captured.
    let mut body = vec![b'x'; 100_000];
    body[..12].copy_from_slice(b"{\"models\":[ ");
    let head =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n";
    let mut write = head.to_vec();
    write.extend_from_slice(&body[..60_000]);
    partial(&mut engine, OUT, 2, &write, 1024, 256);
    partial(&mut engine, OUT, 3, &body[60_000..], 1024, 256);
    // A large chunk and then many small chunks in one write: the terminator is in the tail.
    engine.data(SERVER, IN, 4, 26, b"GET /api/tags HTTP/1.1\r\n\r\n", &[]);
    let mut write = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    write.extend(chunked(&[&[b'y'; 5000]]).concat().iter().take(5000 + 8));
    partial(&mut engine, OUT, 5, &write, 1024, 256);
    let many: Vec<Vec<u8>> = (0..300)
        .map(|i| format!("{{\"n\":{i}}}\n").into_bytes())
        .collect();
    let refs: Vec<&[u8]> = many.iter().map(|m| m.as_slice()).collect();
    partial(&mut engine, OUT, 6, &chunked(&refs).concat(), 1024, 256);
    // The connection stays in step: one more small exchange.
    engine.data(SERVER, IN, 7, 24, b"GET /api/ps HTTP/1.1\r\n\r\n", &[]);
    engine.data(
        SERVER,
        OUT,
        8,
        40,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        &[],
    );
    let out: Vec<Exchange> = engine.drain_finished().collect();
    let got: Vec<(Option<u64>, bool)> = out.iter().map(|e| (e.ts.response_last, e.exact)).collect();
    assert_eq!(
        got,
        vec![(Some(3), true), (Some(6), false), (Some(8), true)]
    );
    assert_eq!(
        (out[0].response_body_bytes, out[2].response_body_bytes),
        (100_000, 2)
    );
    // Inexact, but every byte moved is counted as body except the framing seen.
    let many_len: u64 = chunked(&refs).concat().len() as u64;
    assert!(out[1].response_body_bytes > 5000 && out[1].response_body_bytes < 5000 + many_len);
    assert_eq!(
        engine
            .errors()
            .get(Role::Upstream, ErrorReason::FramingFallback),
        1
    );
}

#[test]
fn final_ollama_fields_survive_a_cut_line() {
    // /api/generate's last line carries a long `context` array: only its ends are captured.
    let context: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
    let last = format!(
        "{{\"model\":\"m\",\"created_at\":\"x\",\"response\":\"\",\"done\":true,\"done_reason\":\"length\",\"context\":[{}],\"total_duration\":9,\"load_duration\":8,\"prompt_eval_count\":7,\"prompt_eval_duration\":6,\"eval_count\":5,\"eval_duration\":4}}\n",
        context.join(",")
    );
    let mut engine = Engine::new(EngineConfig::default());
    engine.open(SERVER, 0, false);
    let req = b"POST /api/generate HTTP/1.1\r\nContent-Length: 26\r\n\r\n{\"model\":\"m\",\"prompt\":\"x\"}";
    engine.data(SERVER, IN, 1, req.len() as u64, req, &[]);
    engine.data(SERVER, OUT, 2, NDJSON_HEAD.len() as u64, NDJSON_HEAD, &[]);
    let first = chunked(&[b"{\"model\":\"m\",\"response\":\"a\",\"done\":false}\n"]);
    engine.data(SERVER, OUT, 3, first[0].len() as u64, &first[0], &[]);
    let write = chunked(&[last.as_bytes()]);
    partial(&mut engine, OUT, 4, &write[0], 1024, 256);
    engine.data(SERVER, OUT, 5, 5, b"0\r\n\r\n", &[]);
    let ex = only(engine.drain_finished().collect());
    assert!(ex.exact, "a gap inside chunk data keeps framing");
    assert_eq!(ex.llm.done_reason.as_deref(), Some("length"));
    assert_eq!(
        (ex.llm.prompt_tokens, ex.llm.completion_tokens),
        (Some(7), Some(5))
    );
    assert_eq!(
        (
            ex.llm.eval_duration_ns,
            ex.llm.load_duration_ns,
            ex.llm.total_duration_ns
        ),
        (Some(4), Some(8), Some(9))
    );
    assert_eq!((ex.ts.first_chunk, ex.llm.chunks), (Some(3), 1));
    assert_eq!(ex.llm.stream, Some(true));
}

#[test]
fn closes_abort_what_is_open() {
    let script: &[(Direction, u64, &[u8])] = &[
        (IN, 1, CHAT_REQUEST),
        (OUT, 2, NDJSON_HEAD),
        (OUT, 3, b"20\r\n{\"message\":{\"content\":\"x\"}}  \n\r\n"),
    ];
    let ex = only(run(script).0);
    assert_eq!((ex.outcome, ex.status), (Outcome::Aborted, Some(200)));
    assert_eq!(ex.ts.response_last, Some(3));
    assert_eq!(ex.llm.done_reason.as_deref(), Some("incomplete"));
    // A request with no response at all.
    let ex = only(run(&[(IN, 1, b"GET /api/tags HTTP/1.1\r\n\r\n")]).0);
    assert_eq!(
        (ex.outcome, ex.status, ex.ts.response_first),
        (Outcome::Aborted, None, None)
    );
}

#[test]
fn truncated_anywhere_never_panics_and_loses_nothing_before_the_cut() {
    let owned = ollama_chat_script();
    let stream: Vec<(Direction, u64, u8)> = owned
        .iter()
        .flat_map(|(d, t, b)| b.iter().map(move |&x| (*d, *t, x)))
        .collect();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..300 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let cut = (rng % stream.len() as u64) as usize;
        // Re-group the prefix into writes of random sizes.
        let mut engine = Engine::new(EngineConfig::default());
        engine.open(SERVER, 0, false);
        let mut at = 0;
        while at < cut {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let (dir, ts, _) = stream[at];
            let mut end = (at + 1 + (rng % 64) as usize).min(cut);
            if let Some(turn) = stream[at..end].iter().position(|s| s.0 != dir) {
                end = at + turn;
            }
            let bytes: Vec<u8> = stream[at..end].iter().map(|s| s.2).collect();
            engine.data(SERVER, dir, ts, bytes.len() as u64, &bytes, &[]);
            at = end;
        }
        engine.close(SERVER.conn_id);
        let out: Vec<Exchange> = engine.drain_finished().collect();
        let request_head = CHAT_REQUEST
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap()
            + 4;
        if cut >= request_head {
            let ex = only(out);
            let done = cut == stream.len();
            assert_eq!(ex.outcome == Outcome::Complete, done, "cut at {cut}");
        }
        assert_eq!(engine.connections(), 0);
    }
}

#[test]
fn limits_are_counted() {
    let mut engine = Engine::new(EngineConfig { max_conns: 2 });
    for id in 1..=3u64 {
        let meta = ConnMeta {
            conn_id: id,
            ..SERVER
        };
        engine.open(meta, id, false);
        engine.data(meta, IN, id, 24, b"GET /api/ps HTTP/1.1\r\n\r\n", &[]);
    }
    assert_eq!(engine.connections(), 2);
    assert_eq!(
        engine.errors().get(Role::Upstream, ErrorReason::ConnLimit),
        1
    );
    let evicted = only(engine.drain_finished().collect());
    assert_eq!(
        (evicted.conn.conn_id, evicted.outcome),
        (1, Outcome::Evicted)
    );
    assert_eq!(engine.in_flight(Role::Upstream, Side::Server), 2);

    let mut engine = Engine::new(EngineConfig::default());
    engine.open(SERVER, 0, false);
    let twenty = b"GET /api/ps HTTP/1.1\r\n\r\n".repeat(MAX_PIPELINE + 4);
    engine.data(SERVER, IN, 1, twenty.len() as u64, &twenty, &[]);
    assert_eq!(engine.in_flight(Role::Upstream, Side::Server), MAX_PIPELINE);
    assert_eq!(
        engine
            .errors()
            .get(Role::Upstream, ErrorReason::PipelineOverflow),
        4
    );
    let head = format!("GET /{} HTTP/1.1\r\n", "a".repeat(http::MAX_HEAD));
    engine.data(SERVER, IN, 2, head.len() as u64, head.as_bytes(), &[]);
    assert_eq!(
        engine
            .errors()
            .get(Role::Upstream, ErrorReason::HeadTooLarge),
        1
    );
    engine.close(SERVER.conn_id);
    assert_eq!(engine.in_flight(Role::Upstream, Side::Server), 0);
}

#[test]
fn client_side_connections_read_egress_as_requests() {
    let client = ConnMeta {
        side: Side::Client,
        conn_id: 9,
        ..SERVER
    };
    let mut engine = Engine::new(EngineConfig::default());
    engine.open(client, 0, false);
    engine.data(client, OUT, 1, 24, b"GET /api/ps HTTP/1.1\r\n\r\n", &[]);
    engine.data(
        client,
        IN,
        2,
        40,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        &[],
    );
    let ex = only(engine.drain_finished().collect());
    assert_eq!((ex.conn.side, ex.status), (Side::Client, Some(200)));
    assert_eq!(engine.in_flight(Role::Upstream, Side::Client), 0);
}

/// A server that answers while the request head is still arriving (a 408 to a slow client, a
/// 400 to a broken one): the exchange counts, with what arrived of the head, marked inexact.
#[test]
fn an_answer_to_an_unfinished_head_is_an_exchange() {
    let (out, errors) = run(&[
        (IN, 1, b"GET /api/tags HTTP/1.1\r\nHo"),
        (IN, 2, b"st: x\r\nX-Slow: "),
        (
            OUT,
            10,
            b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        ),
    ]);
    assert_eq!(out.len(), 1, "{out:?}");
    let ex = &out[0];
    assert_eq!(
        (ex.method, ex.path.as_str(), ex.status),
        (Method::Get, "/api/tags", Some(408))
    );
    assert_eq!(ex.outcome, Outcome::Complete);
    assert!(!ex.exact);
    assert_eq!(ex.ts.request_first, 1);
    assert_eq!(errors.get(Role::Upstream, ErrorReason::TruncatedHead), 1);
    assert_eq!(
        errors.get(Role::Upstream, ErrorReason::UnmatchedResponse),
        0
    );

    // A first line that never finished gives nothing to count the answer against.
    let (out, errors) = run(&[
        (IN, 1, b"GET /api/ta"),
        (
            OUT,
            10,
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        ),
    ]);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(
        errors.get(Role::Upstream, ErrorReason::UnmatchedResponse),
        1
    );
}

#[test]
fn model_management_and_listing_are_not_model_requests() {
    // /api/show names a model in its body, /api/tags answers with a body: neither runs one.
    let show = post("/api/show", r#"{"model":"qwen3:0.6b"}"#);
    let tags: &[u8] = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n";
    let models: &[u8] = b"GET /ollama/v1/models?x=1 HTTP/1.1\r\nHost: x\r\n\r\n";
    let answer: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"models\":[]}";
    for (request, path) in [
        (show.as_slice(), "/api/show"),
        (tags, "/api/tags"),
        (models, "/ollama/v1/models"),
    ] {
        let ex = only(run(&[(IN, 1, request), (OUT, 2, answer)]).0);
        assert_eq!(ex.path, path);
        assert_eq!(ex.status, Some(200));
        assert_eq!(ex.llm, LlmFields::default(), "{path}: no model fields");
        assert_eq!(ex.ts.first_chunk, None, "{path}: no first chunk");
        assert_eq!(
            ex.ts.response_first,
            Some(2),
            "{path}: still an HTTP exchange"
        );
    }
    // The same body on an inference route is a model request with its first chunk.
    let chat = post("/api/chat", r#"{"model":"qwen3:0.6b","stream":false}"#);
    let ex = only(run(&[(IN, 1, chat.as_slice()), (OUT, 2, answer)]).0);
    assert_eq!(ex.llm.model.as_deref(), Some("qwen3:0.6b"));
    assert_eq!(ex.ts.first_chunk, Some(2));
}

/// `request`, then a chunked `text/event-stream` response at 20 whose chunks (one per event
/// string) are written at 30, 40, 50 ….
fn sse_stream(request: &[u8], events: &[&[u8]]) -> (Vec<Exchange>, ErrorCounts) {
    let head: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    let body = chunked(events);
    let mut script: Vec<(Direction, u64, &[u8])> = vec![(IN, 10, request), (OUT, 20, head)];
    for (i, c) in body.iter().enumerate() {
        script.push((OUT, 30 + i as u64 * 10, c));
    }
    run(&script)
}

#[test]
fn openai_responses_stream_first_delta_and_usage() {
    // `/v1/responses` with `stream: true`: lifecycle events (with `"error": null`, an object
    // under `text` and `response`), then text deltas, then the usage in `response.completed`.
    let events: Vec<&[u8]> = vec![
        b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"error\":null,\"output\":[],\"text\":{\"format\":{\"type\":\"text\"}}}}\n\n",
        b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hel\"}\n\n",
        b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"lo\"}\n\n",
        b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"error\":null,\"usage\":{\"input_tokens\":9,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":2,\"total_tokens\":11}}}\n\n",
    ];
    let request = &post(
        "/v1/responses",
        r#"{"model":"m","input":"x","stream":true}"#,
    );
    let (out, errors) = sse_stream(request, &events);
    let ex = only(out);
    assert_eq!(errors.total(), 0);
    assert_eq!(ex.llm.model.as_deref(), Some("m"));
    assert!(!ex.llm.error, "`\"error\": null` is no error");
    // The first delta, not the lifecycle event before it, is the first token.
    assert_eq!(ex.ts.first_chunk, Some(40));
    assert_eq!(
        (ex.llm.prompt_tokens, ex.llm.completion_tokens),
        (Some(9), Some(2))
    );
}

#[test]
fn anthropic_messages_stream_first_text_and_usage() {
    let events: Vec<&[u8]> = vec![
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"role\":\"assistant\",\"content\":[],\"model\":\"m\",\"stop_reason\":null,\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n",
        b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":3}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ];
    let request = &post(
        "/v1/messages",
        r#"{"model":"m","max_tokens":9,"stream":true}"#,
    );
    let ex = only(sse_stream(request, &events).0);
    assert!(!ex.llm.error, "message_stop ends the stream");
    // The empty text of content_block_start is not the first token; the first delta is.
    assert_eq!(ex.ts.first_chunk, Some(50));
    assert_eq!(
        (ex.llm.prompt_tokens, ex.llm.completion_tokens),
        (Some(7), Some(3))
    );
}
