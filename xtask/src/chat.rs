//! The chat path that the accuracy benchmark and the soak drive, as on an Ollama host: nginx
//! (the gateway, [`gateway`]) in front of `observer sim` (a simulated Ollama, [`sim`]), and a
//! client ([`client`]) that sends Ollama and OpenAI chat requests on keep-alive connections and
//! times each exchange at its socket, reading the response with [`response`] (HTTP/1.1 framing,
//! NDJSON and server-sent events) and [`json`].

pub mod client;
pub mod gateway;
pub mod response;
pub mod sim;

pub use client::{Api, ChatClient, ChatRequest, Outcome};
pub use gateway::Gateway;
pub use sim::Sim;
