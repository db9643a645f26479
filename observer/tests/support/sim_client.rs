//! A raw HTTP/1.1 client for black-box tests of servers we write (`observer sim` first):
//! testkit's async client, which reads heads and bodies itself, so tests can check framing,
//! chunk boundaries, resets and early closes byte for byte, which a high-level client would
//! hide. Also the simulator in-process, and the requests the tests send it.

use std::net::SocketAddr;
use std::time::Duration;

use observer_sim::{SimConfig, SimServer, Timing, spawn};
use serde_json::Value;
#[allow(unused_imports, reason = "each test binary uses a part of support")]
pub use testkit::http::{Conn as Client, Ending, Reply, WAIT};
use tokio::net::TcpListener;

pub const TOKENS: u32 = 4;

pub fn fast_config() -> SimConfig {
    SimConfig {
        timing: Timing {
            load: Duration::from_millis(5),
            first_token: Duration::from_millis(5),
            token_interval: Duration::from_millis(1),
            tokens_per_reply: TOKENS,
        },
        seed: Some(7),
        // Requests sent at once run at once (Ollama's default of one slot would queue them).
        num_parallel: 64,
        ..SimConfig::default()
    }
}

pub async fn start(config: SimConfig) -> SimServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    spawn(listener, config).unwrap()
}

pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: sim\r\n\r\n").into_bytes()
}

pub fn post(path: &str, body: &str) -> Vec<u8> {
    post_with(path, "", body)
}

pub fn post_with(path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

pub async fn exchange(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut client = Client::connect(addr).await;
    client.send(request).await;
    client.reply().await
}

pub const CHAT: &str =
    r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"Why is the sky blue?"}]}"#;

/// Replaces the values of the named JSON fields (numbers or strings) by `_`.
pub fn redact(json: &str, keys: &[&str]) -> String {
    let mut out = json.to_owned();
    for key in keys {
        let marker = format!("\"{key}\":");
        let Some(start) = out.find(&marker).map(|i| i + marker.len()) else {
            continue;
        };
        let end = if out[start..].starts_with('"') {
            start + 1 + out[start + 1..].find('"').unwrap() + 1
        } else {
            start + out[start..].find([',', '}']).unwrap()
        };
        out.replace_range(start..end, "_");
    }
    out
}

pub fn duration(line: &Value, key: &str) -> Duration {
    Duration::from_nanos(
        line[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {line}")),
    )
}
