//! Black-box tests of `observer sim`'s HTTP/1.x handling: keep-alive, pipelining, chunked
//! request bodies, `Expect: 100-continue`, HTTP/1.0, malformed and oversized requests, shutdown,
//! and the binary itself (ready line, SIGTERM, one-line errors).

mod support;

use support::sim_client::*;
use tokio::net::TcpStream;

#[tokio::test]
async fn keep_alive_serves_many_requests_on_one_connection() {
    let sim = start(fast_config()).await;
    let mut client = Client::connect(sim.local_addr()).await;
    for i in 0..20 {
        if i % 2 == 0 {
            client.send(&get("/api/version")).await;
            assert_eq!(client.reply().await.text(), r#"{"version":"0.32.15"}"#);
        } else {
            client.send(&post("/api/chat", CHAT)).await;
            let reply = client.reply().await;
            assert_eq!(
                (reply.ending, reply.chunks.len()),
                (Ending::Complete, TOKENS as usize + 1)
            );
        }
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let sim = start(fast_config()).await;
    let mut client = Client::connect(sim.local_addr()).await;
    let pipeline = [
        post("/api/chat", CHAT),
        get("/api/version"),
        get("/"),
        get("/missing"),
    ]
    .concat();
    client.send(&pipeline).await;
    let chat = client.reply().await;
    assert_eq!(chat.chunks.len(), TOKENS as usize + 1);
    assert_eq!(client.reply().await.text(), r#"{"version":"0.32.15"}"#);
    assert_eq!(client.reply().await.text(), "Ollama is running");
    assert_eq!(client.reply().await.text(), "404 page not found");
}

#[tokio::test]
async fn chunked_request_bodies_and_expect_continue_are_understood() {
    let sim = start(fast_config()).await;
    let mut client = Client::connect(sim.local_addr()).await;
    let body =
        r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    let (a, b) = body.split_at(20);
    let request = format!(
        "POST /api/chat HTTP/1.1\r\nHost: sim\r\nTransfer-Encoding: chunked\r\n\r\n{:x};x=y\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nTrailer: 1\r\n\r\n",
        a.len(),
        b.len()
    );
    client.send(request.as_bytes()).await;
    assert_eq!(
        client.reply().await.json()["message"]["content"],
        "The sky appears blue"
    );

    // Expect: 100-continue: the interim response comes before the body is sent.
    let head = format!(
        "POST /api/chat HTTP/1.1\r\nHost: sim\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    client.send(head.as_bytes()).await;
    let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
    assert!(client.fill_to(interim.len()).await.is_none());
    assert_eq!(&client.buf[..], interim);
    client.buf.clear();
    client.send(body.as_bytes()).await;
    let reply = client.reply().await;
    assert!(reply.head.starts_with("HTTP/1.1 200 OK\r\n"));
    assert_eq!(reply.json()["eval_count"], 4);
}

#[tokio::test]
async fn http10_clients_get_unframed_streams_and_a_close() {
    let sim = start(fast_config()).await;
    let mut client = Client::connect(sim.local_addr()).await;
    let request = format!(
        "POST /api/chat HTTP/1.0\r\nContent-Length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    );
    client.send(request.as_bytes()).await;
    let reply = client.reply().await;
    assert_eq!(
        reply.head,
        "HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\nDate: <date>\r\n"
    );
    assert_eq!(reply.ending, Ending::Eof);
    let lines: Vec<&str> = std::str::from_utf8(&reply.body).unwrap().lines().collect();
    assert_eq!(lines.len(), TOKENS as usize + 1);
    assert!(lines[TOKENS as usize].contains(r#""done":true"#));

    let mut client = Client::connect(sim.local_addr()).await;
    client.send(b"GET / HTTP/1.0\r\n\r\n").await;
    let reply = client.reply().await;
    assert_eq!(
        reply.head,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nDate: <date>\r\nContent-Length: 17\r\n"
    );
    assert!(client.closed().await);
}

#[tokio::test]
async fn connection_close_is_announced_and_honoured() {
    let sim = start(fast_config()).await;
    let mut client = Client::connect(sim.local_addr()).await;
    client
        .send(b"GET /api/version HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n\r\n")
        .await;
    let reply = client.reply().await;
    assert_eq!(
        reply.head,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nDate: <date>\r\nContent-Length: 21\r\nConnection: close\r\n"
    );
    assert!(client.closed().await);
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_gos_replies_and_a_close() {
    let mut config = fast_config();
    config.limits.max_head_bytes = 1024;
    config.limits.max_body_bytes = 4096;
    let sim = start(config).await;
    let addr = sim.local_addr();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"NOT HTTP AT ALL\r\n\r\n".to_vec(),
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request",
        ),
        (
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            "HTTP/1.1 400 Bad Request: missing required Host header\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request: missing required Host header",
        ),
        (
            b"POST /api/chat HTTP/1.1\r\nHost: sim\r\nContent-Length: 12x\r\n\r\n".to_vec(),
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request",
        ),
        (
            b"POST /api/chat HTTP/1.1\r\nHost: sim\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            "HTTP/1.1 501 Not Implemented\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\nUnsupported transfer encoding",
        ),
        (
            format!(
                "GET / HTTP/1.1\r\nHost: sim\r\nX-Big: {}\r\n\r\n",
                "a".repeat(2000)
            )
            .into_bytes(),
            "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n431 Request Header Fields Too Large",
        ),
        (
            b"POST /api/chat HTTP/1.1\r\nHost: sim\r\nContent-Length: 5000\r\n\r\n".to_vec(),
            "HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n413 Request Entity Too Large",
        ),
        (
            b"POST /api/chat HTTP/1.1\r\nHost: sim\r\nTransfer-Encoding: chunked\r\n\r\n2000\r\n"
                .to_vec(),
            "HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n413 Request Entity Too Large",
        ),
        (
            b"POST /api/chat HTTP/1.1\r\nHost: sim\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
                .to_vec(),
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request",
        ),
    ];
    for (request, expected) in cases {
        let mut client = Client::connect(addr).await;
        client.send(&request).await;
        while client.fill().await.unwrap() > 0 {}
        assert_eq!(String::from_utf8_lossy(&client.buf), expected);
    }
    // The server is still fine.
    assert_eq!(exchange(addr, &get("/")).await.text(), "Ollama is running");
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let sim = start(fast_config()).await;
    let addr = sim.local_addr();
    assert_eq!(exchange(addr, &get("/")).await.text(), "Ollama is running");
    sim.shutdown().await.unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
}

mod binary {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};

    const BIN: &str = env!("CARGO_BIN_EXE_observer");

    #[test]
    fn prints_the_bound_address_serves_and_stops_on_sigterm() {
        let mut child = Command::new(BIN)
            .args(["sim", "--listen", "127.0.0.1:0", "--load-ms", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("observer sim listening on ")
            .expect(&line)
            .to_owned();
        assert!(!addr.ends_with(":0"), "{addr}");
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        std::io::Write::write_all(
            &mut stream,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.ends_with("\r\n\r\nOllama is running"), "{reply}");
        // SAFETY: plain kill(2) on the child we started.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn a_port_in_use_or_a_bad_address_is_a_one_line_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        for (listen, expected) in [
            (addr.as_str(), format!("error: cannot listen on {addr}: ")),
            (
                "not-an-address",
                "error: cannot listen on not-an-address: ".to_owned(),
            ),
        ] {
            let out = Command::new(BIN)
                .args(["sim", "--listen", listen])
                .output()
                .unwrap();
            assert!(!out.status.success());
            let stderr = String::from_utf8(out.stderr).unwrap();
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.starts_with(&expected), "{stderr}");
            assert!(out.stdout.is_empty());
        }
    }
}
