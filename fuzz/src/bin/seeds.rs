//! Writes the seed corpus of the `engine` fuzz target: realistic conversations in the script
//! format of `observer_fuzz`, each small enough for `-max_len=8192`, so the fuzzer starts from
//! deep states (a stream half read, a pipeline full, a body partly captured) rather than
//! having to discover HTTP.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --bin seeds [DIR]` (default
//! `fuzz/corpus/engine`); files are named `seed-*` and rewritten each run.

use std::path::PathBuf;

use observer::base::Direction::{self, Egress as OUT, Ingress as IN};
use observer::engine::{Engine, EngineConfig, Exchange};
use observer_fuzz::{Op, Script, replay};
use observer_sim::{LAST_CHUNK, encode_chunk as chunk};

/// What the kernel captures of one syscall (observer-common `HEAD_MAX`, `TAIL_MAX`).
const HEAD_MAX: usize = 1024;
const TAIL_MAX: usize = 256;

/// Slots (see `observer_fuzz::meta`): Ollama's server side, the gateway's server side, the
/// gateway's client connection to Ollama.
const OLLAMA: u8 = 0;
const GATEWAY: u8 = 1;
const GATEWAY_TO_OLLAMA: u8 = 2;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/engine"));
    std::fs::create_dir_all(&dir).expect("creating the corpus directory");
    let seeds: [(&str, Seed); 12] = [
        ("ollama-chat", ollama_chat),
        ("gateway-relay", gateway_relay),
        ("openai-sse", openai_sse),
        ("pipelined-gets", pipelined_gets),
        ("expect-continue", expect_continue),
        ("partial-large-bodies", partial_large_bodies),
        ("split-heads", split_heads),
        ("mid-stream-and-garbage", mid_stream_and_garbage),
        ("eviction", eviction),
        ("upgrade-and-abort", upgrade_and_abort),
        ("websocket-turn", websocket_turn),
        ("response-before-request", response_before_request),
    ];
    for (name, build) in seeds {
        let bytes = build().into_bytes();
        assert!(bytes.len() <= 8192, "seed {name} is {} bytes", bytes.len());
        let path = dir.join(format!("seed-{name}"));
        std::fs::write(&path, &bytes).expect("writing a seed");
        // What the seed does on the engine the target uses, to see that it is realistic.
        let mut engine = Engine::new(EngineConfig { max_conns: 4 });
        let mut out: Vec<Exchange> = Vec::new();
        replay(&mut engine, &bytes, |engine, _| {
            out.extend(engine.drain_finished())
        });
        engine.close_all();
        out.extend(engine.drain_finished());
        println!(
            "{} ({} bytes): {} exchanges, errors {:?}",
            path.display(),
            bytes.len(),
            out.len(),
            engine.errors().iter().collect::<Vec<_>>()
        );
        if std::env::var_os("SEEDS_VERBOSE").is_some() {
            for ex in &out {
                println!(
                    "  {} {} {} {:?} {:?} exact={} chunks={} model={:?} done={:?} tokens={:?}/{:?} body={}/{}",
                    ex.conn.conn_id,
                    ex.method.as_str(),
                    ex.path,
                    ex.status,
                    ex.outcome,
                    ex.exact,
                    ex.llm.chunks,
                    ex.llm.model,
                    ex.llm.done_reason,
                    ex.llm.prompt_tokens,
                    ex.llm.completion_tokens,
                    ex.request_body_bytes,
                    ex.response_body_bytes,
                );
            }
        }
    }
}

/// Builds one seed.
type Seed = fn() -> Script;

fn write(s: &mut Script, slot: u8, direction: Direction, step: u8, bytes: &[u8]) {
    s.write(slot, direction, step, bytes, HEAD_MAX, TAIL_MAX);
}

fn open(s: &mut Script, slot: u8) {
    s.push(
        1,
        &Op::Open {
            slot,
            mid_stream: false,
        },
    );
}

fn close(s: &mut Script, slot: u8) {
    s.push(1, &Op::Close { slot });
}

