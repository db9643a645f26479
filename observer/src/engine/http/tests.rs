use super::*;

#[derive(Default)]
struct Record {
    heads: Vec<Head>,
    body: Vec<u8>,
    gaps: u64,
    ends: Vec<u64>,
    errors: Vec<ErrorReason>,
}

impl Sink for Record {
    fn head(&mut self, head: &Head, _ts: u64) -> BodyRule {
        self.heads.push(head.clone());
        BodyRule::Framed
    }
    fn body(&mut self, bytes: &[u8], _ts: u64) {
        self.body.extend_from_slice(bytes);
    }
    fn body_gap(&mut self, n: u64) {
        self.gaps += n;
    }
    fn end(&mut self, ts: u64) {
        self.ends.push(ts);
    }
    fn error(&mut self, reason: ErrorReason) {
        self.errors.push(reason);
    }
}

fn feed(kind: Kind, writes: &[&[u8]]) -> Record {
    let mut parser = MessageParser::new(kind);
    let mut record = Record::default();
    for (i, w) in writes.iter().enumerate() {
        parser.segment(i as u64, w.len() as u64, w, &[], &mut record);
    }
    record
}

#[test]
fn chunked_bodies_with_extensions_and_trailers() {
    let r = feed(
        Kind::Response,
        &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"],
    );
    assert_eq!(r.body, b"hello");
    assert_eq!((r.ends.len(), r.errors.len()), (1, 0));
    assert!(r.heads[0].chunked);
}

#[test]
fn bare_line_feeds_are_tolerated_in_chunk_framing() {
    let r = feed(
        Kind::Response,
        &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n"],
    );
    assert_eq!((r.body.as_slice(), r.ends.len()), (&b"abc"[..], 1));
}

#[test]
fn only_framing_headers_must_be_text() {
    // obs-text in a header the engine does not read is legal HTTP and costs nothing.
    let r = feed(
        Kind::Response,
        &[b"HTTP/1.1 200 OK\r\nServer: caf\xe9\r\nContent-Length: 2\r\n\r\nok"],
    );
    assert_eq!((r.body.as_slice(), r.ends.len()), (&b"ok"[..], 1));
    assert!(r.errors.is_empty());
    // A length that is not text is no length at all.
    let r = feed(
        Kind::Request,
        &[b"POST / HTTP/1.1\r\nContent-Length: 3\xe9\r\n\r\nabc"],
    );
    assert_eq!(r.errors, [ErrorReason::BadHead]);
}

#[test]
fn conflicting_lengths_and_bad_chunks_are_errors() {
    let r = feed(
        Kind::Request,
        &[b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc"],
    );
    assert_eq!(r.errors, [ErrorReason::BadHead]);
    assert!(r.heads.is_empty());
    let r = feed(
        Kind::Response,
        &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
    );
    assert_eq!(r.errors, [ErrorReason::BadChunk]);
}

#[test]
fn a_cut_head_keeps_its_first_lines() {
    let mut parser = MessageParser::new(Kind::Request);
    let mut r = Record::default();
    let head = b"POST /api/chat?x=1 HTTP/1.1\r\nContent-Type: application/json\r\nCookie: aaaa";
    parser.segment(1, 5000, head, b"\r\n\r\n{\"stream\":false}", &mut r);
    assert_eq!(r.errors, [ErrorReason::TruncatedHead]);
    assert_eq!(r.heads[0].path, "/api/chat");
    assert_eq!(r.heads[0].body_type, BodyType::Json);
    assert!(!r.heads[0].complete);
    // The next write starting a request ends the unframed one.
    assert!(parser.end_unframed(&mut r));
    assert_eq!(r.ends, [1]);
}

#[test]
fn paths_are_bounded_and_lose_their_query() {
    let long = format!("GET /{}?q=secret HTTP/1.1\r\n\r\n", "é".repeat(300));
    let r = feed(Kind::Request, &[long.as_bytes()]);
    assert!(r.heads[0].path.len() <= crate::engine::MAX_PATH);
    assert!(!r.heads[0].path.contains("secret"));
}

#[test]
fn message_starts_are_recognised() {
    assert!(looks_like_start(Kind::Request, b"GET / HTTP/1.1"));
    assert!(!looks_like_start(Kind::Request, b"GETX / HTTP/1.1"));
    assert!(!looks_like_start(Kind::Request, b"{\"model\""));
    assert!(looks_like_start(Kind::Response, b"HTTP/1.1 200"));
    assert!(!looks_like_start(Kind::Response, b"HTTP/2 200"));
}

#[test]
fn traceparent_trace_ids() {
    assert_eq!(
        trace_id(b" 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        Some(0x0af7651916cd43dd8448eb211c80319c)
    );
    for bad in [
        &b"00-00000000000000000000000000000000-b7ad6b7169203331-01"[..],
        b"00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
        b"00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
        b"0af7651916cd43dd8448eb211c80319c",
        b"",
    ] {
        assert_eq!(trace_id(bad), None, "{}", String::from_utf8_lossy(bad));
    }
    let head = b"POST /api/chat HTTP/1.1\r\nHost: x\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nContent-Length: 0\r\n\r\n";
    match parse_head(Kind::Request, head) {
        Parsed::Complete(head, _) => {
            assert_eq!(head.trace_id, Some(0x0af7651916cd43dd8448eb211c80319c))
        }
        _ => panic!("not parsed"),
    }
}
