"""Does `torch.compile` speed up a MixLoRA training step on this machine? A trial, not a feature.

Times eager and `torch.compile(model)` forward + backward of the fused MixLoRA path on the same
batch (SmolLM2-135M, bf16, 2 threads) and prints the compile time, the step medians and their ratio,
or the error if compilation fails.

    .venv/bin/python benchmarks/try_compile.py --batch 8 --seq 256
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_step  # noqa: E402


def main(argv=None) -> None:
    import torch

    args = bench_step.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = bench_step.batch_ids(args)
    model, eager_step = bench_step.build("fused", args)
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model)

    def compiled_step(x):
        loss = compiled(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        for p in params:
            p.grad = None

    start = time.perf_counter()
    try:
        compiled_step(ids)
    except Exception:  # report, don't hide: the trial's answer is then "it does not work here"
        traceback.print_exc()
        print(f"torch.compile failed after {time.perf_counter() - start:.1f} s")
        return
    print(f"first compiled step (compilation included): {time.perf_counter() - start:.1f} s", flush=True)
    times = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name, step in (("eager", eager_step), ("compiled", compiled_step)):
            t = time.perf_counter()
            step(ids)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"eager {med['eager']:.2f} s, compiled {med['compiled']:.2f} s, compiled / eager {med['compiled'] / med['eager']:.3f}"
          f" (median of {args.repeats})")


if __name__ == "__main__":
    main()
