"""The server under load: 64 streams that really overlap, clients that leave mid-request (their blocks
come back), /metrics that add up exactly, and preemption in a tiny KV cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.entrypoints.utils import ServerProcess

LONG = dict(model="tiny", temperature=0, max_tokens=96, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tiny_chat_model: Path) -> Iterator[ServerProcess]:
    # Room for 64 sequences of 100 tokens: no preemption here, so every stream runs from the start.
    with ServerProcess(tiny_chat_model, "--num-gpu-blocks-override", "2048") as process:
        yield process


def test_64_streams_overlap(server: ServerProcess) -> None:
    async def run() -> tuple[list[float], list[float], float]:
        client = server.async_client()
        first_chunks, finishes, running_max = [], [], 0.0
        done = asyncio.Event()

        async def one(i: int) -> None:
            stream = await client.completions.create(prompt=f"Request {i}: the quick", stream=True, **LONG)
            started = False
            async for _ in stream:
                if not started:
                    started = True
                    first_chunks.append(time.monotonic())
            finishes.append(time.monotonic())

        async def watch_running() -> None:
            nonlocal running_max
            async with httpx.AsyncClient(timeout=10) as http:
                while not done.is_set():
                    text = (await http.get(f"{server.url}/metrics")).text
                    running_max = max(running_max, _value(text, "pagedinfer:num_requests_running"))
                    await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch_running())
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), timeout=300)
        done.set()
        await watcher
        return first_chunks, finishes, running_max

    first_chunks, finishes, running_max = asyncio.run(run())
    assert len(first_chunks) == len(finishes) == 64
    assert max(first_chunks) < min(finishes)  # every stream started before any ended
    assert running_max > 1


def test_disconnected_clients_free_their_blocks(server: ServerProcess) -> None:
    before = server.metrics()
    total = before["pagedinfer:num_total_blocks"]
    client = server.client()
    streams = [client.chat.completions.create(messages=[{"role": "user", "content": f"hi {i}"}], stream=True,
                                              **LONG) for i in range(8)]
    for stream in streams:
        next(iter(stream))  # the role chunk
        next(iter(stream))  # some content: the request is running
        stream.close()
    # A non-streamed request (16 prompts, n=4: seconds of work) whose client gives up long before.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", timeout=0.5, json={
            "prompt": [f"{i} quick" for i in range(16)], "n": 4, "temperature": 1, "max_tokens": 120,
            "ignore_eos": True, "model": "tiny"})
    assert server.wait_metric("pagedinfer:num_requests_running", 0) == 0
    assert server.wait_metric("pagedinfer:num_free_blocks", total) == total
    after = server.metrics()
    assert after["pagedinfer:kv_cache_usage_perc"] == 0
    # Aborted, not finished: none of them reached the latency histogram.
    assert after["pagedinfer:e2e_request_latency_seconds_count"] == \
        before["pagedinfer:e2e_request_latency_seconds_count"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_metrics_add_up_exactly(server: ServerProcess) -> None:
    client = server.client()
    before = server.metrics()
    usages = [client.completions.create(prompt="The quick brown", max_tokens=7, model="tiny").usage,
              client.completions.create(prompt=["a b", "c d e"], max_tokens=5, n=2, model="tiny").usage,
              client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=9,
                                             model="tiny").usage]
    chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "yo"}], max_tokens=4,
                                                 model="tiny", stream=True,
                                                 stream_options={"include_usage": True}))
    usages.append(chunks[-1].usage)
    num_requests = 1 + 2 + 1 + 1  # the list of two prompts is two requests
    after = server.metrics()

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0)

    assert delta("pagedinfer:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("pagedinfer:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta("pagedinfer:e2e_request_latency_seconds_count") == num_requests
    assert delta("pagedinfer:time_to_first_token_seconds_count") == num_requests
    assert after["pagedinfer:num_requests_waiting"] == 0
    for name in ("num_requests_swapped", "num_preemptions_total", "prefix_cache_hits_total",
                 "time_per_output_token_seconds_count"):
        assert f"pagedinfer:{name}" in after


def test_preemptions_are_counted_in_a_tiny_cache(tiny_chat_model: Path) -> None:
    # 40 blocks of 4 tokens: 8 sequences of 4 + 60 tokens need 128.
    with ServerProcess(tiny_chat_model, "--num-gpu-blocks-override", "40", "--max-model-len", "128") as server:
        async def run() -> list[int]:
            client = server.async_client()
            responses = await asyncio.wait_for(asyncio.gather(*(
                client.completions.create(prompt=f"{i} quick", model="tiny", max_tokens=60,
                                          extra_body={"ignore_eos": True}) for i in range(8))), timeout=300)
            return [response.usage.completion_tokens for response in responses]

        assert asyncio.run(run()) == [60] * 8
        metrics = server.metrics()
        assert metrics["pagedinfer:num_preemptions_total"] > 0
        assert metrics["pagedinfer:num_free_blocks"] == 40


def _value(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
