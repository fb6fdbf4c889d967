"""DRAM bytes the prompt kernel moves beside the SDPA baseline's, per bench_prefill_attention shape (Nsight Compute).

The CTAs running at once should share K/V in L2: each (sequence, kv head)'s K/V then comes from DRAM about
once, as the baseline's does. When the item walk read every head's K/V at every row-tile level, 1 x 8,192
read 208 MB where cuDNN read 101, and 8 x 512 over 4,096 1.18 GB (an H200). A diagnostic, not a timing:
ncu replays each kernel with its caches flushed, so the figures are cold-L2 bytes. Needs an ncu that can
read the GPU's counters.

usage: python bench/prefill_dram_traffic.py [SHAPE ...]     writes $OUT/prefill_dram_traffic.json
  default: the shapes without decodes (ours sends those to the decode kernel, which this leaves out);
  it runs itself under ncu with --probe SHAPE (the kernels of one shape, twice each)
"""
from __future__ import annotations

import csv
import glob
import io
import os
import shutil
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_prefill_attention as prefill  # noqa: E402
from common import card_name, print_table, write_json  # noqa: E402

METRICS = ["dram__bytes_read.sum", "dram__bytes_write.sum"]
KERNELS = "regex:wgmma_ws|sdpa|flash|fmha"  # ours, cuDNN's and FlashAttention's


def probe(shape: str) -> None:
    step = prefill.PagedStep(prefill.SHAPES[shape])
    step.run()
    baseline, note, _ = prefill.make_baseline(step, None, False)
    if baseline is None:
        raise SystemExit(f"{shape}: no SDPA baseline ({note})")
    for _ in range(2):
        step.run()
        baseline()
    torch.cuda.synchronize()


def measure(ncu: str, shape: str) -> list[dict]:
    """The last launch of each kernel name: MB read and written."""
    cmd = [ncu, "--clock-control", "none", "--kernel-name", KERNELS, "--metrics", ",".join(METRICS), "--csv",
           sys.executable, __file__, "--probe", shape]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith('"')]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"ncu failed on {shape!r} (rc {run.returncode}): {run.stderr.strip()[-400:]}")
    by_kernel: dict[str, dict] = {}
    for r in csv.DictReader(io.StringIO("\n".join(lines))):
        name = r["Kernel Name"]
        kernel = "ours" if "wgmma_ws" in name else name.removeprefix("void ").split("<")[0].split("(")[0][:40]
        scale = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3}[r["Metric Unit"]]
        mb = float(r["Metric Value"].replace(",", "")) * scale
        by_kernel.setdefault(kernel, {})[r["Metric Name"].split(".")[0].replace("dram__bytes_", "") + "_mb"] = mb
    return [{"shape": shape, "kernel": k, **{c: round(v, 1) for c, v in m.items()}} for k, m in by_kernel.items()]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        return probe(sys.argv[2])
    ncu = shutil.which("ncu") or max(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), default=None)
    if ncu is None or not torch.cuda.is_available():
        raise SystemExit("prefill_dram_traffic needs a CUDA GPU and Nsight Compute (ncu)")
    shapes = sys.argv[1:] or [s for s in prefill.SHAPES if "decodes" not in s]  # mixed: ours' decodes elsewhere
    unknown = [s for s in shapes if s not in prefill.SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {list(prefill.SHAPES)}")
    rows = [row for shape in shapes for row in measure(ncu, shape)]
    print(f"{card_name()}: DRAM traffic, cold L2 (ncu), kernel {prefill.OURS_KERNEL}")
    print_table(rows, ["shape", "kernel", "read_mb", "write_mb"])
    print("wrote", write_json("prefill_dram_traffic.json", {"kernel": prefill.OURS_KERNEL, "rows": rows}))


if __name__ == "__main__":
    main()
