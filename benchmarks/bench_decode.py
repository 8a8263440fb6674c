"""Cached decoding steps: the frozen base against MixLoRA's two no-grad expert paths, per batch size.

A decoding step of a small batch has few (token, expert) rows, and what it costs is reading every
weight once. The dense masked path (`MixLoraMoeFFN._forward_dense_inference`) reads all E experts'
LoRA matrices at every step; the gathered path (`_forward_gathered_inference`, the default up to
`gathered_inference_max_rows` rows) copies out only the rows' own experts'. The gathered variant here
runs with that limit at 2 * top-k rows (so one and two sequences gather, whatever the default), the
dense one with it at 0.

This times one `forward` per new token with a KV cache (as `generate()` makes them), after a prefill
of --prompt tokens, for each batch size: the base, MixLoRA gathering (`gathered`) and MixLoRA with the
gathered path off (`dense`), interleaved in one process (the order flipping every round), medians
over rounds. SmolLM2-135M, MixLoRA on q, k, v, o, gate, up and down (8 experts, top-2, r=16), small
random B matrices. Also checks that both paths pick the same tokens, and names the path the library's
default takes at each row count. From 3 sequences on (6 rows at top-2) both MixLoRA variants take the
dense path: their ratio is then a control, what the machine's noise alone makes of two identical runs.

`--against COMMIT` adds `dense@COMMIT`: the dense path as that commit wrote it (its `_forward_dense_inference`
and `_dense_weights`, taken from that commit's whole library as `ab_inference.py` imports it, so with its own
MoE weight cache (the attention LoRA's is the current one), on the same model), to time a change of the dense path in one process. Usable while those two
methods' signatures are unchanged. (`ab_inference.py` compares whole libraries.)

    .venv/bin/python benchmarks/bench_decode.py --batch 1 2 4 --json reports/bench_decode.json --markdown reports/bench_decode.md
    .venv/bin/python benchmarks/bench_decode.py --batch 4 --against afb3e0e   # before session 19's dense path
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_inference import mixlora_with_random_b  # noqa: E402
from bench_step import apply_malloc_setting, emit, interval_lines, ratio_intervals, turn_order  # noqa: E402

MODELS = ("base", "gathered", "dense")


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
    p.add_argument("--against", default=None, metavar="COMMIT", help="also time that commit's dense path")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def dense_path_at(commit: str):
    """`MixLoraMoeFFN._forward_dense_inference` and `_dense_weights` as `commit` (any git revision) wrote them,
    from that commit's whole library (`ab_inference.library_at`): they call its module-level helpers (its
    `weight_cache` among them), and the current class's methods through `self`."""
    from ab_inference import library_at

    library, _ = library_at(commit)
    moe = importlib.import_module(f"{library.__name__}.moe")
    return moe.MixLoraMoeFFN._forward_dense_inference, moe.MixLoraMoeFFN._dense_weights


