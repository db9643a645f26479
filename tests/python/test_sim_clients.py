"""The official `ollama` and `openai` Python clients against `observer sim`.

If a real client parses the simulator's answers, the wire format is what those clients see
from a real Ollama. Every reply has 4 tokens ("The sky appears blue"); prompt token counts
follow the simulator's estimate: 4 per message + ceil(bytes / 4) per text.
"""

import datetime

import ollama
import openai
import pytest

MODEL = "llama3.2:1b"
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
REPLY = "The sky appears blue"
PROMPT_TOKENS = 4 + 5  # "Why is the sky blue?" is 20 bytes


def assert_final_metrics(final, eval_count=4, prompt_eval_count=PROMPT_TOKENS, done_reason="stop"):
    assert final.done is True
    assert final.done_reason == done_reason
    assert final.eval_count == eval_count
    assert final.prompt_eval_count == prompt_eval_count
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(final, name), int) and getattr(final, name) > 0, name
    # The simulator measures one timeline: the parts add up to the total but for the wait for
    # a parallel slot, which Ollama reports only in the total (none here: one request at once).
    parts = final.load_duration + final.prompt_eval_duration + final.eval_duration
    assert parts <= final.total_duration <= parts + 5_000_000
    assert final.prompt_eval_duration >= 5_000_000
    assert final.eval_duration >= eval_count * 1_000_000


def test_chat_stream_yields_content_then_a_final_chunk_with_metrics(sim):
    client = ollama.Client(host=sim.host)
    chunks = list(client.chat(model=MODEL, messages=QUESTION, stream=True))
    assert len(chunks) == 5
    assert [c.done for c in chunks] == [False] * 4 + [True]
    assert "".join(c.message.content for c in chunks) == REPLY
    assert all(c.message.role == "assistant" and c.model == MODEL for c in chunks)
    assert_final_metrics(chunks[-1])
    assert chunks[-1].load_duration >= 5_000_000, "the first use loads the model"


def test_chat_without_stream_returns_one_response(sim):
    response = ollama.Client(host=sim.host).chat(model=MODEL, messages=QUESTION, stream=False)
    assert response.message.content == REPLY
    assert_final_metrics(response)
    assert isinstance(response.created_at, str) and response.created_at.endswith("Z")


def test_generate_streamed_and_not(sim):
    client = ollama.Client(host=sim.host)
    chunks = list(client.generate(model="qwen2.5:0.5b", prompt="Why is the sky blue?", stream=True))
    assert "".join(c.response for c in chunks) == REPLY
    assert_final_metrics(chunks[-1])
    assert len(chunks[-1].context) == PROMPT_TOKENS + 4

    response = client.generate(model="qwen2.5:0.5b", prompt="Why?", options={"num_predict": 2})
    assert response.response == "The sky"
    assert_final_metrics(response, eval_count=2, prompt_eval_count=5, done_reason="length")


def test_list_and_ps_parse(sim):
    client = ollama.Client(host=sim.host)
    listed = client.list()
    assert [m.model for m in listed.models] == ["llama3.2:1b", "qwen2.5:0.5b"]
    first = listed.models[0]
    assert first.size == 1321098329
    assert first.digest == "baf6a787fdffd633537aa2eb51cfd54cb93ff08e28040095462bb63daf552878"
    assert first.details.family == "llama"
    assert first.details.parameter_size == "1.2B"
    assert first.details.quantization_level == "Q8_0"
    assert isinstance(first.modified_at, datetime.datetime)

    assert client.ps().models == []
    client.chat(model=MODEL, messages=QUESTION, stream=False)
    loaded = client.ps().models
    assert [m.model for m in loaded] == [MODEL]
    assert loaded[0].size_vram == loaded[0].size > first.size
    assert loaded[0].context_length == 4096
    assert loaded[0].expires_at > datetime.datetime.now(datetime.timezone.utc)


def test_missing_model_raises_response_error_404(sim):
    with pytest.raises(ollama.ResponseError) as raised:
        ollama.Client(host=sim.host).chat(model="nope:1b", messages=QUESTION)
    assert raised.value.status_code == 404
    assert raised.value.error == "model 'nope:1b' not found"

    with pytest.raises(ollama.ResponseError) as raised:
        list(ollama.Client(host=sim.host).chat(model="nope:1b", messages=QUESTION, stream=True))
    assert raised.value.status_code == 404


def test_mid_stream_error_surfaces_in_the_ollama_client(sim):
    client = ollama.Client(host=sim.host, headers={"X-Sim-Fault": "error-after=2"})
    received = []
    with pytest.raises(ollama.ResponseError) as raised:
        for chunk in client.chat(model=MODEL, messages=QUESTION, stream=True):
            received.append(chunk.message.content)
    assert received == ["The", " sky"]
    assert raised.value.error == "an error was encountered while running the model: unexpected EOF"


def test_openai_stream_with_usage(sim):
    client = openai.OpenAI(base_url=f"{sim.host}/v1", api_key="x")
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, stream=True, stream_options={"include_usage": True}
        )
    )
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == REPLY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        PROMPT_TOKENS,
        4,
        PROMPT_TOKENS + 4,
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)


def test_openai_without_stream(sim):
    client = openai.OpenAI(base_url=f"{sim.host}/v1", api_key="x")
    completion = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "The sky appears"
    assert completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (PROMPT_TOKENS, 3)
    assert completion.system_fingerprint == "fp_ollama"


def test_openai_models_and_missing_model(sim):
    client = openai.OpenAI(base_url=f"{sim.host}/v1", api_key="x")
    models = client.models.list()
    assert [m.id for m in models.data] == ["llama3.2:1b", "qwen2.5:0.5b"]
    assert {m.owned_by for m in models.data} == {"library"}
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert raised.value.status_code == 404
    assert raised.value.body["message"] == "model 'nope' not found"
