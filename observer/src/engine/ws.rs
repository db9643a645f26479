//! WebSocket (RFC 6455) after a `101 Switching Protocols`: the frames of one direction, read
//! from the partial capture the engine gets, and the messages they make.
//!
//! Framing is exact as long as every frame header was captured: a payload longer than what was
//! captured of it is skipped by its length, as a `Content-Length` body is. A gap that hides a
//! header loses the framing; the direction then waits for a system call that starts with a
//! plausible frame that fills it exactly (a server writes one frame per call) and goes on
//! from there. A message keeps its first [`MSG_HEAD`] and last [`MSG_TAIL`] captured bytes,
//! unmasked; control frames may come between the fragments of a message. Messages compressed
//! with permessage-deflate (RSV1) are counted and never read.

use super::exchange::ConnMeta;
use super::rpc::{Call, CallOutcome, Calls};
use crate::base::{Direction, Side};

/// Bytes kept from the start of a message.
pub const MSG_HEAD: usize = 2048;
/// Bytes kept from the end of a message.
pub const MSG_TAIL: usize = 512;
/// Payload bytes of a control frame (RFC 6455 §5.5).
const MAX_CONTROL: u64 = 125;

/// Why bytes of a WebSocket direction could not be read. The label of
/// `websocket_unread_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unread {
    /// A capture gap hid a frame header: messages are lost until framing is found again.
    FramingLost,
    /// Bytes that are not a frame where one was due (reserved bits, bad opcode, an unmasked
    /// client frame, an oversized control frame).
    BadFrame,
    /// A message compressed with permessage-deflate: counted, its text not read.
    Compressed,
    /// A data message whose start was not captured (after framing was found again).
    Partial,
    /// A connection upgraded (`101`) to a protocol other than WebSocket (`h2c`, …): counted
    /// once, nothing after the `101` is read.
    OtherProtocol,
}

impl Unread {
    pub const COUNT: usize = 5;
    pub const ALL: [Unread; Unread::COUNT] = [
        Unread::FramingLost,
        Unread::BadFrame,
        Unread::Compressed,
        Unread::Partial,
        Unread::OtherProtocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Unread::FramingLost => "framing_lost",
            Unread::BadFrame => "bad_frame",
            Unread::Compressed => "compressed",
            Unread::Partial => "partial",
            Unread::OtherProtocol => "other_protocol",
        }
    }
}

/// What a message or control frame is; the label `kind` of `websocket_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl MessageKind {
    pub const COUNT: usize = 5;
    pub const ALL: [MessageKind; MessageKind::COUNT] = [
        MessageKind::Text,
        MessageKind::Binary,
        MessageKind::Close,
        MessageKind::Ping,
        MessageKind::Pong,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Text => "text",
            MessageKind::Binary => "binary",
            MessageKind::Close => "close",
            MessageKind::Ping => "ping",
            MessageKind::Pong => "pong",
        }
    }

    fn of_opcode(opcode: u8) -> Option<MessageKind> {
        match opcode {
            1 => Some(MessageKind::Text),
            2 => Some(MessageKind::Binary),
            8 => Some(MessageKind::Close),
            9 => Some(MessageKind::Ping),
            10 => Some(MessageKind::Pong),
            _ => None,
        }
    }
}

/// A finished message (or control frame) of one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: MessageKind,
    /// Compressed with permessage-deflate: `head` and `tail` are empty.
    pub compressed: bool,
    /// Payload bytes, every fragment's.
    pub len: u64,
    /// Timestamps of the system calls that carried its first and last bytes.
    pub first_ts: u64,
    pub last_ts: u64,
    /// Its first captured bytes, unmasked, contiguous from the start (at most [`MSG_HEAD`]).
    pub head: Vec<u8>,
    /// Its last captured bytes, contiguous to the end (at most [`MSG_TAIL`]); empty when
    /// `head` holds the whole message or its end was not captured.
    pub tail: Vec<u8>,
    /// Every byte was captured: `head` (and `tail` where it is longer) is all of it.
    pub whole: bool,
    /// A close frame's status code.
    pub close_code: Option<u16>,
}

