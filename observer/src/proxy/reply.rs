//! The responses the proxy writes itself: 408, 413, 431, 400, 502, 503 and 504, each a small
//! JSON body in Ollama's error shape (`{"error": "..."}`), closing the connection.
//!
//! Owns their wording and headers; when to send one is decided in `conn.rs`.

use std::time::Duration;

/// One of the proxy's own answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub message: String,
    /// `Retry-After` in seconds (503s).
    pub retry_after: Option<Duration>,
}

impl Reply {
    pub fn new(status: u16, message: impl Into<String>) -> Reply {
        Reply {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, after: Duration) -> Reply {
        self.retry_after = Some(after);
        self
    }

    /// The bytes on the wire: status line, headers, JSON body; the connection closes after it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = serde_json::json!({ "error": self.message }).to_string();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            body.len()
        );
        if let Some(after) = self.retry_after {
            head.push_str(&format!("Retry-After: {}\r\n", after.as_secs().max(1)));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_a_complete_closing_json_response() {
        let bytes = Reply::new(503, "model \"m\" is not ready")
            .retry_after(Duration::from_secs(10))
            .to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        let body = r#"{"error":"model \"m\" is not ready"}"#;
        assert_eq!(
            text,
            format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nRetry-After: 10\r\n\r\n{body}",
                body.len()
            )
        );
    }
}
