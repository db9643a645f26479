"""Drives the official `ollama` client for the daemon's end-to-end test (not a pytest module).

Usage: ollama_driver.py HOST. Reads one JSON command per stdin line and answers each with one
JSON line on stdout, after the request is over, so the caller can scrape metrics between
requests. A command: {"model": "...", "stream": true|false, "fault": null|"error-after=3"}.
The answer: what the client saw and when (time.perf_counter seconds): t_call before the call,
t_start when httpx sent the request (its request event hook),
t_first_chunk at the first chunk with non-empty content, t_end after the last byte, the status,
and the final line's counts. One Client is used throughout (keep-alive), and one more per fault;
`fresh_client` marks a client's first call, whose time includes connecting.
"""

import json
import sys
import time

import ollama

# When httpx hands the request to the socket: the client's own "request sent" instant, after
# the Python-side work of building it (which no server can see).
SENT = {}


def mark_sent(_request) -> None:
    SENT["at"] = time.perf_counter()


def chat(client: ollama.Client, faulty: ollama.Client, cmd: dict) -> dict:
    use = faulty if cmd.get("fault") else client
    messages = [{"role": "user", "content": "why is the sky blue?"}]
    out = {"model": cmd["model"], "stream": cmd["stream"], "status": 200, "error": None,
           "t_first_chunk": None, "prompt_eval_count": None, "eval_count": None, "done_reason": None}
    out["t_call"] = time.perf_counter()
    SENT.clear()
    try:
        if cmd["stream"]:
            for part in use.chat(model=cmd["model"], messages=messages, stream=True):
                now = time.perf_counter()
                if out["t_first_chunk"] is None and part.message.content:
                    out["t_first_chunk"] = now
                if part.done:
                    out["prompt_eval_count"] = part.prompt_eval_count
                    out["eval_count"] = part.eval_count
                    out["done_reason"] = part.done_reason
        else:
            resp = use.chat(model=cmd["model"], messages=messages, stream=False)
            out["prompt_eval_count"] = resp.prompt_eval_count
            out["eval_count"] = resp.eval_count
            out["done_reason"] = resp.done_reason
    except ollama.ResponseError as err:
        out["status"] = err.status_code
        out["error"] = str(err)
    out["t_end"] = time.perf_counter()
    out["t_start"] = SENT.get("at", out["t_call"])
    return out


def main() -> None:
    host = sys.argv[1]
    hooks = {"request": [mark_sent]}
    client = ollama.Client(host=host, event_hooks=hooks)
    faulty = {}
    fresh = True
    for line in sys.stdin:
        cmd = json.loads(line)
        fault = cmd.get("fault")
        if fault and fault not in faulty:
            faulty[fault] = ollama.Client(host=host, headers={"X-Sim-Fault": fault}, event_hooks=hooks)
            fresh = True
        result = chat(client, faulty.get(fault), cmd)
        # A client's first call also connects: its timings include what no server sees.
        result["fresh_client"] = fresh
        fresh = False
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
