"""Training-step cost of MixLoRA side by side with its alternatives, on one batch and one base model.

Methods (all forward + backward on the same token batch, LM loss over every position):
  base             the frozen base alone, backward to the input embeddings (the floor every adapter pays)
  lora             HF PEFT LoRA, rank --lora-rank (80: parameter-matched to 16 x 8) on q,k,v,o,gate,up,down
  fused            our MixLoRA default path (--experts, --top-k, --rank, attention LoRA)
  reference        our per-expert path: each routed expert runs its whole FFN (the paper's formula)
  fused_recompute  the fused path recomputing the experts in backward (less memory)
  per_expert_down  fused gate/up, but the base down projection once per (token, expert): the
                   reference code's fast path, to show what factoring W2 out of the sum buys
  fused_grouped    the fused path with `torch._grouped_mm` over the experts' blocks (MixLoraMoeFFN.grouped_mm)
  fused_untiled    the fused path with one matmul per expert block instead of one batched matmul over the
                   blocks' row tiles (MixLoraMoeFFN.tiled_blocks off)
  lora_compiled, fused_compiled
                   the same two after `module.compile()` (torch.compile; not in the default list: each
                   compiles for about half a minute in its warm-up step)
  reference_code   the reference implementation itself (the `mixlora` 0.2.3 package, installed by
                   `make assets`), given the same initial adapter weights: fp32 LoRA experts

Timing is interleaved (one step of each method per round) in one process, so machine noise hits
all methods alike; medians and min-max over --repeats rounds, and for fused / base and fused / LoRA
each round's ratio (`round_ratios`) with a 95% interval over the rounds and issue 18's verdict
(`ratio_interval`). Peak memory is each method's whole process high-water mark (VmHWM), measured
first, in a fresh subprocess per method, because a process's high-water mark only grows.

    .venv/bin/python benchmarks/bench_step.py --json reports/bench.json --markdown reports/bench.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("base", "lora", "fused", "fused_recompute", "reference", "per_expert_down", "reference_code")
ALL_METHODS = METHODS + ("lora_compiled", "fused_compiled", "fused_grouped", "fused_untiled")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="auto", help="the base's dtype; auto: bf16 where the CPU runs it natively, else fp32")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-rank", type=int, default=80)
    p.add_argument("--targets", nargs="+", default=None,
                   help="MixLoRA target modules (default: q,k,v,o and the FFN); the FFN ones get experts")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="tuned: mixlora_lit.runtime.tune_cpu_allocator(), as the mixlora-lit command does "
                        "(freed memory stays in the process); default: glibc's own behaviour")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=ALL_METHODS)
    p.add_argument("--no-memory", action="store_true", help="skip the per-process peak-memory runs")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--markdown", default=None, help="write a Markdown table here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also write each method's per-operator profile of --profile-steps steps to DIR/step_<method>.txt")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--_memory-of", dest="memory_of", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(method: str, args: argparse.Namespace):
    """(model, step) for one method; step(ids) runs forward + backward and clears the gradients."""
    import torch

    from mixlora_lit import get_mixlora_model
    from mixlora_lit.base_models import load_base_model
    from mixlora_lit.baselines import get_lora_model

    compiled = method.endswith("_compiled")
    method = method.removesuffix("_compiled")
    torch.manual_seed(0)
    model, _ = load_base_model(args.base, dtype=args.dtype)
    params = None
    if method == "reference_code":
        model, params = reference_code_model(model, args)
    elif method == "lora":
        model = get_lora_model(model, args.lora_rank, 2 * args.lora_rank, args.dropout)
    elif method == "base":  # frozen: the backward computes input gradients only, as under any adapter
        model.requires_grad_(False)
    else:
        model = get_mixlora_model(model, _mixlora_config(args))
        model.set_execution_path("reference" if method == "reference" else "fused")
        model.set_recompute_experts(method == "fused_recompute")
        for module in model.moe_layers():  # the reference code's fast path: W2 per (token, expert)
            module.factor_down = method != "per_expert_down"
            if method == "fused_grouped":
                module.grouped_mm = True
            if method == "fused_untiled":  # padded blocks as one matmul per expert (before the tiles)
                module.tiled_blocks = False
    model.train()
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if compiled:
        model.compile()

    return model, training_step(model, params, to_embeddings=method == "base")


def training_step(model, params, to_embeddings: bool = False, context=None):
    """step(ids): forward + backward of the full-sequence LM loss, gradients cleared, the loss returned
    (not synchronised). `to_embeddings`: the frozen base's floor, backward to the input embeddings."""
    import contextlib

    enter = context or contextlib.nullcontext

    def step(ids):
        with enter():
            if to_embeddings:
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=embeds, labels=ids, use_cache=False).loss
            else:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        for p in params:
            p.grad = None
        return loss.detach()

    return step


