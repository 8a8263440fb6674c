"""The training-step benchmark of bench_step.py on a GPU (bf16, SmolLM2-135M and Gemma3-270m).

Made for one short run on a lent GPU machine with no internet and without the offline model
weights: each base model is built from its real config (benchmarks/gpu_configs/*.json, copied from
the converted models' config.json) with RANDOM weights. A step's time and memory do not depend on
the weight values; the routing does a little (a random router over random activations spreads
tokens about evenly over the experts, as a trained one with the load-balance loss roughly does).

Methods (forward + backward of the ordinary full-sequence LM loss, as in bench_step.py; no optimizer):
  base              the frozen base, backward to the input embeddings (the floor every adapter pays)
  lora              HF PEFT LoRA r=--lora-rank (80) on q,k,v,o,gate,up,down
  fused             our MixLoRA default path (8 experts, top-2, r=16, attention LoRA, dropout 0.05)
  fused_syncfree    fused with `model.set_sync_free()`: the routing layout built on the device with
                    nothing read back to the host, the expert products as torch._grouped_mm calls,
                    no row padding (the H100 run of 2026-11-26 counted 121 host-device syncs per
                    fused step, all from the layout and transformers' mask)
  fused_syncfree16  the same with expert blocks padded to 16 rows
  fused_nodrop      no LoRA dropout at all (what dropout costs in total)
  reference_code    the `mixlora` 0.2.3 package, only if importable (see --reference-code-path);
                    Llama only (it has no Gemma3 forward)
Optional (measured on 2026-11-26, reports/bench_gpu_step_h100.md): reference (our per-expert path),
fused_pad1 (row_bucket=1), fused_maskdrop (dropout from a keep mask), fused_recompute, per_expert_down.
  allocator         glibc malloc tuning (runtime.tune_cpu_allocator, applied by the `mixlora-lit`
                    command): two child processes, tuned vs glibc default, base + fused steps

Timing: torch.cuda.synchronize() before and after each step, wall clock; --warmup rounds, then
--repeats interleaved rounds (one step of each method per round); median and min-max. Peak GPU
memory per method: built one after another, each runs a warm-up step, then
reset_peak_memory_stats() and one step; the figure is max_memory_allocated() minus what was
allocated before that method's model was built (its own model copy + adapters + the step).
A sync probe (torch.cuda.set_sync_debug_mode) counts the host-device synchronisations of one
step of lora / fused / fused_syncfree* (and fused_maskdrop / reference when run), by source line.
Before timing the first shape, a check compares one step's loss and gradients of the default and the
sync-free layout (same weights, dropout 0). --profile adds per-operator tables of one step of lora,
fused and fused_syncfree at the first shape (profile_*.txt), with wall vs device-kernel time: a step
whose kernels add up to far less than its wall time is bound by the host (launches, Python), not the GPU.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_gpu_step.py --out $OUT --profile
    .venv/bin/python benchmarks/bench_gpu_step.py --device cpu --layers 2 --shapes 2x32 --threads 1 --out /tmp/x
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings

START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(HERE, "gpu_configs")
MODEL_CONFIGS = {"smollm2-135m": "smollm2-135m.json", "gemma3-270m": "gemma3-270m.json"}
DEFAULT_METHODS = ("base", "lora", "fused", "fused_untiled", "fused_syncfree", "fused_syncfree16", "fused_nodrop",
                   "reference_code")
# Measured on an H100 on 2026-11-26 (reports/bench_gpu_step_h100.md), so not run by default any more.
ALL_METHODS = DEFAULT_METHODS + ("reference", "fused_pad1", "fused_maskdrop", "fused_recompute", "per_expert_down")
PROFILED = ("lora", "fused", "fused_syncfree")  # --profile: one step of each, per-operator tables
WHAT = {
    "base": "frozen base, backward to the input embeddings",
    "lora": "PEFT LoRA (q,k,v,o,gate,up,down)",
    "fused": "MixLoRA fused (ours, default)",
    "reference": "MixLoRA reference path (ours, per expert)",
    "reference_code": "mixlora 0.2.3 package (fp32 LoRA)",
    "fused_pad1": "fused, no row padding (row_bucket=1)",
    "fused_untiled": "fused, one matmul per expert block instead of one batched matmul over row tiles",
    "fused_maskdrop": "fused, dropout positions from a keep mask",
    "fused_nodrop": "fused, LoRA dropout 0",
    "fused_syncfree": "fused, routing layout on the device, grouped matmuls (set_sync_free)",
    "fused_syncfree16": "fused_syncfree with expert blocks padded to 16 rows",
    "fused_recompute": "fused, experts recomputed in backward",
    "per_expert_down": "fused gate/up, W2 per (token, expert)",
}
RANDOM_WEIGHTS_NOTE = ("Base models are built from their real configs with RANDOM weights (the weights are not on "
                       "this machine); step time and memory do not depend on weight values. Routing of random "
                       "activations is close to uniform over the experts.")


class Unavailable(Exception):
    """A method that cannot run here (a missing package or switch); recorded, not fatal."""


def elapsed() -> float:
    return time.perf_counter() - START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json, results.md (created)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--models", nargs="+", default=list(MODEL_CONFIGS), choices=list(MODEL_CONFIGS))
    p.add_argument("--shapes", nargs="+", default=["8x256", "16x512"], help="BATCHxSEQ, e.g. 8x256 16x512")
    p.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers (smoke tests)")
    p.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary size (smoke tests)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-rank", type=int, default=80)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=ALL_METHODS)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (--device cpu)")
    p.add_argument("--time-budget", type=float, default=230.0,
                   help="seconds: after this, rounds stop early (at least 3 kept) and what is left is skipped")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-sync-probe", action="store_true")
    p.add_argument("--no-allocator-check", action="store_true")
    p.add_argument("--no-check", action="store_true", help="skip the sync-free vs default gradient comparison")
    p.add_argument("--profile", action="store_true",
                   help=f"write per-operator tables of one step of {', '.join(PROFILED)} (first shape only)")
    p.add_argument("--allocator-repeats", type=int, default=8)
    p.add_argument("--reference-code-path", default=None,
                   help="a folder holding the `mixlora` package (appended to sys.path, so it never shadows "
                        "torch); without it, or if the import fails, reference_code is skipped")
    p.add_argument("--_alloc-child", dest="alloc_child", default=None, choices=("tuned", "default"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape_list = []
    for s in args.shapes:
        b, _, t = s.lower().partition("x")
        args.shape_list.append((int(b), int(t)))
    return args


# ---------------------------------------------------------------------------- models
def model_config(name: str, layers: int | None, vocab_size: int | None = None):
    """transformers config of `name` from the committed JSON; (config, notes)."""
    from transformers import AutoConfig

    with open(os.path.join(CONFIG_DIR, MODEL_CONFIGS[name])) as fh:
        d = json.load(fh)
    notes = []
    if vocab_size is not None:
        d["vocab_size"] = vocab_size
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            if isinstance(d.get(key), int) and d[key] >= vocab_size:
                d[key] = 0
        notes.append(f"vocabulary shrunk to {vocab_size}")
    if layers is not None:
        d["num_hidden_layers"] = layers
        if isinstance(d.get("layer_types"), list):
            d["layer_types"] = d["layer_types"][-layers:]  # the last ones include a full-attention layer
        notes.append(f"shrunk to {layers} layers")
    d.pop("transformers_version", None)
    model_type = d.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **d)
    except Exception as err:  # an older transformers that does not know some key: keep the essentials
        notes.append(f"full config refused ({type(err).__name__}: {err}); built from the essential fields")
        keep = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "hidden_act", "hidden_activation", "sliding_window", "layer_types",
                "query_pre_attn_scalar", "bos_token_id", "eos_token_id", "pad_token_id")
        essential = {k: d[k] for k in keep if k in d}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in rope:
            essential["rope_theta"] = rope["rope_theta"]
        elif "full_attention" in rope:
            essential["rope_theta"] = rope["full_attention"]["rope_theta"]
            essential["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        config = AutoConfig.for_model(model_type, **essential)
    return config, notes


def build_template(name: str, args, device):
    """The base model with random weights, on `device`, in --dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    from mixlora_lit.base_models import parse_dtype

    config, notes = model_config(name, args.layers, args.vocab_size)
    dtype = parse_dtype(args.dtype)
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers that still calls it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
    model = model.to(device)  # a no-op when the device context was honoured; no dtype cast (keeps fp32 buffers)
    model.eval()
    info = {"model_type": config.model_type, "layers": config.num_hidden_layers,
            "params": sum(p.numel() for p in model.parameters()),
            "attn_implementation": getattr(model.config, "_attn_implementation", None), "config_notes": notes}
    return model, info


