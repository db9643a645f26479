"""Drives the official `ollama`, `openai` and `anthropic` clients for the LLM-layer end-to-end
test (observer/tests/llm_clients.rs; not a pytest module).

Usage: llm_clients_driver.py HOST. Reads one JSON command per stdin line and answers each with
one JSON line on stdout once every request of it is over, so that the caller can scrape the
observer's metrics between commands. A command names a scenario (`{"scenario": "queue"}`) and
the answer holds what the clients saw: status codes, the final line's counts and durations
(nanoseconds, as Ollama reports them), usage objects, chunk counts.

The simulator behind HOST runs with one parallel slot (OLLAMA_NUM_PARALLEL=1), a queue of one
(OLLAMA_MAX_QUEUE=1) and a context of 64 tokens (OLLAMA_CONTEXT_LENGTH=64).
"""

import json
import sys
import threading
import time

import anthropic
import httpx
import ollama
import openai

MODEL = "llama3.2:1b"
# Cold until the `busy` scenario loads it.
COLD_MODEL = "qwen2.5:0.5b"
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
# 400 bytes: 4 + 100 tokens by the simulator's estimate, over the 64-token context.
LONG_PROMPT = "word " * 80
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def final_fields(final) -> dict:
    """The counts and durations of an Ollama final line (a response object of the client)."""
    return {
        name: getattr(final, name)
        for name in (
            "done_reason",
            "total_duration",
            "load_duration",
            "prompt_eval_count",
            "prompt_eval_duration",
            "eval_count",
            "eval_duration",
        )
    }


class Driver:
    def __init__(self, host: str) -> None:
        self.host = host
        self.ollama = ollama.Client(host=host)
        self.openai = openai.OpenAI(base_url=f"{host}/v1", api_key="ollama", max_retries=0)
        self.anthropic = anthropic.Anthropic(base_url=host, api_key="ollama", max_retries=0)

    def fresh_ollama(self, fault: str | None = None) -> ollama.Client:
        """A client of its own (one connection), with the simulator's fault header if given."""
        headers = {"X-Sim-Fault": fault} if fault else None
        return ollama.Client(host=self.host, headers=headers)

    def chat_stream(self, client: ollama.Client, model: str = MODEL, **kwargs) -> dict:
        chunks = list(client.chat(model=model, messages=QUESTION, stream=True, **kwargs))
        final = chunks[-1]
        return {
            "chunks": len(chunks),
            "thinking_chunks": sum(1 for c in chunks if c.message.thinking),
            "tool_calls": sum(len(c.message.tool_calls or []) for c in chunks),
            **final_fields(final),
        }

    # Scenarios.

    def warm(self) -> dict:
        return self.chat_stream(self.ollama)

    def queue(self) -> dict:
        """Two streamed chats at once on one slot: the second waits for the first."""
        results: dict[str, dict] = {}

        def run(name: str, delay: float) -> None:
            time.sleep(delay)
            results[name] = self.chat_stream(self.fresh_ollama())

        threads = [
            threading.Thread(target=run, args=("first", 0.0)),
            threading.Thread(target=run, args=("second", 0.05)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def busy(self) -> dict:
        """Three requests for a cold model while it loads (400 ms): the first is loading it,
        the second waits in the scheduler's queue (of one), the third is refused: 503."""
        results: dict[str, object] = {}

        def run(name: str, delay: float) -> None:
            time.sleep(delay)
            try:
                client = self.fresh_ollama("load-ms=400")
                results[name] = self.chat_stream(client, model=COLD_MODEL)
            except ollama.ResponseError as err:
                results[name] = {"status": err.status_code, "error": err.error}

        threads = [
            threading.Thread(target=run, args=(name, delay))
            for name, delay in (("running", 0.0), ("waiting", 0.05), ("refused", 0.1))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def cancel(self) -> dict:
        """A stream the client closes after two chunks, and the request that waited behind it."""
        results: dict[str, object] = {}
        started = threading.Event()

        def cancelled() -> None:
            stream = self.fresh_ollama().chat(model=MODEL, messages=QUESTION, stream=True)
            got = 0
            for _ in stream:
                got += 1
                if got == 1:
                    started.set()
                if got == 2:
                    break
            # Closing the generator closes the response and its connection.
            stream.close()
            results["cancelled_after"] = got
            results["cancelled_at"] = time.monotonic()

        def next_one() -> None:
            started.wait(5)
            results["next"] = self.chat_stream(self.fresh_ollama())

        threads = [threading.Thread(target=cancelled), threading.Thread(target=next_one)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def too_long(self) -> dict:
        """A prompt over the context: truncated by /api/generate, refused by /api/embed with
        `truncate: false`."""
        generated = self.ollama.generate(model=MODEL, prompt=LONG_PROMPT, stream=False)
        try:
            self.ollama.embed(model=MODEL, input=LONG_PROMPT, truncate=False)
            refused = None
        except ollama.ResponseError as err:
            refused = {"status": err.status_code, "error": err.error}
        return {"generate": final_fields(generated), "embed": refused}

    def openai_no_usage(self) -> dict:
        """A chat completion stream without `stream_options.include_usage`: no usage at all."""
        stream = self.openai.chat.completions.create(model=MODEL, messages=QUESTION, stream=True)
        content_chunks = 0
        usage = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                content_chunks += 1
            usage = usage or chunk.usage
        return {"content_chunks": content_chunks, "usage": usage is not None}

    def openai_usage(self) -> dict:
        stream = self.openai.chat.completions.create(
            model=MODEL, messages=QUESTION, stream=True, stream_options={"include_usage": True}
        )
        usage = None
        for chunk in stream:
            usage = chunk.usage or usage
        return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}

    def responses(self) -> dict:
        stream = self.openai.responses.create(model=MODEL, input="Why is the sky blue?", stream=True)
        usage = None
        for event in stream:
            if event.type == "response.completed":
                usage = event.response.usage
        return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}

    def anthropic_messages(self) -> dict:
        input_tokens = output_tokens = None
        with self.anthropic.messages.stream(
            model=MODEL, max_tokens=64, messages=QUESTION
        ) as stream:
            for event in stream:
                if event.type == "message_start":
                    input_tokens = event.message.usage.input_tokens
                elif event.type == "message_delta":
                    # Ollama's final count; message_start's is an estimate.
                    input_tokens = event.usage.input_tokens or input_tokens
                    output_tokens = event.usage.output_tokens
        return {"input_tokens": input_tokens, "output_tokens": output_tokens}

    def embeddings(self) -> dict:
        native = self.ollama.embed(model=MODEL, input="Why is the sky blue?")
        compatible = self.openai.embeddings.create(model=MODEL, input="Why is the sky blue?")
        return {
            "embed_prompt_eval_count": native.prompt_eval_count,
            "openai_prompt_tokens": compatible.usage.prompt_tokens,
        }

    def think_and_tools(self) -> dict:
        """A reply that reasons (three thinking tokens, forced), then calls a tool."""
        return self.chat_stream(self.fresh_ollama("think=3"), tools=TOOLS)


def main() -> None:
    driver = Driver(sys.argv[1])
    for line in sys.stdin:
        command = json.loads(line)
        try:
            result = getattr(driver, command["scenario"])()
        except (httpx.HTTPError, ollama.ResponseError, openai.OpenAIError, anthropic.AnthropicError) as err:
            result = {"exception": f"{type(err).__name__}: {err}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
