//! The one HTTP/1 client of the tests, the benches and xtask: one reader of responses
//! ([`Response`]: sans I/O, fed bytes as they arrive) under a blocking client ([`get`],
//! [`exchange`], the keep-alive [`Client`] that times each exchange) and an async one
//! ([`Conn`], tokio), for tests that read heads, chunks and closes byte for byte.

mod client;
mod conn;
mod response;

pub use client::{Client, Exchange, Outcome, exchange, get, get_request};
pub use conn::{Conn, Ending, Reply, WAIT};
pub use response::{BodyKind, Framing, Response, carries_output};
