"""A/B of `FusedLoraExperts` at another commit against the working tree's, in one process, on the
quickstart's training batches (fused MixLoRA, the training loss, forward + backward).

The other commit's `mixlora_lit/kernels.py` is loaded as a separate module (`git show`); both kernels run
on the same model and batches, alternating per batch (the order flips every round), so machine noise
lands on both alike. Usable while the kernel's interface (`ExpertPlan`, `FusedLoraExperts.apply`) is
unchanged between the two commits.

    .venv/bin/python benchmarks/ab_kernel.py 172c422          # before session 11's restructuring
    .venv/bin/python benchmarks/ab_kernel.py 847307f --shape 8x256 --batches 3   # bench_step's batch size

`--shape BxS` runs random token batches of that shape, every position supervised (the full-sequence
loss of `bench_step.py`), instead of the quickstart's batches.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_real_batches import REPO, build, load_sections, training_batches  # noqa: E402
from bench_step import apply_malloc_setting, turn_order  # noqa: E402


def kernel_at(commit: str):
    source = subprocess.run(["git", "-C", REPO, "show", f"{commit}:mixlora_lit/kernels.py"], check=True,
                            capture_output=True, text=True).stdout
    source = source.replace("from .lora import", "from mixlora_lit.lora import")
    path = os.path.join(tempfile.mkdtemp(), f"kernels_{commit}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"kernels_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FusedLoraExperts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("commit", help="the other commit (its kernel is 'other'; the working tree's is 'current')")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", default=None, metavar="BxS", help="random batches of this shape instead")
    args = p.parse_args(argv)
    apply_malloc_setting("tuned")
    import torch

    import mixlora_lit.moe as moe

    torch.set_num_threads(args.threads)
    variants = {"other": kernel_at(args.commit), "current": moe.FusedLoraExperts}
    model_section, data_section = load_sections(os.path.join(REPO, "configs", "quickstart.yaml"))
    if args.shape:
        size, seq = (int(n) for n in args.shape.lower().split("x"))
        generator = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(args.warmup + args.batches):
            ids = torch.randint(100, 20000, (size, seq), generator=generator)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    else:
        batches = training_batches(data_section, args.warmup + args.batches)
    _, step = build("fused", model_section)

    def run(name: str, batch) -> float:
        moe.FusedLoraExperts = variants[name]
        start = time.perf_counter()
        step(batch)
        return time.perf_counter() - start

    for batch in batches[:args.warmup]:
        for name in variants:
            run(name, batch)
    totals: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        order = turn_order(variants, round_)
        passed = dict.fromkeys(variants, 0.0)
        for batch in batches[args.warmup:]:
            for name in order:
                passed[name] += run(name, batch)
        for name in variants:
            totals[name].append(passed[name])
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n} {t:.2f} s" for n, t in passed.items()), flush=True)
    median = {name: statistics.median(t) for name, t in totals.items()}
    print(f"median pass: other ({args.commit}) {median['other']:.2f} s, current {median['current']:.2f} s; "
          f"current / other {median['current'] / median['other']:.3f}")


if __name__ == "__main__":
    main()
