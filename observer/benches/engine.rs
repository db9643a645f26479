//! Engine throughput: capture events per second through one [`Engine`] on one core.
//!
//! The traffic is built in memory first, as the ring buffer would deliver it: many concurrent
//! connections interleaved in timestamp order, each event owning its captured bytes. The mix:
//! Ollama `/api/chat` NDJSON streams and OpenAI SSE streams of 100–300 chunk writes each (seen
//! on Ollama's server side and on the gateway's client side), keep-alive connections of small
//! API calls (`/api/tags`, `/api/ps`, `/api/version`, `/api/show`) with Content-Length
//! responses, and `/api/embed` calls with bodies larger than the capture (only the first
//! `HEAD_MAX` and last `TAIL_MAX` bytes of a write are kept). The measured loop feeds every
//! event (opens and closes included) to a new engine and drains finished exchanges every 1024
//! events, as the daemon does per batch.
//!
//! `cargo xtask bench engine` (or `cargo bench -p observer --bench engine`). Target: at least
//! 1,000,000 events per second. With `OBSERVER_BENCH_RESULTS=PATH` it also writes the traffic's
//! size there (JSON); criterion's own results are in `target/criterion/engine/`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use observer::base::{Direction, Role, Side};
use observer::engine::{ConnMeta, Engine, EngineConfig};
use observer_common::{HEAD_MAX, TAIL_MAX};
use observer_sim::{LAST_CHUNK, encode_chunk as chunk};

const IN: Direction = Direction::Ingress;
const OUT: Direction = Direction::Egress;

/// Records drained per batch by the daemon's reader.
const BATCH: usize = 1024;

enum Kind {
    Open,
    Data {
        direction: Direction,
        len: u64,
        head: Vec<u8>,
        tail: Vec<u8>,
    },
    Close,
}

struct Event {
    meta: ConnMeta,
    ts: u64,
    kind: Kind,
}

/// The traffic of the benchmark and what one pass over it must produce.
struct Traffic {
    events: Vec<Event>,
    exchanges: usize,
}

fn main_bench(c: &mut Criterion) {
    let traffic = traffic();
    check(&traffic);
    let data = traffic
        .events
        .iter()
        .filter(|e| matches!(e.kind, Kind::Data { .. }))
        .count();
    let bytes: u64 = traffic
        .events
        .iter()
        .map(|e| match &e.kind {
            Kind::Data { len, .. } => *len,
            _ => 0,
        })
        .sum();
    eprintln!(
        "engine bench: {} events ({data} sends/receives, {:.1} MB moved), {} exchanges",
        traffic.events.len(),
        bytes as f64 / 1e6,
        traffic.exchanges
    );
    // For `cargo xtask bench engine`, which writes the figures into docs/BENCHMARKS.md.
    if let Ok(path) = std::env::var("OBSERVER_BENCH_RESULTS") {
        let results = serde_json::json!({
            "events": traffic.events.len(),
            "data_events": data,
            "bytes": bytes,
            "exchanges": traffic.exchanges,
        });
        std::fs::write(&path, results.to_string()).expect("writing OBSERVER_BENCH_RESULTS");
    }
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(traffic.events.len() as u64));
    group.sample_size(20);
    group.bench_function("mixed_ollama_traffic", |b| {
        b.iter(|| feed(black_box(&traffic.events)))
    });
    group.finish();
}

criterion_group!(benches, main_bench);
criterion_main!(benches);

/// Feeds every event to a fresh engine; returns the exchanges it finished.
fn feed(events: &[Event]) -> usize {
    let mut engine = Engine::new(EngineConfig::default());
    let mut exchanges = 0;
    for batch in events.chunks(BATCH) {
        for event in batch {
            match &event.kind {
                Kind::Open => engine.open(event.meta, event.ts, false),
                Kind::Data {
                    direction,
                    len,
                    head,
                    tail,
                } => engine.data(event.meta, *direction, event.ts, *len, head, tail),
                Kind::Close => engine.close(event.meta.conn_id),
            }
        }
        for exchange in engine.drain_finished() {
            exchanges += 1;
            black_box(&exchange);
        }
    }
    exchanges
}

