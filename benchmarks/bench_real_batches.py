"""Training-step cost on the quickstart's own batches: frozen base, fused MixLoRA and PEFT LoRA.

`bench_step.py` times one synthetic 8 x 256 batch with the full-sequence LM loss. Real training
looks different: the quickstart's data module gives batches of 8 prompts of about 80 tokens
(length-grouped, right-padded), and the training loss runs the LM head only at the supervised
answer positions. Short batches are where fixed per-operation costs weigh most, so this script
measures exactly those batches, through the training module's own loss (`MixLoraLitModule.losses`,
router auxiliary loss included):

  base    the frozen base alone, backward to the input embeddings (HF's `enable_input_require_grads`)
  fused   MixLoRA, the quickstart's adapter (8 experts, top-2, r=16, attention LoRA), fused path
  lora    HF PEFT LoRA on the same targets, rank matched to MixLoRA's trainable parameters (`match_rank`)
  ideal   (not run by default) the experts' arithmetic without routing, in eager PyTorch
          (`ideal_experts.py`): slot j of every token uses expert j, no dropout, no attention LoRA

One process, one model per method, the same batches; for each batch every method runs one forward +
backward in turn (interleaved), so machine noise hits all alike. Figures: tokens/s (real, unpadded
tokens, and padded positions) over all timed batches, and the ratios of fused MixLoRA's total step
time to the others':

  real_batch_ratio_vs_base   fused / base   (target <= 1.15)
  real_batch_ratio_vs_lora   fused / lora   (target <= 0.8)

With `--profile DIR` it also writes, per method, the per-operator table of one profiled pass over
`--profile-batches` batches (torch.profiler, sorted by self CPU time) to DIR/real_<method>.txt.

    .venv/bin/python benchmarks/bench_real_batches.py --json reports/bench_real_batches.json \\
        --markdown reports/bench_real_batches.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import (apply_malloc_setting, emit, flips, interval_lines, ratio_intervals, turn_order,  # noqa: E402
                        write_profile)
from mixlora_lit.runs import cpu_model  # noqa: E402

METHODS = ("base", "fused", "lora")
EXTRA_METHODS = ("ideal",)  # not run by default
# `<method>_compiled`: the same with the decoder under torch.compile (`MixLoraLitModule(compile=True)`),
# compiled in the warm-up batches (dynamic shapes from the second length on).
COMPILED = tuple(f"{m}_compiled" for m in ("base", "fused", "ideal"))
# Kernel variants of fused MixLoRA (not run by default): MixLoraMoeFFN attributes they set.
VARIANTS = {"fused_grouped": {"grouped_mm": True},  # torch._grouped_mm over the experts' blocks
            "fused_uniform": {"uniform_waste": float("inf")},  # always one batched matmul (uniform blocks)
            "fused_nopad": {"row_bucket": 1, "uniform_bucket": 1},  # expert blocks not padded
            "fused_pad16": {"row_bucket": 16},  # expert blocks padded to 16 rows, not 64
            "fused_pad32": {"row_bucket": 32},  # expert blocks padded to 32 rows, not 64
            "fused_pad64": {"row_bucket": 64},  # expert blocks padded to 64 rows (the bf16 default; fp32 pads none)
            "fused_syncfree": {"sync_free": True},  # routing layout on the device, grouped matmuls (for GPUs)
            "fused_untiled": {"tiled_blocks": False}}  # padded blocks as one matmul per expert, not as tiles
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "quickstart.yaml"),
                   help="fit config whose model and data sections to use (default: the quickstart)")
    p.add_argument("--adapter", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override adapter settings of the config (YAML values), e.g. lora_dropout=0 "
                        "target_modules=[gate_proj,up_proj,down_proj]")
    p.add_argument("--base", default=None, help="base model instead of the config's model.base")
    p.add_argument("--dtype", default=None, help="the base's dtype instead of the config's model.base_dtype "
                   "(auto: bf16 where the CPU runs it natively, else fp32)")
    p.add_argument("--data-dir", default=None, help="prepared data (default: the config's, else the mixlora-lit cache)")
    p.add_argument("--batches", type=int, default=12, help="timed batches (the first ones of the training loader)")
    p.add_argument("--warmup", type=int, default=3, help="batches run before timing (not counted)")
    p.add_argument("--rounds", type=int, default=2, help="passes over the timed batches")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   choices=METHODS + EXTRA_METHODS + COMPILED + tuple(VARIANTS),
                   help=f"also: ideal (ideal_experts.py), {', '.join(COMPILED)}, "
                        + ", ".join(f"{k} ({v})" for k, v in VARIANTS.items()))
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--profile", default=None, metavar="DIR", help="also write per-operator profiles here")
    p.add_argument("--profile-batches", type=int, default=4)
    return p.parse_args(argv)


def load_sections(path: str) -> tuple[dict, dict]:
    import yaml

    with open(path) as fh:
        config = yaml.safe_load(fh)
    return config.get("model", {}), config.get("data", {})


def apply_overrides(model_section: dict, overrides: list[str]) -> dict:
    """model.adapter settings from KEY=VALUE strings (values parsed as YAML)."""
    import yaml

    adapter = dict(model_section.get("adapter", {}))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--adapter {item!r}: expected KEY=VALUE")
        adapter[key] = yaml.safe_load(value)
    return {**model_section, "adapter": adapter}


def training_batches(data: dict, count: int) -> list[dict]:
    """The first `count` batches of the data module's training loader, as training sees them."""
    from mixlora_lit.lightning.datamodule import MultiTaskDataModule

    dm = MultiTaskDataModule(**data)
    dm.prepare_data()
    dm.setup("fit")
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def build(method: str, model_section: dict):
    """(module, step): step(batch) runs the training loss forward + backward, gradients cleared."""
    import torch

    from mixlora_lit.lightning.module import MixLoraLitModule, causal_lm
    from mixlora_lit.moe import MixLoraMoeFFN

    compiled = method.endswith("_compiled")
    method = method.removesuffix("_compiled")
    adapter = dict(model_section.get("adapter", {}))
    adapter["method"] = {"fused": "mixlora", "lora": "lora", "base": "base", "ideal": "base",
                         **dict.fromkeys(VARIANTS, "mixlora")}[method]
    if method == "lora":
        adapter["match_rank"] = True
    torch.manual_seed(0)
    module = MixLoraLitModule(base=model_section.get("base", "smollm2-135m"),
                              base_dtype=model_section.get("base_dtype", "auto"), adapter=adapter, compile=compiled)
    module.configure_model()
    module.train()
    for layer in module.modules():
        if isinstance(layer, MixLoraMoeFFN):
            for key, value in VARIANTS.get(method, {}).items():
                setattr(layer, key, value)
    if method == "ideal":
        from ideal_experts import make_ideal

        from mixlora_lit.config import MixLoraConfig

        d = MixLoraConfig()  # the adapter's defaults where the config leaves a key out
        unmodelled = {k: adapter[k] for k in ("routing_strategy", "use_rslora", "use_dora", "expert_lora")
                      if adapter.get(k) not in (None, False, getattr(d, k, None))}
        if unmodelled:
            raise SystemExit(f"ideal: models top-k routing over plain LoRA experts only, not {unmodelled}")
        make_ideal(module.model, adapter.get("num_experts", d.num_experts), adapter.get("top_k") or 2,
                   adapter.get("r", d.r), adapter.get("lora_alpha", d.lora_alpha))
    if method == "base":  # the floor: gradients flow back to the input embeddings, no weight gradients
        causal_lm(module.model).enable_input_require_grads()
    params = [p for p in module.parameters() if p.requires_grad]

    def step(batch):
        lm_loss, aux_loss, _ = module.losses(batch)
        (lm_loss + aux_loss).backward()
        for p in params:
            p.grad = None

    return module, step


