//! The fuzz input format: a script of engine operations on a few connections, read from raw
//! bytes ([`Ops`]) and written by the seed generator ([`Script`]). It owns nothing else: the
//! invariants live in `fuzz_targets/engine.rs`, the realistic conversations in
//! `src/bin/seeds.rs`.
//!
//! Each operation is a tag byte, a timestamp step, then its fields. The tag packs the
//! operation and its connection so that one mutated byte moves an operation to another
//! connection or direction without disturbing the rest of the script:
//!
//! ```text
//! tag  bits 0-1  0 data, 1 open, 2 close, 3 drain
//!      bits 2-4  connection slot (0-7)
//!      bit  5    data: egress (else ingress); open: mid-stream; drain: close every connection
//!      bit  6    data: a gap (uncaptured bytes between head and tail) follows, u32 LE
//!      bit  7    data: a tail follows (its length, u16 LE)
//! step u8        the clock advances by this many ns before the operation
//! data           head length u16 LE, [tail length u16 LE], [gap u32 LE], head, tail
//! ```
//!
//! Lengths are cut to the bytes left, so every input is a valid script.

use observer::base::{Direction, Role, Side};
use observer::engine::{ConnMeta, Engine};

/// Connection slots a script can name: more than the engine under test keeps, so eviction is
/// reachable.
pub const SLOTS: u8 = 8;

const DATA: u8 = 0;
const OPEN: u8 = 1;
const CLOSE: u8 = 2;
const DRAIN: u8 = 3;
const FLAG: u8 = 1 << 5;
const GAP: u8 = 1 << 6;
const TAIL: u8 = 1 << 7;

/// One operation on the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    Open {
        slot: u8,
        mid_stream: bool,
    },
    /// One syscall: `gap` bytes between `head` and `tail` were moved but not captured.
    Data {
        slot: u8,
        direction: Direction,
        gap: u64,
        head: &'a [u8],
        tail: &'a [u8],
    },
    Close {
        slot: u8,
    },
    Drain {
        close_all: bool,
    },
}

/// The fixed identity of a slot: both roles and both sides are represented.
pub fn meta(slot: u8) -> ConnMeta {
    let slot = slot % SLOTS;
    ConnMeta {
        conn_id: u64::from(slot) + 1,
        role: if slot & 1 == 0 {
            Role::Upstream
        } else {
            Role::Gateway
        },
        side: if slot & 2 == 0 {
            Side::Server
        } else {
            Side::Client
        },
        port: if slot & 1 == 0 { 11434 } else { 18789 },
        tgid: 100 + u32::from(slot),
    }
}

/// Reads operations from fuzz input: `(step, op)` pairs until the bytes run out.
pub struct Ops<'a> {
    input: &'a [u8],
}

impl<'a> Ops<'a> {
    pub fn new(input: &'a [u8]) -> Ops<'a> {
        Ops { input }
    }

    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.input.split_first()?;
        self.input = rest;
        Some(b)
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.input.len());
        let (taken, rest) = self.input.split_at(n);
        self.input = rest;
        taken
    }

    fn uint(&mut self, n: usize) -> u64 {
        self.bytes(n)
            .iter()
            .rev()
            .fold(0, |acc, &b| acc << 8 | u64::from(b))
    }
}

impl<'a> Iterator for Ops<'a> {
    type Item = (u8, Op<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let tag = self.byte()?;
        let step = self.byte().unwrap_or(0);
        let slot = (tag >> 2) & 7;
        let op = match tag & 3 {
            DATA => {
                let head_len = self.uint(2) as usize;
                let tail_len = if tag & TAIL != 0 { self.uint(2) } else { 0 } as usize;
                let gap = if tag & GAP != 0 { self.uint(4) } else { 0 };
                let head = self.bytes(head_len);
                let tail = self.bytes(tail_len);
                Op::Data {
                    slot,
                    direction: if tag & FLAG != 0 {
                        Direction::Egress
                    } else {
                        Direction::Ingress
                    },
                    gap,
                    head,
                    tail,
                }
            }
            OPEN => Op::Open {
                slot,
                mid_stream: tag & FLAG != 0,
            },
            CLOSE => Op::Close { slot },
            _ => Op::Drain {
                close_all: tag & FLAG != 0,
            },
        };
        Some((step, op))
    }
}

