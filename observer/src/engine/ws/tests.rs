use super::*;

#[derive(Default)]
struct Found {
    messages: Vec<Message>,
    unread: Vec<Unread>,
}

impl WsSink for Found {
    fn message(&mut self, message: Message) {
        self.messages.push(message);
    }
    fn unread(&mut self, reason: Unread) {
        self.unread.push(reason);
    }
}

fn frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    encode_frame(fin, rsv1, opcode, payload, mask)
}

fn text(payload: &[u8]) -> Vec<u8> {
    frame(true, false, 1, payload, None)
}

fn masked_text(payload: &[u8]) -> Vec<u8> {
    frame(true, false, 1, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
}

/// Feeds `bytes` as one system call, capturing at most `head` and `tail` bytes of it.
fn call(p: &mut FrameParser, ts: u64, bytes: &[u8], head: usize, tail: usize, found: &mut Found) {
    let h = head.min(bytes.len());
    let t = tail.min(bytes.len() - h);
    p.segment(
        ts,
        bytes.len() as u64,
        &bytes[..h],
        &bytes[bytes.len() - t..],
        found,
    );
}

fn whole(p: &mut FrameParser, ts: u64, bytes: &[u8], found: &mut Found) {
    call(p, ts, bytes, usize::MAX, 0, found);
}

#[test]
fn every_length_form_masked_and_not() {
    for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
        let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        for masked in [false, true] {
            let mut p = FrameParser::new(masked, false);
            let mut found = Found::default();
            let bytes = if masked {
                masked_text(&payload)
            } else {
                text(&payload)
            };
            whole(&mut p, 7, &bytes, &mut found);
            assert_eq!(found.unread, [], "len {len} masked {masked}");
            let [m] = &found.messages[..] else {
                panic!("len {len}: {:?}", found.messages.len());
            };
            assert_eq!(m.kind, MessageKind::Text);
            assert_eq!(m.len, len as u64);
            assert!(m.whole);
            assert_eq!(m.head, payload[..len.min(MSG_HEAD)], "len {len}");
            if len > MSG_HEAD {
                assert_eq!(m.tail, payload[len - MSG_TAIL..], "len {len}");
            } else {
                assert!(m.tail.is_empty());
            }
            assert_eq!((m.first_ts, m.last_ts), (7, 7));
        }
    }
}

#[test]
fn a_header_split_byte_by_byte_across_calls() {
    let payload = vec![b'x'; 300];
    let bytes = masked_text(&payload);
    let mut p = FrameParser::new(true, false);
    let mut found = Found::default();
    for (i, b) in bytes.iter().enumerate() {
        whole(&mut p, i as u64, std::slice::from_ref(b), &mut found);
    }
    let [m] = &found.messages[..] else {
        panic!("{:?}", found.messages.len())
    };
    assert_eq!(m.head, payload);
    // First payload byte came in the call after the 8-byte header, the last in the last.
    assert_eq!((m.first_ts, m.last_ts), (0, bytes.len() as u64 - 1));
}

#[test]
fn fragments_with_control_frames_between() {
    let key = Some([1, 2, 3, 4]);
    let mut bytes = frame(false, false, 1, b"{\"type\":", key);
    bytes.extend(frame(true, false, 9, b"ping!", key));
    bytes.extend(frame(false, false, 0, b"\"req\",", key));
    bytes.extend(frame(true, false, 10, b"", key));
    bytes.extend(frame(true, false, 0, b"\"id\":\"1\"}", key));
    bytes.extend(frame(true, false, 8, &[0x03, 0xe8, b'b', b'y', b'e'], key));
    let mut p = FrameParser::new(true, false);
    let mut found = Found::default();
    // Split anywhere: the result is the same.
    for cut in [1, 2, 9, 17, bytes.len() - 1] {
        found.messages.clear();
        let mut p2 = FrameParser::new(true, false);
        whole(&mut p2, 1, &bytes[..cut], &mut found);
        whole(&mut p2, 2, &bytes[cut..], &mut found);
        let kinds: Vec<MessageKind> = found.messages.iter().map(|m| m.kind).collect();
        assert_eq!(
            kinds,
            [
                MessageKind::Ping,
                MessageKind::Pong,
                MessageKind::Text,
                MessageKind::Close
            ],
            "cut {cut}"
        );
    }
    whole(&mut p, 1, &bytes, &mut Found::default());
    found.messages.clear();
    let mut p = FrameParser::new(true, false);
    whole(&mut p, 1, &bytes, &mut found);
    assert_eq!(found.messages[0].head, b"ping!");
    assert_eq!(found.messages[2].head, b"{\"type\":\"req\",\"id\":\"1\"}");
    assert_eq!(found.messages[2].len, 23);
    assert_eq!(found.messages[3].close_code, Some(1000));
    assert_eq!(found.unread, []);
}

