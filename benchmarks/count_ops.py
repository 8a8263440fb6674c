"""Operator calls per training step, by method: the host-side cost a GPU pays whatever the kernels.

On a GPU, a step of these small models is bound by the host: each PyTorch operator costs a few
microseconds of Python and dispatch before its kernel is queued, and the H100 ran the frozen
SmolLM2 step (8 x 256) in 77 ms, about 25 times what its FLOPs take (benchmarks/README.md). The number of
operators a step dispatches is then a proxy for its time that this CPU can measure exactly: it
does not depend on the machine's speed or noise, only on the code and the shapes.

Counts every ATen operator dispatched (a TorchDispatchMode: forward, backward and the autograd
engine's gradient accumulation) in one forward + backward of each method, after a warm-up step,
with the methods and models of bench_gpu_step.py (real configs, random weights), on this CPU.
"views" are operators that only make a new view of a tensor (no kernel on a GPU, host cost only).
Dropout draws make a few counts vary by one or two between steps; routing changes the per-expert
loop of the padded layout (one call per non-empty expert block), so the fused counts vary a little.

    .venv/bin/python benchmarks/count_ops.py --layers 2             # SmolLM2-135M, 8 x 256, bf16 (the GPU setting)
    .venv/bin/python benchmarks/count_ops.py --models gemma3-270m --json reports/ops.json --markdown reports/ops.md
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_gpu_step as gpu  # noqa: E402

METHODS = ("base", "lora", "fused", "fused_syncfree", "fused_syncfree16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m"], choices=list(gpu.MODEL_CONFIGS))
    p.add_argument("--shape", default="8x256", help="BATCHxSEQ")
    p.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="the vocabulary (0: the model's own); the counts do not depend on it, the time does: "
                        "SmolLM2's 49152-token LM head took about 3 minutes per bf16 step on an AVX2 CPU")
    p.add_argument("--dtype", default="bf16", help="bf16 takes the GPU's code paths (padded blocks, grouped matmuls)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=gpu.ALL_METHODS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=8, help="most frequent operators listed per method")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def counted_step(step, ids) -> collections.Counter:
    """The ATen operators one call of step(ids) dispatches, by name ("view:" prefixed for views)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[("view:" if func.is_view else "") + str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    mode = Count()
    with mode:
        step(ids)
    return mode.calls


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    batch, _, seq = args.shape.lower().partition("x")
    batch, seq = int(batch), int(seq)
    device = torch.device("cpu")
    gpu_args = gpu.parse_args(["--out", os.devnull, "--device", "cpu", "--dtype", args.dtype]
                              + (["--layers", str(args.layers)] if args.layers else [])
                              + (["--vocab-size", str(args.vocab_size)] if args.vocab_size else []))
    results = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "torch": torch.__version__,
               "dtype": args.dtype, "batch": batch, "seq": seq, "vocab_size": args.vocab_size or None, "models": {}}
    for name in args.models:
        template, info = gpu.build_template(name, gpu_args, device)
        ids = gpu.batch_ids(batch, seq, device, template.config.vocab_size)
        per_method = {}
        for method in args.methods:
            try:
                model, step, _ = gpu.build(method, template, gpu_args, device)
            except gpu.Unavailable as err:
                per_method[method] = {"error": str(err)}
                continue
            step(ids)  # warm-up: weight caches, lazy initialisation
            calls = counted_step(step, ids)
            views = sum(n for op, n in calls.items() if op.startswith("view:"))
            total = sum(calls.values())
            per_method[method] = {"ops": total, "views": views, "non_views": total - views,
                                  "per_layer": total / info["layers"], "top": calls.most_common(args.top)}
            print(f"{name} {method}: {total} operator calls per step ({views} views), "
                  f"{total / info['layers']:.0f} per layer", flush=True)
            del model, step
        lora = per_method.get("lora", {}).get("ops")
        for entry in per_method.values():
            if lora and "ops" in entry:
                entry["ratio_vs_lora"] = entry["ops"] / lora
        results["models"][name] = {"layers": info["layers"], "methods": per_method}
    table = markdown(results)
    print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table)
    return results


def markdown(results: dict) -> str:
    vocab = results.get("vocab_size")
    lines = [f"# Operator calls per training step ({results['dtype']}, batch {results['batch']} x {results['seq']})", "",
             f"Real configs with random weights{f', vocabulary cut to {vocab}' if vocab else ''}; forward + backward "
             f"of the full-sequence LM loss after one warm-up step; every ATen call counted (views: no kernel on "
             f"a GPU). torch {results['torch']}; command: `{results['command']}`", ""]
    for name, model in results["models"].items():
        lines += [f"## {name} ({model['layers']} layers)", "",
                  "| method | operator calls | of which views | calls / layers | / PEFT LoRA | most frequent |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for method, r in model["methods"].items():
            if "error" in r:
                lines.append(f"| {method} | {r['error']} | | | | |")
                continue
            top = ", ".join(f"{op} {n}" for op, n in r["top"][:5])
            ratio = f"{r['ratio_vs_lora']:.2f}" if "ratio_vs_lora" in r else "-"
            lines.append(f"| {method} | {r['ops']} | {r['views']} | {r['per_layer']:.0f} | {ratio} | {top} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
