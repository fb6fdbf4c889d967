"""paged_attention against ref_paged_attention, with a bound derived from a same-precision reference."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from pagedinfer import _ops
from tests.kernels.reference import ref_paged_attention, ref_reshape_and_cache, token_slot
from tests.kernels.utils import (FLOAT_DTYPES, PAD, PagedInputs, assert_close_to_ref, cdiv,
                                 make_paged_inputs, randn, random_seq_specs)


def softmax_scale(head_size: int) -> float:
    # Not exactly 1/sqrt(head_size): a kernel that ignores `scale` must fail.
    return 1.1 / math.sqrt(head_size)


def run_attention(inputs: PagedInputs, scale: float, sliding_window: int = -1,
                  workspace: torch.Tensor | None = None,
                  max_query_len: int | None = None) -> torch.Tensor:
    # NaN-filled so that any output element the kernel forgets to write fails the comparison.
    out = torch.full(inputs.query.shape, float("nan"), dtype=inputs.query.dtype,
                     device=inputs.query.device)
    _ops.paged_attention(out, inputs.query, inputs.kv_cache, *inputs.metadata,
                         inputs.max_query_len if max_query_len is None else max_query_len,
                         scale, sliding_window, workspace)
    return out


def assert_matches_ref(out: torch.Tensor, inputs: PagedInputs, scale: float, sliding_window: int = -1,
                       name: str = "paged_attention") -> None:
    """`out` against the reference on the metadata `inputs` holds now, in the inputs' dtype."""
    assert_close_to_ref(out, lambda dtype: ref_paged_attention(
        inputs.query, inputs.kv_cache, *inputs.metadata, scale, sliding_window, dtype=dtype),
        inputs.query.dtype, name=name)


def check_attention(inputs: PagedInputs, scale: float, sliding_window: int = -1,
                    workspace: torch.Tensor | None = None) -> None:
    assert_matches_ref(run_attention(inputs, scale, sliding_window, workspace), inputs, scale, sliding_window)


# On an sm_90 GPU (with sm_90a code) prompt chunks run wgmma_ws_prefill_kernel.cuh (warp-specialized);
# PAGEDINFER_PREFILL_KERNEL=mma (read by the launcher at every call) selects the mma.sync kernel instead,
# the one other GPUs run, and =wgmma_ws_whole the wgmma kernel without half-width diagonal tiles (which the
# launcher otherwise uses where no sequence sees over 1,024 keys). Tests with prompt chunks run under all three
# (PREFILL_KERNELS). On the CPU every choice takes the same path: the CPU runs only the first
# (tests/conftest.py deselects the others).
@pytest.fixture
def prefill_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PAGEDINFER_PREFILL_KERNEL", request.param)
    return request.param


PREFILL_KERNELS = pytest.mark.parametrize("prefill_kernel", ["wgmma_ws", "wgmma_ws_whole", "mma"], indirect=True)


# (context_len, q_len) per sequence; PAD: a padded row (seq_len 0). Lengths straddle multiples of
# 8, 16 and 32 (one before, at, after) and leave partial last blocks.
CASES = {
    "single_token": [(0, 1)],
    "decode_ragged_batch17": [(c, 1) for c in (0, 1, 6, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100,
                                               129, 250)],
    "prefill_from_empty": [(0, 37), (0, 16), (0, 1), (0, 50)],
    "chunked_prefill": [(45, 19), (128, 33), (1, 7), (16, 16)],
    "mixed_prefill_decode": [(0, 23), (57, 1), (100, 17), (15, 1), (0, 1), (200, 9), (31, 1)],
    "decode_with_padded_rows": [(20, 1), (PAD, 1), (40, 1), (PAD, 1), (PAD, 1)],
    "mixed_with_padded_rows": [(30, 5), (PAD, 3), (12, 1), (PAD, 1)],
    "all_padded": [(PAD, 1), (PAD, 1)],
}


