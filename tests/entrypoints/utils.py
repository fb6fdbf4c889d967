"""A real server process on loopback for the tests, and readers of its /metrics. Every wait is bounded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx
import openai

# Where the server runs: the CPU in CI; `PAGEDINFER_TEST_SERVER_DEVICE=cuda` runs the same tests against a
# server on the GPU (bench/gpu_check.sh serve).
SERVER_DEVICE = os.environ.get("PAGEDINFER_TEST_SERVER_DEVICE", "cpu")
# Small and fast on 2 CPU cores: short sequences, small blocks, a few hundred of them.
DEFAULT_FLAGS = ("--device", SERVER_DEVICE, "--dtype", "float32", "--max-model-len", "128", "--block-size", "4",
                 "--num-gpu-blocks-override", "512", "--max-num-seqs", "64", "--served-model-name", "tiny",
                 "tiny-alias", "--uvicorn-log-level", "warning")
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m pagedinfer.entrypoints.openai.api_server --model MODEL` (or, with cli=True, the
    `pagedinfer serve MODEL` command) on 127.0.0.1; flags replace the defaults of the same name
    (`--x`, value) or are added."""

    def __init__(self, model: Path, *extra_flags: str, wait: bool = True, cli: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pagedinfer-server-", suffix=".log", delete=False)
        entry = (["-m", "pagedinfer.entrypoints.cli", "serve", str(model)] if cli
                 else ["-m", "pagedinfer.entrypoints.openai.api_server", "--model", str(model)])
        command = [sys.executable, *entry, "--host", "127.0.0.1", "--port", str(self.port), *_merge_flags(DEFAULT_FLAGS, extra_flags)]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server did not start in {START_TIMEOUT_S} s:\n{self.output()}")

    def client(self, api_key: str = "not-needed", **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, timeout=60, max_retries=0, **options)

    def async_client(self, api_key: str = "not-needed") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, timeout=120, max_retries=0)

    def metrics(self) -> dict[str, float]:
        """/metrics as {"name{labels}" without the model label: value}, e.g. metrics()["pagedinfer:x"]."""
        values = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                values[_drop_model_label(key)] = float(value)
        return values

    def wait_metric(self, name: str, value: float, timeout: float = 30) -> float:
        """Poll until the metric equals value (gauges are set after each step); its last value."""
        deadline = time.monotonic() + timeout
        while (current := self.metrics().get(name)) != value and time.monotonic() < deadline:
            time.sleep(0.1)
        return current

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> Optional[int]:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        os.unlink(self.log.name)


def _merge_flags(defaults: tuple[str, ...], extra: tuple[str, ...]) -> list[str]:
    """defaults with every flag that extra names dropped (with its values), then extra."""
    given = {flag for flag in extra if flag.startswith("--")}
    merged, skipping = [], False
    for item in defaults:
        if item.startswith("--"):
            skipping = item in given
        if not skipping:
            merged.append(item)
    return merged + list(extra)


def _drop_model_label(key: str) -> str:
    if "{" not in key:
        return key
    name, labels = key[:-1].split("{", 1)
    kept = [label for label in labels.split(",") if label and not label.startswith("model_name=")]
    return f"{name}{{{','.join(kept)}}}" if kept else name
