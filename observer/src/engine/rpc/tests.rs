use super::*;
use crate::base::{Role, Side};

fn meta() -> ConnMeta {
    ConnMeta {
        conn_id: 1,
        tgid: 10,
        role: Role::Gateway,
        side: Side::Server,
        port: 18789,
    }
}

fn text(ts: u64, json: &str) -> Message {
    Message {
        kind: MessageKind::Text,
        compressed: false,
        len: json.len() as u64,
        first_ts: ts,
        last_ts: ts + 1,
        head: json.as_bytes().to_vec(),
        tail: Vec::new(),
        whole: true,
        close_code: None,
    }
}

struct Session {
    calls: Calls,
    out: Vec<Call>,
}

impl Session {
    fn new() -> Session {
        Session {
            calls: Calls::default(),
            out: Vec::new(),
        }
    }
    fn client(&mut self, ts: u64, json: &str) {
        self.calls
            .message(meta(), true, &text(ts, json), &mut self.out);
    }
    fn server(&mut self, ts: u64, json: &str) {
        self.calls
            .message(meta(), false, &text(ts, json), &mut self.out);
    }
}

#[test]
fn an_agent_turn_is_one_call_from_request_to_result() {
    let mut s = Session::new();
    s.server(
        100,
        r#"{"type":"event","event":"connect.challenge","payload":{"nonce":"n","ts":1}}"#,
    );
    s.client(
        200,
        r#"{"type":"req","id":"c1","method":"connect","params":{"minProtocol":4,"client":{"id":"cli"}}}"#,
    );
    s.server(
        300,
        r#"{"type":"res","id":"c1","ok":true,"payload":{"type":"hello-ok","protocol":4}}"#,
    );
    s.client(
        1_000,
        r#"{"type":"req","id":"a1","method":"agent","params":{"message":"hi","idempotencyKey":"k"}}"#,
    );
    s.server(
        1_100,
        r#"{"type":"res","id":"a1","ok":true,"payload":{"runId":"r-1","status":"accepted","acceptedAt":5}}"#,
    );
    s.server(
        1_500,
        r#"{"type":"event","event":"agent","payload":{"runId":"r-1","stream":"lifecycle","data":{"phase":"start"}},"seq":3}"#,
    );
    s.server(
        2_000,
        r#"{"type":"event","event":"agent","payload":{"runId":"r-1","stream":"assistant","data":{"text":"He","delta":"He"}},"seq":4}"#,
    );
    s.server(
        2_200,
        r#"{"type":"event","event":"chat","payload":{"runId":"r-1","sessionKey":"main","state":"delta"},"seq":5}"#,
    );
    s.server(
        3_000,
        r#"{"type":"res","id":"a1","ok":true,"payload":{"runId":"r-1","status":"ok","summary":"completed","result":{"payloads":[{"text":"Hello"}],"meta":{"durationMs":2,"agentMeta":{"usage":{"input":812,"output":9,"total":821}}}}}}"#,
    );
    let [connect, agent] = &s.out[..] else {
        panic!("{:?}", s.out)
    };
    assert_eq!(connect.method, "connect");
    assert_eq!(connect.outcome, CallOutcome::Ok);
    assert_eq!(connect.duration_ns(), 101);
    assert_eq!(connect.first_delta, None);
    assert_eq!(agent.method, "agent");
    assert_eq!(agent.outcome, CallOutcome::Ok);
    assert_eq!(agent.accepted, Some(1_100));
    assert_eq!(agent.first_delta, Some(2_000));
    assert_eq!(agent.time_to_first_delta_ns(), Some(999));
    assert_eq!(agent.duration_ns(), 2_001);
    assert_eq!(
        (agent.input_tokens, agent.output_tokens),
        (Some(812), Some(9))
    );
    assert_eq!(s.calls.in_flight(), 0);
}