/// What one direction's parser found.
pub trait WsSink {
    fn message(&mut self, message: Message);
    fn unread(&mut self, reason: Unread);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At or inside a frame header (`have` bytes of it in `hdr`).
    Header,
    /// Inside a frame's payload.
    Payload,
    /// Framing lost: waiting for a system call that starts with a frame.
    Lost,
}

#[derive(Debug, Clone, Copy, Default)]
struct Frame {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    /// Payload bytes passed so far.
    done: u64,
}

/// The message being assembled from data frames.
#[derive(Debug, Default)]
struct Assembly {
    kind: Option<MessageKind>,
    compressed: bool,
    len: u64,
    first_ts: u64,
    last_ts: u64,
    head: Vec<u8>,
    /// The head still grows: no gap since the message began.
    head_open: bool,
    tail: Vec<u8>,
    /// Bytes missed since `tail` was last emptied (a gap): the tail is only what follows.
    gap: bool,
}

impl Assembly {
    fn push(&mut self, bytes: &[u8]) {
        if self.compressed {
            return;
        }
        if self.head_open {
            let room = MSG_HEAD - self.head.len();
            let n = room.min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
        }
        // The tail: the last MSG_TAIL bytes since the last gap (dropped at the end where the
        // head holds the whole message).
        if bytes.len() >= MSG_TAIL {
            self.tail.clear();
            self.tail
                .extend_from_slice(&bytes[bytes.len() - MSG_TAIL..]);
        } else {
            let over = (self.tail.len() + bytes.len()).saturating_sub(MSG_TAIL);
            self.tail.drain(..over);
            self.tail.extend_from_slice(bytes);
        }
    }

    fn skip(&mut self) {
        self.head_open = false;
        self.tail.clear();
        self.gap = true;
    }
}

/// One direction of a WebSocket connection. `masked`: frames of this direction must be
/// masked (client to server) or must not be (server to client).
#[derive(Debug)]
pub struct FrameParser {
    masked: bool,
    deflate: bool,
    state: State,
    hdr: [u8; 14],
    have: usize,
    /// Timestamp of the call that carried the first byte of the header in `hdr`.
    hdr_ts: u64,
    frame: Frame,
    /// A control frame's payload (its close code), and the timestamps of the calls that
    /// carried its first and last bytes.
    control: Vec<u8>,
    control_ts: (u64, u64),
    /// The data message in progress; `None` between messages.
    message: Option<Assembly>,
    /// After framing was found again, until a message starts: continuation frames belong to
    /// a message whose start was not seen.
    orphan: bool,
}

impl FrameParser {
    /// `masked`: the client's direction; `deflate`: permessage-deflate was negotiated.
    pub fn new(masked: bool, deflate: bool) -> FrameParser {
        FrameParser {
            masked,
            deflate,
            state: State::Header,
            hdr: [0; 14],
            have: 0,
            hdr_ts: 0,
            frame: Frame::default(),
            control: Vec::new(),
            control_ts: (0, 0),
            message: None,
            orphan: false,
        }
    }

    /// Whether the framing is lost now (waiting for a frame to start a system call).
    pub fn is_lost(&self) -> bool {
        self.state == State::Lost
    }

    /// One system call's bytes: `len` moved, the first `head.len()` and last `tail.len()`
    /// captured.
    pub fn segment(&mut self, ts: u64, len: u64, head: &[u8], tail: &[u8], sink: &mut impl WsSink) {
        if self.state == State::Lost && !self.resync(len, head) {
            return;
        }
        let captured = (head.len() + tail.len()) as u64;
        self.feed(ts, head, sink);
        if len > captured {
            self.skip(len - captured, sink);
        }
        self.feed(ts, tail, sink);
    }

    /// Framing is lost (counted once, with the message in progress).
    fn lose(&mut self, reason: Unread, sink: &mut impl WsSink) {
        sink.unread(reason);
        self.state = State::Lost;
        self.have = 0;
        self.message = None;
        self.control.clear();
    }