def main(argv=None) -> dict:
    args = parse_args(argv)
    allocator_tuned = apply_malloc_setting(args.malloc)
    import torch

    torch.set_num_threads(args.threads)
    model_section, data_section = load_sections(args.config)
    model_section = apply_overrides(model_section, args.adapter)
    if args.base:
        model_section["base"] = args.base
    from mixlora_lit.base_models import dtype_name, parse_dtype

    # The dtype `auto` resolves to on this machine, named in the results.
    model_section["base_dtype"] = dtype_name(parse_dtype(args.dtype or model_section.get("base_dtype", "auto")))
    if args.data_dir:
        data_section = {**data_section, "data_dir": args.data_dir}
    batches = training_batches(data_section, args.warmup + args.batches)
    warm, timed = batches[:args.warmup], batches[args.warmup:]
    real_tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    padded_tokens = sum(b["input_ids"].numel() for b in timed)
    shapes = [tuple(b["input_ids"].shape) for b in timed]
    print(f"{len(timed)} timed batches, shapes {shapes}; {real_tokens} real tokens of {padded_tokens} positions",
          flush=True)
    if sum(m.endswith("_compiled") for m in args.methods) > 1:
        # The compiled models share dynamo's cache per code object (the decoder layer's forward sees each
        # model's FFN type and shapes in turn): room for all of them, not the default 8 entries.
        torch._dynamo.config.recompile_limit = 64
    steps, rank = {}, None
    for method in args.methods:
        module, steps[method] = build(method, model_section)
        if method == "lora":
            rank = module.lora_rank
    for batch in warm:
        for method in args.methods:
            steps[method](batch)
    # Per method, the time of each timed batch in each round; the total over batches per round.
    totals: dict[str, list[float]] = {m: [] for m in args.methods}
    per_batch: dict[str, list[float]] = {m: [] for m in args.methods}
    batch_orders = []  # the methods' order on each timed batch, pass after pass
    for round_ in range(args.rounds):
        round_time = {m: 0.0 for m in args.methods}
        for i, batch in enumerate(timed):
            order = turn_order(args.methods, i + round_)  # flips from batch to batch and, per batch, pass to pass
            batch_orders.append(order)
            for method in order:
                start = time.perf_counter()
                steps[method](batch)
                elapsed = time.perf_counter() - start
                round_time[method] += elapsed
                per_batch[method].append(elapsed)
        for method in args.methods:
            totals[method].append(round_time[method])
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{m} {round_time[m]:.2f}s" for m in args.methods),
              flush=True)
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "profile")},
               "base": model_section.get("base", "smollm2-135m"), "dtype": model_section["base_dtype"],
               "cpu": cpu_model(), "torch": torch.__version__, "allocator_tuned": allocator_tuned, "lora_rank": rank,
               "batch_shapes": shapes, "real_tokens_per_pass": real_tokens, "padded_tokens_per_pass": padded_tokens,
               "batch_orders": batch_orders, "methods": {}}
    for method in args.methods:
        median = statistics.median(totals[method])
        results["methods"][method] = {
            "pass_median_s": median, "pass_min_s": min(totals[method]), "pass_max_s": max(totals[method]),
            "step_median_s": statistics.median(per_batch[method]),
            "real_tokens_per_s": real_tokens / median, "padded_tokens_per_s": padded_tokens / median}
    m = results["methods"]

    def ratio(a: str, b: str) -> float | None:
        return m[a]["pass_median_s"] / m[b]["pass_median_s"] if a in m and b in m else None

    def batch_ratios(a: str, b: str) -> list[float]:
        if a not in per_batch or b not in per_batch:
            return []
        return [x / y for x, y in zip(per_batch[a], per_batch[b])]

    # Each ratio key: (numerator, denominator); the always-present keys are None when a method did not run.
    pairs = {"real_batch_ratio_vs_base": ("fused", "base"), "real_batch_ratio_vs_lora": ("fused", "lora"),
             "lora_ratio_vs_base": ("lora", "base")}
    optional = {"ideal_ratio_vs_base": ("ideal", "base"), "fused_ratio_vs_ideal": ("fused", "ideal"),
                **{f"{n}_ratio_vs_base_compiled": (n, "base_compiled") for n in ("fused_compiled", "ideal_compiled")},
                **{f"{v}_ratio_vs_fused": (v, "fused") for v in VARIANTS}}
    pairs.update({k: ab for k, ab in optional.items() if ab[0] in m and ab[1] in m})
    results["round_ratios"] = {}
    for key, (a, b) in pairs.items():
        results[key] = ratio(a, b)
        if a in totals and b in totals:  # the same ratio in each round, for the spread
            results["round_ratios"][key] = [x / y for x, y in zip(totals[a], totals[b])]
    results["intervals"] = ratio_intervals(results["round_ratios"])
    for other in ("base", "lora"):
        r = batch_ratios("fused", other)
        results[f"per_batch_ratio_vs_{other}"] = ({"median": statistics.median(r), "min": min(r), "max": max(r)}
                                                  if r else None)
    if args.profile:
        for method in args.methods:
            write_profile(os.path.join(args.profile, f"real_{method}.txt"), steps[method],
                          timed[:args.profile_batches],
                          f"{method} on {args.profile_batches} quickstart training batches "
                          f"{shapes[:args.profile_batches]}, module loss, {args.threads} threads")
    return emit(results, markdown(results), args)


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"{results['base']} ({results.get('dtype', 'bf16')}, {results.get('cpu', 'CPU not recorded')}), training batches of {os.path.relpath(s['config'], REPO)}: {len(results['batch_shapes'])} "
             f"batches, {results['real_tokens_per_pass']} real tokens in {results['padded_tokens_per_pass']} "
             f"positions per pass, shapes {sorted(set(results['batch_shapes']))}; training loss at supervised "
             f"positions; {s['threads']} threads; median of {s['rounds']} interleaved passes"
             + (" (order flipping from batch to batch)" if flips(results.get("batch_orders", [])) else "")
             + f" after {s['warmup']} warm-up batches; "
             + (f"LoRA r={results['lora_rank']} (matched); " if results.get("lora_rank") else "")
             + f"allocator {'tuned' if results.get('allocator_tuned') else 'glibc default'}; torch {results['torch']}"
             + (f"; adapter overrides {' '.join(s['adapter'])}" if s.get("adapter") else ""), "",
             "| method | pass (s) | min-max (s) | median step (s) | real tokens/s | fused / this |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    fused = results["methods"].get("fused")
    for name, r in results["methods"].items():
        rel = f"{fused['pass_median_s'] / r['pass_median_s']:.2f}" if fused else "-"
        lines.append(f"| {name} | {r['pass_median_s']:.2f} | {r['pass_min_s']:.2f}-{r['pass_max_s']:.2f} "
                     f"| {r['step_median_s']:.3f} | {r['real_tokens_per_s']:.0f} | {rel} |")
    lines.append("")
    keys = ["real_batch_ratio_vs_base", "real_batch_ratio_vs_lora", "lora_ratio_vs_base",
            *results.get("round_ratios", {})]
    for key in dict.fromkeys(keys):
        value, rounds = results.get(key), results.get("round_ratios", {}).get(key, [])
        per_round = f" (per round {', '.join(f'{x:.3f}' for x in rounds)})" if len(rounds) > 1 else ""
        lines.append(f"- `{key}`: {value:.3f}{per_round}" if value is not None else f"- `{key}`: n/a")
    for other in ("base", "lora"):
        r = results.get(f"per_batch_ratio_vs_{other}")
        if r:
            lines.append(f"- fused / {other}, per batch: median {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})")
    lines += interval_lines(results.get("intervals", {}))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
