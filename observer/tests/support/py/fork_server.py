"""A fork-per-connection HTTP server standing in for Ollama on the upstream port: the parent
accepts each connection and forks; the child serves it (keep-alive, HTTP/1.1 with
Content-Length) until the client closes it, while the parent closes its own copy of the socket
at once (socketserver.ForkingMixIn). Each child waits for a request in poll(2), then reads it.

POST /api/chat with model "m" answers 200 and a non-streamed chat reply (JSON); any other
request answers 404 with Ollama's error body. Prints `listening HOST:PORT` once it listens.

Usage: fork_server.py HOST PORT
"""

import http.server
import json
import socketserver
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # With a timeout a child waits for each request in poll(2) and reads it once it is there.
    # Without one it would sit in recv(2) on its idle keep-alive connection, and an observer
    # attached meanwhile would not see that read's bytes (the syscall entered before the hooks
    # existed): the first request after the attach would be lost.
    timeout = 3600

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        try:
            model = json.loads(body).get("model")
        except ValueError:
            model = None
        if self.path == "/api/chat" and model == "m":
            self.reply(
                200,
                {
                    "model": "m",
                    "created_at": "2025-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": "Rayleigh scattering."},
                    "done_reason": "stop",
                    "done": True,
                },
            )
        else:
            self.reply(404, {"error": f"model '{model}' not found"})

    def do_GET(self):
        self.reply(404, {"error": "not found"})


class Server(socketserver.ForkingMixIn, http.server.HTTPServer):
    allow_reuse_address = True
    # nginx keeps up to 8 idle connections per worker; every one is a child here.
    max_children = 256


server = Server((sys.argv[1], int(sys.argv[2])), Handler)
print(f"listening {sys.argv[1]}:{sys.argv[2]}", flush=True)
server.serve_forever()