@PREFILL_KERNELS
@pytest.mark.parametrize("sliding_window", [-1, 1, 19])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("case", list(CASES))
def test_batch_shapes(device, prefill_kernel, case, block_size, dtype, sliding_window):
    inputs = make_paged_inputs(CASES[case], num_heads=8, num_kv_heads=2, head_size=64,
                               block_size=block_size, dtype=dtype, device=device)
    check_attention(inputs, softmax_scale(64), sliding_window)


@pytest.mark.parametrize("max_query_len", [0, 1])
def test_empty_batch(device, max_query_len):
    # No sequences at all: nothing to read or write, whichever path max_query_len selects.
    inputs = make_paged_inputs([], num_heads=8, num_kv_heads=2, head_size=64, block_size=16,
                               dtype=torch.bfloat16, device=device)
    out = run_attention(inputs, 0.125, max_query_len=max_query_len)
    assert out.shape == (0, 8, 64)


# "decode": every q_len 1 (on CUDA the split-KV path); "mixed": prefill chunks among decodes.
STEPS = pytest.mark.parametrize("step", ["decode", "mixed"])


@PREFILL_KERNELS
@STEPS
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_kv_heads, group", [(4, 1), (2, 3), (2, 4), (2, 7), (1, 8), (1, 32)])
def test_gqa_groups(device, prefill_kernel, num_kv_heads, group, dtype, step):
    max_context = 150 if device == "cpu" else 1500
    specs = random_seq_specs(9, max_context=max_context, max_q_len=24,
                             decode_fraction=1.0 if step == "decode" else 0.5)
    inputs = make_paged_inputs(specs, num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                               head_size=128, block_size=16, dtype=dtype, device=device)
    check_attention(inputs, softmax_scale(128))