/// Plays a script on `engine`, calling `after` after each operation. The clock starts at
/// 1000 ns and never goes back (events reach the engine in timestamp order).
pub fn replay(engine: &mut Engine, input: &[u8], mut after: impl FnMut(&mut Engine, &Op<'_>)) {
    let mut ts: u64 = 1_000;
    for (step, op) in Ops::new(input) {
        ts += u64::from(step);
        match op {
            Op::Open { slot, mid_stream } => engine.open(meta(slot), ts, mid_stream),
            Op::Data {
                slot,
                direction,
                gap,
                head,
                tail,
            } => {
                let len = (head.len() + tail.len()) as u64 + gap;
                engine.data(meta(slot), direction, ts, len, head, tail);
            }
            Op::Close { slot } => engine.close(meta(slot).conn_id),
            Op::Drain { close_all: true } => engine.close_all(),
            Op::Drain { close_all: false } => {}
        }
        after(engine, &op);
    }
}

/// Writes a script (the inverse of [`Ops`]), for seed inputs.
#[derive(Debug, Default)]
pub struct Script {
    bytes: Vec<u8>,
}

impl Script {
    pub fn new() -> Script {
        Script::default()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    pub fn push(&mut self, step: u8, op: &Op<'_>) -> &mut Script {
        match *op {
            Op::Open { slot, mid_stream } => {
                self.tag(OPEN, slot, mid_stream, step);
            }
            Op::Close { slot } => {
                self.tag(CLOSE, slot, false, step);
            }
            Op::Drain { close_all } => {
                self.tag(DRAIN, 0, close_all, step);
            }
            Op::Data {
                slot,
                direction,
                gap,
                head,
                tail,
            } => {
                let head = &head[..head.len().min(u16::MAX.into())];
                let tail = &tail[..tail.len().min(u16::MAX.into())];
                let mut tag = DATA | (slot % SLOTS) << 2;
                if direction == Direction::Egress {
                    tag |= FLAG;
                }
                if gap > 0 {
                    tag |= GAP;
                }
                if !tail.is_empty() {
                    tag |= TAIL;
                }
                self.bytes.extend([tag, step]);
                self.bytes
                    .extend_from_slice(&(head.len() as u16).to_le_bytes());
                if !tail.is_empty() {
                    self.bytes
                        .extend_from_slice(&(tail.len() as u16).to_le_bytes());
                }
                if gap > 0 {
                    let gap = u32::try_from(gap).unwrap_or(u32::MAX);
                    self.bytes.extend_from_slice(&gap.to_le_bytes());
                }
                self.bytes.extend_from_slice(head);
                self.bytes.extend_from_slice(tail);
            }
        }
        self
    }

    /// A whole write or read, captured the way the kernel does: all of it when it fits in
    /// `head_max + tail_max`, else its first `head_max` and last `tail_max` bytes.
    pub fn write(
        &mut self,
        slot: u8,
        direction: Direction,
        step: u8,
        bytes: &[u8],
        head_max: usize,
        tail_max: usize,
    ) -> &mut Script {
        let (head, tail, gap) = if bytes.len() <= head_max + tail_max {
            (bytes, &[][..], 0)
        } else {
            let tail_at = bytes.len() - tail_max;
            (
                &bytes[..head_max],
                &bytes[tail_at..],
                (tail_at - head_max) as u64,
            )
        };
        self.push(
            step,
            &Op::Data {
                slot,
                direction,
                gap,
                head,
                tail,
            },
        )
    }

    fn tag(&mut self, op: u8, slot: u8, flag: bool, step: u8) {
        let tag = op | (slot % SLOTS) << 2 | if flag { FLAG } else { 0 };
        self.bytes.extend([tag, step]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_reads_back_as_written() {
        let ops = [
            Op::Open {
                slot: 3,
                mid_stream: true,
            },
            Op::Data {
                slot: 3,
                direction: Direction::Egress,
                gap: 70_000,
                head: b"HTTP/1.1 200 OK\r\n",
                tail: b"0\r\n\r\n",
            },
            Op::Data {
                slot: 5,
                direction: Direction::Ingress,
                gap: 0,
                head: b"GET / HTTP/1.1\r\n\r\n",
                tail: b"",
            },
            Op::Close { slot: 3 },
            Op::Drain { close_all: true },
        ];
        let mut script = Script::new();
        for (i, op) in ops.iter().enumerate() {
            script.push(i as u8, op);
        }
        let bytes = script.into_bytes();
        let read: Vec<(u8, Op<'_>)> = Ops::new(&bytes).collect();
        let expected: Vec<(u8, Op<'_>)> = ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| (i as u8, op))
            .collect();
        assert_eq!(read, expected);
    }
}
