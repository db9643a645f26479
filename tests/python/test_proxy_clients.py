"""The official `ollama` and `openai` Python clients through `observer proxy` in front of
`observer sim`, compared with the same clients talking to the simulator directly.

A client must not be able to tell the proxy is there: the same streamed content and the same
final counts, and (an acceptance item of the proxy, hence the one timing assertion here) a time
to first token within 1 ms of the direct one, by the median of 51 alternating pairs of runs.
"""

import http.client
import signal
import socket
import statistics
import subprocess
import threading
import time

import ollama
import openai
import pytest

from conftest import FAST_FLAGS, Sim, observer_bin

MODEL = "llama3.2:1b"
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
REPLY = "The sky appears blue"
READY_PREFIX = "observer proxy listening on "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """One `observer proxy` process in front of `upstream`; `host` is its base URL."""

    def __init__(self, upstream: str, *flags: str):
        self.metrics = f"127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [
                observer_bin(),
                "--log",
                "warn",
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                upstream,
                "--metrics-addr",
                self.metrics,
                "--gpu",
                "off",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        line = result[0] if result else ""
        if not line.startswith(READY_PREFIX):
            self.process.kill()
            pytest.fail(f"observer proxy did not start: {line!r} {self.process.stderr.read()!r}")
        self.addr = line[len(READY_PREFIX):].strip()
        self.host = f"http://{self.addr}"
        deadline = time.monotonic() + 30
        while self.admin_status("/readyz") != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"observer proxy /readyz never 200: {self.process.stderr.read()!r}")
            time.sleep(0.02)

    def admin_status(self, path: str) -> int:
        host, port = self.metrics.rsplit(":", 1)
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            conn.request("GET", path)
            return conn.getresponse().status
        except OSError:
            return 0

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=35)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def sim_and_proxy():
    """A fast simulator and a proxy in front of it; both must exit 0."""
    sim = Sim(*FAST_FLAGS)
    proxy = Proxy(sim.addr)
    yield sim, proxy
    assert proxy.stop() == 0, proxy.process.stderr.read()
    sim.stop()
    assert sim.process.returncode == 0, sim.process.stderr.read()


def ollama_chat(host: str):
    chunks = list(ollama.Client(host=host).chat(model=MODEL, messages=QUESTION, stream=True))
    final = chunks[-1]
    counts = (final.done, final.done_reason, final.eval_count, final.prompt_eval_count, len(chunks))
    return "".join(c.message.content for c in chunks), counts


def openai_chat(host: str):
    client = openai.OpenAI(base_url=f"{host}/v1", api_key="x")
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, stream=True, stream_options={"include_usage": True}
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    usage = chunks[-1].usage
    counts = (finish, usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, len(chunks))
    return content, counts


def test_ollama_client_streams_the_same_through_the_proxy(sim_and_proxy):
    sim, proxy = sim_and_proxy
    direct = ollama_chat(sim.host)
    proxied = ollama_chat(proxy.host)
    assert proxied == direct
    assert proxied == (REPLY, (True, "stop", 4, 9, 5))


def test_openai_client_streams_the_same_through_the_proxy(sim_and_proxy):
    sim, proxy = sim_and_proxy
    direct = openai_chat(sim.host)
    proxied = openai_chat(proxy.host)
    assert proxied == direct
    # Four content chunks, the finish chunk and the usage chunk.
    assert proxied == (REPLY, ("stop", 9, 4, 13, 6))


def time_to_first_token(client: ollama.Client) -> float:
    started = time.perf_counter()
    stream = client.chat(model=MODEL, messages=QUESTION, stream=True)
    for chunk in stream:
        if chunk.message.content:
            first = time.perf_counter() - started
            break
    else:
        pytest.fail("no content in the stream")
    for _ in stream:  # finish the exchange so that the connection is reused
        pass
    return first


def test_the_proxy_adds_under_a_millisecond_to_the_time_to_first_token(sim_and_proxy):
    sim, proxy = sim_and_proxy
    direct, proxied = ollama.Client(host=sim.host), ollama.Client(host=proxy.host)
    # Warm up: the model's first load, and one kept-alive connection on each path.
    time_to_first_token(direct)
    time_to_first_token(proxied)
    # Single runs vary by milliseconds (timers, the client, the scheduler) while the proxy adds
    # about half of one in a debug build: 51 pairs keep the median's own wobble well inside 1 ms.
    differences = []
    for _ in range(51):
        through_proxy = time_to_first_token(proxied)
        without = time_to_first_token(direct)
        differences.append(through_proxy - without)
    median = statistics.median(differences)
    print(f"time to first token, proxy - direct: median {median * 1e6:.0f} µs of {len(differences)} pairs")
    assert abs(median) <= 0.001, f"median difference {median * 1000:.3f} ms over {sorted(differences)}"
