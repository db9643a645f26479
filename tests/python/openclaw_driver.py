"""Drives a real OpenClaw gateway for the observer's end-to-end test (not a pytest module).

Usage: openclaw_driver.py HOST PORT TOKEN. Standard library only: raw sockets, so that every
timestamp is taken at the socket (time.monotonic(), the kernel's CLOCK_MONOTONIC), and the
WebSocket client is written here (RFC 6455: masked client frames, no extension).

Reads one JSON command per stdin line and answers each with one JSON line once it is over:
- {"kind": "ready"}: waits until GET /readyz answers 200.
- {"kind": "ws_connect"}: opens the WebSocket (GET / with Upgrade), answers the gateway's
  connect.challenge with a protocol 4 `connect` request (token auth) and waits for hello-ok.
- {"kind": "agent", "message": "..."}: one agent turn: a `req agent`, its acceptance, events,
  and the final `res`.
- {"kind": "chat", "stream": true|false}: POST /v1/chat/completions (streamed with
  stream_options.include_usage).
- {"kind": "responses"}: POST /v1/responses, streamed.
- {"kind": "ws_close"}: a close frame, and the connection closed.

Each answer has `sock`: `first_write` / `last_write` around the request's bytes (after the last
write returned), `first_delta` when the read that completed the first message carrying model
text returned (for HTTP: the first chunk with non-empty content or output text), `end` when
the read that completed the answer returned; and `usage` {input, output} as the gateway
reported it.
"""

import base64
import json
import os
import socket
import sys
import time


def now() -> float:
    return time.monotonic()