/// The traffic is what it claims to be: every exchange complete, nothing counted as an error
/// (a benchmark of the error paths would measure something else).
fn check(traffic: &Traffic) {
    let mut engine = Engine::new(EngineConfig::default());
    let mut complete = 0;
    for event in &traffic.events {
        match &event.kind {
            Kind::Open => engine.open(event.meta, event.ts, false),
            Kind::Data {
                direction,
                len,
                head,
                tail,
            } => engine.data(event.meta, *direction, event.ts, *len, head, tail),
            Kind::Close => engine.close(event.meta.conn_id),
        }
        complete += engine
            .drain_finished()
            .filter(|e| e.outcome == observer::engine::Outcome::Complete && e.status.is_some())
            .count();
    }
    assert_eq!(complete, traffic.exchanges, "every exchange completes");
    assert_eq!(engine.errors().total(), 0, "{:?}", engine.errors());
    assert_eq!(engine.connections(), 0);
}

/// A small deterministic generator (xorshift64*): the same traffic on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// Builds one connection's events in order; the merge interleaves connections by time.
struct Conn {
    meta: ConnMeta,
    ts: u64,
    events: Vec<Event>,
}

impl Conn {
    fn new(conn_id: u64, role: Role, side: Side, ts: u64) -> Conn {
        let meta = ConnMeta {
            conn_id,
            role,
            side,
            port: match role {
                Role::Upstream => 11434,
                Role::Gateway => 18789,
            },
            tgid: 1000,
        };
        let mut conn = Conn {
            meta,
            ts,
            events: Vec::new(),
        };
        conn.push(0, Kind::Open);
        conn
    }

    fn push(&mut self, after_ns: u64, kind: Kind) {
        self.ts += after_ns;
        self.events.push(Event {
            meta: self.meta,
            ts: self.ts,
            kind,
        });
    }

    /// Which direction carries requests (the observed process is the server: it receives
    /// them).
    fn request_direction(&self) -> Direction {
        match self.meta.side {
            Side::Server => IN,
            Side::Client => OUT,
        }
    }

    fn response_direction(&self) -> Direction {
        match self.meta.side {
            Side::Server => OUT,
            Side::Client => IN,
        }
    }

    /// One send or receive, captured as the kernel does.
    fn write(&mut self, after_ns: u64, direction: Direction, bytes: &[u8]) {
        let (head, tail) = if bytes.len() <= HEAD_MAX + TAIL_MAX {
            (bytes.to_vec(), Vec::new())
        } else {
            (
                bytes[..HEAD_MAX].to_vec(),
                bytes[bytes.len() - TAIL_MAX..].to_vec(),
            )
        };
        self.push(
            after_ns,
            Kind::Data {
                direction,
                len: bytes.len() as u64,
                head,
                tail,
            },
        );
    }

    fn request(&mut self, after_ns: u64, bytes: &[u8]) {
        self.write(after_ns, self.request_direction(), bytes);
    }

    fn response(&mut self, after_ns: u64, bytes: &[u8]) {
        self.write(after_ns, self.response_direction(), bytes);
    }

