"""Probe (issue 18): would a hand-written C++ kernel for the fused MoE backward's element-wise chain pay?

The chain is what `FusedLoraExperts._backward` runs in eager PyTorch over the [rows, F] tensors of
one layer: act = silu(g), h = act * u, the routing-weight gradient sum(grad * h), grad * w, then
grad_u = grad * act and silu's backward on grad * u. This times it against one C++ function per half
(OpenMP, built here with torch.utils.cpp_extension: g++ and the Python headers needed, about 30 s),
checks that both give the same values, and prints the medians. Not used by the library.

    .venv/bin/python benchmarks/probe_cpp_chain.py --rows 920 --ffn 1536 --flags=-O3,-march=native,-ffast-math
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import torch
import torch.nn.functional as F

SOURCE = r"""
#include <torch/extension.h>
#include <cmath>

// First half: sig = sigmoid(g), h = g sig u, gw[r] = sum_f grad h, grad *= w[r] (in place).
void chain_a(torch::Tensor grad, torch::Tensor g, torch::Tensor u, torch::Tensor w, torch::Tensor sig,
             torch::Tensor h, torch::Tensor gw) {
  const int64_t rows = g.size(0), width = g.size(1);
  float* G = grad.data_ptr<float>();
  const float* X = g.data_ptr<float>();
  const float* U = u.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* S = sig.data_ptr<float>();
  float* H = h.data_ptr<float>();
  float* GW = gw.data_ptr<float>();
  #pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * width;
    const float wr = W[r];
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int64_t f = 0; f < width; ++f) {
      const float x = X[o + f], s = 1.f / (1.f + expf(-x)), hv = x * s * U[o + f];
      S[o + f] = s;
      H[o + f] = hv;
      acc += G[o + f] * hv;
      G[o + f] *= wr;
    }
    GW[r] = acc;
  }
}

// Second half: grad_u = gh g sig, grad_g = gh u silu'(g) with silu' = sig (1 + g (1 - sig)).
void chain_b(torch::Tensor gh, torch::Tensor g, torch::Tensor u, torch::Tensor sig, torch::Tensor gu,
             torch::Tensor gg) {
  const int64_t n = g.numel();
  const float* D = gh.data_ptr<float>();
  const float* X = g.data_ptr<float>();
  const float* U = u.data_ptr<float>();
  const float* S = sig.data_ptr<float>();
  float* GU = gu.data_ptr<float>();
  float* GG = gg.data_ptr<float>();
  #pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float x = X[i], s = S[i], d = D[i];
    GU[i] = d * x * s;
    GG[i] = d * U[i] * s * (1.f + x * (1.f - s));
  }
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=920, help="T*k rows (the quickstart's batches: about 920)")
    p.add_argument("--ffn", type=int, default=1536, help="FFN width F (SmolLM2-135M: 1536)")
    p.add_argument("--flags", default="-O3,-march=native,-ffast-math", help="compiler flags, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args()
    from torch.utils.cpp_extension import load_inline

    flags = args.flags.split(",")
    start = time.perf_counter()
    name = "probe_chain_" + hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]  # one build per flag set
    ext = load_inline(name, cpp_sources=SOURCE,
                      functions=["chain_a", "chain_b"], extra_cflags=[*flags, "-fopenmp"],
                      extra_ldflags=["-fopenmp"])
    print(f"built in {time.perf_counter() - start:.1f} s with {' '.join(flags)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, width = args.rows, args.ffn
    g, u, grad0 = (torch.randn(rows, width) for _ in range(3))
    w = torch.rand(rows, 1)

    def eager():
        grad = grad0.clone()
        act = F.silu(g)
        h = act * u
        gw = (grad * h).sum(1, keepdim=True)
        gh = grad.mul_(w)
        gu = gh * act
        gg = torch.ops.aten.silu_backward(gh.mul_(u), g)
        return h, gw, gu, gg

    def fused():
        grad, sig, h, gw = grad0.clone(), torch.empty_like(g), torch.empty_like(g), torch.empty(rows)
        ext.chain_a(grad, g, u, w.view(-1), sig, h, gw)
        gu, gg = torch.empty_like(g), torch.empty_like(g)
        ext.chain_b(grad, g, u, sig, gu, gg)
        return h, gw.view(-1, 1), gu, gg

    for name, a, b in zip(("h", "weight grad", "grad_u", "grad_g"), eager(), fused()):
        print(f"{name}: max |difference| / max |value| = {((a - b).abs().max() / a.abs().max()).item():.1e}")

    def median_ms(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    for round_ in range(3):  # interleaved rounds: the machine drifts
        e, c = median_ms(eager), median_ms(fused)
        print(f"round {round_ + 1}: eager {e:.2f} ms, C++ {c:.2f} ms, C++ / eager {c / e:.3f}")


if __name__ == "__main__":
    main()
