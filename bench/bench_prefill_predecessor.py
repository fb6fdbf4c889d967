"""How much a prompt kernel's time depends on the kernel that ran just before it, and our ratio to cuDNN
where both follow the same one.

Long tensor-core kernels run at the clock the card's power state allows, and that state is left by what
ran before: on an H200 one prompt of 8,192 tokens took 9-10 % longer after a power-hungry kernel (ours or
cuDNN's) than after a light one (the mma.sync kernel, FlashAttention-2), ours and cuDNN alike. A benchmark
that always runs one kernel after the same neighbour carries that into its ratio (bench/common.py shuffles
each round for that reason). Here each target (ours, cuDNN through torch SDPA) is timed as a CUDA graph of
20 calls right after each predecessor's graph, every (predecessor, target) pair once a round, in a seeded
random order; medians over the rounds.

usage: python bench/bench_prefill_predecessor.py [--rounds N]      writes $OUT/bench_prefill_predecessor.json
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, os.path.dirname(__file__))
import bench_prefill_attention as prefill  # noqa: E402
from common import capture, card_name, print_table, write_json  # noqa: E402

SHAPES = ["1 x 8192 prompt", "16 x 512 prompts"]
CALLS = 20
IDLE_CYCLES = 1_000_000  # torch.cuda._sleep: a spinning kernel of ~0.5 ms, next to no power


def measure(shape: str, rounds: int) -> list[dict]:
    step = prefill.PagedStep(prefill.SHAPES[shape])
    step.run()  # ours' output: make_baseline checks each baseline against it
    cudnn, _, cudnn_err = prefill.make_baseline(step, None, False)
    flash, _, _ = prefill.make_baseline(step, SDPBackend.FLASH_ATTENTION, False)
    if cudnn is None or flash is None or not cudnn_err <= prefill.MAX_ABS_ERR:
        raise SystemExit(f"{shape}: a baseline is missing or disagrees with ours (cuDNN error {cudnn_err})")
    fns = {"ours": step.run, "mma": prefill.with_prefill_kernel("mma", step.run), "cudnn": cudnn,
           "flash": flash, "idle": lambda: torch.cuda._sleep(IDLE_CYCLES)}
    graphs = {name: capture(fn, CALLS) for name, fn in fns.items()}
    pairs = [(before, target) for target in ("ours", "cudnn") for before in graphs]
    samples: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    order = random.Random(1)
    for _ in range(rounds):
        for before, target in order.sample(pairs, len(pairs)):
            graphs[before].replay()
            start.record()
            graphs[target].replay()
            end.record()
            end.synchronize()
            samples[(before, target)].append(start.elapsed_time(end) * 1e3 / CALLS)
    rows = []
    for before in graphs:
        ours, cudnn_us = (statistics.median(samples[(before, t)]) for t in ("ours", "cudnn"))
        rows.append({"shape": shape, "after": before, "ours_us": round(ours, 1), "cudnn_us": round(cudnn_us, 1),
                     "ours_vs_cudnn": round(cudnn_us / ours, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill_predecessor needs a CUDA GPU")
    rows = [row for shape in SHAPES for row in measure(shape, args.rounds)]
    card = card_name()
    print(f"{card}: each target timed as {CALLS} calls right after each predecessor's {CALLS}; "
          f"medians of {args.rounds} rounds")
    print_table(rows, ["shape", "after", "ours_us", "cudnn_us", "ours_vs_cudnn"])
    print("wrote", write_json("bench_prefill_predecessor.json", {"rounds": args.rounds, "calls": CALLS, "rows": rows}))


if __name__ == "__main__":
    main()