fn drain(s: &mut Script) {
    s.push(1, &Op::Drain { close_all: false });
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:11434\r\nUser-Agent: Go-http-client/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const CHAT_BODY: &str =
    r#"{"model":"qwen3:0.6b","messages":[{"role":"user","content":"why is the sky blue?"}]}"#;
const NDJSON_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nDate: Sat, 21 Nov 2026 17:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n";
const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nDate: Sat, 21 Nov 2026 17:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n";

fn ollama_line(i: usize) -> Vec<u8> {
    format!(
        "{{\"model\":\"qwen3:0.6b\",\"created_at\":\"2026-11-21T17:00:00.{i:03}Z\",\"message\":{{\"role\":\"assistant\",\"content\":\"tok{i}\"}},\"done\":false}}\n"
    )
    .into_bytes()
}

const OLLAMA_DONE: &[u8] = br#"{"model":"qwen3:0.6b","created_at":"2026-11-21T17:00:01Z","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"total_duration":400000000,"load_duration":1000000,"prompt_eval_count":26,"prompt_eval_duration":2000000,"eval_count":12,"eval_duration":300000000}
"#;

/// Ollama's `/api/chat` as its server writes it: one write per chunk, the terminator alone.
fn ollama_stream(s: &mut Script, slot: u8, tokens: usize) {
    let (req, resp) = directions(slot);
    write(s, slot, req, 3, &post("/api/chat", CHAT_BODY));
    write(s, slot, resp, 40, NDJSON_HEAD);
    for i in 0..tokens {
        write(s, slot, resp, 20, &chunk(&ollama_line(i)));
    }
    write(s, slot, resp, 20, &chunk(OLLAMA_DONE));
    write(s, slot, resp, 1, LAST_CHUNK);
}

/// Which direction carries requests on this slot (server side: ingress).
fn directions(slot: u8) -> (Direction, Direction) {
    if slot & 2 == 0 { (IN, OUT) } else { (OUT, IN) }
}

fn ollama_chat() -> Script {
    let mut s = Script::new();
    open(&mut s, OLLAMA);
    ollama_stream(&mut s, OLLAMA, 24);
    drain(&mut s);
    // Keep-alive: a second, short exchange on the same connection.
    ollama_stream(&mut s, OLLAMA, 2);
    close(&mut s, OLLAMA);
    s
}

/// One chat seen three times: the gateway's ingress, its request to Ollama, Ollama's server
/// side; the stream relayed back as SSE, interleaved as the kernel would see it.
fn gateway_relay() -> Script {
    let mut s = Script::new();
    for slot in [GATEWAY, GATEWAY_TO_OLLAMA, OLLAMA] {
        open(&mut s, slot);
    }
    let body =
        r#"{"model":"qwen3:0.6b","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    write(&mut s, GATEWAY, IN, 2, &post("/v1/chat/completions", body));
    let upstream = post("/api/chat", CHAT_BODY);
    write(&mut s, GATEWAY_TO_OLLAMA, OUT, 2, &upstream);
    write(&mut s, OLLAMA, IN, 1, &upstream);
    write(&mut s, OLLAMA, OUT, 30, NDJSON_HEAD);
    write(&mut s, GATEWAY_TO_OLLAMA, IN, 1, NDJSON_HEAD);
    write(&mut s, GATEWAY, OUT, 1, SSE_HEAD);
    for i in 0..12 {
        let line = chunk(&ollama_line(i));
        write(&mut s, OLLAMA, OUT, 15, &line);
        write(&mut s, GATEWAY_TO_OLLAMA, IN, 1, &line);
        write(
            &mut s,
            GATEWAY,
            OUT,
            1,
            &chunk(&sse_event(i, "tok", "null")),
        );
    }
    write(&mut s, OLLAMA, OUT, 15, &chunk(OLLAMA_DONE));
    write(&mut s, OLLAMA, OUT, 1, LAST_CHUNK);
    // The gateway reads the last chunk and the terminator in one read.
    let mut last = chunk(OLLAMA_DONE);
    last.extend_from_slice(LAST_CHUNK);
    write(&mut s, GATEWAY_TO_OLLAMA, IN, 1, &last);
    let mut end = chunk(&sse_event(12, "", "\"stop\""));
    end.extend(chunk(b"data: [DONE]\n\n"));
    end.extend_from_slice(LAST_CHUNK);
    write(&mut s, GATEWAY, OUT, 1, &end);
    drain(&mut s);
    s
}

fn sse_event(i: usize, content: &str, finish: &str) -> Vec<u8> {
    format!(
        "data: {{\"id\":\"chatcmpl-{i}\",\"object\":\"chat.completion.chunk\",\"created\":1763744400,\"model\":\"qwen3:0.6b\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"{content}\"}},\"finish_reason\":{finish}}}]}}\n\n"
    )
    .into_bytes()
}

fn openai_sse() -> Script {
    let mut s = Script::new();
    open(&mut s, OLLAMA);
    let body = r#"{"model":"qwen3:0.6b","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":true}}"#;
    write(&mut s, OLLAMA, IN, 1, &post("/v1/chat/completions", body));
    write(&mut s, OLLAMA, OUT, 50, SSE_HEAD);
    for i in 0..20 {
        write(
            &mut s,
            OLLAMA,
            OUT,
            10,
            &chunk(&sse_event(i, "word", "null")),
        );
    }
    write(
        &mut s,
        OLLAMA,
        OUT,
        10,
        &chunk(&sse_event(20, "", "\"stop\"")),
    );
    let usage = b"data: {\"id\":\"chatcmpl-20\",\"object\":\"chat.completion.chunk\",\"created\":1763744400,\"model\":\"qwen3:0.6b\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":20,\"total_tokens\":31}}\n\n";
    write(&mut s, OLLAMA, OUT, 1, &chunk(usage));
    write(&mut s, OLLAMA, OUT, 1, &chunk(b"data: [DONE]\n\n"));
    write(&mut s, OLLAMA, OUT, 1, LAST_CHUNK);
    drain(&mut s);
    s
}

fn pipelined_gets() -> Script {
    let mut s = Script::new();
    open(&mut s, OLLAMA);
    let mut requests = Vec::new();
    for path in ["/api/tags", "/api/ps", "/api/version", "/"] {
        let method = if path == "/" { "HEAD" } else { "GET" };
        requests.extend(format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes());
    }
    write(&mut s, OLLAMA, IN, 1, &requests);
    let tags = br#"{"models":[{"name":"qwen3:0.6b","model":"qwen3:0.6b","size":522653767}]}"#;
    let mut responses = Vec::new();
    for body in [&tags[..], br#"{"models":[]}"#, br#"{"version":"0.12.11"}"#] {
        responses.extend(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes(),
        );
        responses.extend_from_slice(body);
    }
    responses.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n");
    // Responses split at arbitrary places, as reads would return them.
    for piece in responses.chunks(37) {
        write(&mut s, OLLAMA, OUT, 2, piece);
    }
    // A 304, a 204, then an HTTP/1.0 close-delimited response.
    write(&mut s, OLLAMA, IN, 1, b"GET /api/ps HTTP/1.1\r\n\r\n");
    write(
        &mut s,
        OLLAMA,
        OUT,
        1,
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    );
    write(
        &mut s,
        OLLAMA,
        IN,
        1,
        b"DELETE /api/delete HTTP/1.1\r\nContent-Length: 22\r\n\r\n{\"model\":\"old:latest\"}",
    );
    write(&mut s, OLLAMA, OUT, 1, b"HTTP/1.1 204 No Content\r\n\r\n");
    write(
        &mut s,
        OLLAMA,
        IN,
        1,
        b"GET /api/version?x=1 HTTP/1.0\r\n\r\n",
    );
    write(
        &mut s,
        OLLAMA,
        OUT,
        1,
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"version\":\"0.12.11\"}",
    );
    close(&mut s, OLLAMA);
    drain(&mut s);
    s
}

fn expect_continue() -> Script {
    let mut s = Script::new();
    open(&mut s, OLLAMA);
    let body = r#"{"model":"nomic-embed-text","input":["one","two"]}"#;
    write(
        &mut s,
        OLLAMA,
        IN,
        1,
        format!(
            "POST /api/embed HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    write(&mut s, OLLAMA, OUT, 1, b"HTTP/1.1 100 Continue\r\n\r\n");
    write(&mut s, OLLAMA, IN, 1, body.as_bytes());
    let answer = br#"{"model":"nomic-embed-text","embeddings":[[0.1,0.2],[0.3,0.4]],"total_duration":5000,"load_duration":100,"prompt_eval_count":4}"#;
    write(
        &mut s,
        OLLAMA,
        OUT,
        9,
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
            answer.len()
        )
        .as_bytes(),
    );
    write(&mut s, OLLAMA, OUT, 1, answer);
    drain(&mut s);
    s
}

/// Writes larger than the kernel captures: a 100 kB Content-Length body over two writes, a
/// 200 kB request body, a long final NDJSON line whose middle is lost, and a chunked body
/// whose terminator is only in a write's tail.
fn partial_large_bodies() -> Script {
    let mut s = Script::new();
    open(&mut s, OLLAMA);
    write(&mut s, OLLAMA, IN, 1, b"GET /api/tags HTTP/1.1\r\n\r\n");
    let mut body = vec![b' '; 100_000];
    body[..12].copy_from_slice(b"{\"models\":[ ");
    body[99_998..].copy_from_slice(b"]}");
    let mut first =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            .to_vec();
    first.extend_from_slice(&body[..60_000]);
    write(&mut s, OLLAMA, OUT, 5, &first);
    write(&mut s, OLLAMA, OUT, 5, &body[60_000..]);

    let input: Vec<String> = (0..20_000).map(|i| format!("\"w{i}\"")).collect();
    let embed = format!(
        "{{\"model\":\"nomic-embed-text\",\"input\":[{}]}}",
        input.join(",")
    );
    write(&mut s, OLLAMA, IN, 1, &post("/api/embed", &embed));
    write(
        &mut s,
        OLLAMA,
        OUT,
        30,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    );

    let generate = r#"{"model":"qwen3:0.6b","prompt":"x"}"#;
    write(&mut s, OLLAMA, IN, 1, &post("/api/generate", generate));
    write(&mut s, OLLAMA, OUT, 10, NDJSON_HEAD);
    write(
        &mut s,
        OLLAMA,
        OUT,
        10,
        &chunk(
            br#"{"model":"qwen3:0.6b","response":"a","done":false}
"#,
        ),
    );
    let context: Vec<String> = (0..5_000).map(|i| i.to_string()).collect();
    let last = format!(
        "{{\"model\":\"qwen3:0.6b\",\"response\":\"\",\"done\":true,\"done_reason\":\"length\",\"context\":[{}],\"total_duration\":9,\"load_duration\":8,\"prompt_eval_count\":7,\"eval_count\":5,\"eval_duration\":4}}\n",
        context.join(",")
    );
    write(&mut s, OLLAMA, OUT, 10, &chunk(last.as_bytes()));
    write(&mut s, OLLAMA, OUT, 1, LAST_CHUNK);

    // Many small chunks in one large write: framing is lost in the gap, the terminator is in
    // the tail.
    write(&mut s, OLLAMA, IN, 1, &post("/api/chat", CHAT_BODY));
    let mut many = NDJSON_HEAD.to_vec();
    for i in 0..40 {
        many.extend(chunk(&ollama_line(i)));
    }
    many.extend(chunk(OLLAMA_DONE));
    many.extend_from_slice(LAST_CHUNK);
    write(&mut s, OLLAMA, OUT, 10, &many);
    write(&mut s, OLLAMA, IN, 1, b"GET /api/ps HTTP/1.1\r\n\r\n");
    write(
        &mut s,
        OLLAMA,
        OUT,
        1,
        b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"models\":[]}",
    );
    drain(&mut s);
    s
}

/// Heads that arrive in pieces (one byte, then the rest), on both sides of a client
/// connection, and a chunked body with extensions and trailers.
fn split_heads() -> Script {
    let mut s = Script::new();
    open(&mut s, GATEWAY_TO_OLLAMA);
    let request = post(
        "/api/generate",
        r#"{"model":"qwen3:0.6b","prompt":"hi","stream":false}"#,
    );
    for piece in request.chunks(9) {
        write(&mut s, GATEWAY_TO_OLLAMA, OUT, 1, piece);
    }
    let mut response = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec();
    response.extend(b"2b;ext=1\r\n{\"model\":\"qwen3:0.6b\",\"response\":\"hi\"}\n    \r\n");
    response.extend(b"0\r\nX-Trailer: yes\r\n\r\n");
    let (first, rest) = response.split_at(1);
    write(&mut s, GATEWAY_TO_OLLAMA, IN, 30, first);
    for piece in rest.chunks(11) {
        write(&mut s, GATEWAY_TO_OLLAMA, IN, 1, piece);
    }
    close(&mut s, GATEWAY_TO_OLLAMA);
    drain(&mut s);
    s
}

/// A connection picked up mid-stream (seeded from /proc, and one whose open was missed), TLS
/// and SSH bytes where HTTP was due, and a head cut by a capture gap.
fn mid_stream_and_garbage() -> Script {
    let mut s = Script::new();
    s.push(
        1,
        &Op::Open {
            slot: OLLAMA,
            mid_stream: true,
        },
    );
    write(&mut s, OLLAMA, OUT, 1, &chunk(&ollama_line(7)));
    write(&mut s, OLLAMA, OUT, 1, LAST_CHUNK);
    write(&mut s, OLLAMA, IN, 1, b"GET /api/ps HTTP/1.1\r\n\r\n");
    write(
        &mut s,
        OLLAMA,
        OUT,
        1,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    );
    // No open for this one.
    write(&mut s, GATEWAY, OUT, 1, b"lo\"},\"done\":false}\n\r\n");
    write(
        &mut s,
        GATEWAY,
        IN,
        1,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n",
    );
    write(
        &mut s,
        GATEWAY,
        IN,
        1,
        b"SSH-2.0-OpenSSH_9.2\r\nGET /api/tags HTTP/1.1\r\n\r\n",
    );
    write(
        &mut s,
        GATEWAY,
        OUT,
        1,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    );
    // A request head longer than the capture: its end is in the gap.
    let cookie = "c".repeat(3000);
    let head = format!(
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 72\r\nCookie: {cookie}\r\n\r\n{{\"model\":\"qwen3:0.6b\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}"
    );
    write(&mut s, GATEWAY, IN, 1, head.as_bytes());
    write(&mut s, GATEWAY, OUT, 5, b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 30\r\n\r\n{\"error\":\"model load failed\"}\n");
    close(&mut s, GATEWAY);
    drain(&mut s);
    s
}

/// Six connections with requests in flight on an engine that keeps four: the least recently
/// active are evicted; one connection id is reopened while in use.
fn eviction() -> Script {
    let mut s = Script::new();
    for slot in 0..6 {
        open(&mut s, slot);
        let (req, _) = directions(slot);
        write(&mut s, slot, req, 1, &post("/api/chat", CHAT_BODY));
    }
    for slot in 0..6 {
        let (_, resp) = directions(slot);
        write(&mut s, slot, resp, 1, NDJSON_HEAD);
        write(&mut s, slot, resp, 1, &chunk(&ollama_line(slot.into())));
    }
    open(&mut s, 5);
    let pipeline = b"GET /api/ps HTTP/1.1\r\n\r\n".repeat(20);
    write(&mut s, 4, IN, 1, &pipeline);
    s.push(1, &Op::Drain { close_all: true });
    s
}

/// A 101 upgrade (nothing after it is HTTP), and a stream cut short by a close.
fn upgrade_and_abort() -> Script {
    let mut s = Script::new();
    open(&mut s, GATEWAY);
    write(
        &mut s,
        GATEWAY,
        IN,
        1,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    write(
        &mut s,
        GATEWAY,
        OUT,
        1,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    write(&mut s, GATEWAY, IN, 1, b"\x81\x85GET / HTTP/1.1\r\n");
    close(&mut s, GATEWAY);
    open(&mut s, OLLAMA);
    write(&mut s, OLLAMA, IN, 1, &post("/api/chat", CHAT_BODY));
    write(&mut s, OLLAMA, OUT, 40, NDJSON_HEAD);
    for i in 0..3 {
        write(&mut s, OLLAMA, OUT, 20, &chunk(&ollama_line(i)));
    }
    close(&mut s, OLLAMA);
    drain(&mut s);
    s
}

/// A WebSocket frame: FIN and `opcode`, masked with a fixed key when `masked` (a client's).
fn ws_frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = masked.then_some([0x12, 0x34, 0x56, 0x78]);
    observer::engine::ws::encode_frame(true, false, opcode, payload, mask)
}

/// An OpenClaw agent turn over a WebSocket: the upgrade, the challenge and `connect`, an
/// `agent` request, its acceptance, a delta event with a ping between, the result with its
/// usage, and the close.
fn websocket_turn() -> Script {
    let mut s = Script::new();
    open(&mut s, GATEWAY);
    write(
        &mut s,
        GATEWAY,
        IN,
        1,
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    let mut switched =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            .to_vec();
    switched.extend(ws_frame(
        1,
        br#"{"type":"event","event":"connect.challenge","payload":{"nonce":"n","ts":1}}"#,
        false,
    ));
    write(&mut s, GATEWAY, OUT, 1, &switched);
    let client: [&[u8]; 2] = [
        br#"{"type":"req","id":"1","method":"connect","params":{"minProtocol":4}}"#,
        br#"{"type":"req","id":"2","method":"agent","params":{"message":"hi"},"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#,
    ];
    write(&mut s, GATEWAY, IN, 1, &ws_frame(1, client[0], true));
    write(
        &mut s,
        GATEWAY,
        OUT,
        1,
        &ws_frame(
            1,
            br#"{"type":"res","id":"1","ok":true,"payload":{"type":"hello-ok"}}"#,
            false,
        ),
    );
    write(&mut s, GATEWAY, IN, 1, &ws_frame(1, client[1], true));
    for (gap, message) in [
        (1, &br#"{"type":"res","id":"2","ok":true,"payload":{"runId":"r","status":"accepted"}}"#[..]),
        (30, br#"{"type":"event","event":"agent","payload":{"runId":"r","stream":"assistant","data":{"delta":"Hi"}}}"#),
        (5, br#"{"type":"res","id":"2","ok":true,"payload":{"runId":"r","status":"ok","result":{"meta":{"agentMeta":{"usage":{"input":900,"output":2}}}}}}"#),
    ] {
        write(&mut s, GATEWAY, OUT, gap, &ws_frame(1, message, false));
        write(&mut s, GATEWAY, IN, 1, &ws_frame(9, b"", true));
    }
    write(&mut s, GATEWAY, IN, 1, &ws_frame(8, &[0x03, 0xe8], true));
    close(&mut s, GATEWAY);
    drain(&mut s);
    s
}

/// Picked up mid-stream: a response to a request never seen is written in pieces while the
/// client pipelines its next request (the engine once paired the two; see
/// `a_response_begun_before_a_request_does_not_answer_it` in the engine's tests).
fn response_before_request() -> Script {
    let mut s = Script::new();
    s.push(
        1,
        &Op::Open {
            slot: OLLAMA,
            mid_stream: true,
        },
    );
    write(&mut s, OLLAMA, OUT, 1, b"HTTP/1.1 200 OK\r\n");
    write(&mut s, OLLAMA, IN, 1, b"GET /api/ps HTTP/1.1\r\n\r\n");
    write(&mut s, OLLAMA, OUT, 1, b"Content-Length: 2\r\n\r\n{}");
    write(
        &mut s,
        OLLAMA,
        OUT,
        1,
        b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"models\":[]}",
    );
    drain(&mut s);
    s
}
