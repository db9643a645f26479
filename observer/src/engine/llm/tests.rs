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

/// Scans `body` fed one line per write, each line 1 ms after the last, from t = 10 ms.
fn scan_lines(body_type: BodyType, body: &str) -> (LlmFields, Option<u64>) {
    let mut scan = ResponseScan::new(body_type);
    let mut ts = 10 * MS;
    for line in body.split_inclusive('\n') {
        scan.body(line.as_bytes(), ts);
        ts += MS;
    }
    scan.finish(ts, true)
}

const MS: u64 = 1_000_000;

#[test]
fn native_chat_splits_thinking_from_the_answer_and_counts_tool_calls() {
    // Ollama's /api/chat stream for a thinking model asked with tools (api.ChatResponse).
    let body = concat!(
        r#"{"model":"qwen3:0.6b","created_at":"2026-12-03T10:00:00Z","message":{"role":"assistant","content":"","thinking":"Let"},"done":false}"#,
        "\n",
        r#"{"model":"qwen3:0.6b","created_at":"2026-12-03T10:00:00Z","message":{"role":"assistant","content":"","thinking":" me"},"done":false}"#,
        "\n",
        r#"{"model":"qwen3:0.6b","created_at":"2026-12-03T10:00:00Z","message":{"role":"assistant","content":"","tool_calls":[{"id":"call_1","function":{"index":0,"name":"get_weather","arguments":{"city":"Paris"}}},{"id":"call_2","function":{"index":1,"name":"get_time","arguments":{}}}]},"done":false}"#,
        "\n",
        r#"{"model":"qwen3:0.6b","created_at":"2026-12-03T10:00:00Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","total_duration":900000000,"load_duration":100000000,"prompt_eval_count":42,"prompt_eval_duration":200000000,"eval_count":3,"eval_duration":400000000}"#,
        "\n",
    );
    let (fields, first) = scan_lines(BodyType::Ndjson, body);
    assert_eq!(
        first,
        Some(10 * MS),
        "the first thinking chunk is the first token"
    );
    assert_eq!(
        fields.first_answer_ns,
        Some(12 * MS),
        "the tool call is the answer"
    );
    assert_eq!((fields.chunks, fields.thinking_chunks), (3, 2));
    assert_eq!(fields.tool_calls, 2);
    assert_eq!(fields.prompt_eval_duration_ns, Some(200 * MS));
    assert_eq!(fields.total_duration_ns, Some(900 * MS));
    assert_eq!(fields.load_duration_ns, Some(100 * MS));
    assert_eq!(fields.eval_duration_ns, Some(400 * MS));
    assert_eq!(
        (fields.prompt_tokens, fields.completion_tokens),
        (Some(42), Some(3))
    );
    assert_eq!(
        fields.estimated_completion_tokens, None,
        "reported counts win"
    );
    assert_eq!(fields.done_reason.as_deref(), Some("stop"));
}

#[test]
fn native_generate_thinking_is_top_level() {
    let body = concat!(
        r#"{"model":"m","created_at":"t","response":"","thinking":"Hmm","done":false}"#,
        "\n",
        r#"{"model":"m","created_at":"t","response":"Yes","done":false}"#,
        "\n",
        r#"{"model":"m","created_at":"t","response":"","done":true,"done_reason":"stop","context":[1,2],"total_duration":5,"load_duration":1,"prompt_eval_count":2,"prompt_eval_duration":1,"eval_count":2,"eval_duration":2}"#,
        "\n",
    );
    let (fields, first) = scan_lines(BodyType::Ndjson, body);
    assert_eq!(first, Some(10 * MS));
    assert_eq!(fields.first_answer_ns, Some(11 * MS));
    assert_eq!(
        (fields.chunks, fields.thinking_chunks, fields.tool_calls),
        (2, 1, 0)
    );
}

