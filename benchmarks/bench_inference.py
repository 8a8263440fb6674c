"""Inference cost of a MixLoRA model: unmerged vs attention-LoRA-merged, next to the bare base.

Two workloads, both on real prepared data / real tokens:
  eval      the paper's label-token evaluation (`label_token_accuracy`) over --limit test examples
            of each task: examples/s
  generate  greedy `generate()` of --new-tokens tokens for a batch of --gen-batch prompts: new tokens/s

Models: base (the frozen base alone), mixlora (attention LoRA unmerged, fused MoE path),
merged (`merge_and_unload()`: attention LoRA folded into the base weights, MoE FFNs kept).
Interleaved rounds in one process, the order flipping every round; medians, and for MixLoRA / base a
95% interval over the rounds (`bench_step.ratio_interval`). The adapters get small random B matrices so
merging changes weights for real; the script checks that merged and unmerged give the same predictions.

    .venv/bin/python benchmarks/bench_inference.py --json reports/bench_inference.json --markdown reports/bench_inference.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_step import (apply_malloc_setting, emit, flips, interval_lines, ratio_intervals, turn_order,  # noqa: E402
                        write_profile)

MODELS = ("base", "mixlora", "merged")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", help="the base's dtype; auto: bf16 where the CPU runs it natively, else fp32")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa"])
    p.add_argument("--limit", type=int, default=32, help="test examples per task for the eval workload")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned", help="as in bench_step.py")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", default=None, help="prepared data (default: the mixlora-lit cache)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also write the per-operator profile of one generate() of base and mixlora to "
                        "DIR/generate_<model>.txt (after the timed rounds)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def mixlora_with_random_b(args):
    """MixLoRA (--experts, --top-k, --rank, alpha 2 * rank) on a fresh --base, its B matrices small and
    random (seed 0) so the adapters change the outputs; with its config."""
    import torch

    from mixlora_lit import MixLoraConfig, get_mixlora_model
    from mixlora_lit.base_models import load_base_model

    torch.manual_seed(0)
    cfg = MixLoraConfig(r=args.rank, lora_alpha=2 * args.rank, num_experts=args.experts, top_k=args.top_k)
    mixlora = get_mixlora_model(load_base_model(args.base, dtype=args.dtype)[0], cfg)
    with torch.no_grad():
        for name, p in mixlora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return mixlora, cfg


def build_models(args):
    from mixlora_lit import get_mixlora_model
    from mixlora_lit.base_models import load_base_model

    base, _ = load_base_model(args.base, dtype=args.dtype)
    mixlora, cfg = mixlora_with_random_b(args)
    merged_source = get_mixlora_model(load_base_model(args.base, dtype=args.dtype)[0], cfg)
    merged_source.load_state_dict(mixlora.state_dict())
    merged = merged_source.merge_and_unload()
    models = {"base": base, "mixlora": mixlora, "merged": merged}
    for m in models.values():
        m.eval()
    return models


def main(argv=None) -> dict:
    args = parse_args(argv)
    allocator_tuned = apply_malloc_setting(args.malloc)
    from mixlora_lit.base_models import dtype_name, parse_dtype

    args.dtype = dtype_name(parse_dtype(args.dtype))  # `auto` resolved: the results name the dtype used
    import torch

    from mixlora_lit.base_models import load_tokenizer
    from mixlora_lit.data.prepare import read_split
    from mixlora_lit.evaluation.harness import label_token_accuracy

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.base)
    models = build_models(args)
    prompts = [r["question"] for r in read_split(args.tasks[0], "test", args.data_dir)]
    enc = tokenizer(prompts[:args.gen_batch], return_tensors="pt", padding=True, padding_side="left")
    n_eval = None
    times = {(m, w): [] for m in MODELS for w in ("eval", "generate")}
    outputs = {}
    round_orders = []  # the models' order in each round, the warm-up round first
    with torch.no_grad():
        for round_ in range(args.repeats + 1):  # round 0 warms up
            order = turn_order(MODELS, round_)  # the order flips every round
            round_orders.append(list(order))
            for name in order:
                model = models[name]
                start = time.perf_counter()
                scores = label_token_accuracy(model, tokenizer, args.tasks, limit=args.limit, data_dir=args.data_dir,
                                              batch_size=args.eval_batch)
                t_eval = time.perf_counter() - start
                n_eval = sum(s["n"] for s in scores.values())
                start = time.perf_counter()
                out = model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
                t_gen = time.perf_counter() - start
                outputs[name] = (scores, out)
                if round_:
                    times[(name, "eval")].append(t_eval)
                    times[(name, "generate")].append(t_gen)
            print(f"round {round_}/{args.repeats}: " + ", ".join(
                f"{m} eval {times[(m, 'eval')][-1]:.2f}s gen {times[(m, 'generate')][-1]:.2f}s"
                for m in MODELS if times[(m, "eval")]), flush=True)
    new_tokens = args.gen_batch * args.new_tokens
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
               "allocator_tuned": allocator_tuned,
               "torch": torch.__version__, "eval_examples": n_eval, "round_orders": round_orders, "models": {}}
    for name in MODELS:
        ev, gen = statistics.median(times[(name, "eval")]), statistics.median(times[(name, "generate")])
        results["models"][name] = {"eval_s": ev, "eval_examples_per_s": n_eval / ev,
                                   "generate_s": gen, "generate_tokens_per_s": new_tokens / gen,
                                   "label_token_acc": {t: s["acc"] for t, s in outputs[name][0].items()}}
    # per round (the medians above are of times, not of ratios): how much the machine moves within one run
    results["rounds"] = {f"{name}_{work}_s": values for (name, work), values in times.items()}
    results["rounds"]["mixlora_vs_base_eval_time"] = [a / b for a, b in zip(times[("mixlora", "eval")],
                                                                            times[("base", "eval")])]
    results["rounds"]["mixlora_vs_base_generate_time"] = [a / b for a, b in zip(times[("mixlora", "generate")],
                                                                                times[("base", "generate")])]
    results["intervals"] = ratio_intervals({key: results["rounds"][key] for key in
                                            ("mixlora_vs_base_eval_time", "mixlora_vs_base_generate_time")})
    m = results["models"]
    results["merged_vs_unmerged_eval_time"] = m["merged"]["eval_s"] / m["mixlora"]["eval_s"]
    results["merged_vs_unmerged_generate_time"] = m["merged"]["generate_s"] / m["mixlora"]["generate_s"]
    results["mixlora_vs_base_eval_time"] = m["mixlora"]["eval_s"] / m["base"]["eval_s"]
    results["mixlora_vs_base_generate_time"] = m["mixlora"]["generate_s"] / m["base"]["generate_s"]
    results["merged_same_generations"] = bool(torch.equal(outputs["merged"][1], outputs["mixlora"][1]))
    results["merged_same_label_token_acc"] = outputs["merged"][0] == outputs["mixlora"][0]
    if args.profile:
        with torch.no_grad():
            for name in ("base", "mixlora"):
                write_profile(f"{args.profile}/generate_{name}.txt", lambda e, model=models[name]: model.generate(
                    **e, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id), [enc],
                    f"{name}: generate() of {args.new_tokens} new tokens for {args.gen_batch} prompts "
                    f"{tuple(enc['input_ids'].shape)}, {args.dtype}, {args.threads} threads")
    return emit(results, markdown(results), args)


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"{s['base']}, {s['dtype']}, {s['threads']} threads, MixLoRA {s['experts']} experts top-{s['top_k']} "
             f"r={s['rank']}; eval: label-token accuracy over {results['eval_examples']} test examples "
             f"({s['limit']} per task, batch {s['eval_batch']}); generate: {s['gen_batch']} prompts x "
             f"{s['new_tokens']} new tokens, greedy; median of {s['repeats']} interleaved rounds"
             + (" (order flipping)" if flips(results.get("round_orders", [])) else ""), "",
             "| model | eval (s) | eval examples/s | generate (s) | new tokens/s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in results["models"].items():
        lines.append(f"| {name} | {r['eval_s']:.2f} | {r['eval_examples_per_s']:.1f} | {r['generate_s']:.2f} "
                     f"| {r['generate_tokens_per_s']:.1f} |")
    lines += ["",
              f"- merged / unmerged time: eval {results['merged_vs_unmerged_eval_time']:.3f}, "
              f"generate {results['merged_vs_unmerged_generate_time']:.3f}",
              f"- MixLoRA / base time: eval {results['mixlora_vs_base_eval_time']:.3f}, "
              f"generate {results['mixlora_vs_base_generate_time']:.3f}",
              "- MixLoRA / base time per round: eval " + ", ".join(
                  f"{v:.3f}" for v in results["rounds"]["mixlora_vs_base_eval_time"]) + "; generate " + ", ".join(
                  f"{v:.3f}" for v in results["rounds"]["mixlora_vs_base_generate_time"]),
              f"- merged and unmerged give the same generations: {results['merged_same_generations']}; "
              f"the same label-token accuracies: {results['merged_same_label_token_acc']}"]
    lines += interval_lines(results.get("intervals", {}))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