def _mixlora_config(args):
    from mixlora_lit import MixLoraConfig

    extra = {"target_modules": list(args.targets)} if args.targets else {}
    return MixLoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                         num_experts=args.experts, top_k=args.top_k, **extra)


def reference_code_model(base, args, device: str = "cpu", config=None):
    """The reference package's MixLoRA on `base`, with the adapter weights our model starts from.

    The reference keeps its experts in plain dicts and its router as a bare tensor, so their
    parameters are collected here; it computes its LoRA in fp32 (its default dtype), as it would
    for its own users.
    """
    import copy
    import tempfile

    import torch
    from mixlora import inject_adapter_in_model, load_adapter_weights

    from mixlora_lit import get_mixlora_model

    ours = get_mixlora_model(copy.deepcopy(base), config or _mixlora_config(args))
    with tempfile.TemporaryDirectory() as tmp:
        ours.export_reference(tmp)
        config, weights = load_adapter_weights(tmp, device=str(device), dtype=torch.float32)
    del ours
    for p in base.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(base, config, weights)
    params = [p for p in base.parameters() if p.requires_grad]
    for layer in base.model.layers:
        moe = layer.mlp.mixlora_moes[config.adapter_name_]
        moe.gate_.requires_grad_(True)
        params.append(moe.gate_)
        for expert in moe.experts_.values():
            params += [expert.lora_A.weight, expert.lora_B.weight]
    return base, params


def batch_ids(args):
    import torch

    gen = torch.Generator().manual_seed(1234)
    return torch.randint(100, 40000, (args.batch, args.seq), generator=gen)