#[test]
fn openai_stream_without_usage_gets_estimated_tokens() {
    // Ollama's /v1/chat/completions stream: reasoning first, content, then a tool call, no
    // `stream_options.include_usage`.
    let body = concat!(
        r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":"think"},"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"","tool_calls":[{"id":"call_a","index":0,"type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"tool_calls"}]}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );
    let (fields, first) = scan_lines(BodyType::EventStream, body);
    assert_eq!(first, Some(10 * MS));
    // Lines alternate with the empty lines that end each event.
    assert_eq!(fields.first_answer_ns, Some(12 * MS));
    assert_eq!(
        (fields.chunks, fields.thinking_chunks, fields.tool_calls),
        (3, 1, 1)
    );
    assert_eq!(fields.completion_tokens, None);
    assert_eq!(fields.estimated_completion_tokens, Some(3));
    assert_eq!(fields.done_reason.as_deref(), Some("tool_calls"));
    assert!(!fields.error);
}

#[test]
fn openai_streamed_tool_call_pieces_count_once() {
    // A call streamed in pieces (OpenAI's own servers): only the first names the function.
    let body = concat!(
        r#"data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","type":"function","function":{"name":"f","arguments":""}}]}}]}"#,
        "\n\n",
        r#"data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}}]}"#,
        "\n\n",
        r#"data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}"#,
        "\n\n",
        r#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16}}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );
    let (fields, _) = scan_lines(BodyType::EventStream, body);
    assert_eq!(fields.tool_calls, 1);
    assert_eq!(fields.completion_tokens, Some(7));
    assert_eq!(fields.estimated_completion_tokens, None);
}

#[test]
fn responses_api_events_name_reasoning_text_and_tool_calls() {
    // Ollama's /v1/responses stream (openai/responses.go): event names decide what `delta`
    // carries; a function call is announced once and repeated in later events.
    let body = concat!(
        "event: response.created\n",
        r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","status":"in_progress","error":null,"output":[]}}"#,
        "\n\n",
        "event: response.output_item.added\n",
        r#"data: {"type":"response.output_item.added","output_index":0,"item":{"id":"rs_1","type":"reasoning","summary":[]}}"#,
        "\n\n",
        "event: response.reasoning_summary_text.delta\n",
        r#"data: {"type":"response.reasoning_summary_text.delta","item_id":"rs_1","delta":"Thinking"}"#,
        "\n\n",
        "event: response.output_text.delta\n",
        r#"data: {"type":"response.output_text.delta","item_id":"msg_1","delta":"Hello"}"#,
        "\n\n",
        "event: response.output_item.added\n",
        r#"data: {"type":"response.output_item.added","output_index":2,"item":{"id":"fc_1","type":"function_call","status":"in_progress","call_id":"call_1","name":"f","arguments":""}}"#,
        "\n\n",
        "event: response.function_call_arguments.delta\n",
        r#"data: {"type":"response.function_call_arguments.delta","item_id":"fc_1","delta":"{}"}"#,
        "\n\n",
        "event: response.output_item.done\n",
        r#"data: {"type":"response.output_item.done","output_index":2,"item":{"id":"fc_1","type":"function_call","status":"completed","call_id":"call_1","name":"f","arguments":"{}"}}"#,
        "\n\n",
        "event: response.completed\n",
        r#"data: {"type":"response.completed","response":{"id":"resp_1","status":"completed","error":null,"output":[{"type":"function_call","name":"f"}],"usage":{"input_tokens":11,"output_tokens":5,"total_tokens":16}}}"#,
        "\n\n",
    );
    let (fields, first) = scan_lines(BodyType::EventStream, body);
    assert_eq!(first, Some(17 * MS), "the reasoning delta's data line");
    assert_eq!(fields.first_answer_ns, Some(20 * MS));
    assert_eq!(fields.tool_calls, 1);
    assert_eq!((fields.chunks, fields.thinking_chunks), (3, 1));
    assert_eq!(
        (fields.prompt_tokens, fields.completion_tokens),
        (Some(11), Some(5))
    );
    assert_eq!(fields.done_reason.as_deref(), Some("stop"));
    assert!(!fields.error);
}

#[test]
fn anthropic_messages_stream_reads_usage_thinking_and_tool_use() {
    // Ollama's /v1/messages stream (anthropic/anthropic.go).
    let body = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[],"usage":{"input_tokens":30,"output_tokens":0}}}"#,
        "\n\n",
        "event: content_block_start\n",
        r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Hmm"}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Sure"}}"#,
        "\n\n",
        "event: content_block_start\n",
        r#"data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_1","name":"f","input":{}}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{}"}}"#,
        "\n\n",
        "event: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":12}}"#,
        "\n\n",
        "event: message_stop\n",
        r#"data: {"type":"message_stop"}"#,
        "\n\n",
    );
    let (fields, first) = scan_lines(BodyType::EventStream, body);
    assert_eq!(first, Some(17 * MS));
    assert_eq!(fields.first_answer_ns, Some(20 * MS));
    assert_eq!(fields.tool_calls, 1);
    assert_eq!(
        (fields.prompt_tokens, fields.completion_tokens),
        (Some(30), Some(12))
    );
    assert_eq!(fields.done_reason.as_deref(), Some("tool_use"));
    assert!(!fields.error);
}

