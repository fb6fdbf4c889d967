"""Offline throughput end to end: pagedinfer's `LLM.generate` vs HF transformers on Llama-3.1-8B's
architecture with random bf16 weights, both against a roofline computed from the workload alone.

Workloads: (a) 256 requests of 512 prompt / 128 output tokens; (b) 512 ragged requests, prompts uniform
in [32, 1024] and outputs in [16, 512] (random.Random(0)). Random token ids, temperature 1, top_p 1,
ignore_eos (vLLM's benchmark_throughput choices). Also: startup (LLM construction, then the first token
of one short request, in a fresh process).

Baseline (same invocation, each mode in its own process so the card is free): HF `generate` at batch 32
with a static cache on (a)'s shapes, eager and transformers' default (compiled on CUDA), and HF's
continuous batching (`generate_batch`) on (a) or as much of it as a time budget allows; HF's best is
the fastest of these.

Roofline: an ideal scheduler with our token budget (decodes first, then chunked prefill, unbounded KV)
replayed step by step; a step costs max(FLOPs / GEMM rate, bytes / read rate), both rates measured in
our process on this card.

Each child writes $OUT/bench_offline_{ours,hf,hf_cb}.json; the parent merges what is there into a
table and $OUT/bench_offline.json.
Run: python bench/bench_offline.py [--only ours|hf|hf_static|hf_cb] [--workload a|b] [--smoke]
     python bench/bench_offline.py --merge bench_offline_ours.json bench_offline_hf.json ...
     (results of separate runs; writes to $OUT, default ./bench_out)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import time

_PROCESS_START = time.time()  # before torch: a child reports its import time

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import out_dir, print_table, time_interleaved, write_json  # noqa: E402

LLAMA_3_1_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
    rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16",
    hidden_act="silu", attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001)
# Same code paths (GQA, llama3 rope), small enough for two CPU cores.
SMOKE_CONFIG = {**LLAMA_3_1_8B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000,
                "bos_token_id": 1, "eos_token_id": 2}

FULL = dict(a=(256, 512, 128), b=(512, (32, 1024), (16, 512)), max_model_len=2048, hf_batch=32,
            hf_batches=3, hf_cb_budget_s=60.0, warmup_requests=64, gemm=8192, read_bytes=4 << 30,
            # gpu_check.sh's e2e stage runs ours, hf and hf_cb in one command of at most 10 minutes.
            ours_timeout=540, hf_timeout=270, hf_cb_timeout=270)
SMOKE = dict(a=(12, 48, 8), b=(16, (8, 96), (2, 24)), max_model_len=256, hf_batch=4, hf_batches=2,
             hf_cb_budget_s=20.0, warmup_requests=4, gemm=512, read_bytes=64 << 20, ours_timeout=600,
             hf_timeout=600, hf_cb_timeout=600)


# ---------------------------------------------------------------- workloads and the roofline

def workload(name: str, sizes: dict) -> list[tuple[list[int], int]]:
    """(prompt ids, output tokens) per request. Lengths come from their own Random(0) (the issue's
    workload); token ids from another generator, so the lengths do not depend on the vocabulary."""
    vocab = sizes["vocab_size"]
    ids = random.Random(1 if name == "a" else 2)
    if name == "a":
        n, prompt_len, out_len = sizes["a"]
        lens = [(prompt_len, out_len)] * n
    else:
        n, (lo_in, hi_in), (lo_out, hi_out) = sizes["b"]
        rng = random.Random(0)
        lens = [(rng.randint(lo_in, hi_in), rng.randint(lo_out, hi_out)) for _ in range(n)]
    return [([ids.randrange(vocab) for _ in range(p)], o) for p, o in lens]


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(count)]


def model_sizes(cfg: dict) -> dict:
    """Streamed weight elements: every matmul of the layers and the lm_head (the embedding is gathered,
    a few rows a step, not streamed)."""
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    per_layer = h * (heads * hd + 2 * kv * hd) + heads * hd * h + 3 * h * cfg["intermediate_size"]
    return dict(layer_params=cfg["num_hidden_layers"] * per_layer, head_params=cfg["vocab_size"] * h,
                head_dim=hd, attn_flops_per_key=4 * hd * heads * cfg["num_hidden_layers"],
                kv_bytes_per_token=2 * cfg["num_hidden_layers"] * kv * hd * 2)


def roofline(requests: list[tuple[int, int]], cfg: dict, max_batched_tokens: int, max_seqs: int,
             gemm_flops: float, read_bytes_s: float, itemsize: int = 2) -> dict:
    """Seconds of an ideal engine with our scheduler limits: each step runs every decode first, then
    prompt chunks (running prompts, then new ones in order) up to the token budget, with unbounded KV.
    A step costs max(FLOPs / gemm_flops, bytes / read_bytes_s): the matmuls (the lm_head only for rows
    that sample, as in our runner), causal attention over the visible keys, one pass over the streamed
    weights and a read of each scheduled sequence's K/V."""
    m = model_sizes(cfg)
    layer_bytes, head_bytes = m["layer_params"] * itemsize, m["head_params"] * itemsize
    waiting = collections.deque(requests)
    running: list[list[int]] = []  # [computed, prompt, outputs so far, outputs wanted]
    seconds = steps = compute_bound_steps = 0
    while waiting or running:
        budget, tokens, samples, keys, kv_tokens = max_batched_tokens, 0, 0, 0, 0
        scheduled: list[tuple[list[int], int]] = []
        decodes = [r for r in running if r[0] >= r[1]]
        prefills = [r for r in running if r[0] < r[1]]
        for r in decodes + prefills:
            if budget == 0:
                break
            n = 1 if r[0] >= r[1] else min(r[1] - r[0], budget)
            scheduled.append((r, n))
            budget -= n
        while waiting and len(running) < max_seqs and budget > 0:
            prompt, out = waiting.popleft()
            r = [0, prompt, 0, out]
            running.append(r)
            n = min(prompt, budget)
            scheduled.append((r, n))
            budget -= n
        for r, n in scheduled:
            c = r[0]
            tokens += n
            keys += n * c + n * (n + 1) // 2  # query at position p sees p + 1 keys
            kv_tokens += c + n
            r[0] += n
            if r[0] >= r[1]:  # the prompt is done (or this was a decode): one token sampled
                samples += 1
                r[2] += 1
        running = [r for r in running if r[2] < r[3]]
        flops = 2 * m["layer_params"] * tokens + 2 * m["head_params"] * samples + m["attn_flops_per_key"] * keys
        nbytes = layer_bytes + (head_bytes if samples else 0) + kv_tokens * m["kv_bytes_per_token"]
        compute_s, memory_s = flops / gemm_flops, nbytes / read_bytes_s
        seconds += max(compute_s, memory_s)
        compute_bound_steps += compute_s > memory_s
        steps += 1
    outputs = sum(o for _, o in requests)
    return dict(ideal_s=seconds, ideal_output_tok_s=outputs / seconds, ideal_steps=steps,
                ideal_compute_bound_steps=compute_bound_steps)


