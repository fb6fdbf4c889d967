"""The OpenAI-compatible server end to end: a real server process on loopback (tiny random Llama on the
CPU), driven by the official `openai` client. Chat, completions, streaming (equal to non-streaming),
n, usage, logprobs, seeds, every refusal, unknown fields, and the non-/v1 routes."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.entrypoints.utils import ServerProcess

GREEDY = dict(model="tiny", temperature=0)
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return server.client()


def tokenize(server: ServerProcess, **body) -> list[int]:
    return httpx.post(f"{server.url}/tokenize", json=body, timeout=10).json()["tokens"]


def test_models_lists_every_served_name(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["tiny", "tiny-alias"]


def test_chat_renders_the_template_and_counts_usage(server: ServerProcess, client: openai.OpenAI) -> None:
    response = client.chat.completions.create(messages=MESSAGES, max_tokens=8, **GREEDY)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == "tiny"
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == len(tokenize(server, messages=MESSAGES))
    assert 1 <= response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    # The alias answers the same (greedy), under its own name.
    alias = client.chat.completions.create(messages=MESSAGES, max_tokens=8, temperature=0, model="tiny-alias")
    assert alias.model == "tiny-alias" and alias.choices[0].message.content == choice.message.content


def test_chat_without_max_tokens_may_fill_the_context(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(messages=MESSAGES, extra_body={"ignore_eos": True}, **GREEDY)
    assert response.usage.total_tokens == 128 and response.choices[0].finish_reason == "length"
    # max_completion_tokens is OpenAI's newer name for max_tokens.
    response = client.chat.completions.create(messages=MESSAGES, max_completion_tokens=3,
                                              extra_body={"ignore_eos": True}, **GREEDY)
    assert response.usage.completion_tokens == 3


def test_completions_default_to_16_tokens_and_accept_token_ids(client: openai.OpenAI) -> None:
    response = client.completions.create(prompt="The quick brown", extra_body={"ignore_eos": True}, **GREEDY)
    assert response.usage.completion_tokens == 16 and response.choices[0].finish_reason == "length"
    by_ids = client.completions.create(prompt=[0, 84, 85, 86], max_tokens=5, **GREEDY)
    assert by_ids.usage.prompt_tokens == 4


def test_list_prompts_with_n_give_prompt_major_choices(client: openai.OpenAI) -> None:
    prompts = ["The quick brown fox", "日本語のテキスト"]
    options = dict(max_tokens=6, extra_body={"ignore_eos": True}, **GREEDY)
    singles = [client.completions.create(prompt=p, **options) for p in prompts]
    response = client.completions.create(prompt=prompts, n=2, **options)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    texts = [single.choices[0].text for single in singles]
    assert [c.text for c in response.choices] == [texts[0], texts[0], texts[1], texts[1]]
    assert response.usage.completion_tokens == 4 * 6
    assert response.usage.prompt_tokens == sum(single.usage.prompt_tokens for single in singles)


def _stop_string_of(text: str) -> str:
    """Two characters from the middle of a greedy output: a stop string that really stops it."""
    assert len(text) >= 6, text
    return text[len(text) // 2:len(text) // 2 + 2]


@pytest.mark.parametrize("prompt", ["The quick brown fox", "Ça coûte 😀 à Zürich", "日本語のテキストも"])
@pytest.mark.parametrize("use_stop", [False, True])
def test_streamed_completion_equals_non_streamed(client: openai.OpenAI, prompt: str, use_stop: bool) -> None:
    options = dict(prompt=prompt, max_tokens=24, extra_body={"ignore_eos": True}, **GREEDY)
    if use_stop:
        options["stop"] = [_stop_string_of(client.completions.create(**options).choices[0].text)]
    whole = client.completions.create(**options).choices[0]
    chunks = list(client.completions.create(stream=True, **options))
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])
    if use_stop:
        assert whole.finish_reason == "stop" and options["stop"][0] not in whole.text


@pytest.mark.parametrize("content", ["Say hi.", "絵文字 😀🎉 と日本語"])
def test_streamed_chat_equals_non_streamed(client: openai.OpenAI, content: str) -> None:
    options = dict(messages=[{"role": "user", "content": content}], max_tokens=20,
                   extra_body={"ignore_eos": True}, **GREEDY)
    whole = client.chat.completions.create(**options)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **options))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.choices[0].delta.role is None for chunk in chunks[1:-1])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_n_and_seeded_sampling(client: openai.OpenAI) -> None:
    options = dict(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0, n=2)
    first = client.chat.completions.create(seed=7, **options)
    again = client.chat.completions.create(seed=7, **options)
    other = client.chat.completions.create(seed=8, **options)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in again.choices]
    assert texts != [c.message.content for c in other.choices]
    assert texts[0] != texts[1]  # the siblings sample independently
    best = client.completions.create(model="tiny", prompt="The quick", max_tokens=6, temperature=1.0,
                                     best_of=3, n=2, seed=1)
    assert [c.index for c in best.choices] == [0, 1]
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(seed=7, stream=True, **options):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[0], streamed[1]] == texts


def test_logprobs(client: openai.OpenAI) -> None:
    response = client.completions.create(prompt="The quick", max_tokens=5, logprobs=2,
                                         extra_body={"ignore_eos": True}, **GREEDY)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert "".join(logprobs.tokens) == response.choices[0].text
    for value, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert value <= 0 and max(top.values()) == pytest.approx(value)  # greedy: the top token
    echoed = client.completions.create(prompt="The quick", max_tokens=5, logprobs=1, echo=True,
                                       extra_body={"ignore_eos": True}, **GREEDY).choices[0]
    assert echoed.text == "The quick" + response.choices[0].text
    assert echoed.logprobs.token_logprobs[0] is None and echoed.logprobs.token_logprobs[-5:] == pytest.approx(
        logprobs.token_logprobs)

    chat = client.chat.completions.create(messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=3,
                                          **GREEDY).choices[0]
    assert len(chat.logprobs.content) == 4
    for token in chat.logprobs.content:
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].logprob == pytest.approx(token.logprob)


def test_vllm_extras_and_unknown_fields_are_accepted(server: ServerProcess, client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        messages=MESSAGES, max_tokens=6, user="someone", store=False, **GREEDY,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 6, "ignore_eos": True,
                    "stop_token_ids": [1], "skip_special_tokens": True, "include_stop_str_in_output": False,
                    "no_such_field": {"x": 1}, "response_format": {"type": "text"}})
    assert response.usage.completion_tokens == 6
    assert "ignoring unknown fields" in server.output()


def post(server: ServerProcess, path: str, body: object, **headers: str) -> httpx.Response:
    content = body if isinstance(body, str) else None
    return httpx.post(f"{server.url}{path}", timeout=30, headers=headers,
                      **({"content": content} if content is not None else {"json": body}))


BAD_REQUESTS = {
    "malformed JSON": ("/v1/chat/completions", '{"model": "tiny", "messages": ['),
    "no messages": ("/v1/chat/completions", {"model": "tiny"}),
    "empty messages": ("/v1/chat/completions", {"model": "tiny", "messages": []}),
    "negative temperature": ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}),
    "n = 0": ("/v1/completions", {"prompt": "hi", "n": 0}),
    "top_p = 0": ("/v1/completions", {"prompt": "hi", "top_p": 0}),
    "max_tokens = 0": ("/v1/completions", {"prompt": "hi", "max_tokens": 0}),
    "string max_tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}),
    "suffix": ("/v1/completions", {"prompt": "hi", "suffix": "bye"}),
    "json_object": ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_object"}}),
    "json_schema": ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema"}}),
    "top_logprobs without logprobs": ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}),
    "top_logprobs over 20": ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}),
    "a template that refuses the roles": ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}),
    "prompt over max_model_len": ("/v1/completions", {"prompt": list(range(2, 131)), "max_tokens": 1}),
    "prompt + max_tokens over it": ("/v1/completions", {"prompt": "The quick", "max_tokens": 126}),
    "token id outside the vocabulary": ("/v1/completions", {"prompt": [5, 100000]}),
    "empty prompt": ("/v1/completions", {"prompt": []}),
    "best_of < n": ("/v1/completions", {"prompt": "hi", "n": 3, "best_of": 2, "temperature": 1}),
    "best_of > n streamed": ("/v1/completions", {"prompt": "hi", "best_of": 2, "temperature": 1, "stream": True}),
    "n over max_num_seqs": ("/v1/completions", {"prompt": "hi", "n": 65, "temperature": 1}),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_get_400_and_the_server_goes_on(server: ServerProcess, name: str) -> None:
    path, body = BAD_REQUESTS[name]
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["code"] == 400
    if name.startswith("prompt"):
        assert error["param"] in ("prompt", "max_tokens") and "maximum context length is 128" in error["message"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_the_openai_client_sees_400_and_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(messages=MESSAGES, model="tiny", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(messages=MESSAGES, model="gpt-4o")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(prompt="hi", model="gpt-4o", stream=True)


def test_tokenize_detokenize_version_health(server: ServerProcess) -> None:
    tokens = tokenize(server, prompt="The quick brown fox")
    assert post(server, "/detokenize", {"tokens": tokens}).json()["prompt"] == "The quick brown fox"
    assert httpx.get(f"{server.url}/version", timeout=10).json()["version"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