    /// Framing lost: takes `head` as the start of a frame if it plausibly is one that ends
    /// exactly where the system call does.
    fn resync(&mut self, len: u64, head: &[u8]) -> bool {
        let Some((frame, header_len)) = parse_header(head) else {
            return false;
        };
        if self.check(&frame).is_err() || header_len as u64 + frame.len != len {
            return false;
        }
        self.state = State::Header;
        self.have = 0;
        self.message = None;
        self.orphan = true;
        true
    }

    /// Whether a frame may come in this direction.
    fn check(&self, frame: &Frame) -> Result<(), Unread> {
        let control = frame.opcode >= 8;
        let known = matches!(frame.opcode, 0 | 1 | 2 | 8 | 9 | 10);
        if !known
            || frame.mask.is_some() != self.masked
            || (frame.rsv1 && (!self.deflate || control))
            || (control && (!frame.fin || frame.len > MAX_CONTROL))
            || frame.len > i64::MAX as u64
        {
            return Err(Unread::BadFrame);
        }
        Ok(())
    }

    /// Captured bytes that continue the current system call.
    pub fn bytes(&mut self, ts: u64, bytes: &[u8], sink: &mut impl WsSink) {
        self.feed(ts, bytes, sink);
    }

    /// `n` bytes of the current system call that were not captured.
    pub fn gap(&mut self, n: u64, sink: &mut impl WsSink) {
        self.skip(n, sink);
    }

    fn skip(&mut self, n: u64, sink: &mut impl WsSink) {
        match self.state {
            State::Lost => {}
            State::Header => self.lose(Unread::FramingLost, sink),
            State::Payload => {
                let left = self.frame.len - self.frame.done;
                let take = n.min(left);
                self.frame.done += take;
                if self.frame.opcode >= 8 {
                    self.control.clear();
                } else if let Some(message) = &mut self.message {
                    message.len += take;
                    message.skip();
                }
                if self.frame.done == self.frame.len {
                    // The frame ends in the gap (its end is known from its length).
                    self.frame_done(sink);
                }
                if n > take {
                    // The next frame's header is in the gap.
                    self.lose(Unread::FramingLost, sink);
                }
            }
        }
    }

