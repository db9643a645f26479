//! Decoding of ring buffer records into typed events.
//!
//! A record is the raw bytes of an `observer_common::DataEvent` header followed by its
//! payload (variable size), or of a `ConnEvent`; its first `u32` says which. Decoding checks sizes and every enumerated field, so a record from a
//! mismatched kernel object is an error counted by reason, never a panic or a wrong event.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use observer_common::{
    COMM_LEN, ConnEvent, DataEvent, Endpoint, HEAD_MAX, TAIL_MAX, direction, family, kind, side,
};

use crate::base::{ConnRecord, Direction, Role, Side};
use crate::engine::ConnMeta;

/// One send or receive on a watched connection. Its bytes borrow from the ring buffer record
/// it was decoded from (no allocation per event on the daemon's hot path);
/// [`DataRecord::into_owned`] keeps one beyond the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRecord<'a> {
    pub ts_ns: u64,
    pub conn_id: u64,
    pub tgid: u32,
    pub pid: u32,
    /// Process name at the syscall.
    pub comm: Cow<'a, str>,
    pub role: Role,
    pub side: Side,
    pub direction: Direction,
    pub fd: u32,
    pub port: u16,
    /// Bytes the syscall moved; `head.len() + tail.len()` may be less (partial capture).
    pub len: u64,
    pub head: Cow<'a, [u8]>,
    pub tail: Cow<'a, [u8]>,
}

impl DataRecord<'_> {
    pub fn into_owned(self) -> DataRecord<'static> {
        DataRecord {
            comm: Cow::Owned(self.comm.into_owned()),
            head: Cow::Owned(self.head.into_owned()),
            tail: Cow::Owned(self.tail.into_owned()),
            ..self
        }
    }
}

