"""Bad arguments are errors that name the argument, on CPU and on CUDA (debug checks on); a bad index
on CUDA is caught before launch and leaves the context usable."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from pagedinfer import _ops
from tests.kernels.reference import cos_sin_cache, ref_paged_attention
from tests.kernels.utils import PagedInputs, assert_close_to_ref, make_paged_inputs, randn

Case = Callable[[str], tuple[Callable[[], None], str]]  # device -> (the failing call, regex it must match)
CASES: dict[str, Case] = {}
CUDA_ONLY_CASES: dict[str, Case] = {}
INDEX_CASES: set[str] = set()  # range checks of data (run on CPU whatever the debug flag)


def case(*, cuda_only: bool = False, index: bool = False):
    def register(fn: Case) -> Case:
        (CUDA_ONLY_CASES if cuda_only else CASES)[fn.__name__] = fn
        if index:
            INDEX_CASES.add(fn.__name__)
        return fn
    return register


def attention_inputs(device: str, num_heads: int = 4, num_kv_heads: int = 2,
                     head_size: int = 64) -> PagedInputs:
    return make_paged_inputs([(5, 3), (20, 1), (0, 2)], num_heads=num_heads, num_kv_heads=num_kv_heads,
                             head_size=head_size, block_size=16, dtype=torch.bfloat16, device=device)


def attention_call(inputs: PagedInputs, **override) -> Callable[[], None]:
    args = dict(out=torch.empty_like(inputs.query), query=inputs.query, kv_cache=inputs.kv_cache,
                query_start_loc=inputs.query_start_loc, seq_lens=inputs.seq_lens,
                block_tables=inputs.block_tables, max_query_len=inputs.max_query_len, scale=0.125,
                sliding_window=-1, workspace=None)
    args.update(override)
    return lambda: _ops.paged_attention(**args)


def with_entry(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


# ---- paged_attention: dtypes and shapes ------------------------------------------------------------

@case()
def attention_query_dtype_differs_from_cache(device):
    inputs = attention_inputs(device)
    query = inputs.query.float()
    return attention_call(inputs, query=query, out=torch.empty_like(query)), "kv_cache"


@case()
def attention_out_dtype(device):
    inputs = attention_inputs(device)
    return attention_call(inputs, out=torch.empty_like(inputs.query, dtype=torch.float32)), "out"


@case()
def attention_seq_lens_dtype(device):
    inputs = attention_inputs(device)
    return attention_call(inputs, seq_lens=inputs.seq_lens.long()), "seq_lens"


@case()
def attention_block_tables_dtype(device):
    inputs = attention_inputs(device)
    return attention_call(inputs, block_tables=inputs.block_tables.long()), "block_tables"


@case()
def attention_out_shape(device):
    inputs = attention_inputs(device)
    return attention_call(inputs, out=torch.empty_like(inputs.query[:-1])), "out"


@case()
def attention_kv_cache_rank(device):
    inputs = attention_inputs(device)
    return attention_call(inputs, kv_cache=inputs.kv_cache[0]), "kv_cache"


@case()
def attention_head_size_differs_from_cache(device):
    inputs = attention_inputs(device)
    query = randn(6, 4, 128, dtype=torch.bfloat16, device=device)
    return attention_call(inputs, query=query, out=torch.empty_like(query)), "head_size"


@case()
def attention_heads_not_divisible(device):
    inputs = attention_inputs(device, num_heads=6, num_kv_heads=4)
    return attention_call(inputs), "num_kv_heads"


@case()
def attention_head_size_too_large(device):
    inputs = attention_inputs(device, num_heads=2, num_kv_heads=1, head_size=320)
    return attention_call(inputs), "head_size"


@case()
def attention_query_start_loc_length(device):
    inputs = attention_inputs(device)
    return attention_call(inputs, query_start_loc=inputs.query_start_loc[:-1]), "query_start_loc"


@case()
def attention_block_tables_rows(device):
    inputs = attention_inputs(device)
    return attention_call(inputs, block_tables=inputs.block_tables[:-1]), "block_tables"


@case()
def attention_query_heads_not_contiguous(device):
    inputs = attention_inputs(device)
    query = inputs.query.transpose(0, 1).contiguous().transpose(0, 1)  # heads outermost in memory
    return attention_call(inputs, query=query), "query"


@case()
def attention_sliding_window_zero(device):
    return attention_call(attention_inputs(device), sliding_window=0), "sliding_window"


# ---- paged_attention: indices ------------------------------------------------------------------------

@case(index=True)
def attention_block_id_past_pool(device):
    inputs = attention_inputs(device)
    table = with_entry(inputs.block_tables, (1, 0), inputs.kv_cache.shape[1])
    return attention_call(inputs, block_tables=table), r"block_tables\[1, 0\]"


@case(index=True)
def attention_block_id_negative(device):
    inputs = attention_inputs(device)
    table = with_entry(inputs.block_tables, (0, 0), -1)
    return attention_call(inputs, block_tables=table), r"block_tables\[0, 0\]"


@case(index=True)
def attention_seq_len_shorter_than_q_len(device):
    inputs = attention_inputs(device)
    return attention_call(inputs, seq_lens=with_entry(inputs.seq_lens, 0, 2)), r"seq_lens\[0\]"


@case(index=True)
def attention_q_len_above_max_query_len(device):
    # A decode launch (max_query_len 1) reads one row per sequence: a longer one must be refused.
    inputs = attention_inputs(device)
    return attention_call(inputs, max_query_len=1), "max_query_len"


@case(index=True)
def attention_seq_len_negative(device):
    inputs = attention_inputs(device)
    return attention_call(inputs, seq_lens=with_entry(inputs.seq_lens, 1, -5)), r"seq_lens\[1\]"


@case(index=True)
def attention_seq_len_past_block_table(device):
    inputs = attention_inputs(device)
    too_long = 16 * inputs.block_tables.shape[1] + 1
    return attention_call(inputs, seq_lens=with_entry(inputs.seq_lens, 2, too_long)), "block_tables"


@case(index=True)
def attention_query_start_loc_end(device):
    inputs = attention_inputs(device)
    qsl = with_entry(inputs.query_start_loc, -1, inputs.query.shape[0] + 1)
    return attention_call(inputs, query_start_loc=qsl), "query_start_loc"


# ---- reshape_and_cache ---------------------------------------------------------------------------------

def cache_args(device: str, num_tokens: int = 5, num_blocks: int = 4, dtype=torch.bfloat16) -> dict:
    num_slots = num_blocks * 16
    return dict(key=randn(num_tokens, 2, 64, dtype=dtype, device=device),
                value=randn(num_tokens, 2, 64, dtype=dtype, device=device),
                kv_cache=randn(2, num_blocks, 16, 2, 64, dtype=dtype, device=device),
                slot_mapping=torch.randperm(num_slots)[:num_tokens].to(device))


def reshape_and_cache_call(args: dict, **override) -> Callable[[], None]:
    args = {**args, **override}
    return lambda: _ops.reshape_and_cache(**args)


@case()
def reshape_and_cache_key_dtype(device):
    args = cache_args(device)
    return reshape_and_cache_call(args, key=args["key"].float()), "key"


@case()
def reshape_and_cache_slot_mapping_dtype(device):
    args = cache_args(device)
    return reshape_and_cache_call(args, slot_mapping=args["slot_mapping"].int()), "slot_mapping"


@case()
def reshape_and_cache_key_head_size(device):
    args = cache_args(device)
    return reshape_and_cache_call(args, key=randn(5, 2, 32, dtype=torch.bfloat16, device=device)), "key"


@case()
def reshape_and_cache_value_heads(device):
    args = cache_args(device)
    return reshape_and_cache_call(args, value=randn(5, 1, 64, dtype=torch.bfloat16, device=device)), "value"


@case()
def reshape_and_cache_slot_mapping_length(device):
    args = cache_args(device)
    return reshape_and_cache_call(args, slot_mapping=args["slot_mapping"][:-1]), "slot_mapping"


@case(index=True)
def reshape_and_cache_slot_past_pool(device):
    args = cache_args(device)
    slots = with_entry(args["slot_mapping"], 3, 4 * 16)
    return reshape_and_cache_call(args, slot_mapping=slots), r"slot_mapping\[3\]"


@case(index=True)
def reshape_and_cache_slot_below_padding(device):
    args = cache_args(device)
    slots = with_entry(args["slot_mapping"], 0, -2)
    return reshape_and_cache_call(args, slot_mapping=slots), r"slot_mapping\[0\]"


# ---- copy_blocks / swap_blocks ------------------------------------------------------------------------

def caches(num_layers: int, num_blocks: int, device: str, block_size: int = 16) -> list[torch.Tensor]:
    return [randn(2, num_blocks, block_size, 2, 64, dtype=torch.bfloat16, device=device)
            for _ in range(num_layers)]


def mapping(pairs, device: str = "cpu", dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(pairs, dtype=dtype, device=device).reshape(-1, 2)


@case(index=True)
def copy_blocks_src_past_pool(device):
    layers = caches(2, 8, device)
    return lambda: _ops.copy_blocks(layers, mapping([(1, 2), (8, 3)])), r"block_mapping\[1, 0\]"


@case(index=True)
def copy_blocks_dst_negative(device):
    layers = caches(2, 8, device)
    return lambda: _ops.copy_blocks(layers, mapping([(1, -1)])), r"block_mapping\[0, 1\]"


@case()
def copy_blocks_mapping_shape(device):
    layers = caches(2, 8, device)
    bad = torch.tensor([[1, 2, 3]], dtype=torch.int64)
    return lambda: _ops.copy_blocks(layers, bad), "block_mapping"


@case()
def copy_blocks_mapping_dtype(device):
    layers = caches(2, 8, device)
    return lambda: _ops.copy_blocks(layers, mapping([(1, 2)], dtype=torch.int32)), "block_mapping"


def swap_devices(device: str) -> tuple[str, str]:
    return (device, "cpu")  # CPU -> CPU, or GPU -> CPU


@case(index=True)
def swap_blocks_src_past_src_pool(device):
    # Valid in the (larger) destination pool: the source bound must come from the source caches.
    src_device, dst_device = swap_devices(device)
    src, dst = caches(2, 8, src_device), caches(2, 12, dst_device)
    return lambda: _ops.swap_blocks(src, dst, mapping([(0, 1), (9, 2)])), r"block_mapping\[1, 0\]"


@case(index=True)
def swap_blocks_dst_past_dst_pool(device):
    src_device, dst_device = swap_devices(device)
    src, dst = caches(2, 12, src_device), caches(2, 8, dst_device)
    return lambda: _ops.swap_blocks(src, dst, mapping([(9, 8)])), r"block_mapping\[0, 1\]"


@case()
def swap_blocks_layer_counts_differ(device):
    src_device, dst_device = swap_devices(device)
    src, dst = caches(3, 8, src_device), caches(2, 8, dst_device)
    return lambda: _ops.swap_blocks(src, dst, mapping([(0, 1)])), "src_caches|dst_caches"


@case()
def swap_blocks_block_shapes_differ(device):
    src_device, dst_device = swap_devices(device)
    src, dst = caches(2, 8, src_device), caches(2, 8, dst_device, block_size=32)
    return lambda: _ops.swap_blocks(src, dst, mapping([(0, 1)])), "src_caches|dst_caches"


# ---- layers --------------------------------------------------------------------------------------------

@case()
def rms_norm_weight_size(device):
    x = randn(3, 64, dtype=torch.bfloat16, device=device)
    return lambda: _ops.rms_norm(x, randn(63, dtype=torch.bfloat16, device=device), 1e-6), "weight"


@case()
def rms_norm_weight_dtype(device):
    x = randn(3, 64, dtype=torch.bfloat16, device=device)
    return lambda: _ops.rms_norm(x, randn(64, dtype=torch.float32, device=device), 1e-6), "weight"


@case()
def rms_norm_out_shape(device):
    x, w = randn(3, 64, dtype=torch.bfloat16, device=device), randn(64, dtype=torch.bfloat16, device=device)
    return lambda: _ops.rms_norm(x, w, 1e-6, out=torch.empty_like(x[:2])), "out"


@case()
def fused_add_rms_norm_residual_shape(device):
    x, w = randn(3, 64, dtype=torch.bfloat16, device=device), randn(64, dtype=torch.bfloat16, device=device)
    residual = randn(4, 64, dtype=torch.bfloat16, device=device)
    return lambda: _ops.fused_add_rms_norm(x, residual, w, 1e-6), "residual"


def rotary_args(device: str, num_tokens: int = 4, head_size: int = 64, rot_dim: int = 64) -> dict:
    return dict(positions=torch.randint(0, 100, (num_tokens,), device=device),
                query=randn(num_tokens, 4 * head_size, dtype=torch.bfloat16, device=device),
                key=randn(num_tokens, 2 * head_size, dtype=torch.bfloat16, device=device),
                head_size=head_size,
                cos_sin_cache=cos_sin_cache(100, rot_dim, dtype=torch.bfloat16).to(device),
                is_neox=True)


def rotary_call(args: dict, **override) -> Callable[[], None]:
    args = {**args, **override}
    return lambda: _ops.rotary_embedding(**args)


@case()
def rotary_positions_dtype(device):
    args = rotary_args(device)
    return rotary_call(args, positions=args["positions"].int()), "positions"


@case()
def rotary_positions_length(device):
    args = rotary_args(device)
    return rotary_call(args, positions=args["positions"][:-1]), "positions"


@case()
def rotary_rot_dim_past_head_size(device):
    return rotary_call(rotary_args(device, head_size=64, rot_dim=128)), "cos_sin_cache"


@case()
def rotary_query_width_not_heads(device):
    args = rotary_args(device)
    return rotary_call(args, query=args["query"][:, :-8]), "query"


@case(index=True)
def rotary_position_past_cache(device):
    # A position indexes cos_sin_cache rows: out of range must be an error, not an out-of-bounds read.
    args = rotary_args(device)
    return rotary_call(args, positions=with_entry(args["positions"], 2, 100)), "positions"


@case()
def silu_and_mul_odd_width(device):
    return lambda: _ops.silu_and_mul(randn(3, 63, dtype=torch.bfloat16, device=device)), "input"


@case()
def silu_and_mul_out_shape(device):
    x = randn(3, 64, dtype=torch.bfloat16, device=device)
    return lambda: _ops.silu_and_mul(x, out=torch.empty(3, 31, dtype=x.dtype, device=device)), "out"


@case()
def silu_and_mul_out_dtype(device):
    x = randn(3, 64, dtype=torch.bfloat16, device=device)
    return lambda: _ops.silu_and_mul(x, out=torch.empty(3, 32, dtype=torch.float32, device=device)), "out"


# ---- CUDA only: tensors on the wrong device ---------------------------------------------------------

@case(cuda_only=True)
def attention_seq_lens_on_cpu(device):
    inputs = attention_inputs(device)
    return attention_call(inputs, seq_lens=inputs.seq_lens.cpu()), "seq_lens"


@case(cuda_only=True)
def attention_out_on_cpu(device):
    inputs = attention_inputs(device)
    return attention_call(inputs, out=torch.empty_like(inputs.query, device="cpu")), "out"


@case(cuda_only=True)
def reshape_and_cache_slot_mapping_on_cpu(device):
    args = cache_args(device)
    return reshape_and_cache_call(args, slot_mapping=args["slot_mapping"].cpu()), "slot_mapping"


@case(cuda_only=True)
def swap_blocks_mapping_on_gpu(device):
    src, dst = caches(2, 8, device), caches(2, 8, "cpu")
    return lambda: _ops.swap_blocks(src, dst, mapping([(0, 1)], device=device)), "block_mapping"


@case(cuda_only=True)
def rms_norm_weight_on_cpu(device):
    x = randn(3, 64, dtype=torch.bfloat16, device=device)
    return lambda: _ops.rms_norm(x, randn(64, dtype=torch.bfloat16), 1e-6), "weight"


@case(cuda_only=True)
def rotary_cache_on_cpu(device):
    args = rotary_args(device)
    return rotary_call(args, cos_sin_cache=args["cos_sin_cache"].cpu()), "cos_sin_cache"


# ---- the tests -----------------------------------------------------------------------------------------

def assert_device_usable(device: str) -> None:
    """After a rejected call on CUDA: the context still runs a valid op correctly."""
    if device != "cuda":
        return
    torch.cuda.synchronize()
    inputs = attention_inputs(device)
    out = torch.empty_like(inputs.query)
    _ops.paged_attention(out, inputs.query, inputs.kv_cache, *inputs.metadata, inputs.max_query_len,
                         0.125, -1, None)
    torch.cuda.synchronize()
    assert_close_to_ref(out, lambda d: ref_paged_attention(inputs.query, inputs.kv_cache, *inputs.metadata,
                                                           0.125, dtype=d), torch.bfloat16)


ERROR_PARAMS = (
    [pytest.param("cpu", name, id=f"cpu-{name}") for name in CASES]
    + [pytest.param("cuda", name, marks=pytest.mark.gpu, id=f"cuda-{name}")
       for name in [*CASES, *CUDA_ONLY_CASES]])


@pytest.mark.parametrize("device, name", ERROR_PARAMS)
def test_bad_arguments_raise(device, name):
    call, match = {**CASES, **CUDA_ONLY_CASES}[name](device)
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()
    assert_device_usable(device)


@pytest.mark.parametrize("name", sorted(INDEX_CASES))
def test_cpu_index_checks_do_not_depend_on_debug_flag(name):
    # ops.h: on CPU the range checks always run; the flag only adds them on CUDA.
    _ops.set_debug_checks(False)  # the autouse fixture restores it
    call, match = CASES[name]("cpu")
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()