def measure_memory(method: str, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    _, step = build(method, args)
    ids = batch_ids(args)
    for _ in range(2):
        step(ids)
    print(json.dumps({"peak_rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    """This process's own high-water mark. VmHWM, not ru_maxrss: Linux carries ru_maxrss across
    fork and exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(method: str, args) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-of", method, "--base", args.base,
           "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype, "--experts", str(args.experts),
           "--top-k", str(args.top_k), "--rank", str(args.rank), "--lora-rank", str(args.lora_rank),
           "--dropout", str(args.dropout), "--threads", str(args.threads), "--malloc", args.malloc]
    if args.targets:
        cmd += ["--targets", *args.targets]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the peak-memory run of {method!r} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    allocator_tuned = apply_malloc_setting(args.malloc)
    from mixlora_lit.base_models import dtype_name, parse_dtype

    args.dtype = dtype_name(parse_dtype(args.dtype))  # `auto` resolved: the results name the dtype used
    if args.memory_of:
        measure_memory(args.memory_of, args)
        return {}
    import torch

    torch.set_num_threads(args.threads)
    # Memory first, while this process holds no model: the children then have the machine's memory.
    peaks = {}
    if not args.no_memory:
        for method in args.methods:
            peaks[method] = peak_memory(method, args)
            print(f"peak memory {method}: {peaks[method]:.0f} MB", flush=True)
    ids = batch_ids(args)
    steps = {}
    for method in args.methods:
        _, steps[method] = build(method, args)
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    round_orders = []  # the methods' order in each round, warm-up rounds first
    for round_ in range(args.warmup + args.repeats):
        order = turn_order(args.methods, round_ - args.warmup)  # the first timed round: as given
        round_orders.append(order)
        for method in order:
            start = time.perf_counter()
            steps[method](ids)
            if round_ >= args.warmup:
                times[method].append(time.perf_counter() - start)
        print(f"round {round_ + 1}/{args.warmup + args.repeats}: "
              + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in args.methods if times[m]), flush=True)
    tokens = args.batch * args.seq
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("memory_of", "json", "markdown")},
               "torch": torch.__version__, "allocator_tuned": allocator_tuned, "round_orders": round_orders,
               "methods": {}}
    for method in args.methods:
        t = times[method]
        results["methods"][method] = {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                                      "tokens_per_s": tokens / statistics.median(t),
                                      "round_s": list(t)}  # each round, in order: how the machine moved
    for method, peak in peaks.items():
        results["methods"][method]["peak_rss_mb"] = peak
    m = results["methods"]

    def ratio(a, b, key="median_s"):
        return m[a][key] / m[b][key] if a in m and b in m and key in m[a] and key in m[b] else None

    # the same ratios in each round (rounds pair the methods' steps), and what those say
    pairs = {"step_ratio_vs_base": ("fused", "base"), "step_ratio_vs_lora": ("fused", "lora")}
    results["round_ratios"] = {key: [x / y for x, y in zip(m[a]["round_s"], m[b]["round_s"])]
                               for key, (a, b) in pairs.items() if a in m and b in m}
    results["intervals"] = ratio_intervals(results["round_ratios"])
    results["step_ratio_vs_lora"] = ratio("fused", "lora")
    results["step_ratio_vs_reference"] = ratio("fused", "reference")
    results["step_ratio_vs_base"] = ratio("fused", "base")
    results["step_ratio_per_expert_down_vs_fused"] = ratio("per_expert_down", "fused")
    results["peak_mem_ratio_vs_lora"] = ratio("fused", "lora", "peak_rss_mb")
    results["recompute_step_ratio_vs_lora"] = ratio("fused_recompute", "lora")
    results["recompute_peak_mem_ratio_vs_lora"] = ratio("fused_recompute", "lora", "peak_rss_mb")
    results["step_ratio_vs_reference_code"] = ratio("fused", "reference_code")
    results["peak_mem_ratio_vs_reference_code"] = ratio("fused", "reference_code", "peak_rss_mb")
    results["compiled_step_ratio_vs_lora_compiled"] = ratio("fused_compiled", "lora_compiled")
    results["grouped_step_ratio_vs_fused"] = ratio("fused_grouped", "fused")
    results["untiled_step_ratio_vs_fused"] = ratio("fused_untiled", "fused")
    results["compiled_step_ratio_vs_fused"] = ratio("fused_compiled", "fused")
    if args.profile:
        for method in args.methods:
            write_profile(os.path.join(args.profile, f"step_{method}.txt"), steps[method],
                          [ids] * args.profile_steps,
                          f"{method}, {args.base} {args.dtype}, batch {args.batch} x {args.seq}, full-sequence LM loss, "
                          f"{args.threads} threads, {args.profile_steps} steps")
    return emit(results, markdown(results), args)


def emit(results: dict, table: str, args: argparse.Namespace) -> dict:
    """Print the Markdown table and write the figures where --json / --markdown ask; the results back."""
    print(table)
    write_outputs(results, table, args.json, args.markdown)
    return results


def write_profile(path: str, step, inputs: list, title: str, rows: int = 40) -> None:
    """Profile step(x) for each x in inputs (torch.profiler, CPU) and write the per-operator table,
    sorted by self CPU time, with the total wall time of the profiled steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for x in inputs:
            step(x)
        wall = time.perf_counter() - start
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(f"{title}; torch {torch.__version__}; profiled wall time {wall:.2f} s "
                 f"(the profiler adds its own overhead)\n\n{table}\n")
    print(f"profile: {path}", flush=True)


def apply_malloc_setting(setting: str) -> bool:
    """Apply --malloc in this process, before any large tensor; True if the tuning is in effect."""
    if setting == "default":
        return False
    from mixlora_lit.runtime import tune_cpu_allocator

    if not tune_cpu_allocator():
        print("note: --malloc tuned is not in effect here (needs Linux with glibc, and "
              "MIXLORA_LIT_MALLOC_TUNING unset)", file=sys.stderr)
        return False
    return True


# Issue 18's targets for the ratios these benchmarks report (MixLoRA's time over the other's: lower is better).
TARGETS = {"step_ratio_vs_base": 1.15, "real_batch_ratio_vs_base": 1.15, "step_ratio_vs_lora": 0.8,
           "real_batch_ratio_vs_lora": 0.8, "mixlora_vs_base_eval_time": 1.25, "mixlora_vs_base_generate_time": 1.5}


def ratio_interval(key: str, per_round: list[float], confidence: float = 0.95) -> dict | None:
    """What the rounds say about a ratio: the geometric mean of its per-round values (each round's paired
    times) with a Student-t confidence interval on their logarithms, and, for a key in TARGETS, the
    verdict: `met` when the whole interval is at or under the target, `missed` when it is all above,
    `undecided` when it straddles it. None below two rounds or with a ratio that is not a positive number
    (computed before the results are written: nothing here may lose a run).

    The rounds are taken as independent draws. On these machines they drift (a ratio falling or rising
    round by round), which that does not model: read the interval as the spread of this run's rounds, not
    as a bound on what another run gives."""
    if len(per_round) < 2 or not all(isinstance(r, (int, float)) and math.isfinite(r) and r > 0 for r in per_round):
        return None

    from scipy import stats

    logs = [math.log(r) for r in per_round]
    n = len(logs)
    mean = statistics.fmean(logs)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(logs) / math.sqrt(n)
    out = {"geometric_mean": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half),
           "confidence": confidence, "rounds": n}
    if key in TARGETS:
        target = TARGETS[key]
        out["target"] = target
        out["verdict"] = "met" if out["high"] <= target else "missed" if out["low"] > target else "undecided"
    return out


def ratio_intervals(per_round: dict[str, list[float]]) -> dict[str, dict | None]:
    """`ratio_interval` of each key's per-round ratios."""
    return {key: ratio_interval(key, ratios) for key, ratios in per_round.items()}


