"""Evaluation speed of the two protocols: examples/s of the paper's label-token scoring and of cloze
(every choice's answer text scored by log-likelihood), on the same dev examples and the same model.

    .venv/bin/python benchmarks/bench_eval_protocols.py --per-task 60 --json reports/bench_eval_protocols.json

Both run the Lightning module's own evaluation code (`MixLoraLitModule.predictions`) over the data
module's dev batches, interleaved, `--repeats` times each; the JSON keeps every time and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mixlora_lit.data.tasks import PAPER_MULTITASK
from mixlora_lit.lightning.datamodule import MultiTaskDataModule
from mixlora_lit.lightning.module import MixLoraLitModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--per-task", type=int, default=60, help="dev examples per task (the quickstart's 60)")
    parser.add_argument("--batch", type=int, default=16, help="examples per batch (the quickstart's 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    module = MixLoraLitModule(base=args.base, base_dtype=args.dtype)
    module.configure_model()
    module.model.eval()
    loaders = {}
    for protocol in ("paper", "cloze"):
        dm = MultiTaskDataModule(tasks=list(PAPER_MULTITASK), protocol=protocol, tokenizer=args.base,
                                 dev_cap=args.per_task, eval_batch_size=args.batch, cutoff_len=512)
        dm.prepare_data()
        dm.setup("validate")
        loaders[protocol] = list(dm.val_dataloader())
    times: dict[str, list[float]] = {p: [] for p in loaders}
    counts = {p: sum(len(b["id"]) for b in batches) for p, batches in loaders.items()}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for protocol, batches in loaders.items():
                start = time.perf_counter()
                for batch in batches:
                    module.predictions(batch)
                times[protocol].append(time.perf_counter() - start)
    result = {"base": args.base, "dtype": args.dtype, "threads": torch.get_num_threads(), "examples": counts,
              "seconds": times, "examples_per_s": {p: counts[p] / statistics.median(t) for p, t in times.items()}}
    result["cloze_time_vs_paper"] = statistics.median(times["cloze"]) / statistics.median(times["paper"])
    print(json.dumps({k: result[k] for k in ("examples", "examples_per_s", "cloze_time_vs_paper")}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
