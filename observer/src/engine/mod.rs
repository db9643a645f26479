//! The HTTP exchange engine (SPEC §4): ordered byte events of each connection in, finished
//! [`Exchange`]s out. It knows nothing about where the bytes came from (eBPF or the proxy).

mod exchange;

pub use exchange::{ConnMeta, Exchange, LlmFields, MAX_PATH, Method, Outcome, Timestamps};
