"""Quick GPU check of the prompt-chunk kernels, with a diagnosis when one is wrong (seconds to run).

For each PAGEDINFER_PREFILL_KERNEL choice (wgmma_ws, mma) and a few shapes, prints the max error
against the fp32 reference, and for a wrong kernel where it is wrong:
  * "uniform": the softmax scale ~0 makes every visible key weigh the same, so the output is the mean of V
    over the row's keys whatever Q·K^T gives: wrong here (and the QK-free rows below) points at P·V (V's
    shared-memory layout or descriptor, the P fragments), right here but wrong at the normal scale points at
    Q·K^T (Q or K layout / descriptor) or the softmax.
  * which 8-dim chunks of the head and which (token, head) rows (mod 64, the warpgroup rows) carry the error.
Run: python bench/prefill_kernel_smoke.py   (exit status 1 if any kernel is wrong)
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pagedinfer import _ops  # noqa: E402
from tests.kernels.reference import ref_paged_attention  # noqa: E402
from tests.kernels.utils import PAD, make_paged_inputs  # noqa: E402

KERNELS = ["wgmma_ws", "mma"]
SHAPES = {  # name -> (specs, num_heads, num_kv_heads, head_size, block_size, window)
    "1 seq x 128, group 1, head 128": ([(0, 128)], 1, 1, 128, 16, -1),
    "GQA 4, chunk over context, head 128": ([(300, 200), (0, 64), (PAD, 3), (20, 1)], 8, 2, 128, 16, -1),
    "GQA 4, window 100, block 32": ([(300, 200), (1000, 129)], 8, 2, 128, 32, 100),
    "GQA 3, head 64, fp16 block 8": ([(0, 257), (17, 95)], 6, 2, 64, 8, -1),
}


def run(inputs, scale: float, window: int, kernel: str) -> torch.Tensor:
    os.environ["PAGEDINFER_PREFILL_KERNEL"] = kernel
    out = torch.full_like(inputs.query, float("nan"))
    _ops.paged_attention(out, inputs.query, inputs.kv_cache, *inputs.metadata, inputs.max_query_len, scale,
                         window, None)
    torch.cuda.synchronize()
    return out


def diagnose(err: torch.Tensor) -> str:
    # err: [tokens, heads, dims] abs error. Chunks of 8 dims, and rows (token-major (token, head) pairs).
    chunk_err = err.amax(dim=(0, 1)).view(-1, 8).amax(dim=1)
    bad_chunks = [i for i, e in enumerate(chunk_err.tolist()) if e > 0.05]
    rows = err.amax(dim=2).reshape(-1)
    bad_rows = (rows > 0.05).nonzero().flatten().tolist()
    mod64 = sorted({r % 64 for r in bad_rows})
    return (f"bad 8-dim chunks {bad_chunks}; {len(bad_rows)} bad rows of {rows.numel()}, first {bad_rows[:8]}, "
            f"rows mod 64 {mod64[:16]}{'...' if len(mod64) > 16 else ''}")


def main() -> int:
    torch.manual_seed(0)
    _ops.set_debug_checks(True)
    wrong = False
    for name, (specs, heads, kv_heads, head, block, window) in SHAPES.items():
        dtype = torch.float16 if "fp16" in name else torch.bfloat16
        inputs = make_paged_inputs(specs, num_heads=heads, num_kv_heads=kv_heads, head_size=head,
                                   block_size=block, dtype=dtype, device="cuda")
        for label, scale in (("normal", 1.1 / head ** 0.5), ("uniform", 1e-6)):
            ref = ref_paged_attention(inputs.query, inputs.kv_cache, *inputs.metadata, scale, window,
                                      dtype=torch.float32)
            for kernel in KERNELS:
                out = run(inputs, scale, window, kernel).float()
                err = (out - ref).abs().nan_to_num(nan=float("inf"))
                worst = err.max().item()
                ok = worst < 0.05
                wrong |= not ok
                line = f"{name:40s} {label:8s} {kernel:13s} max err {worst:.3g} {'ok' if ok else 'WRONG'}"
                if not ok:
                    line += "  " + diagnose(err)
                print(line)
    os.environ.pop("PAGEDINFER_PREFILL_KERNEL", None)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