    fn close(mut self, after_ns: u64) -> Vec<Event> {
        self.push(after_ns, Kind::Close);
        self.events
    }
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:11434\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\nContent-Type: application/json\r\nAccept-Encoding: gzip\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const MS: u64 = 1_000_000;
const MODEL: &str = "llama3.2:3b";

/// `/api/chat` streamed: one write per token, the final counts, the terminator alone.
fn ollama_chat(conn: &mut Conn, rng: &mut Rng, tokens: u64) {
    let body = format!(
        "{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"system\",\"content\":\"You are a helpful assistant.\"}},{{\"role\":\"user\",\"content\":\"Explain request {} in a few paragraphs.\"}}],\"options\":{{\"temperature\":0.7}}}}",
        rng.next() % 1000
    );
    conn.request(0, &post("/api/chat", &body));
    conn.response(
        rng.range(50, 400) * MS,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nDate: Sat, 21 Nov 2026 17:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    for i in 0..tokens {
        let line = format!(
            "{{\"model\":\"{MODEL}\",\"created_at\":\"2026-11-21T17:00:{:02}.{:09}Z\",\"message\":{{\"role\":\"assistant\",\"content\":\" tok{i}\"}},\"done\":false}}\n",
            i % 60,
            rng.next() % 1_000_000_000
        );
        conn.response(rng.range(15, 30) * MS, &chunk(line.as_bytes()));
    }
    let done = format!(
        "{{\"model\":\"{MODEL}\",\"created_at\":\"2026-11-21T17:01:00.000000000Z\",\"message\":{{\"role\":\"assistant\",\"content\":\"\"}},\"done_reason\":\"stop\",\"done\":true,\"total_duration\":{},\"load_duration\":1200000,\"prompt_eval_count\":31,\"prompt_eval_duration\":21000000,\"eval_count\":{tokens},\"eval_duration\":{}}}\n",
        tokens * 22 * MS,
        tokens * 20 * MS
    );
    conn.response(rng.range(15, 30) * MS, &chunk(done.as_bytes()));
    conn.response(10_000, LAST_CHUNK);
}

/// `/v1/chat/completions` streamed as server-sent events, with usage and `[DONE]`.
fn openai_sse(conn: &mut Conn, rng: &mut Rng, tokens: u64) {
    let body = format!(
        "{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Summarise document {}\"}}],\"stream\":true,\"stream_options\":{{\"include_usage\":true}}}}",
        rng.next() % 1000
    );
    conn.request(0, &post("/v1/chat/completions", &body));
    conn.response(
        rng.range(50, 400) * MS,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: keep-alive\r\nDate: Sat, 21 Nov 2026 17:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    for i in 0..tokens {
        let event = format!(
            "data: {{\"id\":\"chatcmpl-{}\",\"object\":\"chat.completion.chunk\",\"created\":1763744400,\"model\":\"{MODEL}\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\" w{i}\"}},\"finish_reason\":null}}]}}\n\n",
            conn.meta.conn_id
        );
        conn.response(rng.range(15, 30) * MS, &chunk(event.as_bytes()));
    }
    let end = format!(
        "data: {{\"id\":\"chatcmpl-{0}\",\"object\":\"chat.completion.chunk\",\"created\":1763744400,\"model\":\"{MODEL}\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":\"stop\"}}]}}\n\ndata: {{\"id\":\"chatcmpl-{0}\",\"object\":\"chat.completion.chunk\",\"created\":1763744400,\"model\":\"{MODEL}\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[],\"usage\":{{\"prompt_tokens\":18,\"completion_tokens\":{tokens},\"total_tokens\":{1}}}}}\n\n",
        conn.meta.conn_id,
        tokens + 18
    );
    conn.response(rng.range(15, 30) * MS, &chunk(end.as_bytes()));
    conn.response(10_000, &chunk(b"data: [DONE]\n\n"));
    conn.response(10_000, LAST_CHUNK);
}

/// A keep-alive connection of small calls answered with Content-Length bodies.
fn api_calls(conn: &mut Conn, rng: &mut Rng, calls: u64) {
    let tags = format!(
        "{{\"models\":[{{\"name\":\"{MODEL}\",\"model\":\"{MODEL}\",\"modified_at\":\"2026-11-20T10:00:00Z\",\"size\":2019393189,\"digest\":\"a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72\",\"details\":{{\"format\":\"gguf\",\"family\":\"llama\",\"parameter_size\":\"3.2B\",\"quantization_level\":\"Q4_K_M\"}}}}]}}"
    );
    for _ in 0..calls {
        let (request, body): (Vec<u8>, String) = match rng.next() % 4 {
            0 => (
                b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1:11434\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n".to_vec(),
                tags.clone(),
            ),
            1 => (
                b"GET /api/ps HTTP/1.1\r\nHost: 127.0.0.1:11434\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n".to_vec(),
                format!("{{\"models\":[{{\"name\":\"{MODEL}\",\"size\":3500000000,\"size_vram\":3500000000,\"expires_at\":\"2026-11-21T17:05:00Z\"}}]}}"),
            ),
            2 => (
                b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1:11434\r\n\r\n".to_vec(),
                "{\"version\":\"0.12.11\"}".to_string(),
            ),
            _ => (
                post("/api/show", &format!("{{\"model\":\"{MODEL}\"}}")),
                format!("{{\"modelfile\":\"FROM {MODEL}\",\"parameters\":\"stop <|eot_id|>\",\"details\":{{\"family\":\"llama\"}}}}"),
            ),
        };
        conn.request(rng.range(1, 50) * MS, &request);
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nDate: Sat, 21 Nov 2026 17:00:00 GMT\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.response(rng.range(100_000, 2_000_000), response.as_bytes());
    }
}

/// `/api/embed` with a request body far larger than the capture, sent in 64 KiB writes, and
/// a large JSON answer in two writes.
fn large_embed(conn: &mut Conn, rng: &mut Rng) {
    let words: Vec<String> = (0..rng.range(20_000, 40_000))
        .map(|i| format!("\"passage {i}\""))
        .collect();
    let body = format!(
        "{{\"model\":\"nomic-embed-text\",\"input\":[{}]}}",
        words.join(",")
    );
    let request = post("/api/embed", &body);
    for piece in request.chunks(64 * 1024) {
        conn.request(100_000, piece);
    }
    let vector: Vec<String> = (0..768).map(|i| format!("0.{i:04}")).collect();
    let embeddings = vec![format!("[{}]", vector.join(",")); 16].join(",");
    let answer = format!(
        "{{\"model\":\"nomic-embed-text\",\"embeddings\":[{embeddings}],\"total_duration\":14000000,\"load_duration\":1000000,\"prompt_eval_count\":{}}}",
        words.len()
    );
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
        answer.len()
    )
    .into_bytes();
    response.extend_from_slice(answer.as_bytes());
    let half = response.len() / 2;
    conn.response(rng.range(10, 100) * MS, &response[..half]);
    conn.response(50_000, &response[half..]);
}

/// All connections, interleaved in timestamp order.
fn traffic() -> Traffic {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut per_conn: Vec<Vec<Event>> = Vec::new();
    let mut exchanges = 0;
    let mut next_id = 1;
    let mut id = || {
        next_id += 1;
        next_id
    };
    // Streams start over 60 s; each lasts 2–9 s, so a few hundred are open at once. Each is
    // seen twice: Ollama's server side and the gateway's client side (Ollama reads a moment
    // after the gateway writes).
    for i in 0..800 {
        let start = rng.range(0, 60_000) * MS;
        let tokens = rng.range(100, 301);
        let sse = i % 4 == 3;
        let seed = rng.next();
        for (side, skew) in [(Side::Client, 0), (Side::Server, 40_000)] {
            let mut conn = Conn::new(id(), Role::Upstream, side, start + skew);
            // The same seed: both ends see the same bytes.
            let mut same = Rng(seed);
            if sse {
                openai_sse(&mut conn, &mut same, tokens);
            } else {
                ollama_chat(&mut conn, &mut same, tokens);
            }
            exchanges += 1;
            per_conn.push(conn.close(MS));
        }
    }
    for _ in 0..1000 {
        let mut conn = Conn::new(
            id(),
            Role::Upstream,
            Side::Server,
            rng.range(0, 60_000) * MS,
        );
        let calls = rng.range(1, 8);
        api_calls(&mut conn, &mut rng, calls);
        exchanges += calls as usize;
        per_conn.push(conn.close(MS));
    }
    for _ in 0..100 {
        let mut conn = Conn::new(
            id(),
            Role::Upstream,
            Side::Server,
            rng.range(0, 60_000) * MS,
        );
        large_embed(&mut conn, &mut rng);
        exchanges += 1;
        per_conn.push(conn.close(MS));
    }
    let mut events: Vec<Event> = per_conn.into_iter().flatten().collect();
    // Stable: a connection's own events keep their order at equal timestamps.
    events.sort_by_key(|e| e.ts);
    Traffic { events, exchanges }
}
