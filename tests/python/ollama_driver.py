"""Drives the official `ollama` client for the daemon's end-to-end test (not a pytest module).

Usage: ollama_driver.py HOST. Reads one JSON command per stdin line and answers each with one
JSON line on stdout once the request is over, so the caller can scrape metrics between
requests. A command: {"model": "...", "stream": true|false, "fault": null|"error-after=3"}.

One `ollama.Client` serves every command (keep-alive); a fault travels as the sim's
`X-Sim-Fault` header, added to that one request by an httpx request hook.

Each answer carries two clocks (time.perf_counter seconds):
- `api`: what a user of the library sees: `start` before the call, `first_chunk` when the first
  part with non-empty `message.content` is yielded, `end` after the last part (or the error).
- `sock`: the same request at the client's socket, from a wrapped httpcore network stream:
  `first_write` / `last_write` around the request's bytes, `first_read` when the first read of
  the response (its status line) returned, `first_body` when the read carrying
  the response's first body byte returned, `first_chunk` when the read that completed the first
  content line returned, `end` when the response's last read returned.
The gap between the two is Python's own work (building the request, parsing JSON, pydantic
models), which no server-side observer can see; the test compares the observer with `sock` and
reports both.

Python's cyclic garbage collector is off while a request runs and collects between commands: a
full collection takes milliseconds (about 15 ms with these libraries loaded), and one that
starts between a socket call and its timestamp would move `sock` by that much.
"""

import gc
import json
import sys
import time

import httpcore
import httpx
import ollama


class Wire:
    """Socket-level events of the request in progress."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.writes: list[float] = []
        self.reads: list[tuple[float, bytes]] = []

    def first_body(self) -> float | None:
        """When the read holding the first byte after the response head returned."""
        seen = b""
        for at, data in self.reads:
            seen += data
            head_end = seen.find(b"\r\n\r\n")
            if head_end >= 0 and len(seen) > head_end + 4:
                return at
        return None


WIRE = Wire()


class TimedStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self._inner.read(max_bytes, timeout)
        if data:
            WIRE.reads.append((time.perf_counter(), data))
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            WIRE.writes.append(time.perf_counter())
        self._inner.write(buffer, timeout)
        if buffer:
            WIRE.writes.append(time.perf_counter())

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, *args, **kwargs):
        return self._inner.start_tls(*args, **kwargs)

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class TimedBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, *args, **kwargs) -> httpcore.NetworkStream:
        return TimedStream(self._inner.connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args, **kwargs) -> httpcore.NetworkStream:
        return TimedStream(self._inner.connect_unix_socket(*args, **kwargs))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def timed_transport() -> httpx.HTTPTransport:
    transport = httpx.HTTPTransport()
    # httpx does not take a network backend; its pool (public httpcore API) does.
    assert isinstance(transport._pool, httpcore.ConnectionPool)
    transport._pool._network_backend = TimedBackend()
    return transport


FAULT: dict = {"header": None}


def add_fault(request: httpx.Request) -> None:
    if FAULT["header"]:
        request.headers["X-Sim-Fault"] = FAULT["header"]


def chat(client: ollama.Client, cmd: dict) -> dict:
    messages = [{"role": "user", "content": "why is the sky blue?"}]
    out = {"model": cmd["model"], "stream": cmd["stream"], "status": 200, "error": None,
           "prompt_eval_count": None, "eval_count": None, "done_reason": None}
    api = {"first_chunk": None}
    sock = {"first_chunk": None}
    FAULT["header"] = cmd.get("fault")
    WIRE.reset()
    api["start"] = time.perf_counter()
    try:
        if cmd["stream"]:
            for part in client.chat(model=cmd["model"], messages=messages, stream=True):
                if api["first_chunk"] is None and part.message.content:
                    api["first_chunk"] = time.perf_counter()
                    # The line was yielded as soon as the read completing it returned.
                    sock["first_chunk"] = WIRE.reads[-1][0]
                if part.done:
                    out["prompt_eval_count"] = part.prompt_eval_count
                    out["eval_count"] = part.eval_count
                    out["done_reason"] = part.done_reason
        else:
            resp = client.chat(model=cmd["model"], messages=messages, stream=False)
            out["prompt_eval_count"] = resp.prompt_eval_count
            out["eval_count"] = resp.eval_count
            out["done_reason"] = resp.done_reason
    except ollama.ResponseError as err:
        out["status"] = err.status_code
        out["error"] = str(err)
    api["end"] = time.perf_counter()
    sock["first_write"] = WIRE.writes[0]
    sock["last_write"] = WIRE.writes[-1]
    sock["first_read"] = WIRE.reads[0][0]
    sock["first_body"] = WIRE.first_body()
    sock["end"] = WIRE.reads[-1][0]
    out["api"] = api
    out["sock"] = sock
    return out


def main() -> None:
    client = ollama.Client(host=sys.argv[1], transport=timed_transport(),
                           event_hooks={"request": [add_fault]})
    gc.disable()
    for line in sys.stdin:
        print(json.dumps(chat(client, json.loads(line))), flush=True)
        gc.collect()


if __name__ == "__main__":
    main()