    fn feed(&mut self, ts: u64, mut bytes: &[u8], sink: &mut impl WsSink) {
        while !bytes.is_empty() {
            match self.state {
                State::Lost => return,
                State::Header => {
                    if self.have == 0 {
                        self.hdr_ts = ts;
                    }
                    let want = header_len_needed(&self.hdr[..self.have]);
                    let take = (want - self.have).min(bytes.len());
                    self.hdr[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                    self.have += take;
                    bytes = &bytes[take..];
                    if self.have < header_len_needed(&self.hdr[..self.have]) {
                        continue;
                    }
                    let Some((frame, _)) = parse_header(&self.hdr[..self.have]) else {
                        continue;
                    };
                    self.have = 0;
                    if let Err(reason) = self.check(&frame) {
                        self.lose(reason, sink);
                        return;
                    }
                    self.start_frame(frame, self.hdr_ts, sink);
                }
                State::Payload => {
                    let left = self.frame.len - self.frame.done;
                    let n = left.min(bytes.len() as u64) as usize;
                    self.payload(&bytes[..n], ts);
                    bytes = &bytes[n..];
                    if self.frame.done == self.frame.len {
                        self.frame_done(sink);
                    }
                }
            }
        }
    }

    fn start_frame(&mut self, frame: Frame, ts: u64, sink: &mut impl WsSink) {
        self.frame = frame;
        if frame.opcode < 8 {
            if frame.opcode == 0 {
                if self.message.is_none() {
                    if !self.orphan {
                        // A continuation with no message begun: not a frame after all.
                        self.lose(Unread::BadFrame, sink);
                        return;
                    }
                    // The rest of a message whose start was lost: counted, not read.
                    self.message = Some(Assembly {
                        kind: None,
                        first_ts: ts,
                        ..Assembly::default()
                    });
                }
            } else {
                if self.message.is_some() {
                    // A new message before the last one's final fragment.
                    self.lose(Unread::BadFrame, sink);
                    return;
                }
                self.orphan = false;
                self.message = Some(Assembly {
                    kind: MessageKind::of_opcode(frame.opcode),
                    compressed: frame.rsv1,
                    first_ts: ts,
                    head_open: true,
                    ..Assembly::default()
                });
            }
            if let Some(message) = &mut self.message {
                message.last_ts = ts;
            }
        } else {
            self.control.clear();
            self.control_ts = (ts, ts);
        }
        self.state = State::Payload;
        if frame.len == 0 {
            self.frame_done(sink);
        }
    }

    fn payload(&mut self, bytes: &[u8], ts: u64) {
        let mut buf = [0u8; 256];
        let mut at = 0;
        while at < bytes.len() {
            let n = (bytes.len() - at).min(buf.len());
            let piece = &mut buf[..n];
            piece.copy_from_slice(&bytes[at..at + n]);
            if let Some(mask) = self.frame.mask {
                let offset = self.frame.done as usize;
                for (i, b) in piece.iter_mut().enumerate() {
                    *b ^= mask[(offset + i) % 4];
                }
            }
            self.frame.done += n as u64;
            if self.frame.opcode >= 8 {
                self.control.extend_from_slice(piece);
                self.control_ts.1 = ts;
            } else if let Some(message) = &mut self.message {
                message.len += n as u64;
                message.last_ts = ts;
                message.push(piece);
            }
            at += n;
        }
    }

    fn frame_done(&mut self, sink: &mut impl WsSink) {
        self.state = State::Header;
        let frame = self.frame;
        if frame.opcode >= 8 {
            let kind = MessageKind::of_opcode(frame.opcode).unwrap_or(MessageKind::Close);
            // A gap may have taken the payload's start: the code is read only from a whole one.
            let whole = self.control.len() as u64 == frame.len;
            let close_code = (kind == MessageKind::Close && whole && self.control.len() >= 2)
                .then(|| u16::from_be_bytes([self.control[0], self.control[1]]));
            sink.message(Message {
                kind,
                compressed: false,
                len: frame.len,
                first_ts: self.control_ts.0,
                last_ts: self.control_ts.1,
                head: std::mem::take(&mut self.control),
                tail: Vec::new(),
                whole,
                close_code,
            });
            return;
        }
        if !frame.fin {
            return;
        }
        let Some(message) = self.message.take() else {
            return;
        };
        let Some(kind) = message.kind else {
            sink.unread(Unread::Partial);
            return;
        };
        if message.compressed {
            sink.unread(Unread::Compressed);
        }
        let whole = !message.gap && !message.compressed;
        let tail = if message.len as usize <= MSG_HEAD && whole {
            Vec::new()
        } else {
            message.tail
        };
        sink.message(Message {
            kind,
            compressed: message.compressed,
            len: message.len,
            first_ts: message.first_ts,
            last_ts: message.last_ts,
            head: message.head,
            tail,
            whole,
            close_code: None,
        });
    }
}

/// Messages and unread bytes of WebSocket connections, by direction as the observed process
/// sees it (0 ingress, 1 egress) and kind, and by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WsCounts {
    pub messages: [[u64; MessageKind::COUNT]; 2],
    pub unread: [u64; Unread::COUNT],
}

impl WsCounts {
    pub fn message(&self, direction: Direction, kind: MessageKind) -> u64 {
        self.messages[direction_index(direction)][kind as usize]
    }

    pub fn unread(&self, reason: Unread) -> u64 {
        self.unread[reason as usize]
    }
}

fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// Both directions of one WebSocket connection, and the calls made over it.
#[derive(Debug)]
pub struct Session {
    from_client: FrameParser,
    from_server: FrameParser,
    calls: Calls,
}

/// Where a direction's findings go: counts, and text messages to the calls.
struct Route<'a> {
    meta: ConnMeta,
    from_client: bool,
    calls: &'a mut Calls,
    counts: &'a mut WsCounts,
    out: &'a mut Vec<Call>,
}

impl WsSink for Route<'_> {
    fn message(&mut self, message: Message) {
        // Ingress for the server when the client sent it, and the other way round.
        let direction = if (self.meta.side == Side::Server) == self.from_client {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        self.counts.messages[direction_index(direction)][message.kind as usize] += 1;
        self.calls
            .message(self.meta, self.from_client, &message, self.out);
    }

    fn unread(&mut self, reason: Unread) {
        self.counts.unread[reason as usize] += 1;
    }
}