class Conn:
    """A socket with timed writes and reads."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes, sock: dict) -> None:
        sock.setdefault("first_write", now())
        self.sock.sendall(data)
        sock["last_write"] = now()

    def fill(self) -> float:
        """One read into the buffer; when it returned."""
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data
        return now()

    def take(self, n: int) -> bytes:
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def http_request(conn: Conn, path: str, body: dict, token: str, sock: dict) -> None:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    conn.send(head + payload, sock)


def read_head(conn: Conn) -> tuple[int, dict]:
    while b"\r\n\r\n" not in conn.buf:
        conn.fill()
    end = conn.buf.index(b"\r\n\r\n")
    lines = conn.take(end + 4).decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


def read_body(conn: Conn, headers: dict, on_data) -> None:
    """Reads a Content-Length or chunked body; `on_data(bytes, at)` for each piece as it came
    (`at`: when the read that completed it returned)."""
    if "content-length" in headers:
        n = int(headers["content-length"])
        at = now()
        while len(conn.buf) < n:
            at = conn.fill()
        on_data(conn.take(n), at)
        return
    at = now()
    while True:
        while b"\r\n" not in conn.buf:
            at = conn.fill()
        size_line = conn.buf.index(b"\r\n")
        size = int(conn.buf[:size_line].split(b";")[0], 16)
        while len(conn.buf) < size_line + 2 + size + 2:
            at = conn.fill()
        conn.take(size_line + 2)
        data = conn.take(size)
        conn.take(2)
        if size == 0:
            return
        on_data(data, at)


def sse_events(text: str):
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                yield line[6:]


def post(host, port, token, path: str, body: dict, on_json) -> dict:
    """POST `body`; `on_json(obj, at, sock, usage)` for the JSON body, or for each event of an
    SSE stream (`at`: when the read that completed it returned)."""
    sock: dict = {}
    usage: dict = {}
    conn = Conn(host, port)
    http_request(conn, path, body, token, sock)
    status, headers = read_head(conn)
    streamed = headers.get("content-type", "").startswith("text/event-stream")
    pending = [""]

    def on_data(data: bytes, at: float) -> None:
        sock["end"] = at
        if not streamed:
            on_json(json.loads(data), at, sock, usage)
            return
        pending[0] += data.decode()
        # Only whole events: the text after the last blank line waits for the next piece.
        whole, _, pending[0] = pending[0].rpartition("\n\n")
        for event in sse_events(whole):
            if event != "[DONE]":
                on_json(json.loads(event), at, sock, usage)

    read_body(conn, headers, on_data)
    conn.sock.close()
    return {"status": status, "sock": sock, "usage": usage}


def chat(host, port, token, stream: bool) -> dict:
    body = {"model": "openclaw/default", "stream": stream,
            "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
    if stream:
        body["stream_options"] = {"include_usage": True}

    def on_json(chunk: dict, at: float, sock: dict, usage: dict) -> None:
        for choice in chunk.get("choices") or []:
            # A whole answer's message, or a streamed chunk with content (not the role-only one).
            if choice.get("message") or (choice.get("delta") or {}).get("content"):
                sock.setdefault("first_delta", at)
        if chunk.get("usage"):
            u = chunk["usage"]
            usage.update(input=u.get("prompt_tokens"), output=u.get("completion_tokens"))

    return post(host, port, token, "/v1/chat/completions", body, on_json)


def responses(host, port, token) -> dict:
    def on_json(event: dict, at: float, sock: dict, usage: dict) -> None:
        if event.get("type") == "response.output_text.delta" and event.get("delta"):
            sock.setdefault("first_delta", at)
        if event.get("type") == "response.completed":
            u = event["response"].get("usage") or {}
            usage.update(input=u.get("input_tokens"), output=u.get("output_tokens"))

    body = {"model": "openclaw/default", "stream": True, "input": "Why is the sky blue?"}
    return post(host, port, token, "/v1/responses", body, on_json)


class WebSocket:
    def __init__(self, host: str, port: int) -> None:
        self.conn = Conn(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.conn.send((
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\n"
            f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        ).encode(), {})
        status, _ = read_head(self.conn)
        if status != 101:
            raise RuntimeError(f"upgrade answered {status}")
        self.next_id = 1

    def send(self, message: dict, sock: dict, opcode: int = 1) -> None:
        payload = json.dumps(message).encode() if opcode == 1 else message
        mask = os.urandom(4)
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.conn.send(head + mask + masked, sock)

    def receive(self) -> tuple[int, bytes, float]:
        """One message (fragments assembled): opcode, payload, when the read that completed it
        returned."""
        at = now()
        parts = b""
        while True:
            while len(self.conn.buf) < 2:
                at = self.conn.fill()
            b0, b1 = self.conn.buf[0], self.conn.buf[1]
            n, at_len = b1 & 0x7F, 2
            if n == 126:
                while len(self.conn.buf) < 4:
                    at = self.conn.fill()
                n, at_len = int.from_bytes(self.conn.buf[2:4], "big"), 4
            elif n == 127:
                while len(self.conn.buf) < 10:
                    at = self.conn.fill()
                n, at_len = int.from_bytes(self.conn.buf[2:10], "big"), 10
            while len(self.conn.buf) < at_len + n:
                at = self.conn.fill()
            self.conn.take(at_len)
            parts += self.conn.take(n)
            opcode = b0 & 0x0F
            if b0 & 0x80 and opcode != 0:
                return opcode, parts, at
            if b0 & 0x80:
                return 1, parts, at

    def call(self, method: str, params: dict, sock: dict, traceparent: str | None = None) -> dict:
        rid = str(self.next_id)
        self.next_id += 1
        req = {"type": "req", "id": rid, "method": method, "params": params}
        if traceparent:
            req["traceparent"] = traceparent
        self.send(req, sock)
        while True:
            opcode, payload, at = self.receive()
            if opcode != 1:
                continue
            msg = json.loads(payload)
            if msg.get("type") == "event" and is_delta(msg):
                sock.setdefault("first_delta", at)
            if msg.get("type") == "res" and msg.get("id") == rid:
                if (msg.get("payload") or {}).get("status") == "accepted":
                    continue
                sock["end"] = at
                return msg


def is_delta(msg: dict) -> bool:
    payload = msg.get("payload") or {}
    if msg.get("event") == "agent":
        return payload.get("stream") == "assistant"
    if msg.get("event") == "chat":
        return payload.get("state") == "delta"
    return False


def main() -> None:
    host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ws = None
    for line in sys.stdin:
        cmd = json.loads(line)
        kind = cmd["kind"]
        try:
            if kind == "ready":
                deadline = now() + 120
                while True:
                    try:
                        conn = Conn(host, port)
                        conn.send(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", {})
                        status, _ = read_head(conn)
                        conn.sock.close()
                        if status == 200:
                            break
                    except (OSError, EOFError):
                        pass
                    if now() > deadline:
                        raise RuntimeError("the gateway never became ready")
                    time.sleep(0.25)
                out = {"ready": True}
            elif kind == "ws_connect":
                ws = WebSocket(host, port)
                opcode, payload, _ = ws.receive()
                challenge = json.loads(payload)
                assert challenge.get("event") == "connect.challenge", challenge
                sock: dict = {}
                res = ws.call("connect", {
                    "minProtocol": 4, "maxProtocol": 4,
                    "client": {"id": "cli", "version": "1.0.0", "platform": "linux", "mode": "cli"},
                    "role": "operator",
                    "scopes": ["operator.read", "operator.write", "operator.admin"],
                    "caps": [], "auth": {"token": token},
                }, sock)
                out = {"ok": res.get("ok"), "sock": sock}
            elif kind == "agent":
                sock = {}
                # A trace of its own, as a traced client sends it: the gateway runs the turn in a
                # child of it, and its model calls carry that trace upstream.
                res = ws.call("agent", {"message": cmd["message"], "agentId": "main",
                                        "idempotencyKey": f"k-{time.time_ns()}"}, sock,
                              traceparent=f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01")
                u = (((res.get("payload") or {}).get("result") or {}).get("meta") or {})
                u = (u.get("agentMeta") or {}).get("usage") or {}
                out = {"ok": res.get("ok"), "error": res.get("error"), "sock": sock,
                       "usage": {"input": u.get("input"), "output": u.get("output")}}
            elif kind == "chat":
                out = chat(host, port, token, cmd["stream"])
            elif kind == "responses":
                out = responses(host, port, token)
            elif kind == "ws_close":
                ws.send(b"\x03\xe8", {}, opcode=8)
                while True:
                    opcode, _, _ = ws.receive()
                    if opcode == 8:
                        break
                ws.conn.sock.close()
                ws = None
                out = {"closed": True}
            else:
                raise ValueError(f"unknown command {kind}")
        except Exception as err:  # reported to the test, which fails with it
            out = {"failed": f"{type(err).__name__}: {err}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
