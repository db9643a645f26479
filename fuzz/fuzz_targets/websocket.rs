//! Fuzzes the WebSocket frame parser (`observer/src/engine/ws.rs`) and the calls read from its
//! messages (`engine/rpc.rs`). Input: one byte of settings (bit 0: the client's direction,
//! whose frames are masked; bit 1: permessage-deflate negotiated), then system calls, each a
//! 2-byte little-endian length, a byte giving how much of it was captured as head (× 8) and a
//! byte for the tail, and the call's bytes (the uncaptured middle is skipped by length, as the
//! kernel's capture does). Checks every message against the parser's bounds: head and tail
//! sizes, a message reported whole holds all its bytes, timestamps in order; and every call
//! read from the text messages, as a server and a client would send them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::base::{Role, Side};
use observer::engine::ConnMeta;
use observer::engine::rpc::{Call, Calls};
use observer::engine::ws::{FrameParser, MSG_HEAD, MSG_TAIL, Message, Unread, WsSink};

struct Check {
    calls: Calls,
    from_client: bool,
    out: Vec<Call>,
    last_ts: u64,
}

const META: ConnMeta = ConnMeta {
    conn_id: 1,
    role: Role::Gateway,
    side: Side::Server,
    port: 18789,
    tgid: 1,
};

impl WsSink for Check {
    fn message(&mut self, message: Message) {
        assert!(message.head.len() <= MSG_HEAD, "{message:?}");
        assert!(message.tail.len() <= MSG_TAIL, "{message:?}");
        assert!(message.first_ts <= message.last_ts, "{message:?}");
        assert!(message.last_ts <= self.last_ts, "{message:?}");
        if message.whole {
            assert_eq!(
                message.head.len() as u64,
                message.len.min(MSG_HEAD as u64),
                "{message:?}"
            );
        }
        if message.compressed {
            assert!(
                message.head.is_empty() && message.tail.is_empty(),
                "{message:?}"
            );
        }
        self.calls
            .message(META, self.from_client, &message, &mut self.out);
    }

    fn unread(&mut self, _reason: Unread) {}
}

fuzz_target!(|input: &[u8]| {
    let Some((&settings, mut rest)) = input.split_first() else {
        return;
    };
    let masked = settings & 1 != 0;
    let mut parser = FrameParser::new(masked, settings & 2 != 0);
    let mut check = Check {
        calls: Calls::default(),
        from_client: masked,
        out: Vec::new(),
        last_ts: 0,
    };
    let mut ts = 0;
    while rest.len() >= 4 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let (head, tail) = (rest[2] as usize * 8, rest[3] as usize);
        rest = &rest[4..];
        let bytes = &rest[..len.min(rest.len())];
        rest = &rest[bytes.len()..];
        ts += 1;
        check.last_ts = ts;
        let h = head.min(bytes.len());
        let t = tail.min(bytes.len() - h);
        parser.segment(
            ts,
            bytes.len() as u64,
            &bytes[..h],
            &bytes[bytes.len() - t..],
            &mut check,
        );
    }
    check
        .calls
        .close(observer::engine::CallOutcome::Aborted, &mut check.out);
    for call in &check.out {
        assert!(call.request_first <= call.request_last, "{call:?}");
        assert!(call.request_last <= call.end, "{call:?}");
        if let Some(first) = call.first_delta {
            assert!(first >= call.request_first, "{call:?}");
        }
    }
});
