"""One MixLoRA FFN layer against the frozen gated MLP it replaces, at several token counts.

Where the whole-model benchmarks dilute it with attention, embeddings and the LM head, this shows
MixLoRA's own per-layer cost: SmolLM2-135M's FFN shape (hidden 576, FFN 1536, SiLU), bf16, the
MixLoRA FFN built on that very MLP (8 experts, top-2, r=16, dropout 0.05, small random B so the
experts do work). Two workloads:

  eval   forward without autograd, model.eval(): the gathered path up to `gathered_inference_max_rows`
         (token, expert) rows (one sequence's decoding step), the dense masked path up to
         `dense_inference_max_rows` (decoding steps, small batches), the sorted fused path above
         (evaluation batches)
  train  forward + backward with the input requiring grad, model.train() (dropout on)

The base and MixLoRA alternate in one process (medians over --repeats); the same random input per
token count. `--profile DIR` adds a per-operator table of the MixLoRA layer per token count.

    .venv/bin/python benchmarks/bench_moe_layer.py --tokens 4 192 800 2400 --mode eval
    .venv/bin/python benchmarks/bench_moe_layer.py --tokens 640 2048 --mode train --json reports/x.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import apply_malloc_setting, emit, write_profile  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4, 192, 800, 2400])
    p.add_argument("--mode", choices=("eval", "train"), default="eval")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--profile", default=None, metavar="DIR")
    return p.parse_args(argv)


def build(args):
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from mixlora_lit.config import MixLoraConfig
    from mixlora_lit.moe import MixLoraMoeFFN

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, hidden_act="silu"))
    mlp = mlp.to(dtype).requires_grad_(False)
    moe = MixLoraMoeFFN(mlp, MixLoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                                           num_experts=args.experts, top_k=args.top_k))
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return mlp, moe, dtype


def main(argv=None) -> dict:
    args = parse_args(argv)
    allocator_tuned = apply_malloc_setting(args.malloc)
    import torch

    torch.set_num_threads(args.threads)
    mlp, moe, dtype = build(args)
    moe.train(args.mode == "train")
    params = [p for p in moe.parameters() if p.requires_grad]

    def step(module, x):
        if args.mode == "eval":
            with torch.no_grad():
                module(x)
            return
        module(x).float().sum().backward()
        x.grad = None
        for p in params:
            p.grad = None

    rows = []
    for tokens in args.tokens:
        x = torch.randn(1, tokens, args.hidden, dtype=dtype, requires_grad=args.mode == "train")
        with torch.set_grad_enabled(args.mode == "train"):
            path = moe.current_path(tokens * args.top_k)
        times = {"base": [], "mixlora": []}
        for i in range(args.warmup + args.repeats):
            for name, module in (("base", mlp), ("mixlora", moe)):
                start = time.perf_counter()
                step(module, x)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        base, mix = statistics.median(times["base"]), statistics.median(times["mixlora"])
        rows.append({"tokens": tokens, "path": path, "base_ms": base * 1e3, "mixlora_ms": mix * 1e3,
                     "ratio_vs_base": mix / base})
        print(f"{tokens} tokens ({path}): base {base * 1e3:.3f} ms, MixLoRA {mix * 1e3:.3f} ms, "
              f"ratio {mix / base:.3f}", flush=True)
        if args.profile:
            write_profile(os.path.join(args.profile, f"layer_{args.mode}_{tokens}.txt"),
                          lambda _: step(moe, x), [None] * 10,
                          f"MixLoRA FFN layer, {args.mode}, {tokens} tokens ({path}), 10 calls")
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "profile")},
               "torch": torch.__version__, "allocator_tuned": allocator_tuned, "rows": rows}
    return emit(results, markdown(results), args)


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"MixLoRA FFN layer vs the frozen gated MLP ({s['hidden']} -> {s['ffn']}), {s['dtype']}, "
             f"{s['experts']} experts top-{s['top_k']} r={s['rank']}, {s['mode']}, {s['threads']} threads, "
             f"median of {s['repeats']} interleaved calls; torch {results['torch']}", "",
             "| tokens | MixLoRA path | base (ms) | MixLoRA (ms) | MixLoRA / base |",
             "| ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['tokens']} | {r['path']} | {r['base_ms']:.3f} | {r['mixlora_ms']:.3f} | {r['ratio_vs_base']:.3f} |"
              for r in results["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