def mixlora_config(args, dropout):
    from mixlora_lit import MixLoraConfig

    return MixLoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=dropout,
                         num_experts=args.experts, top_k=args.top_k)


def reference_code_model(base, args, device):
    """bench_step.py's reference_code_model, on `device`."""
    try:
        import mixlora  # noqa: F401
    except Exception as err:  # noqa: BLE001
        raise Unavailable(f"the `mixlora` package is not importable ({type(err).__name__}: {err})") from err
    if base.config.model_type not in ("llama", "mistral", "qwen2", "gemma", "gemma2"):
        raise Unavailable(f"the reference code has no forward for model type {base.config.model_type!r}")
    import bench_step  # this folder: the same injection as the CPU benchmark, on `device`

    return bench_step.reference_code_model(base, args, device=str(device), config=mixlora_config(args, args.dropout))


@contextlib.contextmanager
def sparse_dropout_max_p(value):
    """Temporarily set mixlora_lit.lora.SPARSE_DROPOUT_MAX_P (read at call time)."""
    from mixlora_lit import lora

    old = lora.SPARSE_DROPOUT_MAX_P
    lora.SPARSE_DROPOUT_MAX_P = value
    try:
        yield
    finally:
        lora.SPARSE_DROPOUT_MAX_P = old


def build(method: str, template, args, device):
    """(model, step, trainable_params); step(ids) runs forward + backward, clears the grads, returns the loss."""
    import torch

    from mixlora_lit import get_mixlora_model
    from mixlora_lit.baselines import get_lora_model

    torch.manual_seed(0)
    model = copy.deepcopy(template)
    params = None
    context = contextlib.nullcontext
    if method == "base":
        for p in model.parameters():
            p.requires_grad_(False)
    elif method == "reference_code":
        model, params = reference_code_model(model, args, device)
    elif method == "lora":
        model = get_lora_model(model, args.lora_rank, 2 * args.lora_rank, args.dropout)
    else:
        model = get_mixlora_model(model, mixlora_config(args, 0.0 if method == "fused_nodrop" else args.dropout))
        model.set_execution_path("reference" if method == "reference" else "fused")
        model.set_recompute_experts(method == "fused_recompute")
        if method.startswith("fused_syncfree"):
            if not hasattr(model, "set_sync_free"):
                raise Unavailable("MixLoraModel has no set_sync_free any more")
            model.set_sync_free(True, 16 if method == "fused_syncfree16" else 1)
        for module in model.moe_layers():
            module.factor_down = method != "per_expert_down"
            if method == "fused_untiled":
                if not hasattr(module, "tiled_blocks"):
                    raise Unavailable("MixLoraMoeFFN has no tiled_blocks attribute any more")
                module.tiled_blocks = False
            if method == "fused_pad1":
                if not hasattr(module, "row_bucket"):
                    raise Unavailable("MixLoraMoeFFN has no row_bucket attribute any more")
                module.row_bucket = 1
        if method == "fused_maskdrop":
            from mixlora_lit import lora

            if not hasattr(lora, "SPARSE_DROPOUT_MAX_P"):
                raise Unavailable("mixlora_lit.lora has no SPARSE_DROPOUT_MAX_P any more")
            context = lambda: sparse_dropout_max_p(0.0)  # noqa: E731
    model.train()
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    import bench_step  # this folder: the same step as the CPU benchmark

    step = bench_step.training_step(model, params, to_embeddings=method == "base", context=context)
    return model, step, sum(p.numel() for p in params)