#[test]
fn error_bodies_name_busy_servers_and_prompts_too_long() {
    let cases: [(&str, Option<Rejection>); 7] = [
        (
            r#"{"error":"{\"error\":{\"code\":400,\"message\":\"request (70 tokens) exceeds the available context size (64 tokens), try increasing it\",\"type\":\"exceed_context_size_error\",\"n_prompt_tokens\":70,\"n_ctx\":64}}"}"#,
            Some(Rejection::ContextExceeded),
        ),
        (
            r#"{"error":"request (70 tokens) exceeds the available context size (64 tokens), try increasing it"}"#,
            Some(Rejection::ContextExceeded),
        ),
        (
            r#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#,
            Some(Rejection::ServerBusy),
        ),
        (
            r#"{"error":{"message":"server busy, please try again.  maximum pending requests exceeded","type":"api_error","param":null,"code":null}}"#,
            Some(Rejection::ServerBusy),
        ),
        (
            r#"{"error":"the input length exceeds the context length"}"#,
            Some(Rejection::ContextExceeded),
        ),
        (
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"input exceeds maximum context length and cannot be truncated further"}}"#,
            Some(Rejection::ContextExceeded),
        ),
        (
            r#"{"error":"model \"x\" not found, try pulling it first"}"#,
            None,
        ),
    ];
    for (body, want) in cases {
        let mut scan = ResponseScan::new(BodyType::Json);
        scan.body(body.as_bytes(), 5);
        let (fields, _) = scan.finish(6, true);
        assert_eq!(fields.rejection, want, "{body}");
        assert!(fields.error, "{body}");
    }
}

#[test]
fn embeddings_report_prompt_tokens_and_durations() {
    let mut scan = ResponseScan::new(BodyType::Json);
    scan.body(
        br#"{"model":"all-minilm","embeddings":[[0.1,-0.2]],"total_duration":14143917,"load_duration":1019500,"prompt_eval_count":8}"#,
        5,
    );
    let (fields, _) = scan.finish(6, true);
    assert_eq!(fields.prompt_tokens, Some(8));
    assert_eq!(fields.total_duration_ns, Some(14_143_917));
    assert_eq!(fields.completion_tokens, None);
    assert_eq!(fields.estimated_completion_tokens, None, "not a stream");
}

#[test]
fn openai_completions_stream_is_text_with_a_finish_reason() {
    // Ollama's /v1/completions stream (openai/openai.go, ToCompleteChunk), no usage asked for.
    let body = concat!(
        r#"data: {"id":"cmpl-7","object":"text_completion","created":1,"model":"m","system_fingerprint":"fp_ollama","choices":[{"text":"The","index":0,"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"cmpl-7","object":"text_completion","created":1,"model":"m","system_fingerprint":"fp_ollama","choices":[{"text":" sky","index":0,"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"cmpl-7","object":"text_completion","created":1,"model":"m","system_fingerprint":"fp_ollama","choices":[{"text":"","index":0,"finish_reason":"length"}]}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );
    let (fields, first) = scan_lines(BodyType::EventStream, body);
    assert_eq!(first, Some(10 * MS));
    assert_eq!(fields.first_answer_ns, Some(10 * MS));
    assert_eq!(
        (fields.chunks, fields.thinking_chunks, fields.tool_calls),
        (2, 0, 0)
    );
    assert_eq!(fields.estimated_completion_tokens, Some(2));
    assert_eq!(fields.done_reason.as_deref(), Some("length"));
    assert!(!fields.error);
}

#[test]
fn a_native_stream_cut_short_gets_its_tokens_estimated() {
    let mut scan = ResponseScan::new(BodyType::Ndjson);
    for (i, word) in ["The", " sky", " is"].iter().enumerate() {
        let line = format!(
            r#"{{"model":"m","created_at":"t","message":{{"role":"assistant","content":"{word}"}},"done":false}}"#
        ) + "\n";
        scan.body(line.as_bytes(), 10 + i as u64);
    }
    let (fields, _) = scan.finish(20, false);
    assert_eq!(fields.completion_tokens, None);
    assert_eq!(fields.estimated_completion_tokens, Some(3));
}