#[test]
fn a_long_payload_captured_in_part_keeps_framing_exact() {
    // One server write per frame (Node's writev of header and payload): 100 KB captured as
    // its first 1024 and last 256 bytes, then a small frame in the next call.
    let payload: Vec<u8> = (0..100_000).map(|i| b'0' + (i % 10) as u8).collect();
    let mut p = FrameParser::new(false, false);
    let mut found = Found::default();
    call(&mut p, 1, &text(&payload), 1024, 256, &mut found);
    whole(&mut p, 2, &text(b"next"), &mut found);
    assert_eq!(found.unread, []);
    let [big, next] = &found.messages[..] else {
        panic!("{:?}", found.messages.len())
    };
    assert_eq!(big.len, 100_000);
    assert!(!big.whole);
    // The header took 10 bytes of the 1024 captured.
    assert_eq!(big.head, payload[..1014]);
    assert_eq!(big.tail, payload[100_000 - 256..]);
    assert_eq!(next.head, b"next");
    // Several frames in one read, the gap inside the last one's payload: still exact.
    let mut bytes = text(b"a");
    bytes.extend(text(&payload));
    bytes.extend(text(b"zz"));
    let mut found = Found::default();
    let mut p = FrameParser::new(false, false);
    call(&mut p, 3, &bytes, 1024, 4, &mut found);
    let lens: Vec<u64> = found.messages.iter().map(|m| m.len).collect();
    assert_eq!(lens, [1, 100_000, 2]);
    assert_eq!(found.messages[2].head, b"zz");
}

#[test]
fn a_gap_over_a_header_loses_framing_until_a_call_starts_with_a_frame() {
    let payload = vec![b'p'; 5000];
    let mut bytes = text(&payload);
    bytes.extend(text(b"hidden"));
    bytes.extend(text(&payload));
    let mut p = FrameParser::new(false, false);
    let mut found = Found::default();
    // The second frame's header is in the gap.
    call(&mut p, 1, &bytes, 1024, 256, &mut found);
    assert_eq!(found.unread, [Unread::FramingLost]);
    assert!(p.is_lost());
    // A call that is not exactly one frame is not taken.
    let mut two = text(b"a");
    two.extend(text(b"b"));
    whole(&mut p, 2, &two[..4], &mut found);
    assert!(p.is_lost());
    // One that is: framing found again.
    whole(&mut p, 3, &text(b"{\"type\":\"event\"}"), &mut found);
    assert!(!p.is_lost());
    whole(&mut p, 4, &text(b"after"), &mut found);
    let heads: Vec<&[u8]> = found.messages.iter().map(|m| &m.head[..]).collect();
    assert_eq!(heads, [&payload[..1020], b"{\"type\":\"event\"}", b"after"]);
    // The first frame ended in the gap: its end is known, its middle was not captured.
    assert!(!found.messages[0].whole);
    assert_eq!(found.messages[0].len, 5000);
}

#[test]
fn compressed_messages_are_counted_and_never_read() {
    let deflated = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    let mut p = FrameParser::new(false, true);
    let mut found = Found::default();
    whole(
        &mut p,
        1,
        &frame(true, true, 1, &deflated, None),
        &mut found,
    );
    whole(&mut p, 2, &text(b"plain"), &mut found);
    assert_eq!(found.unread, [Unread::Compressed]);
    assert!(found.messages[0].compressed);
    assert!(found.messages[0].head.is_empty());
    assert!(!found.messages[0].whole);
    assert_eq!(found.messages[0].len, 7);
    assert_eq!(found.messages[1].head, b"plain");
}

#[test]
fn frames_that_cannot_be_are_bad_frames() {
    let cases: [(&str, bool, bool, Vec<u8>); 6] = [
        ("unmasked client frame", true, false, text(b"x")),
        ("masked server frame", false, false, masked_text(b"x")),
        (
            "rsv1 without deflate",
            false,
            false,
            frame(true, true, 1, b"x", None),
        ),
        (
            "unknown opcode",
            false,
            false,
            frame(true, false, 3, b"x", None),
        ),
        (
            "fragmented ping",
            false,
            false,
            frame(false, false, 9, b"x", None),
        ),
        (
            "continuation first",
            false,
            false,
            frame(true, false, 0, b"x", None),
        ),
    ];
    for (what, masked, deflate, bytes) in cases {
        let mut p = FrameParser::new(masked, deflate);
        let mut found = Found::default();
        whole(&mut p, 1, &bytes, &mut found);
        assert_eq!(found.unread, [Unread::BadFrame], "{what}");
        assert!(found.messages.is_empty(), "{what}");
        assert!(p.is_lost(), "{what}");
    }
    // Garbage after the 101 (not WebSocket at all) is one bad frame, then nothing.
    let mut p = FrameParser::new(false, false);
    let mut found = Found::default();
    whole(&mut p, 1, b"HTTP/1.1 200 OK\r\n\r\nhello", &mut found);
    assert_eq!(found.unread, [Unread::BadFrame]);
}