@PREFILL_KERNELS
@STEPS
@pytest.mark.parametrize("window", ["off", "block_size+1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_head_and_block_sizes(device, prefill_kernel, block_size, head_size, dtype, window, step):
    # On CUDA, 64 and 128 in 16-bit types take the tensor-core kernels (block sizes 16 and 32
    # specialized, others generic); other head sizes and float32 the SIMT kernel.
    max_context = 3 * block_size + 5 if device == "cpu" else 40 * block_size + 5
    specs = random_seq_specs(6, max_context=max_context, max_q_len=block_size + 3,
                             decode_fraction=1.0 if step == "decode" else 0.5)
    inputs = make_paged_inputs(specs, num_heads=8, num_kv_heads=2, head_size=head_size,
                               block_size=block_size, dtype=dtype, device=device)
    check_attention(inputs, softmax_scale(head_size), -1 if window == "off" else block_size + 1)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_new_tokens_written_then_read(device, dtype):
    """A step as the engine runs it: reshape_and_cache writes the new tokens' K/V at slot_mapping,
    then paged_attention reads them back through the block tables (the two ops agree on slots)."""
    inputs = make_paged_inputs(CASES["mixed_with_padded_rows"] + CASES["chunked_prefill"], num_heads=8,
                               num_kv_heads=4, head_size=128, block_size=16, dtype=dtype, device=device)
    num_tokens = inputs.query.shape[0]
    key = randn(num_tokens, 4, 128, dtype=dtype, device=device)
    value = randn(num_tokens, 4, 128, dtype=dtype, device=device)
    expected_cache = inputs.kv_cache.clone()
    ref_reshape_and_cache(key, value, expected_cache, inputs.slot_mapping)
    _ops.reshape_and_cache(key, value, inputs.kv_cache, inputs.slot_mapping)
    assert torch.equal(inputs.kv_cache, expected_cache)
    check_attention(inputs, softmax_scale(128))


@PREFILL_KERNELS
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_strided_query(device, prefill_kernel, dtype):
    # query as the engine passes it: a [num_tokens, num_heads, head_size] view of a wider qkv row.
    inputs = make_paged_inputs(CASES["mixed_with_padded_rows"] + CASES["mixed_prefill_decode"],
                               num_heads=12, num_kv_heads=4, head_size=64, block_size=16, dtype=dtype,
                               device=device, strided_query=True)
    assert inputs.query.stride(0) > 12 * 64
    check_attention(inputs, softmax_scale(64))


@PREFILL_KERNELS
@pytest.mark.parametrize("sliding_window", [-1, 10])
def test_stale_cache_contents_are_never_read(device, prefill_kernel, sliding_window):
    """Everything outside the sequences' contexts is NaN: free blocks, the tail of each partial last
    block, and the stale table columns (pointed at free blocks). A kernel that lets any of it into
    the result (e.g. 0 * NaN from a masked V row of a partial block) fails. A fresh cache from
    torch.empty can hold NaN bit patterns, so this is a real case, not a contrivance."""
    block_size = 16
    inputs = make_paged_inputs(CASES["mixed_with_padded_rows"] + [(7, 1), (0, 20)], num_heads=8,
                               num_kv_heads=2, head_size=64, block_size=block_size,
                               dtype=torch.bfloat16, device=device, free_blocks=4)
    lens, tables = inputs.seq_lens.tolist(), inputs.block_tables.tolist()
    live = torch.zeros(inputs.kv_cache.shape[1] * block_size, dtype=torch.bool)
    for table, seq_len in zip(tables, lens):
        live[[token_slot(table, p, block_size) for p in range(seq_len)]] = True
    flat = inputs.kv_cache.view(2, -1, *inputs.kv_cache.shape[3:])
    flat[:, ~live.to(device)] = float("nan")

    used = [cdiv(seq_len, block_size) for seq_len in lens]
    used_blocks = {table[j] for table, n in zip(tables, used) for j in range(n)}
    free = [b for b in range(inputs.kv_cache.shape[1]) if b not in used_blocks]
    for i, n in enumerate(used):
        inputs.block_tables[i, n:] = free[i % len(free)]
    check_attention(inputs, softmax_scale(64), sliding_window)


def test_unaligned_out(device):
    # `out` as a view 2 bytes into its buffer: on CUDA the prompt-chunk kernel (16-byte vector stores)
    # must hand such a launch to the per-token kernels rather than fault or write misaligned.
    inputs = make_paged_inputs(CASES["chunked_prefill"] + CASES["mixed_with_padded_rows"], num_heads=8,
                               num_kv_heads=2, head_size=64, block_size=16, dtype=torch.bfloat16,
                               device=device)
    buffer = torch.full((inputs.query.numel() + 1,), float("nan"), dtype=inputs.query.dtype, device=device)
    out = buffer[1:].view(inputs.query.shape)
    scale = softmax_scale(64)
    _ops.paged_attention(out, inputs.query, inputs.kv_cache, *inputs.metadata, inputs.max_query_len,
                         scale, -1, None)
    assert_matches_ref(out, inputs, scale)


def graph_replay_check(step: Callable[[], None], out: torch.Tensor, inputs: PagedInputs, scale: float,
                       sliding_window: int) -> Callable[[], None]:
    """Captures `step` in a CUDA graph (warmed up outside the capture) and returns a check that replays it
    into a NaN-filled `out` and compares with the reference on whatever metadata `inputs` holds then."""
    _ops.set_debug_checks(False)  # they copy metadata to the host: not allowed while capturing
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def check() -> None:
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_ref(out, inputs, scale, sliding_window, name="graph replay")
    return check


# ---- CUDA only: long contexts (split-KV) and CUDA graphs ----------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("use_workspace", [False, True])
@pytest.mark.parametrize("sliding_window", [-1, 1000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("specs", [
    [(c, 1) for c in (1, 511, 2047, 4096, 8191, 12345, 300)],
    [(3000, 100), (4999, 1), (0, 257), (7000, 1), (PAD, 1), (64, 64)],
], ids=["decode", "mixed"])
def test_long_contexts(specs, dtype, sliding_window, use_workspace):
    # Contexts of thousands of tokens cross many splits of the split-KV decode path.
    head_size, block_size = 128, 16
    inputs = make_paged_inputs(specs, num_heads=32, num_kv_heads=8, head_size=head_size,
                               block_size=block_size, dtype=dtype, device="cuda")
    workspace = None
    if use_workspace:
        workspace = _ops.paged_attention_workspace(len(specs), 32, 8, head_size,
                                                   inputs.block_tables.shape[1], block_size, "cuda")
    check_attention(inputs, softmax_scale(head_size), sliding_window, workspace)


@pytest.mark.gpu
@pytest.mark.parametrize("sliding_window", [-1, 3000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graph_decode_with_growing_contexts(dtype, sliding_window):
    """Capture decode at short contexts, then rewrite the metadata in place so that contexts grow past
    many splits: nothing the kernel decides on the host may depend on this step's data."""
    num_heads, num_kv_heads, head_size, block_size, max_blocks = 32, 8, 128, 16, 640
    short = [(5, 1), (PAD, 1), (30, 1), (0, 1), (17, 1), (PAD, 1), (47, 1), (2, 1)]
    long = [(10_000, 1), (PAD, 1), (16 * max_blocks - 1, 1), (4096, 1), (1, 1), (300, 1), (PAD, 1),
            (5555, 1)]
    build = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                 block_size=block_size, dtype=dtype, device="cuda", max_blocks_per_seq=max_blocks)
    inputs = make_paged_inputs(short, **build)
    grown = make_paged_inputs(long, **build)
    inputs.kv_cache = grown.kv_cache  # one pool for both steps: the long step's, the larger
    scale = softmax_scale(head_size)
    workspace = _ops.paged_attention_workspace(len(short), num_heads, num_kv_heads, head_size,
                                               max_blocks, block_size, "cuda")
    out = torch.empty_like(inputs.query)

    def step():
        _ops.paged_attention(out, inputs.query, inputs.kv_cache, *inputs.metadata, 1, scale,
                             sliding_window, workspace)

    check = graph_replay_check(step, out, inputs, scale, sliding_window)
    check()
    for name in ("query", "query_start_loc", "seq_lens", "block_tables"):
        getattr(inputs, name).copy_(getattr(grown, name))
    check()
    assert (out[[1, 6]] == 0).all()  # padded rows


def launched_kernels(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    """`run`'s result and the names of the attention kernels it launched (profiled)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = run()
        torch.cuda.synchronize()
    return out, [e.key for e in prof.key_averages() if "attention" in e.key]


@pytest.mark.gpu
@pytest.mark.parametrize("use_workspace", [False, True])
@pytest.mark.parametrize("mixed", [False, True], ids=["decode", "mixed"])
def test_multi_wave_decode_runs_longest_first(mixed, use_workspace):
    """A decode launch of more than one wave of CTAs serves its sequences longest first: an order kernel
    ranks them on the device (prompt chunks of a mixed step and padded rows last) and the decode kernel reads
    its sequence through that order. 300 ragged decodes x 8 kv heads = 2400 CTAs; one decode per wave would
    not be ordered."""
    specs = [(int(c), 1) for c in torch.randint(0, 3000, (300,))] + [(PAD, 1)] * 5
    if mixed:
        specs += [(100, 40), (0, 70)]
    inputs = make_paged_inputs(specs, num_heads=32, num_kv_heads=8, head_size=128, block_size=16,
                               dtype=torch.bfloat16, device="cuda")
    scale = softmax_scale(128)
    workspace = None
    if use_workspace:
        workspace = _ops.paged_attention_workspace(len(specs), 32, 8, 128, inputs.block_tables.shape[1], 16,
                                                   "cuda")
    out, kernels = launched_kernels(lambda: run_attention(inputs, scale, -1, workspace))
    assert_matches_ref(out, inputs, scale)
    assert any("decode_order_kernel" in k for k in kernels), kernels
    few = make_paged_inputs(specs[:8], num_heads=32, num_kv_heads=8, head_size=128, block_size=16,
                            dtype=torch.bfloat16, device="cuda")
    _, kernels = launched_kernels(lambda: run_attention(few, scale))
    assert not any("decode_order_kernel" in k for k in kernels), kernels


@pytest.mark.gpu
def test_cuda_graph_ordered_decode_with_new_lengths():
    """The order is computed on the device at every replay: a graph captured on one ragged batch, replayed
    after every length changed (longest and shortest swapped places), still matches the reference."""
    num_heads, num_kv_heads, head_size, block_size, max_blocks = 32, 8, 128, 16, 256
    contexts = torch.randint(0, 4000, (300,))
    # The same lengths with the order reversed (longest and shortest swap places): both steps need as many
    # blocks, so the second step's pool also holds every block id of the first step's tables.
    ranked = contexts.sort(descending=True, stable=True)
    swapped = torch.empty_like(contexts)
    swapped[ranked.indices] = ranked.values.flip(0)
    first = [(int(c), 1) for c in contexts]
    second = [(int(c), 1) for c in swapped]
    build = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                 block_size=block_size, dtype=torch.bfloat16, device="cuda", max_blocks_per_seq=max_blocks)
    inputs = make_paged_inputs(first, **build)
    changed = make_paged_inputs(second, **build)
    inputs.kv_cache = changed.kv_cache  # one pool for both steps
    scale = softmax_scale(head_size)
    workspace = _ops.paged_attention_workspace(len(first), num_heads, num_kv_heads, head_size, max_blocks,
                                               block_size, "cuda")
    out = torch.empty_like(inputs.query)

    def step():
        _ops.paged_attention(out, inputs.query, inputs.kv_cache, *inputs.metadata, 1, scale, -1, workspace)

    check = graph_replay_check(step, out, inputs, scale, -1)
    check()
    for name in ("query", "query_start_loc", "seq_lens", "block_tables"):
        getattr(inputs, name).copy_(getattr(changed, name))
    check()


# ---- CUDA only: the prompt-chunk kernels' tiling -------------------------------------------------------
# On CUDA, max_query_len > 1 in fp16/bf16 with head 64/128 runs wgmma_ws_prefill_kernel.cuh on sm_90, else
# (and under PAGEDINFER_PREFILL_KERNEL=mma) mma_prefill_kernel.cuh; all: items of 128 (token, head) rows,
# token-major, against 64-key tiles (128 in the warp-specialized kernel); full tiles unmasked, diagonal and
# window-edge tiles masked, tiles no row sees skipped. These shapes put every edge of that tiling under test.
PREFILL_TILING = {
    # q_len not a multiple of the row tile; several row tiles over a long context; a prompt from empty
    # spanning a row tile by one token (257 x group 1 = 2 x 128 + 1 rows).
    "long": [(300, 200), (0, 257), (1000, 129)],
    # Ragged: decodes and a padded row in the same launch as chunks (their row tiles past q_len exit at
    # once); a chunk of exactly one key tile over a context of one; a 2-token chunk ending past a tile.
    "ragged": [(0, 33), (5, 1), (64, 64), (PAD, 40), (17, 95), (130, 2), (1, 64)],
}


@PREFILL_KERNELS
@pytest.mark.gpu
@pytest.mark.parametrize("sliding_window", [-1, 5, 100])  # none; smaller than a key tile; larger
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_size, block_size", [(128, 16), (128, 32), (64, 16), (128, 8)])
@pytest.mark.parametrize("group", [1, 3, 4, 7])  # 3 and 7: a token's heads straddle row tiles and warps
@pytest.mark.parametrize("case", list(PREFILL_TILING))
def test_prefill_tiling(prefill_kernel, case, group, head_size, block_size, dtype, sliding_window):
    # With a window of 100 the chunk over 300 cached tokens starts its first row's window mid-tile (key 201).
    inputs = make_paged_inputs(PREFILL_TILING[case], num_heads=2 * group, num_kv_heads=2,
                               head_size=head_size, block_size=block_size, dtype=dtype, device="cuda")
    check_attention(inputs, softmax_scale(head_size), sliding_window)


@PREFILL_KERNELS
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scores_that_jump_from_tile_to_tile(prefill_kernel, dtype):
    """Random data moves a row's softmax reference (its running maximum) by a few log2 units at most; here
    it jumps by 18, 36, 72 and 144 from one 128-key tile to the next: O and the row sums must follow each
    move, also where an exponential against the old reference would overflow (144 >= 128). Queries share a
    mean direction (all ones); one key a tile points along it, its length doubling from tile to tile over
    cycles of five tiles."""
    inputs = make_paged_inputs([(0, 1100), (600, 300)], num_heads=8, num_kv_heads=2, head_size=128,
                               block_size=16, dtype=dtype, device="cuda")
    inputs.query.mul_(0.25).add_(1.0)
    keys = inputs.kv_cache[0]  # [num_blocks, block_size, num_kv_heads, head_size]
    keys.mul_(0.25)
    for table, seq_len in zip(inputs.block_tables.tolist(), inputs.seq_lens.tolist()):
        for tile, pos in enumerate(range(37, seq_len, 128)):
            slot = token_slot(table, pos, 16)
            keys[slot // 16, slot % 16] = 2.0 ** (tile % 5)  # score ~128 x that: 18 x it in log2 units
    check_attention(inputs, softmax_scale(128))


@PREFILL_KERNELS
@pytest.mark.gpu
@pytest.mark.parametrize("sliding_window", [-1, 64])
@pytest.mark.parametrize("head_size", [128, 64])
def test_prefill_many_items_per_cta(prefill_kernel, head_size, sliding_window):
    """Thousands of row tiles in one launch (the warp-specialized kernel's persistent CTAs each walk ~20,
    its Q buffers and K/V ring slots through many phases): chunks from empty and over context, decodes,
    padded rows and sequences shorter than the longest (row tiles past their rows), in random order."""
    gen = torch.Generator().manual_seed(7)
    specs = []
    for _ in range(48):
        kind = int(torch.randint(0, 6, (1,), generator=gen))
        q_len = int(torch.randint(2, 600, (1,), generator=gen))
        ctx = int(torch.randint(0, 900, (1,), generator=gen))
        specs.append([(0, q_len), (ctx, q_len), (ctx, 1), (PAD, q_len), (0, 600), (ctx, 129)][kind])
    inputs = make_paged_inputs(specs, num_heads=32, num_kv_heads=8, head_size=head_size, block_size=16,
                               dtype=torch.bfloat16, device="cuda")
    assert inputs.max_query_len * 4 // 128 * 8 * len(specs) > 20 * 132  # > 20 row tiles per SM of an H100
    check_attention(inputs, softmax_scale(head_size), sliding_window)


@pytest.mark.gpu
@pytest.mark.parametrize("group, block_size, context, q_len, kernel, q_by_tma, half_tiles", [
    (4, 16, 300, 257, "wgmma_ws", True, True),    # Llama's group, a short prompt
    (1, 32, 300, 257, "wgmma_ws", True, True),    # one query head a kv head
    (4, 8, 300, 257, "wgmma_ws", True, True),     # a block size the kernel reads at run time
    (3, 16, 300, 257, "wgmma_ws", False, True),   # 128 rows an item do not start at a token's first head
    (4, 16, 300, 1100, "wgmma_ws", True, False),  # past 1,024 keys: whole tiles only
    (4, 16, 900, 257, "wgmma_ws", True, False),   # a short chunk over a context: past 1,024 keys too
    (4, 16, 300, 257, "wgmma_ws_whole", True, False),
])
def test_prompt_kernel_launch_choices(monkeypatch, group, block_size, context, q_len, kernel, q_by_tma,
                                      half_tiles):
    """On sm_90 the prompt kernel loads each item's Q by TMA where the group divides 128, and steps whose
    block table holds at most 1,024 keys a sequence run the kernel with half-width diagonal tiles. Neither
    changes results (a map that cannot be made falls back to cp.async), so the launcher counts the launches
    that used each."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialized prompt kernel runs on sm_90 only")
    monkeypatch.setenv("PAGEDINFER_PREFILL_KERNEL", kernel)
    inputs = make_paged_inputs([(context, 200), (0, q_len), (5, 1)], num_heads=2 * group, num_kv_heads=2,
                               head_size=128, block_size=block_size, dtype=torch.bfloat16, device="cuda")
    before = _ops.prefill_launch_counts()
    check_attention(inputs, softmax_scale(128))
    after = _ops.prefill_launch_counts()
    assert (after[0] - before[0], after[1] - before[1]) == (int(q_by_tma), int(half_tiles))


@pytest.mark.gpu
def test_prefill_reruns_under_a_concurrent_kernel_give_the_same_bits():
    """The warp-specialized kernel's CTAs each list the items themselves and walk their share of that list,
    so the lists must agree. Placed by atomics, their order followed warp timing: with another kernel running
    on a side stream (slower loads, CTAs starting at other times) CTAs disagreed and whole items went
    unwritten (NaN here): 40 of 40 reruns of this case on an H100. The kernel is deterministic: every rerun
    must give the first run's bits. 384 sequences of one row-tile count (a long tie for the sort to break)
    and a few longer ones, padded rows among them."""
    specs = [(int(c), 17) for c in torch.randint(0, 300, (384,))] + [(0, 600), (40, 300), (PAD, 200)] * 4
    inputs = make_paged_inputs(specs, num_heads=32, num_kv_heads=8, head_size=128, block_size=16,
                               dtype=torch.bfloat16, device="cuda")
    scale = softmax_scale(128)
    first = run_attention(inputs, scale)
    assert_matches_ref(first, inputs, scale)
    side = torch.cuda.Stream()
    busy = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    differing = 0
    for _ in range(40):
        with torch.cuda.stream(side):
            for _ in range(2):
                busy @ busy
        out = run_attention(inputs, scale)
        torch.cuda.synchronize()
        differing += int(not torch.equal(out.view(torch.int16), first.view(torch.int16)))
    assert differing == 0, f"{differing} of 40 reruns differ from the first"


@PREFILL_KERNELS
@pytest.mark.gpu
def test_mixed_step_runs_its_decodes_on_the_decode_kernel(prefill_kernel):
    """A step of prompt chunks and decodes is two launches on the same metadata: the chunks on a prompt-chunk
    kernel, the single-token sequences on the decode kernel (its 16-head MMA rows, not 1 / group of a
    128-row chunk tile); a step whose sequences all have max_query_len tokens needs no decode launch."""
    def launched(specs: list) -> list[str]:
        inputs = make_paged_inputs(specs, num_heads=32, num_kv_heads=8, head_size=128, block_size=16,
                                   dtype=torch.bfloat16, device="cuda")
        scale = softmax_scale(128)
        out, kernels = launched_kernels(lambda: run_attention(inputs, scale, -1, None))
        assert_matches_ref(out, inputs, scale)
        return kernels

    mixed = launched([(0, 200), (3000, 1), (PAD, 1), (30, 1), (5, 17)])
    assert any("mma_paged_attention_kernel" in k for k in mixed), mixed
    assert any("prefill_attention_kernel" in k for k in mixed), mixed
    prompts = launched([(0, 200), (10, 200)])
    assert not any("mma_paged_attention_kernel" in k for k in prompts), prompts


@PREFILL_KERNELS
@pytest.mark.gpu
@pytest.mark.parametrize("sliding_window", [-1, 200])
def test_cuda_graph_prefill_with_changing_lengths(prefill_kernel, sliding_window):
    """Capture a prompt-chunk step, then rewrite its metadata in place (same token count, same
    max_query_len, other split of tokens over the sequences, longer contexts): the grid and every host
    decision come from shapes and max_query_len alone."""
    num_heads, num_kv_heads, head_size, block_size, max_blocks = 32, 8, 128, 16, 96
    first = [(0, 300), (50, 7), (PAD, 1)]
    second = [(1000, 150), (3, 157), (20, 1)]  # also 308 tokens; max q_len <= 300
    build = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                 block_size=block_size, dtype=torch.bfloat16, device="cuda", max_blocks_per_seq=max_blocks)
    inputs = make_paged_inputs(first, **build)
    later = make_paged_inputs(second, **build)
    inputs.kv_cache = later.kv_cache  # one pool for both steps: the later step's, the larger
    scale = softmax_scale(head_size)
    out = torch.empty_like(inputs.query)

    def step():
        _ops.paged_attention(out, inputs.query, inputs.kv_cache, *inputs.metadata, 300, scale,
                             sliding_window, None)

    check = graph_replay_check(step, out, inputs, scale, sliding_window)
    check()
    assert (out[307] == 0).all()  # the padded row
    for name in ("query", "query_start_loc", "seq_lens", "block_tables"):
        getattr(inputs, name).copy_(getattr(later, name))
    check()
