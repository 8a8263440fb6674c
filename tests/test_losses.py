"""Load-balance loss against transformers' Mixtral implementation (an independent oracle)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from conftest import batch, randomize_adapters, tiny_llama
from mixlora_lit import MixLoraConfig, get_mixlora_model, load_balance_loss, router_z_loss


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balance_loss_equals_transformers(top_k, masked):
    gen = torch.Generator().manual_seed(top_k)
    logits = [torch.randn(3 * 7, 8, generator=gen) * 2 for _ in range(5)]
    mask = (torch.rand(3, 7, generator=gen) > 0.3).long() if masked else None
    ours = load_balance_loss(logits, top_k, mask)
    theirs = load_balancing_loss_func(tuple(logits), 8, top_k, mask)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_padding_is_excluded():
    gen = torch.Generator().manual_seed(0)
    real = [torch.randn(4, 6, generator=gen) for _ in range(3)]
    junk = [torch.cat([r, torch.randn(5, 6, generator=gen) * 10]) for r in real]  # 5 padding rows each
    mask = torch.tensor([[1] * 4 + [0] * 5])
    assert torch.allclose(load_balance_loss(junk, 2, mask), load_balance_loss(real, 2, None))
    assert torch.allclose(router_z_loss(junk, mask), router_z_loss(real, None))


def test_z_loss_formula():
    logits = [torch.tensor([[0.0, 0.0], [1.0, 3.0]])]
    expected = (torch.log(torch.tensor(2.0)) ** 2 + torch.logsumexp(torch.tensor([1.0, 3.0]), 0) ** 2) / 2
    assert torch.allclose(router_z_loss(logits), expected)


@pytest.mark.parametrize("strategy", ["mixlora", "mixlora-switch"])
def test_model_aux_loss_is_coef_times_balance_loss_over_all_layers(strategy):
    cfg = MixLoraConfig(r=4, lora_alpha=8, num_experts=4, routing_strategy=strategy, router_aux_loss_coef=0.01,
                        router_z_loss_coef=0.002)
    model = get_mixlora_model(tiny_llama(num_hidden_layers=3), cfg, adapter_dtype=torch.float64)
    randomize_adapters(model)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert len(out.router_logits) == 3
    expected = 0.01 * load_balancing_loss_func(out.router_logits, 4, cfg.top_k, mask)
    if strategy == "mixlora-switch":
        z = torch.cat(out.router_logits).logsumexp(-1) ** 2
        expected = expected + 0.002 * (z * mask.reshape(-1).repeat(3)).sum() / (mask.sum() * 3)
    assert torch.allclose(out.aux_loss.double(), expected.double(), rtol=1e-6)
    base_loss = model.base_model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert torch.allclose(out.loss, base_loss + out.aux_loss)