/// The connection of a data record, as the engine names it.
impl From<&DataRecord<'_>> for ConnMeta {
    fn from(d: &DataRecord<'_>) -> ConnMeta {
        ConnMeta {
            conn_id: d.conn_id,
            role: d.role,
            side: d.side,
            port: d.port,
            tgid: d.tgid,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    Data(DataRecord<'a>),
    Open(ConnRecord),
    Close(ConnRecord),
}

impl Event<'_> {
    /// The event with its bytes copied out of the record it borrows from.
    pub fn into_owned(self) -> Event<'static> {
        match self {
            Event::Data(data) => Event::Data(data.into_owned()),
            Event::Open(conn) => Event::Open(conn),
            Event::Close(conn) => Event::Close(conn),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is too short for a {what} ({need} bytes)")]
    TooShort {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("invalid {field} value {value}")]
    BadField { field: &'static str, value: u64 },
}

impl DecodeError {
    /// A short label for counting errors by reason.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooShort { .. } => "too_short",
            DecodeError::UnknownKind(_) => "unknown_kind",
            DecodeError::BadField { .. } => "bad_field",
        }
    }
}

pub fn decode(record: &[u8]) -> Result<Event<'_>, DecodeError> {
    let kind = read::<u32>(record, "record kind")?;
    match kind {
        kind::DATA => decode_data(record).map(Event::Data),
        kind::OPEN => decode_conn(record).map(Event::Open),
        kind::CLOSE => decode_conn(record).map(Event::Close),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

fn decode_data(record: &[u8]) -> Result<DataRecord<'_>, DecodeError> {
    // Borrowed, not copied: the copy was the daemon's largest single cost under load. The
    // payload is sliced from the record itself, aligned or not, so the event borrows it too.
    let raw = view::<DataEvent>(record, "data event")?;
    let head_len = raw.head_len as usize;
    let tail_len = raw.tail_len as usize;
    if head_len > HEAD_MAX || head_len as u64 > raw.len {
        return Err(DecodeError::BadField {
            field: "head_len",
            value: raw.head_len.into(),
        });
    }
    if tail_len > TAIL_MAX || (head_len + tail_len) as u64 > raw.len {
        return Err(DecodeError::BadField {
            field: "tail_len",
            value: raw.tail_len.into(),
        });
    }
    let payload = std::mem::size_of::<DataEvent>();
    if record.len() < payload + head_len + tail_len {
        return Err(DecodeError::TooShort {
            what: "data event's payload",
            len: record.len(),
            need: payload + head_len + tail_len,
        });
    }
    Ok(DataRecord {
        ts_ns: raw.ts_ns,
        conn_id: raw.conn_id,
        tgid: raw.tgid,
        pid: raw.pid,
        role: decode_role(raw.role)?,
        side: decode_side(raw.side)?,
        direction: match raw.direction {
            direction::INGRESS => Direction::Ingress,
            direction::EGRESS => Direction::Egress,
            other => {
                return Err(DecodeError::BadField {
                    field: "direction",
                    value: other.into(),
                });
            }
        },
        fd: raw.fd,
        port: decode_port(raw.port)?,
        comm: comm_str(bytes_at(
            record,
            std::mem::offset_of!(DataEvent, comm),
            COMM_LEN,
        )),
        len: raw.len,
        head: Cow::Borrowed(bytes_at(record, payload, head_len)),
        tail: Cow::Borrowed(bytes_at(record, payload + head_len, tail_len)),
    })
}

/// `len` bytes of `record` from `offset`, within what the caller checked it holds.
fn bytes_at(record: &[u8], offset: usize, len: usize) -> &[u8] {
    &record[offset..offset + len]
}

fn decode_conn(record: &[u8]) -> Result<ConnRecord, DecodeError> {
    let raw: ConnEvent = read(record, "connection event")?;
    Ok(ConnRecord {
        ts_ns: raw.ts_ns,
        conn_id: raw.conn_id,
        tgid: raw.tgid,
        pid: raw.pid,
        role: decode_role(raw.role)?,
        side: decode_side(raw.side)?,
        fd: raw.fd,
        port: decode_port(raw.port)?,
        comm: comm_str(&raw.comm).into_owned(),
        local: decode_endpoint(&raw.local)?,
        remote: decode_endpoint(&raw.remote)?,
        seeded: raw.seeded != 0,
    })
}

/// The record of a connection that userspace closes or seeds itself (no kernel event).
pub fn conn_record(
    ts_ns: u64,
    key: observer_common::SockKey,
    conn: &observer_common::ConnInfo,
) -> Result<ConnRecord, DecodeError> {
    Ok(ConnRecord {
        ts_ns,
        conn_id: conn.conn_id,
        tgid: key.tgid,
        pid: key.tgid,
        comm: String::new(),
        role: decode_role(conn.role)?,
        side: decode_side(conn.side)?,
        fd: key.fd,
        port: decode_port(conn.port)?,
        local: decode_endpoint(&conn.local)?,
        remote: decode_endpoint(&conn.remote)?,
        seeded: false,
    })
}

/// A NUL-padded process name, borrowed unless it is not UTF-8.
fn comm_str(raw: &[u8]) -> Cow<'_, str> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end])
}

/// An endpoint the kernel side filled in, or `None` when it did not know it.
pub fn decode_endpoint(raw: &Endpoint) -> Result<Option<SocketAddr>, DecodeError> {
    let port = decode_port(raw.port)?;
    let ip = match raw.family {
        0 => return Ok(None),
        family::INET => IpAddr::V4(Ipv4Addr::new(
            raw.addr[0],
            raw.addr[1],
            raw.addr[2],
            raw.addr[3],
        )),
        family::INET6 => IpAddr::V6(Ipv6Addr::from(raw.addr)),
        other => {
            return Err(DecodeError::BadField {
                field: "family",
                value: other.into(),
            });
        }
    };
    Ok(Some(SocketAddr::new(ip, port)))
}

/// The kernel-side form of an address (for seeding maps from userspace).
pub fn encode_endpoint(addr: SocketAddr) -> Endpoint {
    let mut endpoint = Endpoint {
        family: 0,
        port: u32::from(addr.port()),
        addr: [0; 16],
    };
    match addr.ip() {
        IpAddr::V4(ip) => {
            endpoint.family = family::INET;
            endpoint.addr[..4].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            endpoint.family = family::INET6;
            endpoint.addr = ip.octets();
        }
    }
    endpoint
}

fn decode_role(value: u32) -> Result<Role, DecodeError> {
    Role::from_kernel(value).ok_or(DecodeError::BadField {
        field: "role",
        value: value.into(),
    })
}

