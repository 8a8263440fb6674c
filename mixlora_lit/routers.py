"""Routers: which experts each token goes to, and with what weight.

Both routers return a `Routing`: `weights` and `experts` of shape [tokens, k] and the raw
`logits` [tokens, E] (kept for the auxiliary losses). An expert index equal to E means "no
expert": the switch router uses it for tokens over an expert's capacity, which are then served
by the frozen FFN alone (scaled by their gate value like any expert output) instead of being
dropped from the FFN altogether.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Routing(NamedTuple):
    weights: torch.Tensor  # [T, k], router dtype
    experts: torch.Tensor  # [T, k], int64 in [0, E]; E marks "frozen FFN only"
    logits: torch.Tensor  # [T, E], router dtype


class _Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, init_range: float, jitter_noise: float,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.jitter_noise = jitter_noise
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device))
        nn.init.normal_(self.weight, mean=0.0, std=init_range)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.training and self.jitter_noise > 0:
            # Multiplicative jitter on the router input only (Switch Transformer): it explores
            # routings without perturbing what the frozen FFN sees.
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return F.linear(x, self.weight)


class TopKRouter(_Router):
    """Softmax over all experts, keep the top k, renormalise the k weights to sum to one."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_range: float = 0.02,
                 jitter_noise: float = 0.0, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(hidden_size, num_experts, init_range, jitter_noise, dtype, device)
        self.top_k = top_k

    def forward(self, x: torch.Tensor, batch_shape: tuple[int, ...] | None = None) -> Routing:
        logits = self._logits(x)
        probs = torch.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights, experts, logits)


class SwitchRouter(_Router):
    """Top-1 routing with a per-sequence expert capacity (Switch Transformer).

    Within each sequence, the first `capacity` tokens (by position) routed to an expert are
    kept; later ones overflow to the frozen FFN. The output weight is the top-1 probability
    (not renormalised), which is what gives the router its gradient. The same rule applies in
    training and inference; during cached generation each step holds one token, so capacity
    never binds there.
    """

    def __init__(self, hidden_size: int, num_experts: int, capacity: int, init_range: float = 1.0,
                 jitter_noise: float = 0.01, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(hidden_size, num_experts, init_range, jitter_noise, dtype, device)
        self.top_k = 1
        self.capacity = capacity

    def forward(self, x: torch.Tensor, batch_shape: tuple[int, ...] | None = None) -> Routing:
        logits = self._logits(x)
        probs = torch.softmax(logits, dim=-1)
        weight, expert = probs.max(dim=-1, keepdim=True)
        batch, seq = batch_shape if batch_shape is not None else (1, x.shape[0])
        one_hot = F.one_hot(expert.view(batch, seq), self.num_experts)
        position_in_expert = torch.cumsum(one_hot, dim=1)  # 1-based rank of the token within its expert
        rank = (position_in_expert * one_hot).sum(-1).reshape(-1, 1)
        expert = torch.where(rank <= self.capacity, expert, torch.full_like(expert, self.num_experts))
        return Routing(weight, expert, logits)
