"""KV-cache data movement, each against a same-run baseline: swap_blocks vs a pinned copy_ of the same
bytes; copy_blocks and reshape_and_cache vs the same moves written with torch indexing (what a Python
engine would do: one indexed copy per layer, one index_put per K and V).
Llama-3.1-8B cache geometry (32 layers, 8 kv heads, head 128, block 16, bf16).

Prints a table and writes $OUT/bench_cache_ops.json. Run: python bench/bench_cache_ops.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import card_name, print_table, time_interleaved, write_json  # noqa: E402

from pagedinfer import _ops  # noqa: E402

LAYERS, KV_HEADS, HEAD, BLOCK, DTYPE = 32, 8, 128, 16, torch.bfloat16
GPU_BLOCKS, CPU_BLOCKS, SWAP_BLOCKS = 2048, 256, 64


def cache(num_blocks: int, device: str, pin: bool = False) -> torch.Tensor:
    t = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD, dtype=DTYPE)
    return t.pin_memory() if pin else t.to(device)


def bench_swap() -> list[dict]:
    gpu = [cache(GPU_BLOCKS, "cuda") for _ in range(LAYERS)]
    cpu = [cache(CPU_BLOCKS, "cpu", pin=True) for _ in range(LAYERS)]
    gpu_ids = torch.randperm(GPU_BLOCKS)[:SWAP_BLOCKS]
    cpu_ids = torch.randperm(CPU_BLOCKS)[:SWAP_BLOCKS]
    out_map = torch.stack([gpu_ids, cpu_ids], 1)
    in_map = torch.stack([cpu_ids, gpu_ids], 1)
    nbytes = LAYERS * SWAP_BLOCKS * gpu[0][:, 0].numel() * DTYPE.itemsize
    # Baseline: the same bytes as one pinned copy_ each way.
    dev_buf = torch.empty(nbytes // DTYPE.itemsize, dtype=DTYPE, device="cuda")
    host_buf = torch.empty(nbytes // DTYPE.itemsize, dtype=DTYPE).pin_memory()

    # Bit-exact check of the benchmark's own data, both directions.
    _ops.swap_blocks(gpu, cpu, out_map)
    torch.cuda.synchronize()
    ok = all(torch.equal(cpu[l][:, cpu_ids], gpu[l][:, gpu_ids].cpu()) for l in range(LAYERS))
    t = time_interleaved({
        "swap_out": lambda: _ops.swap_blocks(gpu, cpu, out_map),
        "swap_in": lambda: _ops.swap_blocks(cpu, gpu, in_map),
        "copy_d2h": lambda: host_buf.copy_(dev_buf, non_blocking=True),
        "copy_h2d": lambda: dev_buf.copy_(host_buf, non_blocking=True),
    }, calls=5, graph=False)
    rows = []
    for direction, base in (("swap_out", "copy_d2h"), ("swap_in", "copy_h2d")):
        rows.append({"op": f"swap_blocks {direction} ({SWAP_BLOCKS} blocks x {LAYERS} layers)",
                     "us": t[direction], "gbps": nbytes / t[direction] / 1e3,
                     "baseline_gbps": nbytes / t[base] / 1e3, "vs_baseline": t[base] / t[direction],
                     "bit_exact": ok})
    return rows


def bench_copy_blocks() -> list[dict]:
    caches = [cache(GPU_BLOCKS, "cuda") for _ in range(LAYERS)]
    rows = []
    for pairs in (1, 4, 16, 64):
        ids = torch.randperm(GPU_BLOCKS)[:2 * pairs].view(pairs, 2).cuda()
        src, dst = ids[:, 0], ids[:, 1]

        def torch_copy() -> None:
            for c in caches:
                c[:, dst] = c[:, src]

        t = time_interleaved({"copy": lambda: _ops.copy_blocks(caches, ids), "torch": torch_copy},
                             calls=20, graph=False)
        nbytes = 2 * LAYERS * pairs * caches[0][:, 0].numel() * DTYPE.itemsize  # read + write
        rows.append({"op": f"copy_blocks {pairs} pairs x {LAYERS} layers", "us": t["copy"],
                     "gbps": nbytes / t["copy"] / 1e3, "baseline_us": t["torch"],
                     "baseline_gbps": nbytes / t["torch"] / 1e3, "vs_baseline": t["torch"] / t["copy"]})
    return rows


def bench_reshape_and_cache() -> list[dict]:
    kv = cache(GPU_BLOCKS * 4, "cuda")
    rows = []
    for tokens in (256, 8192):
        qkv = torch.randn(tokens, (32 + 2 * KV_HEADS) * HEAD, dtype=DTYPE, device="cuda")
        k = qkv[:, 32 * HEAD:(32 + KV_HEADS) * HEAD].view(tokens, KV_HEADS, HEAD)
        v = qkv[:, (32 + KV_HEADS) * HEAD:].view(tokens, KV_HEADS, HEAD)
        slots = torch.randperm(kv.shape[1] * BLOCK, device="cuda")[:tokens]
        flat_k, flat_v = kv[0].view(-1, KV_HEADS, HEAD), kv[1].view(-1, KV_HEADS, HEAD)

        def torch_write() -> None:
            flat_k[slots] = k
            flat_v[slots] = v

        t = time_interleaved({"w": lambda: _ops.reshape_and_cache(k, v, kv, slots), "torch": torch_write},
                             calls=20)
        nbytes = 2 * 2 * k.numel() * DTYPE.itemsize  # K and V, read + write
        rows.append({"op": f"reshape_and_cache {tokens} tokens", "us": t["w"], "gbps": nbytes / t["w"] / 1e3,
                     "baseline_us": t["torch"], "baseline_gbps": nbytes / t["torch"] / 1e3,
                     "vs_baseline": t["torch"] / t["w"]})
    return rows


def main() -> None:
    torch.manual_seed(0)
    rows = bench_swap() + bench_copy_blocks() + bench_reshape_and_cache()
    fmt = [{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    print(f"\ncache ops on {card_name()}")
    print_table(fmt, ["op", "us", "gbps", "baseline_us", "baseline_gbps", "vs_baseline", "bit_exact"])
    print("baselines: a pinned copy_ of the same bytes (swap), torch indexing (copy_blocks, reshape_and_cache)")
    targets = {f"{r['op']} >= 0.90x pinned copy_": r["vs_baseline"] >= 0.90 for r in rows if "bit_exact" in r}
    for name, ok in targets.items():
        print(f"target {name}: {'MET' if ok else 'MISSED'}")
    print("wrote", write_json("bench_cache_ops.json", {"rows": rows, "targets": targets}))


if __name__ == "__main__":
    main()
