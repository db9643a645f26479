use super::*;

fn scan_request(pieces: &[&[u8]]) -> (Option<String>, Option<bool>) {
    let mut scan = RequestScan::default();
    for piece in pieces {
        if piece.is_empty() {
            scan.gap();
        } else {
            scan.body(piece);
        }
    }
    (scan.model, scan.stream)
}

#[test]
fn request_keys_are_top_level_only() {
    let body: &[u8] = br#"{"messages": [{"role": "user", "content": "say \"model\": \"x\", \"stream\": false", "model": "nested"}], "options": {"stream": false}, "model": "qwen3:0.6b", "stream": true}"#;
    assert_eq!(
        scan_request(&[body]),
        (Some("qwen3:0.6b".into()), Some(true))
    );
    // Byte by byte gives the same answer.
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(
        scan_request(&bytes),
        (Some("qwen3:0.6b".into()), Some(true))
    );
    assert_eq!(
        scan_request(&[br#"{"model":"m","stream":false}"#]),
        (Some("m".into()), Some(false))
    );
    assert_eq!(
        scan_request(&[br#"{"stream" : false , "x": 1}"#]),
        (None, Some(false))
    );
    assert_eq!(scan_request(&[b"not json at all"]), (None, None));
}

#[test]
fn after_a_gap_keys_are_searched() {
    // The head of the body, a gap, its tail.
    let got = scan_request(&[
        br#"{"model":"llama3","messages":[{"role":"user","con"#,
        b"",
        br#"tent":"x"}],"stream":false}"#,
    ]);
    assert_eq!(got, (Some("llama3".into()), Some(false)));
    let got = scan_request(&[
        br#"{"messages":[{"con"#,
        b"",
        br#"x"}],"model":"m2","stream":true}"#,
    ]);
    assert_eq!(got, (Some("m2".into()), Some(true)));
}

#[test]
fn escaped_keys_inside_strings_do_not_count() {
    let mut scan = ResponseScan::new(BodyType::Ndjson);
    scan.body(b"{\"message\":{\"content\":\"\\\"done\\\":true, \\\"eval_count\\\":99\"},\"done\":false}\n", 5);
    let (fields, first) = scan.finish(6, true);
    assert_eq!(fields.completion_tokens, None);
    assert_eq!((fields.chunks, first), (1, Some(5)));
    assert_eq!(fields.done_reason, None);
}

#[test]
fn thinking_and_generate_responses_are_content() {
    let mut scan = ResponseScan::new(BodyType::Ndjson);
    scan.body(b"{\"message\":{\"role\":\"assistant\",\"content\":\"\",\"thinking\":\"hmm\"},\"done\":false}\n", 1);
    scan.body(b"{\"response\":\"\",\"done\":false}\n", 2);
    scan.body(b"{\"response\":\"a\",\"done\":false}\n", 3);
    let (fields, first) = scan.finish(4, true);
    assert_eq!(
        (fields.chunks, first, fields.last_chunk_ns),
        (2, Some(1), Some(3))
    );
}

#[test]
fn a_long_line_is_scanned_in_pieces() {
    let mut scan = ResponseScan::new(BodyType::Json);
    let filler = "1,".repeat(MAX_LINE);
    let body =
        format!("{{\"embeddings\":[[{filler}0]],\"prompt_eval_count\":12,\"load_duration\":3}}");
    for piece in body.as_bytes().chunks(1000) {
        scan.body(piece, 7);
    }
    let (fields, first) = scan.finish(8, true);
    assert_eq!(
        (fields.prompt_tokens, fields.load_duration_ns),
        (Some(12), Some(3))
    );
    assert_eq!(first, Some(7));
}

#[test]
fn model_calls_are_every_path_but_management_and_listing() {
    for path in [
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/messages",
        "/ollama/api/chat",
        "/custom/inference",
        "/api/tagsx",
    ] {
        assert!(is_model_call(path), "{path}");
    }
    for path in [
        "/api/show",
        "/api/tags",
        "/api/tags/",
        "/api/ps?verbose=1",
        "/api/version",
        "/api/pull",
        "/api/delete",
        "/api/blobs/sha256:abc",
        "/v1/models",
        "/v1/models/llama3",
        "/ollama/api/show",
        "/health",
        "/healthz",
        "/readyz",
        "/tools/invoke",
    ] {
        assert!(!is_model_call(path), "{path}");
    }
}
