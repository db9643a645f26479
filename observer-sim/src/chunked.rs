//! Chunked transfer coding, both ways: an incremental decoder for request bodies (fed whatever
//! bytes have arrived, it consumes what it can and asks for more) and the encoder Go's
//! net/http uses for responses (`<hex len>\r\n<data>\r\n`, lower-case hex, `0\r\n\r\n` last).
//!
//! The decoder bounds the decoded size and rejects malformed framing; it never allocates more
//! than the limit.

use super::request::RequestError;

/// Go's frame for one flushed write.
pub fn encode_chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The last chunk with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Longest chunk-size line (size plus extensions) accepted, like Go's line limit.
const MAX_SIZE_LINE: usize = 4096;
/// Longest trailer section accepted.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailers { seen: usize },
    Done,
}

/// Incremental decoder of a chunked request body.
#[derive(Debug)]
pub struct ChunkedBody {
    body: Vec<u8>,
    limit: usize,
    state: State,
}

impl ChunkedBody {
    pub fn new(limit: usize) -> Self {
        Self {
            body: Vec::new(),
            limit,
            state: State::Size,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// Consumes as much of `input` as forms complete framing; returns the bytes used.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, RequestError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Done => return Ok(used),
                State::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((len, size))) => {
                        used += len;
                        if size > (self.limit - self.body.len()) as u64 {
                            return Err(RequestError::BodyTooLarge(self.limit));
                        }
                        self.state = if size == 0 {
                            State::Trailers { seen: 0 }
                        } else {
                            State::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if rest.len() > MAX_SIZE_LINE => {
                        return Err(RequestError::Malformed("chunk size line too long"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(used),
                    Err(_) => return Err(RequestError::Malformed("bad chunk size")),
                },
                State::Data(remaining) => {
                    if rest.is_empty() {
                        return Ok(used);
                    }
                    let take = rest
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    self.body.extend_from_slice(&rest[..take]);
                    used += take;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                }
                State::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(used);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(RequestError::Malformed("chunk data not followed by CRLF"));
                    }
                    used += 2;
                    self.state = State::Size;
                }
                State::Trailers { seen } => {
                    // Trailer lines are read and dropped; an empty line ends the body.
                    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                        if seen + rest.len() > MAX_TRAILERS {
                            return Err(RequestError::Malformed("trailers too long"));
                        }
                        return Ok(used);
                    };
                    used += eol + 2;
                    self.state = if eol == 0 {
                        State::Done
                    } else if seen + eol > MAX_TRAILERS {
                        return Err(RequestError::Malformed("trailers too long"));
                    } else {
                        State::Trailers {
                            seen: seen + eol + 2,
                        }
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(wire: &[u8], piece: usize) -> Result<Vec<u8>, RequestError> {
        let mut decoder = ChunkedBody::new(1024);
        let mut pending = Vec::new();
        for part in wire.chunks(piece) {
            pending.extend_from_slice(part);
            let used = decoder.feed(&pending)?;
            pending.drain(..used);
        }
        assert!(decoder.is_done(), "body not complete");
        assert!(pending.is_empty(), "bytes left over: {pending:?}");
        Ok(decoder.into_body())
    }

    #[test]
    fn decodes_whatever_the_split() {
        let wire = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for piece in 1..wire.len() {
            assert_eq!(decode_in_pieces(wire, piece).unwrap(), b"hello, world");
        }
    }

    #[test]
    fn stops_at_the_end_of_the_body_leaving_the_next_request() {
        let mut decoder = ChunkedBody::new(1024);
        let wire = b"1\r\na\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        let used = decoder.feed(wire).unwrap();
        assert!(decoder.is_done());
        assert_eq!(&wire[used..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn rejects_bad_framing_and_oversize_bodies() {
        let mut decoder = ChunkedBody::new(1024);
        assert!(matches!(
            decoder.feed(b"zz\r\n"),
            Err(RequestError::Malformed(_))
        ));
        let mut decoder = ChunkedBody::new(1024);
        assert!(matches!(
            decoder.feed(b"2\r\nabXY"),
            Err(RequestError::Malformed(_))
        ));
        let mut decoder = ChunkedBody::new(4);
        assert!(matches!(
            decoder.feed(b"5\r\n"),
            Err(RequestError::BodyTooLarge(4))
        ));
    }

    #[test]
    fn encodes_like_go() {
        assert_eq!(
            encode_chunk(b"{\"a\":1}\n"),
            b"8\r\n{\"a\":1}\n\r\n".to_vec()
        );
        assert_eq!(encode_chunk(&[b'x'; 255])[..4], *b"ff\r\n");
    }
}