/// What a session's bytes go into.
pub struct SessionOutput<'a> {
    pub counts: &'a mut WsCounts,
    pub calls: &'a mut Vec<Call>,
}

impl Session {
    /// After a `101` that switched to WebSocket; `deflate`: permessage-deflate negotiated.
    pub fn new(deflate: bool) -> Session {
        Session {
            from_client: FrameParser::new(true, deflate),
            from_server: FrameParser::new(false, deflate),
            calls: Calls::default(),
        }
    }

    fn route<'a>(
        &'a mut self,
        meta: ConnMeta,
        from_client: bool,
        out: SessionOutput<'a>,
    ) -> (&'a mut FrameParser, Route<'a>) {
        let parser = if from_client {
            &mut self.from_client
        } else {
            &mut self.from_server
        };
        (
            parser,
            Route {
                meta,
                from_client,
                calls: &mut self.calls,
                counts: out.counts,
                out: out.calls,
            },
        )
    }

    /// One system call's bytes in one direction.
    #[allow(clippy::too_many_arguments)]
    pub fn segment(
        &mut self,
        meta: ConnMeta,
        from_client: bool,
        ts: u64,
        len: u64,
        head: &[u8],
        tail: &[u8],
        out: SessionOutput<'_>,
    ) {
        let (parser, mut route) = self.route(meta, from_client, out);
        parser.segment(ts, len, head, tail, &mut route);
    }

    /// Captured bytes that continue a system call (those after the `101` head).
    pub fn bytes(
        &mut self,
        meta: ConnMeta,
        from_client: bool,
        ts: u64,
        bytes: &[u8],
        out: SessionOutput<'_>,
    ) {
        let (parser, mut route) = self.route(meta, from_client, out);
        parser.bytes(ts, bytes, &mut route);
    }

    /// Bytes that continue a system call and were not captured.
    pub fn gap(&mut self, meta: ConnMeta, from_client: bool, n: u64, out: SessionOutput<'_>) {
        let (parser, mut route) = self.route(meta, from_client, out);
        parser.gap(n, &mut route);
    }

    /// The connection is gone: open calls end with `outcome`.
    pub fn close(&mut self, outcome: CallOutcome, out: &mut Vec<Call>) {
        self.calls.close(outcome, out);
    }
}

/// One frame as a peer writes it: FIN, RSV1 (a compressed message's first frame), `opcode`,
/// the payload's length in its shortest form, and the payload masked with `mask` (a
/// client's) or not (a server's). For tests, fuzz seeds and tools that speak WebSocket.
pub fn encode_frame(
    fin: bool,
    rsv1: bool,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | (u8::from(rsv1) << 6) | (opcode & 0x0f)];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xffff => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// How many header bytes a frame needs, from what is known of it (at least 2).
fn header_len_needed(known: &[u8]) -> usize {
    if known.len() < 2 {
        return 2;
    }
    let masked = known[1] & 0x80 != 0;
    let extra = match known[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + extra + if masked { 4 } else { 0 }
}

/// A whole frame header at the start of `bytes`, and its length.
fn parse_header(bytes: &[u8]) -> Option<(Frame, usize)> {
    let need = header_len_needed(bytes);
    if bytes.len() < need {
        return None;
    }
    let (b0, b1) = (bytes[0], bytes[1]);
    if b0 & 0x30 != 0 {
        // RSV2 and RSV3: no extension this parser knows uses them. Reported by `check`
        // through an unknown opcode.
        return Some((
            Frame {
                opcode: 0xff,
                ..Frame::default()
            },
            need,
        ));
    }
    let (len, mut at) = match b1 & 0x7f {
        126 => (u64::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
        127 => (u64::from_be_bytes(bytes[2..10].try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if b1 & 0x80 != 0 {
        let key = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
        at += 4;
        Some(key)
    } else {
        None
    };
    Some((
        Frame {
            fin: b0 & 0x80 != 0,
            rsv1: b0 & 0x40 != 0,
            opcode: b0 & 0x0f,
            mask,
            len,
            done: 0,
        },
        at,
    ))
}

#[cfg(test)]
mod tests;