#[test]
fn errors_carry_their_code_and_open_calls_end_aborted() {
    let mut s = Session::new();
    s.client(
        10,
        r#"{"type":"req","id":7,"method":"chat.send","params":{}}"#,
    );
    s.server(
        20,
        r#"{"type":"res","id":7,"ok":false,"error":{"code":"INVALID_REQUEST","message":"bad"}}"#,
    );
    s.client(
        30,
        r#"{"type":"req","id":"x","method":"agent","params":{"id":"not-this"}}"#,
    );
    assert_eq!(s.calls.in_flight(), 1);
    s.calls.close(CallOutcome::Aborted, &mut s.out);
    let [failed, aborted] = &s.out[..] else {
        panic!("{:?}", s.out)
    };
    assert_eq!(failed.outcome, CallOutcome::Error("INVALID_REQUEST".into()));
    assert_eq!(failed.outcome.as_str(), "INVALID_REQUEST");
    assert_eq!(aborted.method, "agent");
    assert_eq!(aborted.outcome, CallOutcome::Aborted);
    assert_eq!(aborted.end, 31);
}

#[test]
fn nested_ids_and_types_are_not_the_message_s() {
    let mut s = Session::new();
    // The nested "type" and "id" come first; the top-level ones decide.
    s.client(
        1,
        r#"{"params":{"type":"res","id":"inner"},"method":"agent","id":"outer","type":"req"}"#,
    );
    s.server(
        2,
        r#"{"payload":{"id":"outer","status":"ok"},"ok":true,"id":"inner","type":"res"}"#,
    );
    assert!(s.out.is_empty());
    s.server(
        3,
        r#"{"type":"res","ok":true,"id":"outer","payload":{"status":"ok"}}"#,
    );
    assert_eq!(s.out.len(), 1);
    // A request from the server, or a response from the client, is not a call.
    s.server(4, r#"{"type":"req","id":"s","method":"agent"}"#);
    s.client(5, r#"{"type":"res","id":"s","ok":true}"#);
    assert_eq!(s.calls.in_flight(), 0);
}

#[test]
fn deltas_without_a_run_go_to_the_oldest_call_still_waiting() {
    let mut s = Session::new();
    s.client(
        1,
        r#"{"type":"req","id":"1","method":"chat.send","params":{}}"#,
    );
    s.client(
        2,
        r#"{"type":"req","id":"2","method":"chat.send","params":{}}"#,
    );
    s.client(
        3,
        r#"{"type":"req","id":"3","method":"sessions.list","params":{}}"#,
    );
    s.server(
        10,
        r#"{"type":"event","event":"chat","payload":{"state":"delta"}}"#,
    );
    s.server(
        11,
        r#"{"type":"event","event":"chat","payload":{"state":"delta"}}"#,
    );
    s.server(
        12,
        r#"{"type":"event","event":"chat","payload":{"state":"final"}}"#,
    );
    for id in ["3", "2", "1"] {
        s.server(
            20,
            &format!(r#"{{"type":"res","id":"{id}","ok":true,"payload":{{}}}}"#),
        );
    }
    let firsts: Vec<(&str, Option<u64>)> = s
        .out
        .iter()
        .map(|c| (c.method.as_str(), c.first_delta))
        .collect();
    assert_eq!(
        firsts,
        [
            ("sessions.list", None),
            ("chat.send", Some(11)),
            ("chat.send", Some(10))
        ]
    );
}

#[test]
fn usage_in_the_tail_of_a_long_result_is_read() {
    let mut s = Session::new();
    s.client(1, r#"{"type":"req","id":"a","method":"agent","params":{}}"#);
    let mut result = text(
        50,
        r#"{"type":"res","id":"a","ok":true,"payload":{"runId":"r","status":"ok","result":{"payloads":[{"text":"long"#,
    );
    result.whole = false;
    result.len = 100_000;
    result.tail =
        br#"ng text"}],"meta":{"agentMeta":{"usage":{"input":30000,"output":1200}}}}}}"#.to_vec();
    s.calls.message(meta(), false, &result, &mut s.out);
    assert_eq!(s.out[0].input_tokens, Some(30_000));
    assert_eq!(s.out[0].output_tokens, Some(1_200));
    // Compressed or binary messages are never read.
    let mut s = Session::new();
    let mut req = text(1, r#"{"type":"req","id":"a","method":"agent"}"#);
    req.compressed = true;
    s.calls.message(meta(), true, &req, &mut s.out);
    req.compressed = false;
    req.kind = MessageKind::Binary;
    s.calls.message(meta(), true, &req, &mut s.out);
    assert_eq!(s.calls.in_flight(), 0);
}

#[test]
fn pending_calls_are_bounded() {
    let mut s = Session::new();
    for i in 0..MAX_PENDING_CALLS + 3 {
        s.client(
            i as u64,
            &format!(r#"{{"type":"req","id":"{i}","method":"health"}}"#),
        );
    }
    assert_eq!(s.calls.in_flight(), MAX_PENDING_CALLS);
    // The 3 oldest ended evicted, each counted as such.
    let evicted: Vec<&str> = s.out.iter().map(|c| c.method.as_str()).collect();
    assert_eq!(evicted, ["health"; 3]);
    assert!(s.out.iter().all(|c| c.outcome == CallOutcome::Evicted));
    assert_eq!(
        s.out.iter().map(|c| c.request_first).collect::<Vec<_>>(),
        [0, 1, 2]
    );
}

#[test]
fn output_tokens_from_the_usage_event_when_the_result_hides_them() {
    let mut s = Session::new();
    s.client(1, r#"{"type":"req","id":"a","method":"agent","params":{}}"#);
    s.server(
        2,
        r#"{"type":"res","id":"a","ok":true,"payload":{"runId":"r","status":"accepted"}}"#,
    );
    s.server(
        3,
        r#"{"type":"event","event":"agent","payload":{"runId":"r","stream":"usage","data":{"outputTokens":41}},"seq":9}"#,
    );
    // A long result whose middle (the usage) was not captured.
    let mut result = text(
        4,
        r#"{"type":"res","id":"a","ok":true,"payload":{"runId":"r","status":"ok","result":{"payloads":[{"text":"..."#,
    );
    result.whole = false;
    result.tail = br#"..."stopReason":"stop"}}}"#.to_vec();
    s.calls.message(meta(), false, &result, &mut s.out);
    assert_eq!(s.out[0].output_tokens, Some(41));
    assert_eq!(s.out[0].input_tokens, None);
}

#[test]
fn a_request_s_traceparent_gives_its_trace_id() {
    let mut s = Session::new();
    s.client(
        1,
        r#"{"type":"req","id":"a","method":"agent","params":{"traceparent":"00-11111111111111111111111111111111-2222222222222222-01"},"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#,
    );
    s.client(
        2,
        r#"{"type":"req","id":"b","method":"agent","traceparent":"not a traceparent"}"#,
    );
    s.server(
        3,
        r#"{"type":"res","id":"a","ok":true,"payload":{"status":"ok"}}"#,
    );
    s.server(
        4,
        r#"{"type":"res","id":"b","ok":true,"payload":{"status":"ok"}}"#,
    );
    assert_eq!(s.out[0].trace_id, Some(0x0af7651916cd43dd8448eb211c80319c));
    assert_eq!(s.out[1].trace_id, None);
}

#[test]
fn escaped_quotes_and_runs_of_others() {
    let mut s = Session::new();
    // An escaped quote in a top-level string before the keys that decide.
    s.client(
        1,
        r#"{"note":"a\"b","type":"req","id":"1","method":"agent","params":{}}"#,
    );
    s.server(
        2,
        r#"{"type":"res","id":"1","ok":true,"payload":{"runId":"r1","status":"accepted"}}"#,
    );
    // A delta of another run is not this turn's; its own is.
    s.server(
        3,
        r#"{"type":"event","event":"chat","payload":{"runId":"r2","state":"delta"}}"#,
    );
    s.server(
        4,
        r#"{"type":"event","event":"agent","payload":{"runId":"r1","stream":"assistant"}}"#,
    );
    s.server(
        5,
        r#"{"type":"res","id":"1","ok":true,"payload":{"status":"ok"}}"#,
    );
    assert_eq!(s.out.len(), 1, "{:?}", s.out);
    assert_eq!(s.out[0].first_delta, Some(4));
}
