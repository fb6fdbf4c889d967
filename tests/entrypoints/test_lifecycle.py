"""The server's life: `pagedinfer serve` with --api-key (401 on /v1 without it), flags that stop
start-up, SIGTERM letting a running stream finish, and an engine failure mid-stream (clients get an
error, /health says 503, the process exits non-zero)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.entrypoints.utils import SERVER_DEVICE, ServerProcess

STREAM = dict(model="tiny", prompt="The quick", max_tokens=100, temperature=0, stream=True,
              extra_body={"ignore_eos": True})


def test_serve_cli_with_api_key(tiny_chat_model: Path) -> None:
    with ServerProcess(tiny_chat_model, "--api-key", "secret", cli=True) as server:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, timeout=10)  # no header
        assert response.status_code == 401 and response.json()["error"]["code"] == 401
        assert [model.id for model in server.client(api_key="secret").models.list()][0] == "tiny"
        assert server.client(api_key="secret").completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # stays open
        assert "serving on http://127.0.0.1" in server.output()


@pytest.mark.parametrize("flags, message", [(("--tensor-parallel-size", "2"), "tensor_parallel_size"),
                                            (("--quantization", "awq"), "quantization")])
def test_unsupported_flags_stop_start_up(tiny_chat_model: Path, flags: tuple[str, ...], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pagedinfer.entrypoints.openai.api_server", "--model",
                             str(tiny_chat_model), "--device", SERVER_DEVICE, *flags],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "not supported" in result.stderr


def test_sigterm_lets_a_running_stream_finish(tiny_chat_model: Path) -> None:
    server = ServerProcess(tiny_chat_model)
    with server:
        stream = server.client().completions.create(**STREAM)
        chunks = [next(iter(stream))]
        server.process.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert len("".join(chunk.choices[0].text for chunk in chunks)) > 0
        assert server.process.wait(60) in (0, -signal.SIGTERM)


def test_engine_failure_mid_stream(tiny_chat_model: Path) -> None:
    with ServerProcess(tiny_chat_model, "--fail-after-steps", "30") as server:
        async def run() -> list[BaseException]:
            client = server.async_client()

            async def streamed() -> None:
                async for _ in await client.completions.create(**STREAM):
                    pass

            async def whole() -> None:
                await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=100, extra_body={"ignore_eos": True})

            return await asyncio.wait_for(asyncio.gather(streamed(), whole(), return_exceptions=True), 60)

        errors = asyncio.run(run())
        assert all(isinstance(error, openai.APIError) for error in errors), errors
        assert any("engine failed" in str(error) for error in errors), errors
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
        assert server.process.wait(60) == 1
        assert "injected engine failure" in server.output()
