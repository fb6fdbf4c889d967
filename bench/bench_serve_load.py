"""A bounded load test of a running `pagedinfer serve` on loopback: N streamed requests (chat and
completions alternating) at a fixed concurrency, a fraction of the clients disconnecting mid-stream.

Passes (exit 0) with zero 5xx, zero requests past the timeout, and every KV block free again afterwards
(read from /metrics). Prints a JSON summary.

    pagedinfer serve --port 8000 &
    python bench/bench_serve_load.py --url http://127.0.0.1:8000 --requests 500 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import statistics
import sys
import time
from collections import Counter
from urllib.parse import urlparse

import httpx

PROMPTS = ["Explain the difference between TCP and UDP.", "Write a haiku about the sea.",
           "List three prime numbers.", "What is the capital of France?", "Summarize paged attention.",
           "Translate 'good morning' into German.", "日本の首都はどこですか？", "Tell me a joke 😀."]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def one_request(http: httpx.AsyncClient, index: int, args: argparse.Namespace,
                      disconnect: bool) -> tuple[str, float, int]:
    """(outcome, seconds, chunks): outcome is the status code, "disconnected" or "timeout"."""
    chat = index % 2 == 0
    prompt = random.Random(index).choice(PROMPTS)
    body = {"model": args.model, "max_tokens": args.max_tokens, "stream": True, "temperature": 0.7,
            "seed": index, **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    start, chunks = time.monotonic(), 0

    async def stream() -> str:
        nonlocal chunks
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return str(response.status_code)
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    if '"error"' in line[:20]:
                        return "stream error"
                    chunks += 1
                    if disconnect and chunks == 3:
                        return "disconnected"  # leaving the block closes the connection
            return "200"

    try:
        outcome = await asyncio.wait_for(stream(), args.timeout)
    except asyncio.TimeoutError:
        outcome = "timeout"
    return outcome, time.monotonic() - start, chunks


async def run(args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits) as http:
        disconnecting = set(random.Random(0).sample(range(args.requests),
                                                    int(args.requests * args.disconnect_fraction)))
        slots = asyncio.Semaphore(args.concurrency)

        async def limited(index: int) -> tuple[str, float, int]:
            async with slots:
                return await one_request(http, index, args, index in disconnecting)

        start = time.monotonic()
        results = await asyncio.gather(*(limited(i) for i in range(args.requests)))
        elapsed = time.monotonic() - start
        # Aborts are applied between steps: give the engine a moment to free the last blocks.
        deadline = time.monotonic() + 30
        while True:
            text = (await http.get("/metrics")).text
            free, total = metric(text, "pagedinfer:num_free_blocks"), metric(text, "pagedinfer:num_total_blocks")
            running = metric(text, "pagedinfer:num_requests_running")
            if (free == total and running == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    outcomes = Counter(outcome for outcome, _, _ in results)
    completed = [seconds for outcome, seconds, _ in results if outcome == "200"]
    return {
        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "outcomes": dict(outcomes), "seconds": round(elapsed, 1),
        "requests_per_s": round(args.requests / elapsed, 2),
        "chunks_per_s": round(sum(chunks for _, _, chunks in results) / elapsed, 1),
        "latency_p50_s": round(statistics.median(completed), 2) if completed else None,
        "latency_p99_s": round(statistics.quantiles(completed, n=100)[98], 2) if len(completed) > 1 else None,
        "free_blocks_after": free, "total_blocks": total, "running_after": running,
        "generation_tokens_total": metric(text, "pagedinfer:generation_tokens_total"),
        "preemptions_total": metric(text, "pagedinfer:num_preemptions_total"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="the served model name (default: the server's first)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--disconnect-fraction", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    args = parser.parse_args()
    host = urlparse(args.url).hostname or ""
    if not (host == "localhost" or ipaddress.ip_address(host).is_loopback):
        parser.error(f"loopback only: {host} is not a loopback address")
    if args.model is None:
        args.model = httpx.get(f"{args.url}/v1/models", timeout=10).json()["data"][0]["id"]
    summary = asyncio.run(run(args))
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    outcomes = summary["outcomes"]
    failed = (any(outcome not in ("200", "disconnected") for outcome in outcomes)
              or summary["free_blocks_after"] != summary["total_blocks"] or summary["running_after"] != 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
