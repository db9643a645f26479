//! `observer proxy` in front of a gateway-shaped WebSocket server: the upgrade passes, the
//! frames go both ways unchanged, and the calls over them are counted as `observer run`
//! counts them (`rpc_*`, `websocket_*`), from the bytes the proxy moves. No root needed.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use observer::engine::ws::encode_frame;
use support::proxy::{METRICS_WAIT, Proxy};

/// A frame with FIN set: masked with a fixed key for a client's, plain for a server's.
fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    encode_frame(
        true,
        false,
        opcode,
        payload,
        masked.then_some([0x0a, 0x0b, 0x0c, 0x0d]),
    )
}

/// Reads one frame's payload (and checks its mask bit), opcode first.
fn read_frame(stream: &mut TcpStream, masked: bool) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(head[1] & 0x80 != 0, masked, "mask bit");
    let len = match head[1] & 0x7f {
        126 => {
            let mut n = [0u8; 2];
            stream.read_exact(&mut n).unwrap();
            u16::from_be_bytes(n) as usize
        }
        n => n as usize,
    };
    let mut key = [0u8; 4];
    if masked {
        stream.read_exact(&mut key).unwrap();
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).unwrap();
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    (head[0] & 0x0f, payload)
}

/// A message head; empty when the peer closed first (the proxy's TCP readiness check).
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read_exact(&mut byte).is_err() {
            return String::new();
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// The gateway: answers the upgrade, sends the challenge, and for each request frame from the
/// client answers as OpenClaw does (an agent turn: accepted, a delta event, the result). Other
/// requests (the proxy's readiness checks) get a 404.
fn gateway() -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut conn, request) = loop {
            let (mut conn, _) = listener.accept().unwrap();
            let request = read_head(&mut conn);
            if request.contains("Upgrade: websocket") {
                break (conn, request);
            }
            let _ = conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        };
        let mut first = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec();
        first.extend(frame(
            1,
            br#"{"type":"event","event":"connect.challenge","payload":{"nonce":"n","ts":1}}"#,
            false,
        ));
        conn.write_all(&first).unwrap();
        let mut seen = vec![request];
        loop {
            let (opcode, payload) = read_frame(&mut conn, true);
            if opcode == 8 {
                conn.write_all(&frame(8, &payload, false)).unwrap();
                return seen;
            }
            let text = String::from_utf8(payload).unwrap();
            let id = if text.contains(r#""id":"1""#) {
                "1"
            } else {
                "2"
            };
            let answers: Vec<String> = if id == "1" {
                vec![format!(
                    r#"{{"type":"res","id":"{id}","ok":true,"payload":{{"type":"hello-ok"}}}}"#
                )]
            } else {
                vec![
                    format!(r#"{{"type":"res","id":"{id}","ok":true,"payload":{{"runId":"r","status":"accepted"}}}}"#),
                    r#"{"type":"event","event":"agent","payload":{"runId":"r","stream":"assistant","data":{"delta":"Hi"}}}"#.to_string(),
                    format!(r#"{{"type":"res","id":"{id}","ok":true,"payload":{{"runId":"r","status":"ok","result":{{"meta":{{"agentMeta":{{"usage":{{"input":120,"output":7}}}}}}}}}}}}"#),
                ]
            };
            for answer in answers {
                std::thread::sleep(Duration::from_millis(5));
                conn.write_all(&frame(1, answer.as_bytes(), false)).unwrap();
            }
            seen.push(text);
        }
    });
    (addr, handle)
}

#[test]
fn websocket_calls_through_the_proxy_are_counted() {
    let (upstream, gateway) = gateway();
    let proxy = Proxy::start(upstream, &[]);
    let mut client = TcpStream::connect(proxy.addr).unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .unwrap();
    let head = read_head(&mut client);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}\n{}", proxy.log());
    let (_, challenge) = read_frame(&mut client, false);
    assert!(String::from_utf8_lossy(&challenge).contains("connect.challenge"));
    client
        .write_all(&frame(
            1,
            br#"{"type":"req","id":"1","method":"connect","params":{}}"#,
            true,
        ))
        .unwrap();
    read_frame(&mut client, false);
    client
        .write_all(&frame(
            1,
            br#"{"type":"req","id":"2","method":"agent","params":{"message":"hi"}}"#,
            true,
        ))
        .unwrap();
    // Accepted, the delta, the result: unchanged through the proxy.
    let answers: Vec<String> = (0..3)
        .map(|_| String::from_utf8(read_frame(&mut client, false).1).unwrap())
        .collect();
    assert!(answers[1].contains(r#""delta":"Hi""#), "{answers:?}");
    assert!(answers[2].contains(r#""status":"ok""#), "{answers:?}");
    client.write_all(&frame(8, &[0x03, 0xe8], true)).unwrap();
    assert_eq!(read_frame(&mut client, false).0, 8);
    drop(client);
    let seen = gateway.join().unwrap();
    assert_eq!(
        seen.len(),
        3,
        "the upgrade and two requests reached the gateway: {seen:?}"
    );

    let labels = [("role", "gateway"), ("method", "agent"), ("outcome", "ok")];
    let start = Instant::now();
    let samples = loop {
        let s = proxy.scrape();
        if s.value("observer_rpc_calls_total", &labels) >= 1.0
            && s.value(
                "observer_websocket_messages_total",
                &[("role", "gateway"), ("kind", "close")],
            ) >= 2.0
        {
            break s;
        }
        assert!(
            start.elapsed() < METRICS_WAIT,
            "calls not counted: {}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let gw = |name: &str, more: &[(&str, &str)]| {
        let mut all = vec![("role", "gateway")];
        all.extend_from_slice(more);
        samples.value(name, &all)
    };
    assert_eq!(
        gw(
            "observer_rpc_calls_total",
            &[("method", "agent"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        gw(
            "observer_rpc_calls_total",
            &[("method", "connect"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        gw(
            "observer_rpc_time_to_first_delta_seconds_count",
            &[("method", "agent")]
        ),
        1.0
    );
    assert_eq!(
        gw("observer_rpc_tokens_total", &[("type", "prompt")]),
        120.0
    );
    assert_eq!(
        gw("observer_rpc_tokens_total", &[("type", "completion")]),
        7.0
    );
    // The client's 2 requests and close in; the challenge, 4 answers and the close out.
    assert_eq!(
        gw(
            "observer_websocket_messages_total",
            &[("direction", "ingress"), ("kind", "text")]
        ),
        2.0
    );
    assert_eq!(
        gw(
            "observer_websocket_messages_total",
            &[("direction", "egress"), ("kind", "text")]
        ),
        5.0
    );
    assert_eq!(gw("observer_http_requests_total", &[("code", "101")]), 1.0);
    assert_eq!(samples.value("observer_websocket_unread_total", &[]), 0.0);
    proxy.stop();
}
