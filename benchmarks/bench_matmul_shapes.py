"""Why the fused path pads each expert's rows (`MixLoraMoeFFN.row_bucket`): on CPU, a bf16 matmul
of a shape not seen before costs far more than one whose shape repeats, because oneDNN builds
(and caches) a kernel per shape. Routing gives every expert a new row count at every step.

Times, side by side in one process, the per-expert LoRA matmul of the benchmark setting
([n, 1536] x [1536, 16], SmolLM2's FFN width, rank 16) over the same set of row counts n:
  new shapes     each n for the first time
  same shapes    the same n again (kernels cached)
  padded shapes  new n rounded up to a multiple of --bucket, as the fused path runs them

    .venv/bin/python benchmarks/bench_matmul_shapes.py
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=1536)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shapes", type=int, default=300, help="distinct row counts per pass")
    p.add_argument("--bucket", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    h = torch.randn(4096 + args.bucket, args.features, dtype=torch.bfloat16)
    a = torch.randn(args.rank, args.features, dtype=torch.bfloat16)

    def per_call_ms(counts):
        start = time.perf_counter()
        for n in counts:
            h[:n] @ a.t()
        return (time.perf_counter() - start) / len(counts) * 1e3

    first = list(range(400, 400 + args.shapes))
    new_ms = per_call_ms(first)
    same_ms = per_call_ms(first)
    fresh = list(range(1000, 1000 + args.shapes))  # not seen yet, padded as the fused path does
    padded_ms = per_call_ms([-(-n // args.bucket) * args.bucket for n in fresh])
    result = {"new_shape_ms": new_ms, "same_shape_ms": same_ms, "padded_shape_ms": padded_ms,
              "new_over_same": new_ms / same_ms, "new_over_padded": new_ms / padded_ms}
    print(f"[n, {args.features}] x [{args.features}, {args.rank}] bf16, n in {args.shapes} distinct values, "
          f"{args.threads} threads, per call:")
    print(f"  new shapes {new_ms:.3f} ms, same shapes again {same_ms:.3f} ms, "
          f"new shapes padded to {args.bucket} rows {padded_ms:.3f} ms")
    print(f"  new / same {result['new_over_same']:.1f}x, new / padded {result['new_over_padded']:.1f}x")
    return result


if __name__ == "__main__":
    main()
