"""Router auxiliary losses.

`load_balance_loss` is the Switch/Mixtral formula E * sum_i f_i P_i computed once over the
router logits of all layers together (as the reference code does, not per layer and summed):
f_i is the fraction of (token, choice) assignments that the top-k picks send to expert i (so
the f_i sum to k), P_i the mean router probability of expert i; padding tokens are left out.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _flat_mask(attention_mask: torch.Tensor | None, num_tokens: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(num_tokens, device=device)
    mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    if mask.numel() != num_tokens:
        raise ValueError(f"attention mask has {mask.numel()} positions but the router saw {num_tokens} tokens")
    return mask


def load_balance_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """router_logits: one [tokens, E] tensor per layer; attention_mask: [batch, seq] or None."""
    num_layers = len(router_logits)
    logits = torch.cat(list(router_logits), dim=0).float()
    num_experts = logits.shape[-1]
    mask = _flat_mask(attention_mask, router_logits[0].shape[0], logits.device).repeat(num_layers)
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # [N, k]
    total = mask.sum().clamp_min(1.0)
    counts = torch.zeros(num_experts, device=logits.device).index_add_(
        0, chosen.reshape(-1), mask.repeat_interleave(top_k))
    fraction = counts / total
    mean_prob = (probs * mask.unsqueeze(1)).sum(dim=0) / total
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens and layers of logsumexp(logits)^2 (ST-MoE), which keeps logits small."""
    num_layers = len(router_logits)
    logits = torch.cat(list(router_logits), dim=0).float()
    mask = _flat_mask(attention_mask, router_logits[0].shape[0], logits.device).repeat(num_layers)
    z = torch.logsumexp(logits, dim=-1) ** 2
    return (z * mask).sum() / mask.sum().clamp_min(1.0)
