"""What the optimizer step costs next to a training step: AdamW's three implementations on the real trainable tensors.

`bench_real_batches.py` and `bench_step.py` time forward + backward. A training step also runs the
optimizer, once per step over every trainable tensor: MixLoRA on SmolLM2 has about 1,700 of them
(8 experts x gate/up/down x A/B per layer, a router, the attention LoRAs), so AdamW's per-tensor
work is not small next to the quickstart's short batches. This script builds the quickstart's
modules (`configs/quickstart.yaml`: MixLoRA, and PEFT LoRA with `match_rank`), gives every trainable
tensor a random gradient, and times, interleaved in one process:

  for-loop   torch.optim.AdamW(foreach=False): ~10 operations per tensor (torch's default on CPU)
  foreach    torch.optim.AdamW(foreach=True): the multi-tensor path (on CPU, a loop inside torch)
  fused      torch.optim.AdamW(fused=True): one kernel pass per tensor (`optimizer.fused: null`, the
             fit loop's default since session 17, picks it where torch has it)

plus the fit loop's check after each update (`MixLoraLitModule._check_finite_weights`), and, for
scale, the median forward + backward of the quickstart's first training batches (`--batches`).

    .venv/bin/python benchmarks/bench_optimizer.py --json reports/bench_optimizer.json \\
        --markdown reports/bench_optimizer.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_real_batches import REPO, build, load_sections, training_batches  # noqa: E402
from bench_step import emit  # noqa: E402
from mixlora_lit.runs import cpu_model  # noqa: E402

LABELS = {"fused": "MixLoRA (fused path)", "lora": "PEFT LoRA (rank matched)"}
KERNELS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "quickstart.yaml"))
    p.add_argument("--methods", nargs="+", default=["fused", "lora"], choices=("fused", "lora"),
                   help="fused: MixLoRA (the config's adapter); lora: PEFT LoRA, rank matched")
    p.add_argument("--repeats", type=int, default=15, help="timed optimizer steps per implementation")
    p.add_argument("--batches", type=int, default=5, help="training batches timed for scale (0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def time_optimizers(params, repeats: int) -> dict:
    """Median seconds of one AdamW step per implementation, rounds interleaved, on copies of `params`."""
    import torch

    from mixlora_lit.lightning.module import OptimizerSettings

    hp = OptimizerSettings(lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3 for p in params]
    optimizers = {}
    for name, kwargs in KERNELS.items():
        copies = [p.detach().clone().requires_grad_(True) for p in params]
        for c, g in zip(copies, grads):
            c.grad = g.clone()
        optimizers[name] = torch.optim.AdamW(copies, lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas,
                                             **kwargs)
        optimizers[name].step()  # state allocated; not timed
    times = {name: [] for name in KERNELS}
    for _ in range(repeats):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_check(module, repeats: int) -> float:
    """Median seconds of the fit loop's finiteness check of the trainable weights after an update."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module._check_finite_weights(0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    model_section, data_section = load_sections(args.config)
    batches = training_batches(data_section, args.batches) if args.batches else []
    results = {"config": os.path.relpath(args.config, REPO), "threads": args.threads, "repeats": args.repeats,
               "torch": torch.__version__, "cpu": cpu_model(), "methods": {}}
    for method in args.methods:
        module, step = build(method, model_section)
        params = [p for p in module.parameters() if p.requires_grad]
        row = {"tensors": len(params), "parameters": sum(p.numel() for p in params)}
        print(f"{method}: {row['tensors']} trainable tensors, {row['parameters'] / 1e6:.1f} M parameters", flush=True)
        row["adamw_s"] = time_optimizers(params, args.repeats)
        row["weight_check_s"] = time_check(module, args.repeats)
        if batches:
            step(batches[0])  # warm-up
            step_times = []
            for batch in batches:
                start = time.perf_counter()
                step(batch)
                step_times.append(time.perf_counter() - start)
            row["forward_backward_s"] = statistics.median(step_times)
        adamw = row["adamw_s"]
        row["fused_vs_for_loop"] = adamw["fused"] / adamw["for-loop"]
        if batches:
            row["for_loop_share_of_step"] = adamw["for-loop"] / (row["forward_backward_s"] + adamw["for-loop"])
            row["fused_share_of_step"] = adamw["fused"] / (row["forward_backward_s"] + adamw["fused"])
        results["methods"][method] = row
        del module, step, params
    return emit(results, markdown(results), args)


def markdown(results: dict) -> str:
    lines = [f"# AdamW implementations on the quickstart's trainable tensors ({results['cpu']}, "
             f"{results['threads']} threads, torch {results['torch']})", "",
             f"Median of {results['repeats']} interleaved steps per implementation; forward + backward: median over "
             "the quickstart's first training batches. Command: `python benchmarks/bench_optimizer.py`.", "",
             "| trainable tensors of | tensors | for-loop (ms) | foreach (ms) | fused (ms) | fused / for-loop | weight check (ms) "
             "| forward + backward (s) | for-loop AdamW, share of step | fused, share of step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, row in results["methods"].items():
        adamw = row["adamw_s"]
        fb = row.get("forward_backward_s")
        shares = f"{row['for_loop_share_of_step']:.1%} | {row['fused_share_of_step']:.1%}" if fb else "- | -"
        lines.append(f"| {LABELS[method]} | {row['tensors']} | {adamw['for-loop'] * 1e3:.1f} | {adamw['foreach'] * 1e3:.1f} | "
                     f"{adamw['fused'] * 1e3:.1f} | {row['fused_vs_for_loop']:.3f} | {row['weight_check_s'] * 1e3:.1f} | "
                     f"{f'{fb:.3f}' if fb else '-'} | {shares} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
