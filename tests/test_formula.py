"""The library's layers against the paper's formulas, computed here from raw weight tensors.

Nothing in this file uses the library's layer code for the expected values: weights are read
from the modules' state dicts and combined with plain tensor algebra, token by token.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_adapters, tiny_gemma3, tiny_llama
from mixlora_lit import MixLoraConfig, get_mixlora_model

ACTS = {"silu": F.silu, "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh")}


def _expert_weight(sd, proj, e, scaling, dora=False):
    """(W + s B_e A_e), DoRA-rescaled row-wise when asked: the expert's effective dense weight."""
    w = sd[f"{proj}.base_layer.weight"] if f"{proj}.base_layer.weight" in sd else sd[f"{proj}.weight"]
    key = f"{proj}.experts.{e}"
    if f"{key}.lora_A.weight" not in sd:
        return w
    merged = w + scaling * sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]
    if dora:
        merged = (sd[f"{key}.lora_magnitude"] / merged.norm(dim=1)).unsqueeze(1) * merged
    return merged


def _paper_moe(sd, x, act, num_experts, top_k, scaling, dora=False, switch_capacity=None):
    """y_t = sum_{i in topk(t)} w_i (W2+dW2_i) [act((W1+dW1_i) x_t) * (W3+dW3_i) x_t]."""
    probs = torch.softmax(x @ sd["moe_gate.weight"].T, dim=-1)
    ys = []
    used = [0] * num_experts
    for t in range(x.shape[0]):
        if switch_capacity is None:
            w, idx = torch.topk(probs[t], top_k)
            w = w / w.sum()
        else:  # top-1, un-normalised probability, capacity by position within the sequence
            w, idx = probs[t].max(dim=-1, keepdim=True)
            used[idx.item()] += 1
            if used[idx.item()] > switch_capacity:
                idx = torch.tensor([num_experts])  # over capacity: the frozen FFN
        y = torch.zeros(x.shape[1], dtype=x.dtype)
        for weight, e in zip(w, idx.tolist()):
            w1 = _expert_weight(sd, "gate_proj", e, scaling, dora)
            w3 = _expert_weight(sd, "up_proj", e, scaling, dora)
            w2 = _expert_weight(sd, "down_proj", e, scaling, dora)
            h = act(w1 @ x[t]) * (w3 @ x[t])
            y = y + weight * (w2 @ h)
        ys.append(y)
    return torch.stack(ys)


def _layer_output(layer, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, layer(x)) for random fp64 token states."""
    x = torch.randn(tokens, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, layer(x.unsqueeze(0)).squeeze(0)


@pytest.mark.parametrize("family,act_name", [("llama", "silu"), ("gemma3", "gelu_pytorch_tanh")])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("path", ["fused", "reference"])
def test_moe_layer_matches_paper_formula(family, act_name, top_k, path):
    base = (tiny_llama if family == "llama" else tiny_gemma3)()
    model = get_mixlora_model(base, MixLoraConfig(r=4, lora_alpha=6, lora_dropout=0.0, num_experts=4, top_k=top_k),
                              adapter_dtype=torch.float64)
    randomize_adapters(model)
    model.set_execution_path(path)
    layer = model.moe_layers()[1]
    x, got = _layer_output(layer, 11, 5)
    expected = _paper_moe(layer.state_dict(), x, ACTS[act_name], 4, top_k, scaling=6 / 4)
    assert (got - expected).abs().max().item() < 1e-12


def test_dora_experts_match_formula():
    model = get_mixlora_model(tiny_llama(), MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=3,
                                                          top_k=2, use_dora=True), adapter_dtype=torch.float64)
    randomize_adapters(model)
    layer = model.moe_layers()[0]
    x, got = _layer_output(layer, 7, 2)
    expected = _paper_moe(layer.state_dict(), x, F.silu, 3, 2, scaling=2.0, dora=True)
    assert (got - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("training", [False, True])
def test_switch_routing_returns_expert_outputs_in_inference_and_training(training):
    """The reference code's switch inference returns the input; ours returns p * E_i(x)."""
    cfg = MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=3, routing_strategy="mixlora-switch",
                        expert_capacity=3, jitter_noise=0.0)
    model = get_mixlora_model(tiny_llama(), cfg, adapter_dtype=torch.float64)
    randomize_adapters(model)
    model.train(training)
    layer = model.moe_layers()[0]
    x, got = _layer_output(layer, 12, 4)
    expected = _paper_moe(layer.state_dict(), x, F.silu, 3, 1, scaling=2.0, switch_capacity=3)
    assert (got - expected).abs().max().item() < 1e-12
    assert (got - x).abs().max().item() > 1e-3


@pytest.mark.parametrize("rslora,dora", [(False, False), (True, False), (False, True)])
def test_attention_lora_matches_formula(rslora, dora):
    model = get_mixlora_model(tiny_llama(attention_bias=True),
                              MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=2, use_rslora=rslora,
                                            use_dora=dora), adapter_dtype=torch.float64)
    randomize_adapters(model)
    proj = model.base_model.model.layers[0].self_attn.q_proj
    sd = proj.state_dict()
    with torch.no_grad():
        sd["base_layer.bias"].normal_()
        proj.base_layer.bias.copy_(sd["base_layer.bias"])
    scaling = 8 / math.sqrt(4) if rslora else 8 / 4
    weight = sd["base_layer.weight"] + scaling * sd["lora_B.weight"] @ sd["lora_A.weight"]
    if dora:
        weight = (sd["lora_magnitude"] / weight.norm(dim=1)).unsqueeze(1) * weight
    x = torch.randn(5, 32, dtype=torch.float64)
    with torch.no_grad():
        got = proj(x)
    assert (got - (x @ weight.T + sd["base_layer.bias"])).abs().max().item() < 1e-12


def test_topk_router_renormalises_and_jitters_only_in_training():
    cfg = MixLoraConfig(r=2, lora_alpha=4, num_experts=5, top_k=3, jitter_noise=0.1)
    model = get_mixlora_model(tiny_llama(), cfg, adapter_dtype=torch.float64)
    router = model.moe_layers()[0].moe_gate
    x = torch.randn(6, 32, dtype=torch.float64)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.logits, b.logits)
    assert torch.allclose(a.weights.sum(-1), torch.ones(6, dtype=torch.float64))
    probs = torch.softmax(x @ router.weight.T, -1)
    top = torch.topk(probs, 3)
    assert torch.equal(a.experts, top.indices)
    assert torch.allclose(a.weights, top.values / top.values.sum(-1, keepdim=True))
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


def test_nn_module_apply_reaches_every_adapter():
    """`model.apply(fn)` is nn.Module's: it visits every submodule (it used to hit LoraAdapter's own `apply`)."""
    from mixlora_lit import LoraAdapter

    model = get_mixlora_model(tiny_llama(), MixLoraConfig(r=2, lora_alpha=4, num_experts=3))
    seen = []

    def init(module):
        if isinstance(module, LoraAdapter):
            torch.nn.init.ones_(module.lora_B.weight)
            seen.append(module)

    assert model.apply(init) is model
    # 2 layers x (4 attention LoRAs + 3 FFN projections x 3 experts)
    assert len(seen) == 2 * (4 + 3 * 3) and all(bool((m.lora_B.weight == 1).all()) for m in seen)
