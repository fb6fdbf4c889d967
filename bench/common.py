"""Shared pieces of the GPU benchmarks: card name, graph-replay timing, the read ceiling, JSON output."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
from typing import Callable

import torch


def card_name() -> str:
    if not torch.cuda.is_available():  # CPU smoke runs (bench_offline.py --smoke) still name their machine
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return torch.cuda.get_device_name()


def out_dir() -> str:
    path = os.environ.get("OUT", "bench_out")
    os.makedirs(path, exist_ok=True)
    return path


def capture(fn: Callable[[], None], calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` back-to-back calls of fn: replaying it times the kernels, not the launches."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the graph (allocator, lazy init)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def time_interleaved(fns: dict[str, Callable[[], None]], calls: int = 20, repeats: int = 7,
                     graph: bool = True) -> dict[str, float]:
    """Median µs per call of each fn over `repeats` interleaved rounds of `calls` calls, each round
    timed with events: a replayed CUDA graph of the calls, or (graph=False) the calls queued eagerly,
    for ops that copy host data and so are not captured. Each round runs the fns in its own (seeded)
    random order: a long kernel's time depends on what ran just before it (the card's power state: on an
    H200 up to 10 %, bench_prefill_predecessor.py), which one fixed order would carry into the ratios."""
    if graph:
        graphs = {name: capture(fn, calls) for name, fn in fns.items()}
        rounds = {name: g.replay for name, g in graphs.items()}
    else:
        rounds = {name: (lambda fn=fn: [fn() for _ in range(calls)]) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for run in rounds.values():  # one untimed round each
        run()
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(list(rounds), len(rounds)):
            run = rounds[name]
            start.record()
            run()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) * 1e3 / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


_read_kernel = None


def read_ceiling_gbps(nbytes: int = 4 << 30) -> float:
    """GB/s of our own vectorized read-only kernel (Triton) over a buffer far larger than L2."""
    global _read_kernel
    import triton
    import triton.language as tl

    if _read_kernel is None:
        @triton.jit
        def read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
            pid, nprog = tl.program_id(0), tl.num_programs(0)
            acc = tl.zeros([BLOCK], tl.float32)
            for start in range(pid * BLOCK, n, nprog * BLOCK):
                offs = start + tl.arange(0, BLOCK)
                acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
            tl.store(out_ptr + pid, tl.sum(acc))

        _read_kernel = read_kernel
    x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    grid = torch.cuda.get_device_properties(0).multi_processor_count * 8
    partial = torch.empty(grid, dtype=torch.float32, device="cuda")
    us = time_interleaved({"read": lambda: _read_kernel[(grid,)](x, partial, x.numel(), BLOCK=4096)},
                          calls=5)["read"]
    del x
    return nbytes / us / 1e3


def write_json(name: str, payload: dict, card: str | None = None) -> str:
    """card: given by a caller that must not touch CUDA itself (a parent of the processes that ran)."""
    path = os.path.join(out_dir(), name)
    with open(path, "w") as f:
        json.dump({"card": card or card_name(), "torch": torch.__version__, **payload}, f, indent=2)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)))
