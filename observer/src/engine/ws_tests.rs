//! A whole WebSocket session through the engine: the handshake as an HTTP exchange, then
//! OpenClaw's calls read from the frames of both directions, as the gateway's server side
//! sees them (it reads the client's masked frames, writes its own unmasked).

use super::*;
use crate::base::Side;

const GATEWAY: ConnMeta = ConnMeta {
    conn_id: 9,
    role: Role::Gateway,
    side: Side::Server,
    port: 18789,
    tgid: 200,
};

const IN: Direction = Direction::Ingress;
const OUT: Direction = Direction::Egress;

const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18789\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n";

fn switching(extensions: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n{extensions}\r\n"
    )
    .into_bytes()
}

/// A text frame as a server writes it (unmasked) or a client (masked).
fn frame(payload: &str, masked: bool) -> Vec<u8> {
    let mask = masked.then_some([0x11, 0x22, 0x33, 0x44]);
    ws::encode_frame(true, false, 1, payload.as_bytes(), mask)
}

fn data(engine: &mut Engine, dir: Direction, ts: u64, bytes: &[u8]) {
    engine.data(GATEWAY, dir, ts, bytes.len() as u64, bytes, &[]);
}

#[test]
fn an_openclaw_session_is_a_handshake_and_calls() {
    let mut engine = Engine::new(EngineConfig::default());
    engine.open(GATEWAY, 0, false);
    data(&mut engine, IN, 1_000, UPGRADE);
    // The 101 and the server's first frame in one write.
    let mut first = switching("");
    first.extend(frame(
        r#"{"type":"event","event":"connect.challenge","payload":{"nonce":"abc","ts":1}}"#,
        false,
    ));
    data(&mut engine, OUT, 2_000, &first);
    let handshake: Vec<Exchange> = engine.drain_finished().collect();
    let [upgrade] = &handshake[..] else {
        panic!("{handshake:?}")
    };
    assert_eq!(upgrade.status, Some(101));
    assert_eq!(upgrade.ts.duration_ns(), Some(1_000));

    data(
        &mut engine,
        IN,
        3_000,
        &frame(
            r#"{"type":"req","id":"1","method":"connect","params":{"minProtocol":4,"maxProtocol":4}}"#,
            true,
        ),
    );
    let hello = format!(
        r#"{{"type":"res","id":"1","ok":true,"payload":{{"type":"hello-ok","features":"{}"}}}}"#,
        "x".repeat(16_000)
    );
    // A 16 KB answer captured as its first 1024 and last 256 bytes.
    let hello = frame(&hello, false);
    engine.data(
        GATEWAY,
        OUT,
        3_500,
        hello.len() as u64,
        &hello[..1024],
        &hello[hello.len() - 256..],
    );
    data(
        &mut engine,
        IN,
        10_000,
        &frame(
            r#"{"type":"req","id":"2","method":"agent","params":{"message":"hi","idempotencyKey":"k"}}"#,
            true,
        ),
    );
    data(
        &mut engine,
        OUT,
        10_100,
        &frame(
            r#"{"type":"res","id":"2","ok":true,"payload":{"runId":"run-2","status":"accepted"}}"#,
            false,
        ),
    );
    data(
        &mut engine,
        OUT,
        400_000,
        &frame(
            r#"{"type":"event","event":"agent","payload":{"runId":"run-2","stream":"assistant","data":{"delta":"Hi"}},"seq":7}"#,
            false,
        ),
    );
    data(
        &mut engine,
        OUT,
        500_000,
        &frame(
            r#"{"type":"res","id":"2","ok":true,"payload":{"runId":"run-2","status":"ok","result":{"meta":{"agentMeta":{"usage":{"input":900,"output":12}}}}}}"#,
            false,
        ),
    );
    // A ping from the client, and a turn left open when the connection closes.
    let mut ping = vec![0x89, 0x80, 1, 2, 3, 4];
    ping.extend(frame(
        r#"{"type":"req","id":"3","method":"agent","params":{}}"#,
        true,
    ));
    data(&mut engine, IN, 600_000, &ping);
    engine.close(GATEWAY.conn_id);

    let calls: Vec<Call> = engine.drain_calls().collect();
    let summary: Vec<(&str, &str, u64, Option<u64>)> = calls
        .iter()
        .map(|c| {
            (
                c.method.as_str(),
                c.outcome.as_str(),
                c.duration_ns(),
                c.time_to_first_delta_ns(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("connect", "ok", 500, None),
            ("agent", "ok", 490_000, Some(390_000)),
            ("agent", "aborted", 0, None),
        ]
    );
    assert_eq!(
        (calls[1].input_tokens, calls[1].output_tokens),
        (Some(900), Some(12))
    );
    // Nothing after the handshake was an HTTP exchange or an HTTP error.
    assert_eq!(engine.drain_finished().count(), 0);
    assert_eq!(engine.errors().total(), 0);
    let counts = engine.ws_counts(Role::Gateway, Side::Server);
    assert_eq!(counts.message(IN, MessageKind::Text), 3);
    assert_eq!(counts.message(IN, MessageKind::Ping), 1);
    assert_eq!(counts.message(OUT, MessageKind::Text), 5);
    assert_eq!(counts.unread, [0; Unread::COUNT]);
}

#[test]
fn a_negotiated_deflate_is_counted_and_not_read() {
    let mut engine = Engine::new(EngineConfig::default());
    engine.open(GATEWAY, 0, false);
    data(&mut engine, IN, 1, UPGRADE);
    data(
        &mut engine,
        OUT,
        2,
        &switching("Sec-WebSocket-Extensions: permessage-deflate\r\n"),
    );
    // RSV1 set: compressed.
    let mut compressed = frame(r#"{"type":"req","id":"1","method":"agent"}"#, true);
    compressed[0] |= 0x40;
    data(&mut engine, IN, 3, &compressed);
    engine.close(GATEWAY.conn_id);
    assert_eq!(engine.drain_calls().count(), 0);
    let counts = engine.ws_counts(Role::Gateway, Side::Server);
    assert_eq!(counts.unread(Unread::Compressed), 1);
    assert_eq!(counts.message(IN, MessageKind::Text), 1);
}

#[test]
fn an_upgrade_to_something_else_stays_opaque() {
    let mut engine = Engine::new(EngineConfig::default());
    engine.open(GATEWAY, 0, false);
    data(
        &mut engine,
        IN,
        1,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    );
    data(
        &mut engine,
        OUT,
        2,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n\x00\x00\x12\x04",
    );
    data(&mut engine, IN, 3, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    engine.close(GATEWAY.conn_id);
    let exchanges: Vec<Exchange> = engine.drain_finished().collect();
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].ts.duration_ns(), Some(1));
    assert_eq!(engine.errors().total(), 0);
    assert_eq!(engine.drain_calls().count(), 0);
    // Opaque from here on, and said why.
    let counts = engine.ws_counts(Role::Gateway, Side::Server);
    assert_eq!(counts.unread(Unread::OtherProtocol), 1);
    assert_eq!(counts.messages, [[0; MessageKind::COUNT]; 2]);
}

#[test]
fn a_101_head_cut_by_the_capture_loses_framing_instead_of_misreading() {
    let mut engine = Engine::new(EngineConfig::default());
    engine.open(GATEWAY, 0, false);
    data(&mut engine, IN, 1, UPGRADE);
    // A 101 longer than the head capture, with frames after it in the same write: the tail
    // holds the middle of a frame, which must not be read as one.
    let mut write = switching(&format!("X-Pad: {}\r\n", "p".repeat(1500)));
    let text = format!(
        r#"{{"type":"event","event":"tick","payload":{{"pad":"{}"}}}}"#,
        "q".repeat(600)
    );
    write.extend(frame(&text, false));
    engine.data(
        GATEWAY,
        OUT,
        2,
        write.len() as u64,
        &write[..1024],
        &write[write.len() - 256..],
    );
    // Framing is found again at the next write that is one frame.
    data(
        &mut engine,
        OUT,
        3,
        &frame(r#"{"type":"event","event":"tick","payload":{}}"#, false),
    );
    let counts = engine.ws_counts(Role::Gateway, Side::Server);
    assert_eq!(counts.unread(Unread::FramingLost), 1);
    assert_eq!(counts.unread(Unread::BadFrame), 0);
    assert_eq!(counts.message(OUT, MessageKind::Text), 1);
}
