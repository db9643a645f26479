//! Black-box tests of `observer proxy` in front of `observer sim` (or a plain listener standing
//! in for it): the statuses the proxy answers itself (408, 413, 502, 503, 504), its timeouts,
//! connection limit, readiness gate and drain, faults on either side of a stream, and that the
//! bytes it relays are the upstream's own. Each test then checks the exchanges `/metrics`
//! counted for the client side (`role="gateway"`) and the upstream side (`role="upstream"`).
//! No root needed: the proxy sees the traffic because it carries it.

mod support;

use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::capture::free_port;
use support::daemon::{FAST_SIM, Samples, Sim};
use support::proxy::{FakeUpstream, METRICS_WAIT, Proxy};
use support::sim_client::*;
use tokio::io::AsyncWriteExt;

const REQUESTS: &str = "observer_http_requests_total";

/// Polls `/metrics` until `observer_http_requests_total{role}` has exactly the counts `want`
/// by code and nothing else (counts land when an exchange ends), then compares exactly.
fn assert_requests(proxy: &Proxy, role: &str, want: &[(&str, f64)]) {
    let read = |s: &Samples| {
        let mut got: Vec<(String, f64)> = want
            .iter()
            .map(|(code, _)| {
                // + 0.0: an empty sum is -0.0, which reads oddly in a failure.
                let value = s.value(REQUESTS, &[("role", role), ("code", code)]) + 0.0;
                (code.to_string(), value)
            })
            .collect();
        got.push((
            "all codes".into(),
            s.value(REQUESTS, &[("role", role)]) + 0.0,
        ));
        got
    };
    let mut expected: Vec<(String, f64)> = want.iter().map(|(c, n)| (c.to_string(), *n)).collect();
    expected.push((
        "all codes".into(),
        want.iter().map(|(_, n)| n).sum::<f64>() + 0.0,
    ));
    let start = Instant::now();
    loop {
        let got = read(&proxy.scrape());
        if got == expected {
            return;
        }
        if start.elapsed() > METRICS_WAIT {
            let (_, text) = proxy.get("/metrics");
            let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(REQUESTS)).collect();
            panic!(
                "{REQUESTS}{{role={role:?}}} by code: got {got:?}, want {expected:?}\n{}",
                lines.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `/metrics` until `name{labels}` is `want` (within [`METRICS_WAIT`]); panics with the
/// last value otherwise.
fn await_value(proxy: &Proxy, name: &str, labels: &[(&str, &str)], want: f64) {
    let start = Instant::now();
    loop {
        let got = proxy.scrape().value(name, labels);
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < METRICS_WAIT,
            "{name}{labels:?} is {got}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls the admin server's `path` until it answers `status`.
fn await_status(proxy: &Proxy, path: &str, status: u16, within: Duration) {
    let start = Instant::now();
    loop {
        let (got, body) = proxy.get(path);
        if got == status {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{path} answers {got}, not {status}, after {within:?}: {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_of(reply: &Reply) -> u16 {
    reply.head.split(' ').nth(1).unwrap().parse().unwrap()
}

/// One of the proxy's own answers: `status`, JSON, `Connection: close`, a body that is exactly
/// `{"error": "<text>"}`. Returns the text.
fn assert_own_reply(reply: &Reply, status: u16) -> String {
    assert_eq!(status_of(reply), status, "{}", reply.head);
    let content_type = reply.header("Content-Type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "Content-Type {content_type:?}: {}",
        reply.head
    );
    assert!(
        reply
            .header("Connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "no Connection: close: {}",
        reply.head
    );
    assert_eq!(reply.ending, Ending::Complete, "{}", reply.head);
    let body: Value = serde_json::from_slice(&reply.body)
        .unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", reply.text()));
    let object = body.as_object().expect("body is a JSON object");
    assert_eq!(object.len(), 1, "body {body}");
    object["error"]
        .as_str()
        .unwrap_or_else(|| panic!("body {body}"))
        .to_owned()
}

/// `Retry-After` in whole seconds, at least 1.
fn assert_retry_after(reply: &Reply) {
    let after = reply
        .header("Retry-After")
        .unwrap_or_else(|| panic!("no Retry-After: {}", reply.head));
    let seconds: u64 = after
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {after:?}"));
    assert!(seconds >= 1, "Retry-After {seconds}");
}

/// Reads until the peer ends the connection; how it ended. Every byte is left in `client.buf`.
async fn read_to_end(client: &mut Client) -> Ending {
    loop {
        if let Some(ending) = client.fill_to(client.buf.len() + 1).await {
            return ending;
        }
    }
}

/// A raw response: its head (up to the blank line) and the chunks of its chunked body,
/// tolerating a body cut anywhere; `terminated` when the last (empty) chunk came, `rest` is
/// whatever followed the last whole chunk.
struct Raw {
    head: String,
    chunks: Vec<Vec<u8>>,
    terminated: bool,
    rest: Vec<u8>,
}

fn dechunk(bytes: &[u8]) -> Raw {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no whole head in {:?}", String::from_utf8_lossy(bytes)))
        + 4;
    let head = String::from_utf8(bytes[..end].to_vec()).unwrap();
    let mut body = &bytes[end..];
    let mut chunks = Vec::new();
    let mut terminated = false;
    while let Ok(httparse::Status::Complete((line, size))) = httparse::parse_chunk_size(body) {
        let size = size as usize;
        if body.len() < line + size + 2 {
            break;
        }
        assert_eq!(&body[line + size..line + size + 2], b"\r\n");
        let data = body[line..line + size].to_vec();
        body = &body[line + size + 2..];
        if size == 0 {
            terminated = true;
            break;
        }
        chunks.push(data);
    }
    Raw {
        head,
        chunks,
        terminated,
        rest: body.to_vec(),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A streamed chat with per-request timing from `X-Sim-Fault`.
fn chat_with(fault: &str) -> Vec<u8> {
    post_with("/api/chat", &format!("X-Sim-Fault: {fault}\r\n"), CHAT)
}

#[tokio::test]
async fn a_head_dribbled_past_the_head_timeout_gets_408() {
    let sim = Sim::start(FAST_SIM);
    let proxy = Proxy::start(sim.addr, &["--head-timeout", "300ms"]);
    let mut client = Client::connect(proxy.addr).await;
    let started = Instant::now();
    client.send(b"GET /api/tags HTTP/1.1\r\nHo").await;
    // Slow-loris: a byte every 50 ms keeps the connection busy but never ends the head.
    let mut dribble = b"st: proxy\r\nX-Slow: "
        .iter()
        .chain(std::iter::repeat(&b'a'));
    loop {
        tokio::select! {
            ready = client.stream.readable() => break ready.unwrap(),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                let byte = *dribble.next().unwrap();
                if client.stream.write_all(&[byte]).await.is_err() {
                    break;
                }
            }
        }
        assert!(
            started.elapsed() < WAIT,
            "no answer {WAIT:?} into a dribbled head"
        );
    }
    let reply = client.reply().await;
    let waited = started.elapsed();
    assert_own_reply(&reply, 408);
    assert!(
        waited >= Duration::from_millis(300),
        "408 after {waited:?}, before the head timeout"
    );
    assert!(
        client.closed().await,
        "open after the 408: {:?}",
        client.buf
    );

    assert_requests(&proxy, "gateway", &[("408", 1.0)]);
    assert_requests(&proxy, "upstream", &[]);
    proxy.stop();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_without_a_word() {
    let sim = Sim::start(FAST_SIM);
    let proxy = Proxy::start(sim.addr, &["--idle-timeout", "300ms"]);
    let mut client = Client::connect(proxy.addr).await;
    // A stream longer than the idle timeout is not idle: it finishes.
    client.send(&chat_with("token-ms=150, tokens=4")).await;
    let stream = client.reply().await;
    assert_eq!(status_of(&stream), 200);
    assert_eq!(stream.ending, Ending::Complete);
    assert_eq!(stream.chunks.len(), 5);

    // The connection turned idle after this request was sent: it cannot close sooner than
    // the idle timeout after that.
    let asked = Instant::now();
    client.send(&get("/api/version")).await;
    let reply = client.reply().await;
    assert_eq!(status_of(&reply), 200);
    assert!(
        client.closed().await,
        "bytes after an idle timeout: {:?}",
        String::from_utf8_lossy(&client.buf)
    );
    let closed = asked.elapsed();
    assert!(
        closed >= Duration::from_millis(300),
        "closed {closed:?} after the last request was sent, before the idle timeout"
    );

    assert_requests(&proxy, "gateway", &[("200", 2.0)]);
    assert_requests(&proxy, "upstream", &[("200", 2.0)]);
    proxy.stop();
}

/// A chat body of exactly `len` bytes.
fn chat_body(len: usize) -> String {
    let frame = r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":""}]}"#;
    let content = "x".repeat(len - frame.len());
    let body = format!(
        r#"{{"model":"llama3.2:1b","messages":[{{"role":"user","content":"{content}"}}]}}"#
    );
    assert_eq!(body.len(), len);
    body
}

#[tokio::test]
async fn a_body_over_max_body_bytes_gets_413_and_nothing_reaches_the_upstream() {
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";
    let upstream = FakeUpstream::start("POST /api/chat ", ANSWER);
    // No probe: every connection the upstream accepts is the proxy's forwarding.
    let proxy = Proxy::start(upstream.addr, &["--max-body-bytes", "1000", "--no-probe"]);

    let mut client = Client::connect(proxy.addr).await;
    client.send(&post("/api/chat", &chat_body(2000))).await;
    let reply = client.reply().await;
    assert_own_reply(&reply, 413);
    assert!(
        client.closed().await,
        "open after the 413: {:?}",
        client.buf
    );
    assert_requests(&proxy, "gateway", &[("413", 1.0)]);
    assert_requests(&proxy, "upstream", &[]);
    let posts = upstream.heads_starting("POST");
    assert!(
        posts.is_empty(),
        "the upstream got {:?}",
        posts
            .iter()
            .map(|h| String::from_utf8_lossy(h).into_owned())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        upstream.accepted().len(),
        0,
        "an upstream connection was opened for the refused request"
    );

    // The limit itself is allowed.
    let mut client = Client::connect(proxy.addr).await;
    let request = post("/api/chat", &chat_body(1000));
    client.send(&request).await;
    let reply = client.reply().await;
    assert_eq!(status_of(&reply), 200, "{}", reply.head);
    assert_eq!(reply.text(), r#"{"ok":true}"#);
    let posts = upstream.heads_starting("POST");
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0], request, "the forwarded request differs");

    assert_requests(&proxy, "gateway", &[("413", 1.0), ("200", 1.0)]);
    assert_requests(&proxy, "upstream", &[("200", 1.0)]);
    proxy.stop();
}

#[tokio::test]
async fn an_unreachable_upstream_gets_502_at_once() {
    let nobody: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = Proxy::start(nobody, &[]);
    let reply = exchange(proxy.addr, &get("/api/tags")).await;
    // At once: on the refusal, not after the connect timeout (which says "within 5s").
    let error = assert_own_reply(&reply, 502);
    assert!(
        error.starts_with(&format!("cannot connect to the upstream {nobody}: "))
            && error.contains("Connection refused"),
        "{error:?}"
    );

    assert_requests(&proxy, "gateway", &[("502", 1.0)]);
    assert_requests(&proxy, "upstream", &[]);
    proxy.stop();
}

#[tokio::test]
async fn a_model_the_probe_finds_not_ready_gets_503_without_an_upstream_connection() {
    let sim = Sim::start(FAST_SIM);
    let proxy = Proxy::start(
        sim.addr,
        &[
            "--model",
            "llama3.2:1b",
            "--probe-tcp-interval",
            "100ms",
            "--probe-api-interval",
            "100ms",
            "--probe-generate-interval",
            "100ms",
            "--probe-first-chunk-timeout",
            "300ms",
        ],
    );
    await_status(&proxy, "/ready/model", 200, Duration::from_secs(10));
    let before = exchange(proxy.addr, &post("/api/chat", CHAT)).await;
    assert_eq!(status_of(&before), 200);
    assert_eq!(before.chunks.len(), 5);

    sim.signal(libc::SIGUSR1);
    await_status(&proxy, "/ready/model", 503, Duration::from_secs(10));
    let opened = |s: &Samples| {
        s.value(
            "observer_tcp_connections_opened_total",
            &[("role", "upstream")],
        )
    };
    let opened_before = opened(&proxy.scrape());
    let gated = exchange(proxy.addr, &post("/api/chat", CHAT)).await;
    let error = assert_own_reply(&gated, 503);
    assert_retry_after(&gated);
    assert!(
        error.starts_with(r#"model "llama3.2:1b" is not ready"#),
        "{error:?}"
    );
    // The listing API still answers while inference hangs, and the gate lets it through.
    let tags = exchange(proxy.addr, &get("/api/tags")).await;
    assert_eq!(status_of(&tags), 200);
    // One upstream connection since: the listing's; none for the gated chat.
    await_value(
        &proxy,
        "observer_tcp_connections_opened_total",
        &[("role", "upstream")],
        opened_before + 1.0,
    );

    sim.signal(libc::SIGUSR2);
    await_status(&proxy, "/ready/model", 200, Duration::from_secs(10));
    let after = exchange(proxy.addr, &post("/api/chat", CHAT)).await;
    assert_eq!(status_of(&after), 200);
    assert_eq!(after.ending, Ending::Complete);
    assert_eq!(after.chunks.len(), 5);

    assert_requests(&proxy, "gateway", &[("200", 3.0), ("503", 1.0)]);
    assert_requests(&proxy, "upstream", &[("200", 3.0)]);
    proxy.stop();
}

#[tokio::test]
async fn connections_beyond_max_conns_get_503_and_the_others_carry_on() {
    let sim = Sim::start(FAST_SIM);
    let proxy = Proxy::start(sim.addr, &["--max-conns", "2"]);
    let mut held = [
        Client::connect(proxy.addr).await,
        Client::connect(proxy.addr).await,
    ];
    for client in &mut held {
        client.send(&get("/api/version")).await;
        assert_eq!(status_of(&client.reply().await), 200);
    }

    // The third gets its answer without asking anything (not a request: nothing to count).
    let mut third = Client::connect(proxy.addr).await;
    let refused = tokio::time::timeout(WAIT, third.reply())
        .await
        .expect("no answer on a connection beyond --max-conns that sent nothing");
    assert_own_reply(&refused, 503);
    assert_retry_after(&refused);
    assert!(third.closed().await);
    // A fourth asks at once: its request is answered 503 and counted.
    let mut fourth = Client::connect(proxy.addr).await;
    fourth.send(&get("/api/version")).await;
    let refused = fourth.reply().await;
    assert_own_reply(&refused, 503);
    assert_retry_after(&refused);
    assert!(fourth.closed().await);

    for client in &mut held {
        client.send(&get("/api/version")).await;
        assert_eq!(status_of(&client.reply().await), 200);
    }
    let [first, mut second] = held;
    drop(first);
    await_value(
        &proxy,
        "observer_tcp_connections_active",
        &[("role", "gateway")],
        1.0,
    );
    let mut fresh = Client::connect(proxy.addr).await;
    fresh.send(&get("/api/version")).await;
    assert_eq!(status_of(&fresh.reply().await), 200);
    second.send(&get("/api/version")).await;
    assert_eq!(status_of(&second.reply().await), 200);

    assert_requests(&proxy, "gateway", &[("200", 6.0), ("503", 1.0)]);
    assert_requests(&proxy, "upstream", &[("200", 6.0)]);
    proxy.stop();
}

#[tokio::test]
async fn an_exchange_over_the_timeout_gets_504_or_is_cut_mid_body() {
    let sim = Sim::start(FAST_SIM);
    let proxy = Proxy::start(sim.addr, &["--timeout", "500ms"]);

    let started = Instant::now();
    let hung = exchange(proxy.addr, &chat_with("hang")).await;
    let waited = started.elapsed();
    assert_own_reply(&hung, 504);
    assert!(
        waited >= Duration::from_millis(500),
        "504 after {waited:?}, before the timeout"
    );

    // Tokens at about 5, 405, 805… ms: the head and the first chunks are out when time is up.
    let mut client = Client::connect(proxy.addr).await;
    client.send(&chat_with("token-ms=400")).await;
    let ending = read_to_end(&mut client).await;
    let raw = dechunk(&client.buf);
    assert!(
        raw.head.starts_with("HTTP/1.1 200 OK\r\n"),
        "{ending:?} {}",
        raw.head
    );
    assert!(
        !contains(&client.buf, b"HTTP/1.1 504") && !contains(&client.buf, b"Gateway Timeout"),
        "a 504 after a 200 head: {:?}",
        String::from_utf8_lossy(&client.buf)
    );
    assert!(
        !raw.terminated,
        "the stream finished within the timeout: {ending:?}"
    );
    assert!(
        (1..5).contains(&raw.chunks.len()),
        "{} chunks before the cut",
        raw.chunks.len()
    );
    for chunk in &raw.chunks {
        let line: Value = serde_json::from_slice(chunk).unwrap();
        assert_eq!(line["done"], false, "{line}");
    }
    assert!(
        raw.rest.is_empty(),
        "bytes after the last whole chunk: {:?}",
        raw.rest
    );

    assert_requests(&proxy, "gateway", &[("504", 1.0), ("200", 1.0)]);
    assert_requests(&proxy, "upstream", &[("none", 1.0), ("200", 1.0)]);
    proxy.stop();
}

#[tokio::test]
async fn a_client_reset_mid_stream_leaves_the_proxy_serving() {
    let sim = Sim::start(FAST_SIM);
    let proxy = Proxy::start(sim.addr, &[]);
    // 200 tokens, 50 ms apart: ten seconds of stream unless someone cuts it.
    let mut client = Client::connect(proxy.addr).await;
    client.send(&chat_with("token-ms=50, tokens=200")).await;
    let (head, ..) = client.head().await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    client.fill_to(client.buf.len() + 1).await;
    for role in ["gateway", "upstream"] {
        await_value(
            &proxy,
            "observer_tcp_connections_active",
            &[("role", role)],
            1.0,
        );
    }
    client.stream.set_zero_linger().unwrap();
    drop(client);

    let reply = exchange(proxy.addr, &get("/api/version")).await;
    assert_eq!(status_of(&reply), 200);
    // Both sides closed, the upstream one long before the stream would have ended.
    for role in ["gateway", "upstream"] {
        await_value(
            &proxy,
            "observer_tcp_connections_active",
            &[("role", role)],
            0.0,
        );
    }

    assert_requests(&proxy, "gateway", &[("200", 2.0)]);
    assert_requests(&proxy, "upstream", &[("200", 2.0)]);
    proxy.stop();
}

#[tokio::test]
async fn an_upstream_reset_mid_stream_cuts_the_client_stream() {
    let sim = Sim::start(FAST_SIM);
    let proxy = Proxy::start(sim.addr, &[]);
    let mut client = Client::connect(proxy.addr).await;
    client.send(&chat_with("reset-after=2")).await;
    let ending = read_to_end(&mut client).await;
    let raw = dechunk(&client.buf);
    assert!(raw.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", raw.head);
    assert_eq!(raw.chunks.len(), 2, "{ending:?}");
    assert!(!raw.terminated);
    assert!(raw.rest.is_empty(), "{:?}", raw.rest);
    let content: Vec<Value> = raw
        .chunks
        .iter()
        .map(|c| serde_json::from_slice::<Value>(c).unwrap()["message"]["content"].clone())
        .collect();
    assert_eq!(content, ["The", " sky"]);

    let reply = exchange(proxy.addr, &get("/api/version")).await;
    assert_eq!(status_of(&reply), 200);

    assert_requests(&proxy, "gateway", &[("200", 2.0)]);
    assert_requests(&proxy, "upstream", &[("200", 2.0)]);
    proxy.stop();
}

#[tokio::test]
async fn ten_thousand_keep_alive_requests_on_one_connection() {
    const N: usize = 10_000;
    let sim = Sim::start(FAST_SIM);
    let proxy = Proxy::start(sim.addr, &[]);
    let direct = exchange(sim.addr, &get("/api/version")).await;
    let mut client = Client::connect(proxy.addr).await;
    for i in 0..N {
        client.send(&get("/api/version")).await;
        let reply = client.reply().await;
        assert_eq!(
            (reply.head.as_str(), reply.body.as_slice()),
            (direct.head.as_str(), direct.body.as_slice()),
            "request {i}"
        );
    }
    drop(client);

    assert_requests(&proxy, "gateway", &[("200", N as f64)]);
    assert_requests(&proxy, "upstream", &[("200", N as f64)]);
    proxy.stop();
}

/// Writes `requests` in one write and reads one reply per request (`true`: a HEAD).
async fn pipeline(addr: SocketAddr, requests: &[(&[u8], bool)]) -> Vec<(String, Vec<u8>)> {
    let mut client = Client::connect(addr).await;
    let all: Vec<u8> = requests
        .iter()
        .flat_map(|(r, _)| r.iter().copied())
        .collect();
    client.send(&all).await;
    let mut replies = Vec::new();
    for (_, head) in requests {
        let reply = client.reply_framed(*head).await;
        assert_eq!(reply.ending, Ending::Complete);
        replies.push((reply.head, reply.body));
    }
    replies
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let sim = Sim::start(FAST_SIM);
    let proxy = Proxy::start(sim.addr, &[]);
    let head = b"HEAD /api/tags HTTP/1.1\r\nHost: sim\r\n\r\n".to_vec();
    let failing = post_with("/api/chat", "X-Sim-Fault: status=500\r\n", CHAT);
    let version = get("/api/version");
    let requests: [(&[u8], bool); 3] = [(&head, true), (&failing, false), (&version, false)];

    let direct = pipeline(sim.addr, &requests).await;
    let proxied = pipeline(proxy.addr, &requests).await;
    assert_eq!(
        direct
            .iter()
            .map(|(h, _)| h.lines().next().unwrap())
            .collect::<Vec<_>>(),
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 500 Internal Server Error",
            "HTTP/1.1 200 OK"
        ]
    );
    for (i, (direct, proxied)) in direct.iter().zip(&proxied).enumerate() {
        assert_eq!(proxied.0, direct.0, "head of reply {i}");
        assert_eq!(
            String::from_utf8_lossy(&proxied.1),
            String::from_utf8_lossy(&direct.1),
            "body of reply {i}"
        );
    }

    assert_requests(&proxy, "gateway", &[("200", 2.0), ("500", 1.0)]);
    assert_requests(&proxy, "upstream", &[("200", 2.0), ("500", 1.0)]);
    proxy.stop();
}

#[tokio::test]
async fn forwarded_for_adds_the_client_address_and_nothing_else() {
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-Length: 24\r\n\r\n{\"version\":\"0.0.0-fake\"}";
    const REQUEST: &[u8] = b"GET /api/version?probe=no HTTP/1.1\r\nHost: proxy-test\r\nUser-Agent: t/1.0\r\nAccept: */*\r\nX-Custom:  spaced  \r\n\r\n";
    let upstream = FakeUpstream::start("GET /api/version?probe=no ", ANSWER);

    for (flags, added) in [
        (&["--forwarded-for"][..], "X-Forwarded-For: 127.0.0.1\r\n"),
        (&[][..], ""),
    ] {
        let flags = [flags, &["--no-probe"]].concat();
        let proxy = Proxy::start(upstream.addr, &flags);
        let seen_before = upstream.heads_starting("GET /api/version?probe=no ").len();
        let mut client = Client::connect(proxy.addr).await;
        client.send(REQUEST).await;
        assert_eq!(client.fill_to(ANSWER.len()).await, None);
        assert_eq!(client.buf, ANSWER, "the answer changed on the way");

        let heads = upstream.heads_starting("GET /api/version?probe=no ");
        assert_eq!(heads.len(), seen_before + 1);
        let forwarded = String::from_utf8(heads[seen_before].clone()).unwrap();
        let original = String::from_utf8(REQUEST.to_vec()).unwrap();
        if added.is_empty() {
            assert_eq!(forwarded, original, "{flags:?}");
        } else {
            assert_eq!(
                forwarded.matches(added).count(),
                1,
                "{flags:?}: {forwarded:?}"
            );
            let line_start = forwarded.find(added).unwrap();
            assert!(
                forwarded[..line_start].ends_with("\r\n"),
                "{added:?} is not a header line: {forwarded:?}"
            );
            assert_eq!(forwarded.replacen(added, "", 1), original, "{flags:?}");
        }
        drop(client);
        assert_requests(&proxy, "gateway", &[("200", 1.0)]);
        assert_requests(&proxy, "upstream", &[("200", 1.0)]);
        proxy.stop();
    }
}

#[tokio::test]
async fn sigterm_lets_open_streams_finish_and_refuses_new_connections() {
    let sim = Sim::start(FAST_SIM);
    let mut proxy = Proxy::start(sim.addr, &["--drain-timeout", "20s"]);
    let mut client = Client::connect(proxy.addr).await;
    client.send(&chat_with("token-ms=50, tokens=20")).await;
    let (head, ..) = client.head().await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");

    proxy.signal(libc::SIGTERM);
    let signalled = Instant::now();
    loop {
        match StdTcpStream::connect(proxy.addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) => panic!("connect: {e}"),
            Ok(_) => {}
        }
        assert!(
            signalled.elapsed() < WAIT,
            "still accepting {WAIT:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut reply = Reply {
        head,
        body: Vec::new(),
        chunks: Vec::new(),
        ending: Ending::Complete,
    };
    let ending = client.chunks(&mut reply).await;
    assert_eq!(ending, Ending::Complete, "the stream was cut by the drain");
    assert_eq!(reply.chunks.len(), 21);
    let last: Value = serde_json::from_slice(reply.chunks.last().unwrap()).unwrap();
    assert_eq!(
        (&last["done"], &last["eval_count"]),
        (&Value::Bool(true), &20.into())
    );

    // The keep-alive connection held open does not hold the exit up.
    let status = proxy.wait_exit(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?} 5 s after the last exchange ended: {}",
        proxy.log()
    );
    proxy.assert_quiet_stdout();
    assert!(client.closed().await);
}

/// The JSON fields whose values depend on when and how fast the simulator ran: wall-clock
/// stamps (`created_at`, `created`) and measured durations. Everything else must be equal.
const TIME_FIELDS: &[&str] = &[
    "created_at",
    "created",
    "total_duration",
    "load_duration",
    "prompt_eval_duration",
    "eval_duration",
];

/// Every value of the named fields, in every JSON object of `text`, replaced by `_`.
fn mask_times(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while !rest.is_empty() {
        for key in TIME_FIELDS {
            let marker = format!("\"{key}\":");
            if let Some(after) = rest.strip_prefix(&marker) {
                let end = if let Some(quoted) = after.strip_prefix('"') {
                    1 + quoted.find('"').unwrap() + 1
                } else {
                    after.find([',', '}']).unwrap()
                };
                out.push_str(&marker);
                out.push('_');
                rest = &after[end..];
                continue 'scan;
            }
        }
        let c = rest.chars().next().unwrap();
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The same request to two simulators started alike, one directly and one through the proxy:
/// equal heads (`Date` masked by the client), the same chunks, equal chunk by chunk once
/// [`TIME_FIELDS`] are masked.
async fn assert_relayed_unchanged(request: &[u8], chunks: usize) {
    let direct_sim = Sim::start(FAST_SIM);
    let proxied_sim = Sim::start(FAST_SIM);
    let proxy = Proxy::start(proxied_sim.addr, &[]);
    let direct = exchange(direct_sim.addr, request).await;
    let proxied = exchange(proxy.addr, request).await;
    assert_eq!(proxied.head, direct.head);
    assert_eq!(
        (&proxied.ending, &direct.ending),
        (&Ending::Complete, &Ending::Complete)
    );
    assert_eq!(direct.chunks.len(), chunks, "{}", direct.text());
    let masked = |reply: &Reply| -> Vec<String> {
        reply
            .chunks
            .iter()
            .map(|c| mask_times(std::str::from_utf8(c).unwrap()))
            .collect()
    };
    assert_eq!(masked(&proxied), masked(&direct));

    assert_requests(&proxy, "gateway", &[("200", 1.0)]);
    assert_requests(&proxy, "upstream", &[("200", 1.0)]);
    proxy.stop();
}

#[tokio::test]
async fn an_ndjson_stream_is_relayed_unchanged() {
    // Four content lines and the final one.
    assert_relayed_unchanged(&post("/api/chat", CHAT), 5).await;
}

#[tokio::test]
async fn an_sse_stream_is_relayed_unchanged() {
    let body = r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"Why is the sky blue?"}],"stream":true,"stream_options":{"include_usage":true}}"#;
    // Four content events, then the finish, usage and [DONE] events in one chunk.
    assert_relayed_unchanged(&post("/v1/chat/completions", body), 5).await;
}

#[tokio::test]
async fn chunks_reach_the_client_as_they_come() {
    let sim = Sim::start(FAST_SIM);
    let proxy = Proxy::start(sim.addr, &[]);
    // The second token comes a second after the first: a relay that buffered would hold
    // the first that long.
    let mut client = Client::connect(proxy.addr).await;
    let sent = Instant::now();
    client.send(&chat_with("token-ms=1000, tokens=2")).await;
    let (head, ..) = client.head().await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let mut reply = Reply {
        head,
        body: Vec::new(),
        chunks: Vec::new(),
        ending: Ending::Complete,
    };
    while !client.buf.ends_with(b"}\n\r\n") {
        assert_eq!(client.fill_to(client.buf.len() + 1).await, None);
    }
    let first = sent.elapsed();
    assert!(
        first < Duration::from_millis(900),
        "the first chunk came after {first:?}"
    );
    assert_eq!(client.chunks(&mut reply).await, Ending::Complete);
    assert_eq!(reply.chunks.len(), 3);
    proxy.stop();
}