#[test]
fn the_rest_of_a_lost_message_is_partial() {
    let mut p = FrameParser::new(false, false);
    let mut found = Found::default();
    let mut bytes = frame(false, false, 1, &[b'a'; 3000], None);
    bytes.extend(frame(false, false, 0, b"bb", None));
    call(&mut p, 1, &bytes, 1024, 2, &mut found);
    assert_eq!(found.unread, [Unread::FramingLost]);
    // Framing found again on a continuation: the message's end is counted, not read.
    whole(&mut p, 2, &frame(true, false, 0, b"end", None), &mut found);
    whole(&mut p, 3, &text(b"ok"), &mut found);
    assert_eq!(found.unread, [Unread::FramingLost, Unread::Partial]);
    assert_eq!(found.messages.len(), 1);
    assert_eq!(found.messages[0].head, b"ok");
}

/// xorshift64*: a fixed sequence per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_streams_cut_anywhere_give_the_messages_sent() {
    for seed in 1..400u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let masked = seed % 2 == 0;
        let key = || masked.then_some([0xa1, 0x5e, 0x07, 0xff]);
        // Messages of every size class, some fragmented with pings between fragments.
        let mut stream = Vec::new();
        let mut sent: Vec<Vec<u8>> = Vec::new();
        for m in 0..rng.below(8) + 1 {
            let len = match rng.below(4) {
                0 => rng.below(126),
                1 => 126 + rng.below(2000),
                2 => 65_536 + rng.below(1000),
                _ => rng.below(10),
            } as usize;
            let payload: Vec<u8> = (0..len).map(|i| (i as u64 * 31 + m) as u8).collect();
            let pieces = if len > 2 { rng.below(3) + 1 } else { 1 };
            let mut at = 0;
            for piece in 0..pieces {
                let end = if piece + 1 == pieces {
                    len
                } else {
                    at + rng.below((len - at) as u64) as usize
                };
                let opcode = if piece == 0 { 1 } else { 0 };
                stream.extend(frame(
                    piece + 1 == pieces,
                    false,
                    opcode,
                    &payload[at..end],
                    key(),
                ));
                if piece + 1 < pieces && rng.below(2) == 0 {
                    stream.extend(frame(true, false, 9, b"p", key()));
                }
                at = end;
            }
            sent.push(payload);
        }
        // Cut into calls at random points, each captured whole.
        let mut p = FrameParser::new(masked, false);
        let mut found = Found::default();
        let mut at = 0;
        while at < stream.len() {
            let n = (rng.below(3000) as usize + 1).min(stream.len() - at);
            whole(&mut p, at as u64, &stream[at..at + n], &mut found);
            at += n;
        }
        assert_eq!(found.unread, [], "seed {seed}");
        let texts: Vec<&Message> = found
            .messages
            .iter()
            .filter(|m| m.kind == MessageKind::Text)
            .collect();
        assert_eq!(texts.len(), sent.len(), "seed {seed}");
        for (m, payload) in texts.iter().zip(&sent) {
            assert_eq!(m.len, payload.len() as u64, "seed {seed}");
            assert_eq!(
                m.head,
                payload[..payload.len().min(MSG_HEAD)],
                "seed {seed}"
            );
            if payload.len() > MSG_HEAD {
                assert_eq!(m.tail, payload[payload.len() - MSG_TAIL..], "seed {seed}");
            }
        }
        // The same stream with heads and tails cut short: never a panic, never a message
        // longer than sent, and what is reported as whole is exact.
        let mut p = FrameParser::new(masked, false);
        let mut found = Found::default();
        let mut at = 0;
        while at < stream.len() {
            let n = (rng.below(5000) as usize + 1).min(stream.len() - at);
            let (h, t) = (rng.below(1100) as usize, rng.below(300) as usize);
            call(&mut p, at as u64, &stream[at..at + n], h, t, &mut found);
            at += n;
        }
        for m in found
            .messages
            .iter()
            .filter(|m| m.kind == MessageKind::Text)
        {
            let payload = sent
                .iter()
                .find(|s| s.len() as u64 == m.len && s.starts_with(&m.head))
                .unwrap_or_else(|| panic!("seed {seed}: a message nobody sent: {m:?}"));
            if m.whole {
                assert_eq!(
                    m.head,
                    payload[..payload.len().min(MSG_HEAD)],
                    "seed {seed}"
                );
            }
        }
    }
}

#[test]
fn random_bytes_never_panic() {
    for seed in 1..300u64 {
        let mut rng = Rng(seed | 1);
        let bytes: Vec<u8> = (0..rng.below(4000)).map(|_| rng.next() as u8).collect();
        for masked in [false, true] {
            let mut p = FrameParser::new(masked, seed % 3 == 0);
            let mut found = Found::default();
            let mut at = 0;
            while at < bytes.len() {
                let n = (rng.below(700) as usize + 1).min(bytes.len() - at);
                let (h, t) = (rng.below(800) as usize, rng.below(100) as usize);
                call(&mut p, 0, &bytes[at..at + n], h, t, &mut found);
                at += n;
            }
            for m in &found.messages {
                assert!(m.head.len() <= MSG_HEAD && m.tail.len() <= MSG_TAIL);
            }
        }
    }
}