def batch_ids(batch, seq, device, vocab_size=49152):
    """bench_step.py's batch (ids 100..39999), kept inside a shrunk vocabulary."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    low, high = min(100, vocab_size // 2), min(40000, vocab_size)
    return torch.randint(low, high, (batch, seq), generator=gen).to(device)


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, ids, device):
    sync(device)
    t0 = time.perf_counter()
    loss = step(ids)
    sync(device)
    return time.perf_counter() - t0, float(loss)


# ---------------------------------------------------------------------------- probes
@contextlib.contextmanager
def observed_layouts():
    """While open, every routing layout the MoE layers build is counted: yields a dict with the row
    buckets used, rows with and without padding, and how many layouts there were and were sync-free."""
    from mixlora_lit import moe

    seen = {"buckets": set(), "rows_padded": 0, "rows_real": 0, "layouts": 0, "sync_free": 0}
    orig_layout = moe.ExpertLayout

    class RecordingLayout(orig_layout):
        def __init__(self, flat_experts, num_experts, k, bucket=1, *args, **kwargs):
            super().__init__(flat_experts, num_experts, k, bucket, *args, **kwargs)
            seen["buckets"].add(bucket)
            seen["rows_padded"] += self.num_rows
            seen["rows_real"] += flat_experts.numel()
            seen["layouts"] += 1
            seen["sync_free"] += int(getattr(self, "sync_free", False))

    moe.ExpertLayout = RecordingLayout
    try:
        yield seen
    finally:
        moe.ExpertLayout = orig_layout


def probe_layout_and_dropout(model, step, ids, device) -> dict:
    """One step of a fused model with the routing layouts and the dropout draws observed."""
    from mixlora_lit import kernels, lora

    drops = {"calls": 0, "sparse": 0}
    orig_drop_lora, orig_drop_kernels = lora.dropped_positions, getattr(kernels, "dropped_positions", None)

    def recording_drop(numel, threshold, dev, *args, **kwargs):
        drops["calls"] += 1
        drops["sparse"] += int(threshold / 65536 <= getattr(lora, "SPARSE_DROPOUT_MAX_P", 0))
        return orig_drop_lora(numel, threshold, dev, *args, **kwargs)

    lora.dropped_positions = recording_drop
    if orig_drop_kernels is not None:
        kernels.dropped_positions = recording_drop
    try:
        with observed_layouts() as seen:
            step(ids)
            sync(device)
    finally:
        lora.dropped_positions = orig_drop_lora
        if orig_drop_kernels is not None:
            kernels.dropped_positions = orig_drop_kernels
    real = seen["rows_real"]
    return {"row_buckets_used": sorted(seen["buckets"]),
            "padding_extra_rows_fraction": (seen["rows_padded"] - real) / real if real else None,
            "layouts": seen["layouts"], "sync_free_layouts": seen["sync_free"],
            "dropout_draw_calls": drops["calls"], "dropout_calls_by_drawn_positions": drops["sparse"]}


def probe_syncs(step, ids, device) -> dict:
    """Host-device synchronisations of one step, by source line (torch.cuda.set_sync_debug_mode)."""
    import torch

    if device.type != "cuda":
        return {"note": "CUDA only"}
    counts: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" not in str(w.message).lower():
            continue
        where = f"{os.path.relpath(w.filename) if w.filename.startswith(os.getcwd()) else w.filename}:{w.lineno}"
        counts[where] = counts.get(where, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    return {"total": sum(counts.values()), "by_line": dict(top[:12])}


def sync_free_check(template, args, device) -> dict:
    """One step's loss and gradients of the default and the sync-free layout (in --dtype: bf16 on a
    GPU) against the default path on an fp32 copy of the base, the oracle (same weights, random B
    matrices so every product matters, dropout 0). Per path: the relative L2 error over all gradients
    and the largest per-tensor error (relative to the tensor's largest value). bf16 alone puts both
    paths well off fp32 (on a CPU smoke run the reference path was as far off as the others), so
    the sync-free path is right when its error is the default's, not when it is small. An expert
    without rows has no gradient on the default path and a zero one on the sync-free path; both
    count as zero."""
    import torch

    from mixlora_lit import get_mixlora_model

    ids = batch_ids(2, 64, device, template.config.vocab_size)

    def run(base, sync_free):
        torch.manual_seed(0)
        model = get_mixlora_model(copy.deepcopy(base), mixlora_config(args, 0.0)).train()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        model.set_sync_free(sync_free)
        with observed_layouts() as seen:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad).detach().float()
                 for n, p in model.named_parameters() if p.requires_grad}
        return float(loss), grads, seen

    oracle_loss, oracle, _ = run(copy.deepcopy(template).float(), False)
    norm = sum(float(g.pow(2).sum()) for g in oracle.values()) ** 0.5
    result = {"loss_fp32_oracle": oracle_loss, "tensors": len(oracle)}
    for label, sync_free in (("default", False), ("sync_free", True)):
        loss, grads, seen = run(template, sync_free)
        err = sum(float((grads[n] - g).pow(2).sum()) for n, g in oracle.items()) ** 0.5 / max(norm, 1e-30)
        worst = max(((float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)), n)
                     for n, g in oracle.items()), default=(0.0, None))
        result[label] = {"loss": loss, "relative_l2_grad_error": err, "worst_tensor_error": worst[0],
                         "worst_tensor": worst[1], "layouts": seen["layouts"], "sync_free_layouts": seen["sync_free"]}
    d, f = result["default"], result["sync_free"]
    ran = (f"the sync-free run built {f['sync_free_layouts']} sync-free layouts of {f['layouts']}"
           + ("" if f["sync_free_layouts"] == f["layouts"] > 0 else " (NOT the sync-free path: this dtype or device "
                                                                     "has no grouped matmul without host reads)"))
    result["summary"] = (f"{ran}; against the fp32 default path (loss {oracle_loss:.5f}), over {len(oracle)} gradient "
                         f"tensors: default loss {d['loss']:.5f}, gradient L2 error {d['relative_l2_grad_error']:.2e} "
                         f"(worst tensor {d['worst_tensor_error']:.2e}); sync-free loss {f['loss']:.5f}, "
                         f"L2 error {f['relative_l2_grad_error']:.2e} (worst tensor {f['worst_tensor_error']:.2e})")
    return result


def profile_step(step, ids, device, path: str) -> dict:
    """One profiled step: wall time, device kernel time and launches, host operator time and the
    operator calls made from Python or autograd (not those nested in another operator); the
    per-operator tables (by device time, then by host time) go to `path`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t, _ = timed(step, ids, device)
    events = prof.events()
    device_events = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    host_events = [e for e in events if not str(getattr(e, "device_type", "")).endswith("CUDA")]
    time_of = lambda e: getattr(e, "device_time", None) or getattr(e, "cuda_time", 0) or 0  # noqa: E731
    averages = prof.key_averages()
    with open(path, "w") as fh:
        if cuda:
            fh.write(averages.table(sort_by="self_cuda_time_total", row_limit=40) + "\n\n")
        fh.write(averages.table(sort_by="self_cpu_time_total", row_limit=40) + "\n")
    return {"wall_ms": t * 1e3, "device_ms": sum(time_of(e) for e in device_events) / 1e3,
            "kernels": len(device_events), "host_ms": sum(e.self_cpu_time_total for e in host_events) / 1e3,
            "ops": sum(1 for e in host_events if e.name.startswith("aten::") and not _under_aten(e)),
            "file": os.path.basename(path)}


def _under_aten(event) -> bool:
    """Whether a profiler event runs inside another ATen operator (e.g. aten::copy_ inside aten::to, or
    the per-group matmuls of a CPU grouped matmul): those are not calls the host dispatches itself."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


# ---------------------------------------------------------------------------- one (model, shape)
def run_config(name, template, tinfo, batch, seq, args, device, deadline) -> dict:
    import torch

    ids = batch_ids(batch, seq, device, template.config.vocab_size)
    result = {"model": name, "batch": batch, "seq": seq, "tokens": batch * seq, "base_info": tinfo,
              "methods": {}, "errors": {}, "probes": {}}
    cuda = device.type == "cuda"
    steps, models = {}, {}
    if not args.no_check and (batch, seq) == args.shape_list[0]:
        try:
            result["sync_free_check"] = sync_free_check(template, args, device)
            log(f"  sync-free check: {result['sync_free_check']['summary']}")
        except Exception as err:  # noqa: BLE001
            result["sync_free_check"] = {"error": f"{type(err).__name__}: {err}"}
            log(f"  sync-free check FAILED: {type(err).__name__}: {err}")
        if cuda:
            torch.cuda.empty_cache()
    for method in args.methods:
        if elapsed() > deadline:
            result["errors"][method] = "skipped: time budget"
            continue
        try:
            if cuda:
                gc.collect()
                before = torch.cuda.memory_allocated()
            model, step, trainable = build(method, template, args, device)
            entry = {"what": WHAT[method], "trainable_params": trainable}
            _, entry["loss_first_step"] = timed(step, ids, device)  # also the warm-up for the memory step
            if cuda and not args.no_memory:
                after_build = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                timed(step, ids, device)
                peak = torch.cuda.max_memory_allocated()
                entry.update(peak_mb=(peak - before) / 2**20, model_mb=(after_build - before) / 2**20,
                             step_peak_mb=(peak - after_build) / 2**20)
            try:  # the probes only observe; a probe that breaks on changed code costs the figure, not the method
                if method.startswith("fused") or method == "per_expert_down":
                    entry["probe"] = probe_layout_and_dropout(model, step, ids, device)
                if not args.no_sync_probe and cuda and method in ("fused", "fused_maskdrop", "reference", "lora",
                                                                   "fused_syncfree", "fused_syncfree16"):
                    result["probes"][f"syncs_{method}"] = probe_syncs(step, ids, device)
            except Exception as err:  # noqa: BLE001
                entry["probe_error"] = f"{type(err).__name__}: {err}"
            steps[method], models[method] = step, model
            result["methods"][method] = entry
            mem = f", peak {entry['peak_mb']:.0f} MB" if "peak_mb" in entry else ""
            log(f"  built {method}: trainable {trainable:,}{mem}")
        except Unavailable as err:
            result["errors"][method] = f"unavailable: {err}"
            log(f"  {method}: unavailable: {err}")
        except Exception as err:  # noqa: BLE001 - one failing method must not end the run
            result["errors"][method] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
            log(f"  {method}: FAILED {type(err).__name__}: {err}")
            if cuda:
                torch.cuda.empty_cache()
    times: dict[str, list[float]] = {m: [] for m in steps}
    rounds = args.warmup + args.repeats
    for round_ in range(rounds):
        for method, step in list(steps.items()):
            try:
                t, _ = timed(step, ids, device)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory: drop the method, keep the others
                result["errors"][method] = f"failed in round {round_ + 1}: {type(err).__name__}: {err}"
                log(f"  {method}: FAILED in round {round_ + 1}: {type(err).__name__}: {err}")
                del steps[method], models[method]
                if cuda:
                    torch.cuda.empty_cache()
                continue
            if round_ >= args.warmup:
                times[method].append(t)
        done = round_ + 1 - args.warmup
        log(f"  round {round_ + 1}/{rounds}: " + (", ".join(f"{m} {times[m][-1] * 1e3:.1f}ms" for m in steps if times[m])
                                                  if done > 0 else "warm-up"))
        if elapsed() > deadline and done >= min(3, args.repeats):
            result["stopped_early_after_rounds"] = done
            log(f"  time budget reached: stopping after {done} timed rounds")
            break
    for method, t in times.items():
        if t:
            med = statistics.median(t)
            result["methods"][method].update(median_s=med, min_s=min(t), max_s=max(t), rounds=len(t),
                                             tokens_per_s=batch * seq / med)
    result["ratios"] = ratios(result["methods"])
    if args.profile and (batch, seq) == args.shape_list[0]:
        result["profiles"] = {}
        for method in PROFILED:
            if method in steps:
                path = os.path.join(args.out, f"profile_{name}_{batch}x{seq}_{method}.txt")
                try:
                    result["profiles"][method] = profile_step(steps[method], ids, device, path)
                except Exception as err:  # noqa: BLE001
                    result["profiles"][method] = {"error": f"{type(err).__name__}: {err}"}
    del steps, models
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def ratios(m: dict) -> dict:
    def r(a, b, key="median_s"):
        return m[a][key] / m[b][key] if a in m and b in m and key in m[a] and key in m[b] else None

    return {
        "fused_vs_lora": r("fused", "lora"),  # GPU target <= 1.0 (the paper: MixLoRA 1.885 x LoRA latency)
        "fused_vs_reference": r("fused", "reference"),
        "fused_vs_reference_code": r("fused", "reference_code"),
        "fused_vs_base": r("fused", "base"),
        "reference_vs_lora": r("reference", "lora"),
        "reference_code_vs_lora": r("reference_code", "lora"),
        "pad1_vs_fused": r("fused_pad1", "fused"),
        "maskdrop_vs_fused": r("fused_maskdrop", "fused"),
        "nodrop_vs_fused": r("fused_nodrop", "fused"),
        "syncfree_vs_fused": r("fused_syncfree", "fused"),
        "syncfree_vs_lora": r("fused_syncfree", "lora"),
        "syncfree16_vs_fused": r("fused_syncfree16", "fused"),
        "syncfree16_vs_lora": r("fused_syncfree16", "lora"),
        "recompute_vs_fused": r("fused_recompute", "fused"),
        "per_expert_down_vs_fused": r("per_expert_down", "fused"),
        "peak_mem_fused_vs_lora": r("fused", "lora", "peak_mb"),
        "peak_mem_fused_vs_reference": r("fused", "reference", "peak_mb"),
        "peak_mem_fused_vs_reference_code": r("fused", "reference_code", "peak_mb"),
    }


# ---------------------------------------------------------------------------- allocator check
def vm_hwm_mb():
    import bench_step  # this folder

    return bench_step._peak_rss_mb()


def alloc_child(args) -> None:
    """Child process: base + fused steps with the glibc allocator tuned or not; one JSON line."""
    import torch

    from mixlora_lit import runtime

    tuned = runtime.tune_cpu_allocator() if args.alloc_child == "tuned" else False
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    template, _ = build_template(args.models[0], args, device)
    batch, seq = args.shape_list[0]
    ids = batch_ids(batch, seq, device, template.config.vocab_size)
    steps = {m: build(m, template, args, device)[1] for m in ("base", "fused")}
    times = {m: [] for m in steps}
    for round_ in range(args.warmup + args.allocator_repeats):
        for m, step in steps.items():
            t, _ = timed(step, ids, device)
            if round_ >= args.warmup:
                times[m].append(t)
    out = {"setting": args.alloc_child, "tuned_in_effect": tuned, "model": args.models[0], "batch": batch,
           "seq": seq, "host_peak_rss_mb": vm_hwm_mb()}
    for m, t in times.items():
        out[m] = {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "rounds": len(t)}
    print(json.dumps(out), flush=True)


def allocator_check(args, deadline) -> dict:
    out = {"note": ("glibc malloc tuning only changes host (CPU) allocations; CUDA tensors come from torch's "
                    "caching allocator either way. Two child processes, compare within this block only."),
           "runs": []}
    for setting in ("default", "tuned"):
        left = deadline + 30 - elapsed()  # a child takes about 20 s on a GPU; it may overrun the budget a little
        if left < 30:
            out["runs"].append({"setting": setting, "error": "skipped: time budget"})
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--_alloc-child", setting, "--out", args.out,
               "--device", args.device, "--models", args.models[0], "--shapes", args.shapes[0],
               "--dtype", args.dtype, "--experts", str(args.experts), "--top-k", str(args.top_k),
               "--rank", str(args.rank), "--dropout", str(args.dropout), "--warmup", str(args.warmup),
               "--allocator-repeats", str(args.allocator_repeats)]
        if args.layers is not None:
            cmd += ["--layers", str(args.layers)]
        if args.vocab_size is not None:
            cmd += ["--vocab-size", str(args.vocab_size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = dict(os.environ)
        env.pop("MIXLORA_LIT_MALLOC_TUNING", None)
        log(f"allocator check: child with glibc malloc {setting}")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env)
            if proc.returncode != 0:
                out["runs"].append({"setting": setting, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"})
            else:
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                out["runs"].append(run)
                log(f"  {setting}: base {run['base']['median_s'] * 1e3:.1f}ms, fused "
                    f"{run['fused']['median_s'] * 1e3:.1f}ms, host peak RSS {run['host_peak_rss_mb']:.0f} MB, "
                    f"tuned in effect: {run['tuned_in_effect']}")
        except subprocess.TimeoutExpired:
            out["runs"].append({"setting": setting, "error": "timed out (time budget)"})
    return out


# ---------------------------------------------------------------------------- static facts
def static_checks() -> dict:
    """What the code does about each CPU-specific choice, read from the working tree at run time."""
    facts = {}
    try:
        from mixlora_lit import lora, runtime

        facts["lora.SPARSE_DROPOUT_MAX_P"] = getattr(lora, "SPARSE_DROPOUT_MAX_P", None)
        facts["allocator_tuned_in_this_process"] = runtime.allocator_tuned()
    except Exception as err:  # noqa: BLE001
        facts["error"] = repr(err)
    root = os.path.dirname(HERE)
    sources = {}
    for rel in ("mixlora_lit/moe.py", "mixlora_lit/kernels.py", "mixlora_lit/lora.py", "mixlora_lit/cli.py"):
        try:
            with open(os.path.join(root, rel)) as fh:
                sources[rel] = fh.read()
        except OSError:
            sources[rel] = ""
    # MixLoRAMoE.row_buckets: which devices and dtypes get padded row buckets by default
    facts["row_bucket_default_lines"] = [ln.strip() for ln in sources["mixlora_lit/moe.py"].splitlines()
                                         if "padded = " in ln or "if padded else" in ln]
    # Lines that branch on the device kind (autocast's device.type arguments are not branches).
    facts["device_branches_in_moe_kernels_lora"] = [
        f"{k}: {ln.strip()}" for k, src in sources.items() if k != "mixlora_lit/cli.py" for ln in src.splitlines()
        if any(t in ln for t in ('= "cuda"', "= 'cuda'", '= "cpu"', "= 'cpu'", "is_cuda", "is_available()"))]
    facts["cli_tunes_allocator_at_startup"] = "tune_cpu_allocator()" in sources["mixlora_lit/cli.py"]
    return facts


# ---------------------------------------------------------------------------- output
def environment(args, device) -> dict:
    import torch
    import transformers

    env = {"command": "PYTHONPATH=. " + " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
           "cwd": os.getcwd(), "python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "transformers": transformers.__version__, "device": str(device),
           "note": RANDOM_WEIGHTS_NOTE, "settings": {k: v for k, v in vars(args).items()
                                                     if k not in ("alloc_child", "shape_list")}}
    try:
        import peft

        env["peft"] = peft.__version__
    except Exception:  # noqa: BLE001
        env["peft"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    else:
        env.update(gpu=None, cpu_threads=torch.get_num_threads())
    return env


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    env = results["environment"]
    s = env["settings"]
    lines = [f"# MixLoRA training step on {env.get('gpu') or env['device']}", "",
             f"torch {env['torch']} (CUDA {env['torch_cuda']}), transformers {env['transformers']}, "
             f"peft {env['peft']}, python {env['python']}, {s['dtype']}. "
             f"MixLoRA {s['experts']} experts top-{s['top_k']} r={s['rank']} + attention LoRA, dropout {s['dropout']}; "
             f"PEFT LoRA r={s['lora_rank']}. Forward + backward of the full-sequence LM loss, no optimizer; "
             f"median of {s['repeats']} interleaved rounds after {s['warmup']} warm-up rounds.", "",
             f"**{RANDOM_WEIGHTS_NOTE}**", "", f"Command: `{env['command']}`", ""]
    for c in results["configs"]:
        lines += [f"## {c['model']}, batch {c['batch']} x {c['seq']} ({c['base_info']['layers']} layers)", "",
                  "| method | what | step (ms) | min-max (ms) | tokens/s | peak GPU mem (MB) | trainable | fused / this |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        fused = c["methods"].get("fused", {}).get("median_s")
        for name, r in c["methods"].items():
            if "median_s" not in r:
                continue
            rel = f"{fused / r['median_s']:.2f}" if fused else "-"
            lines.append(f"| {name} | {r['what']} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f}-"
                         f"{r['max_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {fmt(r.get('peak_mb'), '.0f')} "
                         f"| {r['trainable_params']:,} | {rel} |")
        lines.append("")
        r = c["ratios"]
        for key, what in (("fused_vs_lora", "fused"), ("syncfree_vs_lora", "fused_syncfree"),
                          ("syncfree16_vs_lora", "fused_syncfree16")):
            if r.get(key) is not None:
                verdict = "meets" if r[key] <= 1.0 else "MISSES"
                lines += [f"**{what} / PEFT LoRA step time = {r[key]:.3f}** ({verdict} the GPU target <= 1.0; "
                          f"the paper reports MixLoRA at 1.885 x LoRA's latency)", ""]
        check = c.get("sync_free_check")
        if check:
            lines += [f"- sync-free vs default layout, same weights, dropout 0: {check.get('summary', check)}"]
        for method, prof in c.get("profiles", {}).items():
            if "error" in prof:
                lines.append(f"- profile {method}: {prof['error']}")
            else:
                lines.append(f"- profile {method}: wall {prof['wall_ms']:.1f} ms, device kernels {prof['device_ms']:.1f} ms "
                             f"({prof['kernels']} launches), host {prof['host_ms']:.1f} ms in {prof['ops']} operator calls "
                             f"({prof['file']})")
        for key, value in c["ratios"].items():
            if value is not None:
                lines.append(f"- `{key}`: {value:.3f}")
        for method, entry in c["methods"].items():
            probe = entry.get("probe")
            if probe:
                lines.append(f"- {method}: row buckets used {probe['row_buckets_used']}, padding adds "
                             f"{fmt(probe['padding_extra_rows_fraction'] and 100 * probe['padding_extra_rows_fraction'], '.1f')}% "
                             f"rows; sync-free layouts {probe.get('sync_free_layouts')} of {probe.get('layouts')}; "
                             f"dropout draws {probe['dropout_draw_calls']} "
                             f"({probe['dropout_calls_by_drawn_positions']} by drawn positions)")
        for key, p in c.get("probes", {}).items():
            if "total" in p:
                where = ", ".join(f"{k} x{v}" for k, v in list(p["by_line"].items())[:5])
                lines.append(f"- host-device syncs per step, {key.removeprefix('syncs_')}: {p['total']} ({where})")
        for method, err in c["errors"].items():
            lines.append(f"- {method}: {err.splitlines()[0]}")
        if c.get("stopped_early_after_rounds"):
            lines.append(f"- stopped early (time budget) after {c['stopped_early_after_rounds']} rounds")
        lines.append("")
    for skipped in results.get("skipped", []):
        lines.append(f"- skipped: {skipped}")
    alloc = results.get("allocator")
    if alloc:
        lines += ["## glibc allocator tuning (runtime.tune_cpu_allocator)", "", alloc["note"], "",
                  "| setting | in effect | base (ms) | fused (ms) | host peak RSS (MB) |", "| --- | --- | ---: | ---: | ---: |"]
        for run in alloc["runs"]:
            if "error" in run:
                lines.append(f"| {run['setting']} | error: {run['error'].splitlines()[0][:80]} | | | |")
            else:
                lines.append(f"| {run['setting']} | {run['tuned_in_effect']} | {run['base']['median_s'] * 1e3:.1f} "
                             f"| {run['fused']['median_s'] * 1e3:.1f} | {fmt(run['host_peak_rss_mb'], '.0f')} |")
        lines.append("")
    lines += ["## Static facts (working tree at run time)", ""]
    lines += [f"- `{k}`: {v}" for k, v in results.get("static", {}).items()]
    lines.append(f"\nTotal wall time {results.get('wall_s', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def write(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    results["wall_s"] = elapsed()
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(markdown(results))


# ---------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.reference_code_path:
        path = os.path.abspath(args.reference_code_path)
        if os.path.isdir(os.path.join(path, "mixlora")):
            sys.path.append(path)  # appended: it never shadows torch or transformers
    if args.alloc_child:
        alloc_child(args)
        return {}
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available here; use --device cpu for a smoke test")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = args.time_budget
    results = {"environment": environment(args, device), "static": static_checks(), "configs": [], "skipped": []}
    log(f"torch {torch.__version__}, device {results['environment'].get('gpu') or device}; {RANDOM_WEIGHTS_NOTE}")
    write(results, args.out)
    # The paper-relevant settings first: every model at the first shape, then the larger shapes.
    plan = [(s, m) for s in args.shape_list for m in args.models]
    plan.insert(len(args.models), "allocator")  # after the first shape: a cheap check, before the long configs
    templates: dict[str, tuple] = {}
    for item in plan:
        if item == "allocator":
            if not args.no_allocator_check:
                templates.clear()  # free the device for the children
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                results["allocator"] = allocator_check(args, deadline)
                write(results, args.out)
            continue
        (batch, seq), name = item
        if elapsed() > deadline:
            results["skipped"].append(f"{name} {batch}x{seq}: time budget")
            log(f"skip {name} {batch}x{seq}: time budget reached")
            continue
        log(f"== {name}, batch {batch} x {seq}")
        try:
            if name not in templates:
                for other in list(templates):  # one template on the device at a time
                    del templates[other]
                gc.collect()
                templates[name] = build_template(name, args, device)
                log(f"  built {name} from its config, random weights: {templates[name][1]}")
            template, tinfo = templates[name]
            results["configs"].append(run_config(name, template, tinfo, batch, seq, args, device, deadline))
        except Exception as err:  # noqa: BLE001
            results["skipped"].append(f"{name} {batch}x{seq}: {type(err).__name__}: {err}")
            log(f"  FAILED: {type(err).__name__}: {err}\n{traceback.format_exc()}")
        write(results, args.out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write(results, args.out)
    md = markdown(results)
    print(md, flush=True)
    log(f"wrote {os.path.join(args.out, 'results.json')} and results.md")
    return results


if __name__ == "__main__":
    main()
