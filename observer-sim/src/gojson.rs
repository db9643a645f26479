//! JSON the way Go's `encoding/json` writes and reads it, so bodies match Ollama byte for byte.
//!
//! Writing: `json.Marshal` is compact and escapes `<`, `>`, `&`, U+2028 and U+2029; field order
//! is the Go struct's declaration order, which the response structs in `ollama.rs` and
//! `openai.rs` reproduce by their own declaration order (serde keeps it). `json.Encoder.Encode`
//! is the same plus a newline. Reading: `json.Decoder.Decode` takes the first JSON value and
//! ignores whatever follows, and its error texts are what Ollama echoes in a 400.
//! This module knows nothing of HTTP.

use serde::Serialize;
use serde_json::{Map, Value};

/// Go's `json.Marshal`: compact, HTML-safe.
pub fn marshal<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own response structs cannot fail (no maps with non-string keys).
    let plain = serde_json::to_vec(value).unwrap_or_default();
    escape_html(&plain)
}

/// Go's `json.NewEncoder(w).Encode(v)`: `Marshal` plus a trailing newline.
pub fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    let mut line = marshal(value);
    line.push(b'\n');
    line
}

/// `<`, `>`, `&`, U+2028 and U+2029 can only occur inside JSON strings, so a byte-level
/// rewrite of the compact output is exactly Go's string escaping.
fn escape_html(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'<' => out.extend_from_slice(b"\\u003c"),
            b'>' => out.extend_from_slice(b"\\u003e"),
            b'&' => out.extend_from_slice(b"\\u0026"),
            0xE2 if json.get(i + 1) == Some(&0x80)
                && matches!(json.get(i + 2), Some(0xA8 | 0xA9)) =>
            {
                out.extend_from_slice(if json[i + 2] == 0xA8 {
                    b"\\u2028"
                } else {
                    b"\\u2029"
                });
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    out
}

/// Why a request body did not decode, worded as Go's decoder words it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No JSON value at all. Ollama's native handlers answer "missing request body" for this.
    #[error("EOF")]
    Empty,
    #[error("unexpected EOF")]
    Truncated,
    #[error("invalid character {0} looking for beginning of value")]
    Syntax(String),
    #[error("json: cannot unmarshal {found} into Go value of type {go_type}")]
    NotAnObject {
        found: &'static str,
        go_type: &'static str,
    },
    #[error("json: cannot unmarshal {found} into Go struct field {field} of type {go_type}")]
    FieldType {
        found: String,
        field: String,
        go_type: &'static str,
    },
}

/// Decodes the first JSON value of `body` into an object, as `Decode` into a Go struct would.
/// `null` decodes to an empty object (Go leaves the struct zeroed).
pub fn decode_object(
    body: &[u8],
    go_type: &'static str,
) -> Result<Map<String, Value>, DecodeError> {
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<Value>();
    match values.next() {
        None => Err(DecodeError::Empty),
        Some(Ok(Value::Object(map))) => Ok(map),
        Some(Ok(Value::Null)) => Ok(Map::new()),
        Some(Ok(other)) => Err(DecodeError::NotAnObject {
            found: kind(&other),
            go_type,
        }),
        Some(Err(err)) if err.is_eof() => Err(DecodeError::Truncated),
        Some(Err(err)) => Err(DecodeError::Syntax(offending_char(body, &err))),
    }
}

/// Go's name for a JSON value's kind in "cannot unmarshal X into ...".
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The character serde stopped at, quoted as Go's `quoteChar` does.
fn offending_char(body: &[u8], err: &serde_json::Error) -> String {
    let text = String::from_utf8_lossy(body);
    let found = text
        .lines()
        .nth(err.line().saturating_sub(1))
        .and_then(|line| line.chars().nth(err.column().saturating_sub(1)));
    match found {
        Some('\'') => "'\\''".to_owned(),
        Some('"') => "'\"'".to_owned(),
        Some(c) if c.is_control() => format!("'\\x{:02x}'", c as u32),
        Some(c) => format!("'{c}'"),
        None => "'?'".to_owned(),
    }
}

/// Go's error for a JSON value of the wrong kind for a struct field.
pub fn type_error(field: &str, value: &Value, go_type: &'static str) -> DecodeError {
    let found = match value {
        // Go says "number 1.5" when a number does not fit the integer field.
        Value::Number(n) if go_type == "int" => format!("number {n}"),
        other => kind(other).to_owned(),
    };
    DecodeError::FieldType {
        found,
        field: field.to_owned(),
        go_type,
    }
}

/// A string field; absent and `null` are `None`. `path` is Go's `Struct.field` for errors.
pub fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a str>, DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(type_error(path, other, "string")),
    }
}

/// A bool field; absent and `null` are `None`.
pub fn opt_bool(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<bool>, DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(type_error(path, other, "bool")),
    }
}

/// An integer field (Go `int`); absent and `null` are `None`.
pub fn opt_int(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<i64>, DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| type_error(path, &obj[key], "int")),
        Some(other) => Err(type_error(path, other, "int")),
    }
}

/// An array field; absent and `null` are empty.
pub fn opt_array<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &str,
    go_type: &'static str,
) -> Result<&'a [Value], DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(type_error(path, other, go_type)),
    }
}

/// An object field; absent and `null` are `None`.
pub fn opt_object<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &str,
    go_type: &'static str,
) -> Result<Option<&'a Map<String, Value>>, DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(other) => Err(type_error(path, other, go_type)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marshal_escapes_html_like_go() {
        let value = serde_json::json!({"error": "model '<a&b>' not found \u{2028}"});
        assert_eq!(
            marshal(&value),
            br#"{"error":"model '\u003ca\u0026b\u003e' not found \u2028"}"#.to_vec()
        );
        assert_eq!(encode_line(&value).last(), Some(&b'\n'));
    }

    #[test]
    fn decode_takes_the_first_value_and_ignores_trailing_bytes() {
        let obj = decode_object(br#" {"model":"m"} trailing"#, "api.ChatRequest").unwrap();
        assert_eq!(
            opt_str(&obj, "model", "ChatRequest.model").unwrap(),
            Some("m")
        );
        assert!(
            decode_object(b"null", "api.ChatRequest")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn decode_errors_read_like_go() {
        assert_eq!(decode_object(b"  \n", "T").unwrap_err().to_string(), "EOF");
        assert_eq!(
            decode_object(br#"{"model":"#, "T").unwrap_err().to_string(),
            "unexpected EOF"
        );
        assert_eq!(
            decode_object(b"hello", "T").unwrap_err().to_string(),
            "invalid character 'h' looking for beginning of value"
        );
        assert_eq!(
            decode_object(b"[1]", "api.ChatRequest")
                .unwrap_err()
                .to_string(),
            "json: cannot unmarshal array into Go value of type api.ChatRequest"
        );
    }

    #[test]
    fn field_type_errors_name_the_go_field() {
        let obj = decode_object(br#"{"model":7,"stream":"yes","n":1.5}"#, "T").unwrap();
        assert_eq!(
            opt_str(&obj, "model", "ChatRequest.model")
                .unwrap_err()
                .to_string(),
            "json: cannot unmarshal number into Go struct field ChatRequest.model of type string"
        );
        assert_eq!(
            opt_bool(&obj, "stream", "ChatRequest.stream")
                .unwrap_err()
                .to_string(),
            "json: cannot unmarshal string into Go struct field ChatRequest.stream of type bool"
        );
        assert_eq!(
            opt_int(&obj, "n", "R.n").unwrap_err().to_string(),
            "json: cannot unmarshal number 1.5 into Go struct field R.n of type int"
        );
    }
}