def decode_steps(model, ids, steps: int):
    """Greedy cached decoding after a prefill of `ids` (untimed), no grad: the seconds each of `steps` forwards
    took (one new token per sequence, as `generate()` makes them, with a `DynamicCache`) and the tokens picked."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        picked, times = [token], []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
            picked.append(token)
    return times, torch.cat(picked, dim=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    allocator_tuned = apply_malloc_setting(args.malloc)
    from mixlora_lit.base_models import dtype_name, parse_dtype

    args.dtype = dtype_name(parse_dtype(args.dtype))
    import torch

    from mixlora_lit.base_models import load_base_model

    torch.set_num_threads(args.threads)
    base = load_base_model(args.base, dtype=args.dtype)[0].eval()
    mixlora = mixlora_with_random_b(args)[0].eval()
    layers = mixlora.moe_layers()
    models = MODELS + ((f"dense@{args.against}",) if args.against else ())
    against = dense_path_at(args.against) if args.against else None

    def configure(name):
        for layer in layers:  # None: the library's default; `dense`: no row count within the gathered limit
            layer.gathered_inference_max_rows = {"default": None, "gathered": 2 * args.top_k}.get(name, 0)
            layer.__dict__.pop("_dense_cache", None)  # rebuilt by the (untimed) prefill, by this run's code
            for method, old in zip(("_forward_dense_inference", "_dense_weights"), against or ()):
                if name == models[-1]:
                    setattr(layer, method, types.MethodType(old, layer))
                else:
                    layer.__dict__.pop(method, None)

    def run(name, ids, steps):
        configure(name)
        step_times, tokens = decode_steps(base if name == "base" else mixlora, ids, steps)
        return sum(step_times) / steps, tokens

    rows = []
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, base.config.vocab_size, (batch, args.prompt), generator=gen)
        times = {name: [] for name in models}
        tokens = {}
        for name in models:  # warm-up: caches built, allocator settled
            tokens[name] = run(name, ids, 4)[1]
        for round_ in range(args.rounds):
            for name in turn_order(models, round_):  # the order flips every round
                seconds, tokens[name] = run(name, ids, args.steps)
                times[name].append(seconds)
        paths = {}
        for name in ("gathered", "default"):  # the last: back to the library's defaults
            configure(name)
            with torch.no_grad():
                paths[name] = layers[0].current_path(batch * args.top_k)
        med = {name: statistics.median(v) for name, v in times.items()}
        row = {"batch": batch, "rows": batch * args.top_k, "gathered_variant_path": paths["gathered"],
               "default_path": paths["default"], **{f"{name}_ms": med[name] * 1e3 for name in MODELS},
               "gathered_vs_base": med["gathered"] / med["base"], "dense_vs_base": med["dense"] / med["base"],
               "gathered_vs_dense": med["gathered"] / med["dense"],
               "gathered_vs_dense_per_round": [a / b for a, b in zip(times["gathered"], times["dense"])],
               "dense_vs_base_per_round": [a / b for a, b in zip(times["dense"], times["base"])],
               "same_tokens": bool(torch.equal(tokens["gathered"], tokens["dense"])),
               "round_ms": {name: [t * 1e3 for t in v] for name, v in times.items()}}
        if against:
            name = models[-1]
            row.update({"against_ms": med[name] * 1e3, "dense_vs_against": med["dense"] / med[name],
                        "dense_vs_against_per_round": [a / b for a, b in zip(times["dense"], times[name])],
                        "same_tokens_against": bool(torch.equal(tokens["dense"], tokens[name]))})
        row["intervals"] = ratio_intervals({key: row[f"{key}_per_round"] for key in
                                            ("gathered_vs_dense", "dense_vs_base", "dense_vs_against")
                                            if f"{key}_per_round" in row})
        rows.append(row)
        print(f"batch {batch} ({row['gathered_variant_path']}): base {row['base_ms']:.1f} ms/step, gathered "
              f"{row['gathered_ms']:.1f}, dense {row['dense_ms']:.1f}; gathered / dense "
              f"{row['gathered_vs_dense']:.3f}", flush=True)
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
               "allocator_tuned": allocator_tuned, "torch": torch.__version__, "rows": rows}
    return emit(results, markdown(results), args)


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"{s['base']}, {s['dtype']}, {s['threads']} threads, MixLoRA {s['experts']} experts top-{s['top_k']} "
             f"r={s['rank']} on q, k, v, o, gate, up, down; one cached decoding step after a {s['prompt']}-token "
             f"prompt; median of {s['rounds']} interleaved rounds (order flipping) of {s['steps']} steps; "
             f"torch {results['torch']}. `gathered`: the gathered path up to {2 * s['top_k']} rows (else dense); "
             "`dense`: the dense path at every row count", "",
             "| batch | (token, expert) rows | `gathered` runs | library default | base (ms/step) | gathered | dense | "
             "gathered / base | dense / base | gathered / dense | same tokens |",
             "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['batch']} | {r['rows']} | {r['gathered_variant_path']} | {r['default_path']} | {r['base_ms']:.1f} | "
              f"{r['gathered_ms']:.1f} | {r['dense_ms']:.1f} | {r['gathered_vs_base']:.3f} | {r['dense_vs_base']:.3f} | "
              f"{r['gathered_vs_dense']:.3f} | {r['same_tokens']} |" for r in results["rows"]]
    lines.append("")
    lines += [f"- batch {r['batch']}: gathered / dense per round "
              + ", ".join(f"{v:.3f}" for v in r["gathered_vs_dense_per_round"]) for r in results["rows"]]
    if s["against"]:
        lines += [f"- batch {r['batch']}: dense path / dense@{s['against']} {r['dense_vs_against']:.3f} "
                  f"({r['dense_ms']:.1f} / {r['against_ms']:.1f} ms/step; per round "
                  + ", ".join(f"{v:.3f}" for v in r["dense_vs_against_per_round"])
                  + f"); same tokens: {r['same_tokens_against']}" for r in results["rows"]]
    for r in results["rows"]:
        lines += interval_lines(r.get("intervals", {}), prefix=f"batch {r['batch']}: ")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
