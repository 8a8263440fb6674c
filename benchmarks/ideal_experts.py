"""An idealised MixLoRA FFN for the step benchmarks: what the experts must compute, without routing.

Every token runs through k LoRA experts, as in MixLoRA, but slot j of every token always uses
expert j's weights, so nothing is gathered, sorted, padded or looped over per expert: each LoRA
product is one batched matmul over [k, T, .] contiguous rows, the activation runs on [k, T, F],
and autograd does the backward. The router still runs (logits, softmax, top-k weights) and its
weights scale the slots, so the weighted sum and its gradients are real. No dropout.

This is not a model anyone should train (the experts are never chosen by the router); it is the
arithmetic and memory traffic of MixLoRA's experts with none of the routing machinery, in eager
PyTorch. `bench_real_batches.py --methods base fused ideal --adapter lora_dropout=0
"target_modules=[gate_proj,up_proj,down_proj]"` compares it with the fused kernel on the same
experts-only, dropout-free adapter, and with the frozen base (add `*_compiled` for the same under
torch.compile). It is our simplest routing-free formulation, not a lower bound (a hand-written kernel
could beat it): ideal / base is what the experts' work costs without routing, fused / ideal what the
routing and the fused kernel's bookkeeping add.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _ideal_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    k, r = mlp.ideal_k, mlp.ideal_r
    probs = F.softmax(F.linear(x, mlp.ideal_router), dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))
    weights, _ = probs.topk(k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype).t().unsqueeze(-1)  # [k, T, 1]
    g, u = mlp.gate_proj(x), mlp.up_proj(x)  # the frozen projections, once per token
    low = torch.matmul(x, mlp.ideal_a_gu.transpose(1, 2))  # [k, T, 2r]
    g = torch.baddbmm(g.expand(k, -1, -1), low[..., :r], mlp.ideal_b_g.transpose(1, 2), alpha=mlp.ideal_scaling)
    u = torch.baddbmm(u.expand(k, -1, -1), low[..., r:], mlp.ideal_b_u.transpose(1, 2), alpha=mlp.ideal_scaling)
    h = mlp.act_fn(g) * u  # [k, T, F]
    lora = torch.bmm(torch.bmm(h, mlp.ideal_a_d.transpose(1, 2)), mlp.ideal_b_d.transpose(1, 2))  # [k, T, H]
    out = mlp.down_proj((h * weights).sum(0)) + (lora * weights).sum(0) * mlp.ideal_scaling
    return out.reshape(shape)


_IDEAL_CLASSES: dict[type, type] = {}


def make_ideal(model: nn.Module, num_experts: int, top_k: int, r: int, lora_alpha: float) -> int:
    """Turn every gated FFN of `model` (gate_proj, up_proj, down_proj, act_fn) into the idealised
    MixLoRA FFN, with k = top_k experts' LoRA weights (A at PEFT's scale; B small but not zero, unlike
    PEFT's zeros, so that no product is trivially zero), held in the base's dtype (MixLoRA keeps fp32
    masters and casts them per step: the same here in fp32, a cast fewer for the ideal in bf16).
    Scaling lora_alpha / r (no rsLoRA). Returns the number of FFNs changed."""
    changed = 0
    for mlp in model.modules():
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        hidden, ffn = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        w = mlp.gate_proj.weight
        dtype, device, k = w.dtype, w.device, top_k

        def param(*size: int, std: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(*size, dtype=dtype, device=device) * std)

        mlp.ideal_k, mlp.ideal_r, mlp.ideal_scaling = k, r, lora_alpha / r
        mlp.ideal_router = param(num_experts, hidden, std=0.02)
        mlp.ideal_a_gu = param(k, 2 * r, hidden, std=1 / math.sqrt(hidden))
        mlp.ideal_b_g = param(k, ffn, r, std=1e-3)
        mlp.ideal_b_u = param(k, ffn, r, std=1e-3)
        mlp.ideal_a_d = param(k, r, ffn, std=1 / math.sqrt(ffn))
        mlp.ideal_b_d = param(k, hidden, r, std=1e-3)
        # A subclass, not a per-instance forward: under torch.compile every layer then runs the same code
        # (a bound method per instance is a guard per layer, and recompiles past dynamo's limit).
        cls = type(mlp)
        if cls not in _IDEAL_CLASSES.values():  # not already idealised
            if cls not in _IDEAL_CLASSES:
                _IDEAL_CLASSES[cls] = type(f"Ideal{cls.__name__}", (cls,), {"forward": _ideal_forward})
            mlp.__class__ = _IDEAL_CLASSES[cls]
        changed += 1
    return changed