fn decode_side(value: u32) -> Result<Side, DecodeError> {
    match value {
        side::SERVER => Ok(Side::Server),
        side::CLIENT => Ok(Side::Client),
        other => Err(DecodeError::BadField {
            field: "side",
            value: other.into(),
        }),
    }
}

fn decode_port(value: u32) -> Result<u16, DecodeError> {
    u16::try_from(value).map_err(|_| DecodeError::BadField {
        field: "port",
        value: value.into(),
    })
}

/// Copies a plain-data `T` out of the front of `record` (ring buffer records are 8-byte
/// aligned, but copying keeps this independent of that).
fn read<T: aya::Pod>(record: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let need = std::mem::size_of::<T>();
    if record.len() < need {
        return Err(DecodeError::TooShort {
            what,
            len: record.len(),
            need,
        });
    }
    // SAFETY: `T: Pod` is valid for any bytes, and `record` holds at least `need` of them.
    Ok(unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<T>()) })
}

/// A plain-data `T` at the front of `record`: borrowed where the record is aligned for it and
/// long enough (ring buffer records are 8-byte aligned), else [`read`] (copied, or the error).
fn view<'a, T: aya::Pod>(record: &'a [u8], what: &'static str) -> Result<Cow<'a, T>, DecodeError> {
    let ptr = record.as_ptr();
    if record.len() >= std::mem::size_of::<T>() && ptr.align_offset(std::mem::align_of::<T>()) == 0
    {
        // SAFETY: `T: Pod` is valid for any bytes, `record` holds at least `size_of::<T>()` of
        // them, the pointer is aligned for `T`, and the borrow lives as long as `record`.
        Ok(Cow::Borrowed(unsafe { &*ptr.cast::<T>() }))
    } else {
        read(record, what).map(Cow::Owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_common::role;

    fn as_bytes<T: aya::Pod>(value: &T) -> Vec<u8> {
        // SAFETY: Pod types have no padding and may be viewed as bytes.
        unsafe {
            std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    fn as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
        // SAFETY: a u64 slice is viewed as its own bytes.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
    }

    /// A data record: the header, then `head`, then `tail`.
    fn data_record(head: &[u8], tail: &[u8], len: u64) -> Vec<u8> {
        let mut bytes = as_bytes(&data_header(head.len(), tail.len(), len));
        bytes.extend_from_slice(head);
        bytes.extend_from_slice(tail);
        bytes
    }

    fn data_header(head_len: usize, tail_len: usize, len: u64) -> DataEvent {
        DataEvent {
            kind: kind::DATA,
            direction: direction::EGRESS,
            ts_ns: 42,
            conn_id: 7,
            tgid: 100,
            pid: 101,
            role: role::UPSTREAM,
            side: side::CLIENT,
            fd: 5,
            port: 11434,
            len,
            head_len: head_len as u32,
            tail_len: tail_len as u32,
            comm: *b"nginx\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    #[test]
    fn decodes_a_data_event() {
        let bytes = data_record(b"GET / HTTP/1.1\r\n", b"", 16);
        assert_eq!(
            bytes.len(),
            80 + 16,
            "the record is as long as what it holds"
        );
        let event = decode(&bytes).unwrap();
        let Event::Data(data) = event else {
            panic!("expected data, got {event:?}")
        };
        assert_eq!(data.head, b"GET / HTTP/1.1\r\n".as_slice());
        assert_eq!(
            (data.len, data.port, data.role, data.side),
            (16, 11434, Role::Upstream, Side::Client)
        );
        assert_eq!(data.direction, Direction::Egress);
        assert_eq!(data.comm, "nginx");
        assert!(data.tail.is_empty());
    }

    #[test]
    fn head_and_tail_follow_the_header() {
        let bytes = data_record(b"HTTP/1.1 200 OK\r\n", b"0\r\n\r\n", 100_000);
        let Ok(Event::Data(data)) = decode(&bytes) else {
            panic!("not decoded: {:?}", decode(&bytes))
        };
        assert_eq!(data.head, b"HTTP/1.1 200 OK\r\n".as_slice());
        assert_eq!(data.tail, b"0\r\n\r\n".as_slice());
        assert_eq!(data.len, 100_000);
    }

    #[test]
    fn a_record_decodes_the_same_borrowed_or_copied() {
        let bytes = data_record(b"GET / HTTP/1.1\r\n", b"", 16);
        // Buffers of u64s are 8-byte aligned: the record at offset 0 is borrowed, at 1 copied.
        let mut aligned_words = vec![0u64; bytes.len() / 8 + 2];
        let mut unaligned_words = aligned_words.clone();
        let aligned_buffer = as_bytes_mut(&mut aligned_words);
        aligned_buffer[..bytes.len()].copy_from_slice(&bytes);
        let aligned = decode(&aligned_buffer[..bytes.len()]).unwrap();
        let unaligned_buffer = as_bytes_mut(&mut unaligned_words);
        unaligned_buffer[1..=bytes.len()].copy_from_slice(&bytes);
        let unaligned = decode(&unaligned_buffer[1..=bytes.len()]).unwrap();
        assert_eq!(aligned, unaligned);
        assert!(matches!(&aligned, Event::Data(d) if d.head == b"GET / HTTP/1.1\r\n".as_slice()));
        // Either way the bytes are the record's own: nothing allocated per event.
        for event in [&aligned, &unaligned] {
            let Event::Data(d) = event else {
                panic!("not a data event: {event:?}")
            };
            assert!(matches!(d.head, Cow::Borrowed(_)), "head copied");
            assert!(matches!(d.tail, Cow::Borrowed(_)), "tail copied");
            assert!(
                matches!(d.comm, Cow::Borrowed("nginx")),
                "comm {:?}",
                d.comm
            );
        }
        assert_eq!(aligned.clone().into_owned(), aligned);
    }

    #[test]
    fn decodes_open_and_close() {
        let conn = ConnEvent {
            kind: kind::OPEN,
            side: side::SERVER,
            ts_ns: 1,
            conn_id: 2,
            tgid: 3,
            pid: 4,
            role: role::GATEWAY,
            fd: 9,
            port: 18789,
            seeded: 0,
            local: encode_endpoint("0.0.0.0:18789".parse().unwrap()),
            remote: encode_endpoint("[::1]:40000".parse().unwrap()),
            comm: [0; COMM_LEN],
        };
        assert!(
            matches!(decode(&as_bytes(&conn)), Ok(Event::Open(c)) if c.side == Side::Server && c.port == 18789)
        );
        let close = ConnEvent {
            kind: kind::CLOSE,
            ..conn
        };
        assert!(matches!(decode(&as_bytes(&close)), Ok(Event::Close(c)) if c.fd == 9));
    }

    #[test]
    fn endpoints_round_trip_and_unknown_is_none() {
        for addr in ["127.0.0.1:11434", "[::1]:18789", "[fe80::1]:1", "0.0.0.0:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(decode_endpoint(&encode_endpoint(addr)), Ok(Some(addr)));
        }
        assert_eq!(decode_endpoint(&Endpoint::default()), Ok(None));
        let bad = Endpoint {
            family: 99,
            ..Endpoint::default()
        };
        assert_eq!(decode_endpoint(&bad).unwrap_err().reason(), "bad_field");
    }

    #[test]
    fn rejects_short_unknown_and_inconsistent_records() {
        assert_eq!(decode(&[1, 0]).unwrap_err().reason(), "too_short");
        assert_eq!(
            decode(&[9, 0, 0, 0]).unwrap_err(),
            DecodeError::UnknownKind(9)
        );
        let bytes = data_record(b"abc", b"", 3);
        assert_eq!(decode(&bytes[..60]).unwrap_err().reason(), "too_short");
        // A record cut short of the payload its header announces.
        assert_eq!(
            decode(&bytes[..bytes.len() - 1]).unwrap_err().reason(),
            "too_short"
        );
        // A head longer than the syscall's byte count cannot be right.
        let lying = data_record(b"abcdef", b"", 2);
        assert_eq!(
            decode(&lying).unwrap_err(),
            DecodeError::BadField {
                field: "head_len",
                value: 6
            }
        );
        let mut bad_role = data_header(0, 0, 1);
        bad_role.role = 77;
        assert_eq!(
            decode(&as_bytes(&bad_role)).unwrap_err(),
            DecodeError::BadField {
                field: "role",
                value: 77
            }
        );
    }
}
