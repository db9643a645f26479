//! Chat requests as Ollama and OpenAI clients send them (`/api/chat`, `/api/generate`,
//! `/v1/chat/completions`, streamed or not, with `observer sim`'s fault header), and a
//! keep-alive client sending them ([`ChatClient`], over testkit's HTTP/1 client).

use std::{net::SocketAddr, time::Duration};

use testkit::http::{self, Exchange};

/// The model every request names (one `observer sim` serves by default).
pub const MODEL: &str = "llama3.2:1b";

/// The inference APIs the client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `POST /api/chat`: NDJSON when streamed.
    Chat,
    /// `POST /api/generate`: NDJSON when streamed.
    Generate,
    /// `POST /v1/chat/completions`: server-sent events when streamed.
    OpenAiChat,
}

impl Api {
    pub fn route(self) -> &'static str {
        match self {
            Api::Chat => "/api/chat",
            Api::Generate => "/api/generate",
            Api::OpenAiChat => "/v1/chat/completions",
        }
    }
}

/// One inference request.
#[derive(Clone, Debug)]
pub struct ChatRequest {
    pub api: Api,
    pub stream: bool,
    /// The `X-Sim-Fault` header for `observer sim` (its faults, or this request's timing).
    pub sim: Option<String>,
    /// Varies the prompt (and so the request's length) from one request to the next.
    pub prompt: String,
}

impl ChatRequest {
    pub fn new(api: Api, stream: bool) -> ChatRequest {
        ChatRequest {
            api,
            stream,
            sim: None,
            prompt: "Why is the sky blue?".to_owned(),
        }
    }

    pub fn with_sim(mut self, header: impl Into<String>) -> ChatRequest {
        self.sim = Some(header.into());
        self
    }

    /// The request's bytes, head and body, ready for one write.
    pub fn to_bytes(&self) -> Vec<u8> {
        let prompt = self.prompt.replace(['"', '\\'], "");
        let body = match self.api {
            Api::Generate => format!(
                r#"{{"model":"{MODEL}","prompt":"{prompt}","stream":{}}}"#,
                self.stream
            ),
            Api::Chat | Api::OpenAiChat => format!(
                r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{prompt}"}}],"stream":{}}}"#,
                self.stream
            ),
        };
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: xtask-chat\r\n\
             Content-Type: application/json\r\nAccept: */*\r\nContent-Length: {}\r\n",
            self.api.route(),
            body.len()
        );
        if let Some(sim) = &self.sim {
            head += &format!("X-Sim-Fault: {sim}\r\n");
        }
        head += "\r\n";
        [head.into_bytes(), body.into_bytes()].concat()
    }
}

/// A keep-alive connection to one server sending [`ChatRequest`]s: testkit's HTTP/1 client,
/// which times each exchange at its socket and says how it ended.
pub struct ChatClient(http::Client);

impl ChatClient {
    /// `timeout` bounds the connect and each read.
    pub fn new(addr: SocketAddr, timeout: Duration) -> ChatClient {
        ChatClient(http::Client::new(addr, timeout))
    }

    /// Sends `request` and reads its whole response. Never fails: what went wrong is the
    /// exchange's [`Outcome`](http::Outcome).
    pub fn send(&mut self, request: &ChatRequest) -> Exchange {
        self.0.send(&request.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_fault_header_and_an_exact_length() {
        let bytes = ChatRequest::new(Api::OpenAiChat, true)
            .with_sim("status=500")
            .to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"));
        assert!(head.contains("\r\nX-Sim-Fault: status=500"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }
}
