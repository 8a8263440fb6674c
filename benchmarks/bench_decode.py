"""Cached decoding steps: the frozen base against MixLoRA's two no-grad expert paths, per batch size.

A decoding step of a small batch has few (token, expert) rows, and what it costs is reading every
weight once. The dense masked path (`MixLoraMoeFFN._forward_dense_inference`) reads all E experts'
LoRA matrices at every step; the gathered path (`_forward_gathered_inference`, the default below
`gathered_inference_max_rows`, E // 2 + 1 rows unless set) copies out only the rows' own experts'.
This times one `forward` per new token with a KV cache (as `generate()` makes them), after a prefill
of --prompt tokens, for each batch size: the base, MixLoRA by default, and MixLoRA with the gathered
path off (`dense`), interleaved in one process, medians over rounds. SmolLM2-135M, MixLoRA on q, k,
v, o, gate, up and down (8 experts, top-2, r=16), small random B matrices. Also checks that both
paths pick the same tokens.

    .venv/bin/python benchmarks/bench_decode.py --batch 1 2 4 --json reports/bench_decode.json --markdown reports/bench_decode.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import apply_malloc_setting, emit  # noqa: E402

MODELS = ("base", "mixlora", "dense")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", help="the base's dtype; auto: bf16 where the CPU runs it natively, else fp32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--prompt", type=int, default=24, help="prompt tokens per sequence (random ids)")
    p.add_argument("--steps", type=int, default=16, help="timed decoding steps per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned", help="as in bench_step.py")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    allocator_tuned = apply_malloc_setting(args.malloc)
    from mixlora_lit.base_models import dtype_name, parse_dtype

    args.dtype = dtype_name(parse_dtype(args.dtype))
    import torch
    from transformers import DynamicCache

    from mixlora_lit import MixLoraConfig, get_mixlora_model
    from mixlora_lit.base_models import load_base_model

    torch.set_num_threads(args.threads)
    base = load_base_model(args.base, dtype=args.dtype)[0].eval()
    torch.manual_seed(0)
    cfg = MixLoraConfig(r=args.rank, lora_alpha=2 * args.rank, num_experts=args.experts, top_k=args.top_k)
    mixlora = get_mixlora_model(load_base_model(args.base, dtype=args.dtype)[0], cfg).eval()
    with torch.no_grad():
        for name, p in mixlora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    layers = mixlora.moe_layers()

    def decode(model, ids, steps):
        """Per-step seconds and the tokens picked, greedy, after a prefill of `ids`."""
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            picked = [token]
            start = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                picked.append(token)
            return (time.perf_counter() - start) / steps, torch.cat(picked, dim=1)

    def run(name, ids, steps):
        model = base if name == "base" else mixlora
        for layer in layers:  # `dense`: no row count is below the gathered path's limit
            layer.gathered_inference_max_rows = 0 if name == "dense" else None
        return decode(model, ids, steps)

    rows = []
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, base.config.vocab_size, (batch, args.prompt), generator=gen)
        with torch.no_grad():
            paths = {name: layers[0].current_path(batch * args.top_k) for name in ("mixlora",)}
        times = {name: [] for name in MODELS}
        tokens = {}
        for name in MODELS:  # warm-up: caches built, allocator settled
            tokens[name] = run(name, ids, 4)[1]
        for _ in range(args.rounds):
            for name in MODELS:
                seconds, tokens[name] = run(name, ids, args.steps)
                times[name].append(seconds)
        for layer in layers:
            layer.gathered_inference_max_rows = None
        med = {name: statistics.median(v) for name, v in times.items()}
        row = {"batch": batch, "rows": batch * args.top_k, "mixlora_path": paths["mixlora"],
               **{f"{name}_ms": med[name] * 1e3 for name in MODELS},
               "mixlora_vs_base": med["mixlora"] / med["base"], "dense_vs_base": med["dense"] / med["base"],
               "mixlora_vs_dense": med["mixlora"] / med["dense"],
               "mixlora_vs_dense_per_round": [a / b for a, b in zip(times["mixlora"], times["dense"])],
               "same_tokens": bool(torch.equal(tokens["mixlora"], tokens["dense"]))}
        rows.append(row)
        print(f"batch {batch} ({row['mixlora_path']}): base {row['base_ms']:.1f} ms/step, MixLoRA "
              f"{row['mixlora_ms']:.1f}, dense {row['dense_ms']:.1f}; MixLoRA / dense {row['mixlora_vs_dense']:.3f}",
              flush=True)
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
               "allocator_tuned": allocator_tuned, "torch": torch.__version__, "rows": rows}
    return emit(results, markdown(results), args)


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"{s['base']}, {s['dtype']}, {s['threads']} threads, MixLoRA {s['experts']} experts top-{s['top_k']} "
             f"r={s['rank']} on q, k, v, o, gate, up, down; one cached decoding step after a {s['prompt']}-token "
             f"prompt; median of {s['rounds']} interleaved rounds of {s['steps']} steps; torch {results['torch']}", "",
             "| batch | (token, expert) rows | MixLoRA's path | base (ms/step) | MixLoRA | dense path | "
             "MixLoRA / base | dense / base | MixLoRA / dense | same tokens |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['batch']} | {r['rows']} | {r['mixlora_path']} | {r['base_ms']:.1f} | {r['mixlora_ms']:.1f} | "
              f"{r['dense_ms']:.1f} | {r['mixlora_vs_base']:.3f} | {r['dense_vs_base']:.3f} | "
              f"{r['mixlora_vs_dense']:.3f} | {r['same_tokens']} |" for r in results["rows"]]
    lines.append("")
    lines += [f"- batch {r['batch']}: MixLoRA / dense per round "
              + ", ".join(f"{v:.3f}" for v in r["mixlora_vs_dense_per_round"]) for r in results["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
