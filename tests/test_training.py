"""What trains and what does not."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import batch, tiny_llama
from mixlora_lit import MixLoraConfig, get_mixlora_model


def test_base_frozen_adapters_train():
    """Every base weight (the wrapped projections included, whose names change on injection) is the same
    tensor after injection, gets no gradient and does not change; every adapter tensor changes."""
    base = tiny_llama(dtype=torch.float32)
    frozen = [(name, param, param.detach().clone()) for name, param in base.named_parameters()]
    wrapped = [n for n, _, _ in frozen if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                       "o_proj.weight", "gate_proj.weight", "up_proj.weight",
                                                       "down_proj.weight"))]
    assert len(wrapped) == 7 * base.config.num_hidden_layers  # the weights injection renames are all checked
    model = get_mixlora_model(base, MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2))
    in_model = {id(p): n for n, p in model.named_parameters()}
    assert all(id(param) in in_model for _, param, _ in frozen), "injection replaced a base weight"
    assert any(in_model[id(param)].endswith("q_proj.base_layer.weight") for _, param, _ in frozen)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(("lora_" in n or "moe_gate" in n) for n in adapters)
    assert not any(param.requires_grad for _, param, _ in frozen)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids, mask = batch()
    for _ in range(2):  # B starts at zero, so A only gets a gradient from the second step on
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        for name, param, _ in frozen:
            assert param.grad is None, f"frozen {name} got a gradient"
        opt.step()
        opt.zero_grad()
    for name, param, value in frozen:
        assert torch.equal(param, value), f"frozen {name} changed"
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapters[n])}
    assert changed == set(adapters), f"unchanged adapter tensors: {sorted(set(adapters) - changed)[:5]}"


def test_dropout_is_off_in_eval_mode():
    """The reference inference package leaves expert dropout on in eval; two eval forwards must agree."""
    model = get_mixlora_model(tiny_llama(dtype=torch.float32), MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                                            num_experts=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    ids, mask = batch()
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(a, c)


@pytest.mark.parametrize("p", [0.05, 0.3])  # drawn positions (sparse) and keep mask (dense)
def test_fast_dropout_drops_the_requested_fraction_and_keeps_the_mean(p):
    from mixlora_lit.lora import FastDropout

    torch.manual_seed(0)
    drop = FastDropout(p)
    x = torch.ones(1000, 1000, dtype=torch.bfloat16)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / x.numel())
    assert abs(y.float().mean().item() - 1.0) < 0.01
    assert torch.equal(drop.eval()(x), x)
    x = torch.ones(10, 10, requires_grad=True)
    out = FastDropout(p).train()(x)
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the gradient passes exactly where the value did


@pytest.mark.parametrize("p,width,row_order", [(0.05, None, None), (0.05, 40, None), (0.3, 40, None), (0.05, 40, False)])
def test_dropped_positions_are_independent_bernoulli(p, width, row_order):
    """Each element dropped independently with probability p: the number dropped out of n varies
    like a Binomial(n, p) (a fixed-size draw would not vary), pairs are dropped together with
    probability p**2 (neighbours across a row boundary included), and every row's share is
    Binomial(width, p) too (a fixed count per row would not vary). Drawn positions come in row order
    on the CPU; `row_order=False` is the one-count draw other devices use (no host-device sync)."""
    from mixlora_lit.lora import SPARSE_DROPOUT_MAX_P, dropped_positions

    torch.manual_seed(1)
    n, draws, threshold = 4000, 400, int(round(p * 65536))
    masks = torch.zeros(draws, n, dtype=torch.bool)
    for i in range(draws):
        pos = dropped_positions(n, threshold, torch.device("cpu"), width, row_order)
        if p <= SPARSE_DROPOUT_MAX_P and width and row_order is None:
            assert torch.equal(pos // width, (pos // width).sort().values)
        masks[i, pos] = True
    totals = masks.sum(dim=1).double()
    q = threshold / 65536
    assert abs(totals.mean().item() - n * q) < 5 * math.sqrt(n * q * (1 - q) / draws)
    assert 0.8 < totals.std().item() / math.sqrt(n * q * (1 - q)) < 1.2  # chi-square, 400 draws: +-0.18 at 5 sigma
    if width:
        per_row = masks.view(draws, -1, width).sum(dim=2).double()  # 40,000 rows of 40
        assert 0.97 < per_row.std().item() / math.sqrt(width * q * (1 - q)) < 1.03
    both = (masks[:, :-1] & masks[:, 1:]).double().mean().item()
    assert abs(both - q * q) < 5 * math.sqrt(q * q / (draws * (n - 1) / 2))
    assert dropped_positions(0, threshold, torch.device("cpu"), width, row_order).numel() == 0  # an empty tensor
