"""A frozen LM head on generation's first-step input: the strided [B, 1, H] view against a contiguous copy.

Generation's first step projects only the last position (`logits_to_keep=1`), a strided view of the
hidden states. With a frozen head `torch.matmul` does not fold that view into one `mm`; it runs a
batched matmul against the weight expanded to [B, H, V] (and on CPU in bf16 copies it). The library's
`fold_lm_head_inputs` gives the head a contiguous copy instead. This times both on a head of the given
size, alternating which goes first, per dtype and batch size, and writes the medians and the ratio
`contiguous_vs_strided` (the hooked time over the unhooked one).

    .venv/bin/python benchmarks/bench_lm_head.py --json reports/bench_lm_head.json --markdown reports/bench_lm_head.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import emit, interval_lines, ratio_intervals, turn_order  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M's hidden size")
    p.add_argument("--vocab", type=int, default=49152, help="SmolLM2-135M's vocabulary")
    p.add_argument("--prompt", type=int, default=25, help="positions in the hidden states the view is cut from")
    p.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from mixlora_lit.base_models import fold_lm_head_inputs

    torch.set_num_threads(args.threads)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        plain = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(dtype).requires_grad_(False)
        hooked = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(dtype).requires_grad_(False)
        hooked.load_state_dict(plain.state_dict())

        class Model(torch.nn.Module):  # what `fold_lm_head_inputs` looks for: a model with an output head
            def get_output_embeddings(self):
                return hooked

        fold_lm_head_inputs(Model())
        heads = {"strided": plain, "contiguous": hooked}
        for batch in args.batch:
            x = torch.randn(batch, args.prompt, args.hidden, dtype=dtype)[:, -1:, :]
            times = {k: [] for k in heads}
            with torch.no_grad():
                diff = (plain(x).double() - hooked(x).double()).abs().max().item()  # also the warm-up
                for round_ in range(args.rounds):
                    for name in turn_order(heads, round_):
                        start = time.perf_counter()
                        heads[name](x)
                        times[name].append(time.perf_counter() - start)
            per_round = [c / s for c, s in zip(times["contiguous"], times["strided"])]
            row = {"dtype": dtype_name, "batch": batch, "strided_ms": statistics.median(times["strided"]) * 1e3,
                   "contiguous_ms": statistics.median(times["contiguous"]) * 1e3, "max_abs_logit_diff": diff,
                   "contiguous_vs_strided_per_round": per_round,
                   "intervals": ratio_intervals({"contiguous_vs_strided": per_round})}
            row["contiguous_vs_strided"] = row["contiguous_ms"] / row["strided_ms"]
            rows.append(row)
            print(f"{dtype_name} batch {batch}: strided {row['strided_ms']:.1f} ms, contiguous "
                  f"{row['contiguous_ms']:.1f} ms, ratio {row['contiguous_vs_strided']:.3f}", flush=True)
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
               "torch": torch.__version__, "rows": rows}
    return emit(results, markdown(results), args)


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"A frozen [{s['vocab']}, {s['hidden']}] LM head on a strided [B, 1, {s['hidden']}] view (generation's first "
             f"step) vs a contiguous copy (`fold_lm_head_inputs`); median of {s['rounds']} alternating calls; "
             f"{s['threads']} threads; torch {results['torch']}", "",
             "| dtype | B | strided (ms) | contiguous (ms) | contiguous / strided | largest logit difference |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results["rows"]:
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['strided_ms']:.1f} | {r['contiguous_ms']:.1f} | "
                     f"{r['contiguous_vs_strided']:.3f} | {r['max_abs_logit_diff']:.2g} |")
    lines.append("")
    for r in results["rows"]:
        lines += interval_lines(r["intervals"], prefix=f"{r['dtype']}, B={r['batch']}: ")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
