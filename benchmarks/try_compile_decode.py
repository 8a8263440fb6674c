"""Does `torch.compile` speed up cached decoding here? A trial, not a feature.

Compiles the model (`torch.compile(model, dynamic=True)`, inductor) and decodes greedily with a
`DynamicCache` after a --prompt-token prompt: the first compiled decode (compilation and the
recompilations of the first steps included) is timed once, then eager and compiled decodes
alternate for --rounds rounds. Prints the median ms per step of each, their ratio, and whether both
picked the same tokens (in bf16 the compiled kernels round differently, so they need not).
`--model mixlora`: MixLoRA (8 experts, top-2, r=16) with small random B matrices, as in
bench_inference.py; `--model base`: the frozen base.

    .venv/bin/python benchmarks/try_compile_decode.py --model base
    .venv/bin/python benchmarks/try_compile_decode.py --model mixlora
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import decode_steps  # noqa: E402
from bench_inference import mixlora_with_random_b  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("base", "mixlora"), default="mixlora")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", help="the base's dtype; auto: bf16 where the CPU runs it natively, else fp32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=24)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from mixlora_lit.base_models import dtype_name, load_base_model, parse_dtype

    args.dtype = dtype_name(parse_dtype(args.dtype))
    import torch

    torch.set_num_threads(args.threads)
    model = (mixlora_with_random_b(args)[0] if args.model == "mixlora"
             else load_base_model(args.base, dtype=args.dtype)[0]).eval()
    ids = torch.randint(0, 1000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, dynamic=True)

    with torch.no_grad():
        start = time.perf_counter()
        try:
            first, _ = decode_steps(compiled, ids, 4)
        except Exception:  # report, don't hide: the trial's answer is then "it does not work here"
            traceback.print_exc()
            print(f"torch.compile failed after {time.perf_counter() - start:.1f} s")
            return
        print(f"{args.model}, {args.dtype}: first compiled decode (prefill and 4 steps, compilation included) "
              f"{time.perf_counter() - start:.1f} s; its steps {', '.join(f'{t:.2f}' for t in first)} s", flush=True)
        medians = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            eager, a = decode_steps(model, ids, args.steps)
            comp, b = decode_steps(compiled, ids, args.steps)
            medians["eager"].append(statistics.median(eager))
            medians["compiled"].append(statistics.median(comp))
            print(f"eager {medians['eager'][-1] * 1e3:.1f} ms/step, compiled {medians['compiled'][-1] * 1e3:.1f}; "
                  f"same tokens: {torch.equal(a, b)}", flush=True)
    e, c = (statistics.median(medians[k]) for k in ("eager", "compiled"))
    print(f"median over {args.rounds} rounds: eager {e * 1e3:.1f} ms/step, compiled {c * 1e3:.1f}, compiled / eager {c / e:.3f}")


if __name__ == "__main__":
    main()
