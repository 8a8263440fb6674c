"""A/B of the whole library's inference at another commit against the working tree's, in one process:
greedy generation, cached decoding steps and label-token evaluation of the same MixLoRA model.

The other commit's `mixlora_lit` package is extracted (`git archive`) and imported under another name,
`mixlora_lit_at_<commit>` (the package imports itself relatively), so both versions' code, from the
attention LoRA to the MoE paths and their weight caches, runs in one process on the same adapter weights
(the working tree's model, small random B matrices as in bench_inference.py, copied into the other's).
Three models interleave, the order flipping every round: the frozen base, `new` (working tree) and
`old` (COMMIT). Reports the medians, new / old and each / base with 95% intervals over the rounds, and
whether new and old pick the same tokens and reach the same accuracies.

    .venv/bin/python benchmarks/ab_inference.py HEAD --json reports/ab_inference.json --markdown reports/ab_inference.md
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import decode_steps  # noqa: E402
from bench_inference import mixlora_with_random_b  # noqa: E402
from bench_step import apply_malloc_setting, emit, interval_lines, ratio_intervals, turn_order  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("base", "new", "old")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("commit", help="the commit whose library `old` runs")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", help="the base's dtype; auto: bf16 where the CPU runs it natively, else fp32")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--workloads", nargs="+", default=["generate", "decode", "eval"],
                   choices=["generate", "decode", "eval"])
    p.add_argument("--gen-batch", type=int, default=4, help="prompts per generate() (real test questions)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--decode-batch", type=int, default=1, help="sequences per cached decoding step")
    p.add_argument("--decode-steps", type=int, default=16, help="timed steps per round, after a 24-token prompt")
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "boolq"])
    p.add_argument("--limit", type=int, default=16, help="test examples per task for the eval workload")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned", help="as in bench_step.py")
    p.add_argument("--data-dir", default=None, help="prepared data (default: the mixlora-lit cache)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def library_at(commit: str):
    """(the package `mixlora_lit` as of `commit`, imported as `mixlora_lit_at_<sha>`, the full sha)."""
    sha = subprocess.run(["git", "rev-parse", commit], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", sha, "mixlora_lit"], cwd=REPO, check=True, capture_output=True).stdout
    root = tempfile.mkdtemp(prefix="ab_inference_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # imported modules need no files after import
    name = f"mixlora_lit_at_{sha[:10]}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        # git's own archive; the "data" filter (Python >= 3.11.4 / 3.10.12) where there is one
        tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    os.rename(os.path.join(root, "mixlora_lit"), os.path.join(root, name))
    sys.path.insert(0, root)
    return importlib.import_module(name), sha


def main(argv=None) -> dict:
    args = parse_args(argv)
    allocator_tuned = apply_malloc_setting(args.malloc)
    from mixlora_lit.base_models import dtype_name, parse_dtype

    args.dtype = dtype_name(parse_dtype(args.dtype))
    import torch

    from mixlora_lit.base_models import load_base_model, load_tokenizer
    from mixlora_lit.data.prepare import read_split
    from mixlora_lit.evaluation.harness import label_token_accuracy

    torch.set_num_threads(args.threads)
    old_lib, sha = library_at(args.commit)
    tokenizer = load_tokenizer(args.base)
    new, cfg = mixlora_with_random_b(args)
    old_cfg = old_lib.MixLoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, num_experts=cfg.num_experts, top_k=cfg.top_k)
    old = old_lib.get_mixlora_model(load_base_model(args.base, dtype=args.dtype)[0], old_cfg)
    old.load_state_dict(new.state_dict())
    models = {"base": load_base_model(args.base, dtype=args.dtype)[0], "new": new, "old": old}
    for m in models.values():
        m.eval()

    prompts = [r["question"] for r in read_split(args.tasks[0], "test", args.data_dir)][:args.gen_batch]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    decode_ids = torch.randint(0, tokenizer.vocab_size, (args.decode_batch, 24), generator=torch.Generator().manual_seed(0))

    def generate(model):
        return model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)

    def evaluate(model):
        return label_token_accuracy(model, tokenizer, args.tasks, limit=args.limit, data_dir=args.data_dir,
                                    batch_size=args.eval_batch)

    def timed(work, model):
        if work == "decode":  # seconds per cached step
            step_times, tokens = decode_steps(model, decode_ids, args.decode_steps)
            return sum(step_times) / args.decode_steps, tokens
        start = time.perf_counter()
        out = generate(model) if work == "generate" else evaluate(model)
        return time.perf_counter() - start, out

    times = {(m, w): [] for m in MODELS for w in args.workloads}
    outputs = {}
    round_orders = []
    with torch.no_grad():
        for round_ in range(args.rounds + 1):  # round 0 warms up (caches built, allocator settled)
            order = turn_order(MODELS, round_)
            round_orders.append(order)
            for name in order:
                for work in args.workloads:
                    seconds, outputs[(name, work)] = timed(work, models[name])
                    if round_:
                        times[(name, work)].append(seconds)
            if round_:
                print(f"round {round_}/{args.rounds}: " + "; ".join(
                    f"{w} " + ", ".join(f"{m} {times[(m, w)][-1]:.3f}s" for m in MODELS) for w in args.workloads),
                    flush=True)
    per_round, same = {}, {}
    for work in args.workloads:
        for a, b in (("new", "old"), ("new", "base"), ("old", "base")):
            per_round[f"{work}_{a}_vs_{b}"] = [x / y for x, y in zip(times[(a, work)], times[(b, work)])]
        new_out, old_out = outputs[("new", work)], outputs[("old", work)]
        same[work] = bool(torch.equal(new_out, old_out)) if work != "eval" else new_out == old_out
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
               "old_commit": sha, "allocator_tuned": allocator_tuned, "torch": torch.__version__,
               "round_orders": round_orders,
               "median_s": {f"{m}_{w}": statistics.median(times[(m, w)]) for m in MODELS for w in args.workloads},
               "rounds_s": {f"{m}_{w}": times[(m, w)] for m in MODELS for w in args.workloads},
               "per_round": per_round, "intervals": ratio_intervals(per_round), "new_same_as_old": same}
    return emit(results, markdown(results), args)


def markdown(results: dict) -> str:
    s = results["settings"]
    med = results["median_s"]
    units = {"generate": "s per generate()", "decode": "ms per step", "eval": "s per evaluation"}
    lines = [f"{s['base']}, {s['dtype']}, {s['threads']} threads, MixLoRA {s['experts']} experts top-{s['top_k']} "
             f"r={s['rank']}; `new`: the working tree's library, `old`: {results['old_commit'][:10]}'s, the same "
             f"weights; medians of {s['rounds']} interleaved rounds (order flipping); torch {results['torch']}. "
             f"generate: {s['gen_batch']} prompts x {s['new_tokens']} new tokens, greedy; decode: {s['decode_batch']} "
             f"sequence(s), one cached step; eval: label-token accuracy, {s['limit']} test examples of each of "
             f"{', '.join(s['tasks'])}, batch {s['eval_batch']}", "",
             "| workload | unit | base | new | old | new / old | new / base | old / base | new, old same tokens (eval: accuracies) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for work in s["workloads"]:
        scale = 1e3 if work == "decode" else 1.0
        b, n, o = (med[f"{m}_{work}"] for m in MODELS)
        lines.append(f"| {work} | {units[work]} | {b * scale:.3f} | {n * scale:.3f} | {o * scale:.3f} | {n / o:.3f} | "
                     f"{n / b:.3f} | {o / b:.3f} | {results['new_same_as_old'][work]} |")
    lines.append("")
    lines += interval_lines(results["intervals"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