def measure_rates(dtype: torch.dtype, gemm_n: int, read_bytes: int, device: str) -> dict:
    """The roofline's inputs on this card: the best of a square GEMM and a model-shaped one (8192
    tokens through a fused gate/up projection), and a read-only pass over a buffer far past L2."""
    h, inter = LLAMA_3_1_8B["hidden_size"], LLAMA_3_1_8B["intermediate_size"]
    shapes = {"square": (gemm_n, gemm_n, gemm_n), "gate_up": (gemm_n, h, 2 * inter) if device == "cuda"
              else (gemm_n, gemm_n // 2, gemm_n * 2)}
    tensors = {k: (torch.randn(m, kk, dtype=dtype, device=device),
                   torch.randn(n, kk, dtype=dtype, device=device)) for k, (m, kk, n) in shapes.items()}
    fns = {k: (lambda a=a, b=b: torch.nn.functional.linear(a, b)) for k, (a, b) in tensors.items()}
    us = time_interleaved(fns, calls=10) if device == "cuda" else _cpu_best_us(fns)
    tflops = {k: 2 * m * kk * n / us[k] / 1e6 for k, (m, kk, n) in shapes.items()}
    del tensors, fns
    if device == "cuda":
        torch.cuda.empty_cache()
        # What the engine left free decides the buffer (4 GiB when it fits; always far past L2).
        free = torch.cuda.mem_get_info()[0]
        read_bytes = int(min(read_bytes, max(256 << 20, (free - (512 << 20)) // 2)) // 4096 * 4096)
        try:
            from common import read_ceiling_gbps
            gbps, how = read_ceiling_gbps(read_bytes), "Triton bf16 sum kernel (bench/common.py), reads only"
        except Exception as e:  # noqa: BLE001 - no Triton, or it failed to compile here
            gbps = _torch_sum_gbps(read_bytes, device)
            how = f"torch.sum of a bf16 tensor, reads only (Triton kernel: {type(e).__name__})"
    else:
        gbps, how = _torch_sum_gbps(read_bytes, device), "torch.sum of a bf16 tensor, reads only"
    return dict(gemm_tflops=max(tflops.values()),
                gemm_tflops_by_shape={k: float(f"{v:.4g}") for k, v in tflops.items()},
                gemm_shapes={k: list(v) for k, v in shapes.items()}, read_gbps=gbps, read_bytes=read_bytes,
                read_method=how)


def _cpu_best_us(fns: dict) -> dict:
    best = {}
    for name, fn in fns.items():
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = min(times) * 1e6
    return best


def _torch_sum_gbps(nbytes: int, device: str) -> float:
    x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    if device == "cuda":
        us = time_interleaved({"sum": lambda: x.sum(dtype=torch.float32)}, calls=5)["sum"]
    else:
        us = _cpu_best_us({"sum": lambda: x.sum(dtype=torch.float32)})["sum"]
    return nbytes / us / 1e3


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- our engine (child process)

def run_ours(args: argparse.Namespace, sizes: dict, cfg: dict, model_dir: str) -> None:
    from pagedinfer import LLM, SamplingParams
    import_s = time.time() - args.spawned_at
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = dict(engine="pagedinfer", device=device, enforce_eager=args.enforce_eager, config=cfg,
                        process_start_to_imports_done_s=import_s)

    def save() -> None:
        write_json("bench_offline_ours.json", result)

    options = dict(model=model_dir, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                   max_model_len=sizes["max_model_len"], seed=0, device=device)
    if args.enforce_eager:  # only when asked: the engine's default is the configuration users get
        options["enforce_eager"] = True
    if device == "cpu":
        options["kv_cache_space"] = 0.5
    t0 = time.perf_counter()
    llm = LLM(**options)
    sync(device)
    construct_s = time.perf_counter() - t0
    first = [{"prompt_token_ids": random_prompts(1, 16, cfg["vocab_size"], seed=10)[0]}]
    t1 = time.perf_counter()
    llm.generate(first, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    sync(device)
    ttft_s = time.perf_counter() - t1
    sched = llm.llm_engine.config.scheduler
    result.update(construct_s=construct_s, first_token_s=ttft_s, startup_s=construct_s + ttft_s,
                  max_num_batched_tokens=sched.max_num_batched_tokens, max_num_seqs=sched.max_num_seqs,
                  num_kv_blocks=_num_blocks(llm), workloads={})
    print(f"startup: construction {construct_s:.1f} s, first token {ttft_s:.2f} s", flush=True)
    save()

    # Warm-up at the workloads' shapes (full prompt chunks, a decode batch) on prompts of their own, so
    # that the timed runs get no prefix-cache hits.
    n_in, n_out = sizes["a"][1], 8
    warm = random_prompts(sizes["warmup_requests"], n_in, cfg["vocab_size"], seed=11)
    t2 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in warm],
                 SamplingParams(max_tokens=n_out, ignore_eos=True), use_tqdm=False)
    sync(device)
    result["warmup_s"] = time.perf_counter() - t2

    for name in args.workloads:
        reqs = workload(name, {**sizes, "vocab_size": cfg["vocab_size"]})
        prompts = [{"prompt_token_ids": p} for p, _ in reqs]
        params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=o, ignore_eos=True) for _, o in reqs]
        preempted = _num_preemptions(llm)
        sync(device)
        t = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        sync(device)
        wall = time.perf_counter() - t
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        in_tokens = sum(len(p) for p, _ in reqs)
        expected = sum(o for _, o in reqs)
        if out_tokens != expected:  # ignore_eos: every request runs to max_tokens, or the figure is wrong
            result["workloads"][name] = dict(error=f"{out_tokens} output tokens, expected {expected}")
            print(f"ours ({name}): {result['workloads'][name]['error']}", flush=True)
            save()
            continue
        result["workloads"][name] = dict(
            requests=len(reqs), prompt_tokens=in_tokens, output_tokens=out_tokens, wall_s=wall,
            output_tok_s=out_tokens / wall, total_tok_s=(in_tokens + out_tokens) / wall,
            prefix_cache_hit_tokens=sum(o.num_cached_tokens or 0 for o in outputs),
            preemptions=None if preempted is None else _num_preemptions(llm) - preempted)
        print(f"ours ({name}): {len(reqs)} requests, {out_tokens / wall:.0f} output tok/s, "
              f"{(in_tokens + out_tokens) / wall:.0f} total tok/s ({wall:.1f} s)", flush=True)
        save()

    # Rates after the engine is gone: its KV cache holds most of the card.
    del llm
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    try:
        rates = measure_rates(torch.bfloat16, sizes["gemm"], sizes["read_bytes"], device)
    except Exception as e:  # noqa: BLE001 - the throughput figures stand without a roofline
        result["rates_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"roofline rates not measured: {result['rates_error']}", flush=True)
        save()
        return
    result["rates"] = rates
    print(f"roofline inputs: GEMM {rates['gemm_tflops']:.4g} TFLOP/s {rates['gemm_tflops_by_shape']}, "
          f"read {rates['read_gbps']:.4g} GB/s over {rates['read_bytes'] / 2**30:.2f} GiB", flush=True)
    for name, w in result["workloads"].items():
        if "error" in w:
            continue
        reqs = [(len(p), o) for p, o in workload(name, {**sizes, "vocab_size": cfg["vocab_size"]})]
        w.update(roofline(reqs, cfg, result["max_num_batched_tokens"], result["max_num_seqs"],
                          rates["gemm_tflops"] * 1e12, rates["read_gbps"] * 1e9))
    save()


def _num_blocks(llm) -> int | None:
    cache = getattr(llm.llm_engine.model_runner, "cache", None)
    return getattr(cache, "num_gpu_blocks", None) or getattr(cache, "num_blocks", None)


def _num_preemptions(llm) -> int | None:
    return getattr(llm.llm_engine.scheduler, "num_preemptions", None)


# ---------------------------------------------------------------- HF transformers (child process)

def run_hf(args: argparse.Namespace, sizes: dict, cfg: dict, model_dir: str) -> None:
    """role hf: `generate` with a static cache; role hf_cb: `generate_batch`. Separate processes: a crash
    or a compiled graph pool of one does not touch the other, and each sizes its cache on a free card."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = dict(engine="transformers", role=args.role, transformers=transformers.__version__,
                        device=device)

    def save() -> None:
        write_json(f"bench_offline_{args.role}.json", result)

    config = AutoConfig.from_pretrained(model_dir)
    t0 = time.perf_counter()
    model = _hf_model(AutoModelForCausalLM, config, device)
    sync(device)
    result["construct_s"] = time.perf_counter() - t0
    model.generation_config.eos_token_id = None  # random weights: never stop early (ignore_eos)
    model.generation_config.pad_token_id = 0
    reqs = workload("a", {**sizes, "vocab_size": cfg["vocab_size"]})
    # Sampling as ours: temperature 1, top_p 1, no top_k (HF's default is 50).
    sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    with torch.no_grad():  # finite logits: the dummy weights must not overflow in bf16
        logits = model(torch.tensor([reqs[0][0][:64]], device=device)).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("HF model with random weights gives non-finite logits")
    save()
    if args.role == "hf":
        result["static"] = _hf_static(model, GenerationConfig, reqs, sizes, cfg, sampling, device, save, result)
    else:
        result["continuous_batching"] = _hf_continuous_batching(model, GenerationConfig, reqs, sizes, cfg,
                                                                sampling, device)
    save()


def _hf_static(model, generation_config_cls, reqs, sizes: dict, cfg: dict, sampling: dict, device: str,
               save, result: dict) -> list[dict]:
    """generate with a static cache at batch hf_batch: per variant a full warm-up batch first (the first
    pass plans kernels for every new KV length; a compiled step compiles), then hf_batches timed batches
    of (a)'s prompts. Variants: eager, then transformers' default, which on CUDA compiles the decode step
    of a static cache (recent versions); each is saved before the next starts."""
    n, prompt_len, out_len = sizes["a"]
    batch, batches = sizes["hf_batch"], sizes["hf_batches"]
    gen = dict(max_new_tokens=out_len, min_new_tokens=out_len, cache_implementation="static",
               pad_token_id=0, eos_token_id=None, **sampling)

    def static_batch(prompts: list[list[int]], **extra) -> int:
        ids = torch.tensor(prompts, device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen, **extra)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    can_disable = hasattr(generation_config_cls(), "disable_compile")
    variants = [("eager", dict(disable_compile=True))] if can_disable else []
    if device == "cuda" or not can_disable:  # on the CPU the default is eager too
        variants.append(("default", {}))
    runs: list[dict] = []
    result["static"] = runs
    for name, extra in variants:
        try:
            t = time.perf_counter()
            static_batch(random_prompts(batch, prompt_len, cfg["vocab_size"], seed=12), **extra)
            sync(device)
            warm_s = time.perf_counter() - t
            generated = 0
            t = time.perf_counter()
            for i in range(batches):
                generated += static_batch([p for p, _ in reqs[i * batch:(i + 1) * batch]], **extra)
            sync(device)
            wall = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - reported in the table, never replaced by a number
            runs.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(f"HF generate static ({name}) failed: {runs[-1]['error']}", flush=True)
            save()
            continue
        compiled = name == "default" and getattr(model, "_compiled_call", None) is not None
        runs.append(dict(variant="compiled" if compiled else name, batch=batch, batches=batches,
                         output_tokens=generated, wall_s=wall, output_tok_s=generated / wall, warmup_s=warm_s,
                         prompt_tokens=batches * batch * prompt_len))
        print(f"HF generate static batch {batch} ({runs[-1]['variant']}): {generated / wall:.0f} output tok/s "
              f"(warm-up {warm_s:.0f} s)", flush=True)
        save()
    return runs


def _hf_model(auto_cls, config, device: str):
    """bf16 weights made on the device with no init pass (an 8B init on the CPU takes minutes), then
    N(0, 0.02) matrices and unit norms as our dummy loader does, so activations stay finite."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with torch.device(device), no_init_weights():
        try:
            model = auto_cls.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        except TypeError:  # before `dtype` replaced `torch_dtype`
            model = auto_cls.from_config(config, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    if model.dtype != torch.bfloat16:  # a transformers that ignored the dtype argument
        model = model.to(torch.bfloat16)
    model = model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.fill_(1.0)  # Llama's 1-D parameters are the RMSNorm weights (no biases)
    return model


def _hf_continuous_batching(model, generation_config_cls, reqs, sizes: dict, cfg: dict, sampling: dict,
                            device: str) -> dict:
    import transformers
    if not hasattr(model, "generate_batch"):
        return dict(error=f"not available in transformers {transformers.__version__}")
    params = inspect.signature(model.generate_batch).parameters
    n, prompt_len, out_len = sizes["a"]
    gc_ = generation_config_cls(max_new_tokens=out_len, min_new_tokens=out_len, eos_token_id=None,
                                pad_token_id=0, **sampling)
    extra = {k: v for k, v in dict(progress_bar=False, record_timestamps=True).items() if k in params}

    def call(prompts: list[list[int]]) -> tuple[float, float | None, int, int]:
        """(wall s of the call, s from the first request added to the last finished, tokens, results)."""
        sync(device)
        t = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=gc_, **extra)
        sync(device)
        wall = time.perf_counter() - t
        outs = list(out.values()) if isinstance(out, dict) else list(out)
        tokens = sum(len(getattr(o, "generated_tokens", []) or []) for o in outs)
        span = None
        try:  # transformers 5: perf_counter stamps from request creation to finish (excludes setup)
            start = min(o.created_time for o in outs)
            end = max(o.lifespan[1] for o in outs)
            if end > start:
                span = end - start
        except (AttributeError, TypeError, ValueError, IndexError):
            pass
        return wall, span, tokens, len(outs)

    try:
        # Warm-up at the same shapes; it also estimates the rate that bounds the timed run.
        warm = random_prompts(min(32, n), prompt_len, cfg["vocab_size"], seed=13)
        w_wall, w_span, w_tokens, _ = call(warm)
        if w_tokens == 0:
            return dict(error=f"generate_batch returned no tokens (transformers {transformers.__version__})")
        est_rate = w_tokens / (w_span or w_wall)
        # Requests the time budget allows, assuming no speed-up from a larger batch (bounded either way).
        count = int(min(n, max(min(32, n), sizes["hf_cb_budget_s"] * est_rate / out_len)))
        count -= count % min(32, n)
        wall, span, tokens, results = call([p for p, _ in reqs[:count]])
        expected = count * out_len
        r = dict(requests=count, output_tokens=tokens, expected_tokens=expected, wall_s=wall, span_s=span,
                 output_tok_s=tokens / (span or wall), output_tok_s_whole_call=tokens / wall,
                 timed_from="first request added to last finished" if span else "whole generate_batch call",
                 warmup_s=w_wall, attn_implementation=getattr(model.config, "_attn_implementation", None),
                 prompt_tokens=count * prompt_len)
        if results != count or tokens != expected:
            r["note"] = f"{results} of {count} results, {tokens} of {expected} tokens"
        print(f"HF generate_batch {count} requests: {r['output_tok_s']:.0f} output tok/s "
              f"({r['timed_from']}; whole call {tokens / wall:.0f})", flush=True)
        return r
    except Exception as e:  # noqa: BLE001 - reported in the table, never replaced by a number
        print(f"HF generate_batch failed: {type(e).__name__}: {e}", flush=True)
        return dict(error=f"{type(e).__name__}: {str(e)[:300]} (transformers {transformers.__version__})")


# ---------------------------------------------------------------- parent: children, merge, table

def run_child(role: str, args: argparse.Namespace, timeout: int) -> dict:
    """Runs one child; its time limit is its own, cut to what is left before $BENCH_DEADLINE (epoch
    seconds, set by gpu_check.sh so that a whole device command stays inside its 10 minutes), less a
    margin for the merge."""
    left = float(os.environ.get("BENCH_DEADLINE", "inf")) - time.time() - 20
    if left < 60:
        print(f"[{role}] skipped: {max(left, 0):.0f} s left before BENCH_DEADLINE", flush=True)
        return dict(status=f"skipped, {max(left, 0):.0f} s left before BENCH_DEADLINE", seconds=0)
    timeout = int(min(timeout, left))
    cmd = [sys.executable, __file__, "--role", role, "--spawned-at", repr(time.time()),
           "--workload", args.workload] + (["--smoke"] if args.smoke else []) + \
          (["--enforce-eager"] if args.enforce_eager else [])
    t = time.time()
    try:
        proc = subprocess.run(cmd, timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"killed after {timeout} s"
    print(f"[{role}] {status} in {time.time() - t:.0f} s", flush=True)
    return dict(status=status, seconds=time.time() - t)


ROLES = ("ours", "hf", "hf_cb")  # children: our engine; HF generate (static cache); HF generate_batch
ONLY = {"all": ROLES, "ours": ("ours",), "hf": ("hf", "hf_cb"), "hf_static": ("hf",), "hf_cb": ("hf_cb",)}


def merge(parts: dict[str, dict], run_info: dict) -> None:
    """The table and bench_offline.json from the children's results (role -> its JSON)."""
    ours, rows, candidates = parts.get("ours"), [], []
    card = next((p["card"] for p in parts.values() if "card" in p), "unknown")
    hf_runs = [(f"HF generate, static cache, batch {r.get('batch', FULL['hf_batch'])}, {r['variant']}", r)
               for r in parts.get("hf", {}).get("static", [])]
    if "continuous_batching" in parts.get("hf_cb", {}):
        hf_runs.append(("HF generate_batch (continuous batching)", parts["hf_cb"]["continuous_batching"]))
    for label, r in hf_runs:
        if "error" in r:
            rows.append(dict(workload="a", engine=label, note=r["error"]))
            continue
        requests = r.get("requests") or r["batch"] * r["batches"]
        seconds = r.get("span_s") or r["wall_s"]  # generate_batch: its span without the manager's setup
        notes = [r.get("note", "")]
        if r.get("span_s", 0) is None:
            notes.append("whole call timed, setup included")
        rows.append(dict(workload="a", engine=label, requests=requests, wall_s=f"{seconds:.1f}",
                         output_tok_s=f"{r['output_tok_s']:.0f}",
                         total_tok_s=f"{(r['prompt_tokens'] + r['output_tokens']) / seconds:.0f}",
                         note="; ".join(filter(None, notes))))
        candidates.append((r["output_tok_s"], label))
    hf_best = max(candidates) if candidates else None
    for name, w in (ours or {}).get("workloads", {}).items():
        if "error" in w:
            rows.append(dict(workload=name, engine="pagedinfer", note=w["error"]))
            continue
        row = dict(workload=name, engine="pagedinfer", requests=w["requests"], wall_s=f"{w['wall_s']:.1f}",
                   output_tok_s=f"{w['output_tok_s']:.0f}", total_tok_s=f"{w['total_tok_s']:.0f}")
        notes = []
        if "ideal_s" in w:
            w["of_roofline"] = w["ideal_s"] / w["wall_s"]
            row.update(ideal_s=f"{w['ideal_s']:.2f}", ideal_output_tok_s=f"{w['ideal_output_tok_s']:.0f}",
                       of_roofline=f"{w['of_roofline']:.2f}")
            if w["of_roofline"] > 1:  # faster than ideal: the measured rates are below what the model got
                notes.append("above the roofline: its rates were under-measured")
        if name == "a" and hf_best:
            w["vs_hf_best"] = w["output_tok_s"] / hf_best[0]
            row["vs_hf_best"] = f"{w['vs_hf_best']:.2f}x"
        if w.get("preemptions"):
            notes.append(f"{w['preemptions']} preemptions")
        row["note"] = "; ".join(notes)
        rows.append(row)
    print(f"\n{card}")
    for role in ROLES:  # a child that failed or ran out of time explains its missing rows
        status = run_info.get(role, {}).get("status")
        if status not in (None, "ok"):
            print(f"[{role}] {status}: its rows are missing or partial")
    if rows:
        print_table(rows, ["workload", "engine", "requests", "wall_s", "output_tok_s", "total_tok_s", "ideal_s",
                           "ideal_output_tok_s", "of_roofline", "vs_hf_best", "note"])
    else:
        print("no throughput figures came back")
    a = (ours or {}).get("workloads", {}).get("a", {})
    if "vs_hf_best" in a or "of_roofline" in a:  # issue 6's targets for workload (a)
        checks = []
        if "vs_hf_best" in a:
            checks.append(f">= 3x HF's best ({hf_best[1]}): {a['vs_hf_best']:.2f}x, "
                          f"{'met' if a['vs_hf_best'] >= 3 else 'missed'}")
        if "of_roofline" in a:
            checks.append(f">= 0.60 of the roofline: {a['of_roofline']:.2f}, "
                          f"{'met' if a['of_roofline'] >= 0.6 else 'missed'}")
        print("targets for (a): " + "; ".join(checks))
    if ours and "construct_s" in ours:
        print(f"startup (pagedinfer, fresh process): imports {ours['process_start_to_imports_done_s']:.1f} s, "
              f"LLM(...) {ours['construct_s']:.2f} s, first token of a 16-token request "
              f"{ours['first_token_s']:.2f} s -> {ours['startup_s']:.2f} s from construction to first token")
    if ours and "rates" in ours:
        r = ours["rates"]
        print(f"roofline inputs: GEMM {r['gemm_tflops']:.4g} TFLOP/s (best of {r['gemm_tflops_by_shape']}), "
              f"read {r['read_gbps']:.4g} GB/s ({r['read_method']}, {r['read_bytes'] / 2**30:.2f} GiB); "
              f"token budget {ours['max_num_batched_tokens']}, max_num_seqs {ours['max_num_seqs']}")
    elif ours and "rates_error" in ours:
        print(f"roofline rates not measured: {ours['rates_error']}")
    for role in ("hf", "hf_cb"):
        if role in parts:
            print(f"{role}: transformers {parts[role].get('transformers')}, model built in "
                  f"{parts[role].get('construct_s', float('nan')):.1f} s")
    payload = dict(run=run_info, parts=parts,
                   hf_best=hf_best and dict(output_tok_s=hf_best[0], engine=hf_best[1]))
    print("wrote", write_json("bench_offline.json", payload, card=card))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(ONLY), default="all",
                        help="which children run: ours, hf (static and continuous batching), or one HF mode")
    parser.add_argument("--workload", choices=["a", "b", "both"], default="both",
                        help="ours only: HF runs (a)'s shapes")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on whatever device there is")
    parser.add_argument("--enforce-eager", action="store_true", help="pass enforce_eager=True to LLM")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="merge bench_offline_<role>.json files")
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, default=_PROCESS_START, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workloads = ["a", "b"] if args.workload == "both" else [args.workload]
    sizes = SMOKE if args.smoke else FULL
    cfg = SMOKE_CONFIG if args.smoke else LLAMA_3_1_8B

    if args.merge:
        parts = {}
        for path in args.merge:
            with open(path) as f:
                part = json.load(f)
            parts["ours" if part.get("engine") == "pagedinfer" else part.get("role", "hf")] = part
        merge(parts, dict(merged_from=args.merge))
        return
    if args.role:
        with tempfile.TemporaryDirectory() as model_dir:
            with open(os.path.join(model_dir, "config.json"), "w") as f:
                json.dump(cfg, f)
            (run_ours if args.role == "ours" else run_hf)(args, sizes, cfg, model_dir)
        return

    # The parent touches no CUDA: each child gets the whole card in its own process, one after another.
    run_info = dict(smoke=args.smoke, only=args.only, workloads=args.workloads, config=cfg, sizes=sizes,
                    started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    paths = {role: os.path.join(out_dir(), f"bench_offline_{role}.json") for role in ROLES}
    for role in ONLY[args.only]:
        if os.path.exists(paths[role]):
            os.remove(paths[role])  # a stale result must not be merged as this run's
        run_info[role] = run_child(role, args, sizes[f"{role}_timeout"])
    parts = {}
    for role, path in paths.items():
        if os.path.exists(path):  # --only hf still merges ours from an earlier stage in this $OUT
            with open(path) as f:
                parts[role] = json.load(f)
    merge(parts, run_info)


if __name__ == "__main__":
    main()