def turn_order(items, turn: int) -> list:
    """The order to run `items` in on turn `turn`: as given on even turns, reversed on odd ones, so that drift
    within a turn does not always favour the items that run first."""
    return list(items) if turn % 2 == 0 else list(reversed(items))


def flips(orders: list) -> bool:
    """Whether a run's recorded orders differ (the order flipped), for the Markdown headers."""
    return len({tuple(o) for o in orders}) > 1


def interval_lines(intervals: dict[str, dict | None], prefix: str = "") -> list[str]:
    """One Markdown list item per `ratio_intervals` entry, each starting with `prefix`."""
    lines = []
    for key, iv in intervals.items():
        if iv is None:
            lines.append(f"- {prefix}`{key}`: no interval (fewer than two rounds)")
            continue
        line = (f"- {prefix}`{key}`: geometric mean {iv['geometric_mean']:.3f} over {iv['rounds']} rounds, "
                f"{iv['confidence']:.0%} CI {iv['low']:.3f}-{iv['high']:.3f}")
        lines.append(line + (f"; target <= {iv['target']}: **{iv['verdict']}**" if "target" in iv else ""))
    return lines


def write_outputs(results: dict, table: str, json_path: str | None, markdown_path: str | None) -> None:
    """The figures as JSON and the table as Markdown, each where asked (creating the folder)."""
    for path, text in ((json_path, json.dumps(results, indent=1)), (markdown_path, table + "\n")):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(text)


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"{s['base']}, {s['dtype']}, batch {s['batch']} x {s['seq']}, {s['threads']} threads, "
             f"MixLoRA {s['experts']} experts top-{s['top_k']} r={s['rank']}, LoRA r={s['lora_rank']}, "
             f"median of {s['repeats']} interleaved steps (forward + backward)"
             + (", order flipping every round" if flips(results.get("round_orders", [])) else "")
             + (f", MixLoRA targets {' '.join(s['targets'])}" if s.get("targets") else "")
             + f", allocator {'tuned' if results.get('allocator_tuned') else 'glibc default'}", "",
             "| method | step (s) | min-max (s) | tokens/s | peak RSS (MB) | fused / this |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    fused = results["methods"].get("fused")
    for name, r in results["methods"].items():
        rel = f"{fused['median_s'] / r['median_s']:.2f}" if fused else "-"
        mem = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        lines.append(f"| {name} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | {r['tokens_per_s']:.0f} "
                     f"| {mem} | {rel} |")
    lines.append("")
    for key in ("step_ratio_vs_lora", "step_ratio_vs_reference", "step_ratio_vs_base", "peak_mem_ratio_vs_lora",
                "recompute_step_ratio_vs_lora", "recompute_peak_mem_ratio_vs_lora", "step_ratio_vs_reference_code",
                "peak_mem_ratio_vs_reference_code", "compiled_step_ratio_vs_lora_compiled",
                "compiled_step_ratio_vs_fused", "grouped_step_ratio_vs_fused", "untiled_step_ratio_vs_fused"):
        value = results.get(key)
        lines.append(f"- `{key}`: {value:.3f}" if value is not None else f"- `{key}`: n/a")
    lines += interval_lines(results.get("intervals", {}))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
