"""merge_and_unload, merge/unmerge, generate() through the fused path."""

from __future__ import annotations

import torch

from conftest import batch, randomize_adapters, tiny_llama
from mixlora_lit import LoraLinear, MixLoraConfig, MixLoraMoeFFN, get_mixlora_model


def _model(**cfg):
    model = get_mixlora_model(tiny_llama(), MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, **cfg),
                              adapter_dtype=torch.float64)
    randomize_adapters(model)
    return model.eval()


def test_merge_and_unload_keeps_outputs_and_experts():
    for use_dora in (False, True):
        model = _model(use_dora=use_dora)
        ids, mask = batch()
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
            merged = model.merge_and_unload()
            got = merged(input_ids=ids, attention_mask=mask).logits
        assert (got - expected).abs().max().item() < 1e-10
        assert not any(isinstance(m, LoraLinear) for m in merged.modules())
        assert sum(isinstance(m, MixLoraMoeFFN) for m in merged.modules()) == 2
        assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_merge_unmerge_round_trip():
    model = _model(use_dora=True)
    q = model.base_model.model.layers[0].self_attn.q_proj
    original = q.base_layer.weight.detach().clone()
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        model.merge_adapter()
        assert not torch.allclose(q.base_layer.weight, original)
        assert (model(input_ids=ids, attention_mask=mask).logits - expected).abs().max() < 1e-10
        model.unmerge_adapter()
    assert (q.base_layer.weight - original).abs().max() < 1e-12
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits - expected).abs().max() < 1e-12


def test_generate_uses_the_mixlora_layers_and_matches_merged_model(monkeypatch):
    from mixlora_lit.moe import MixLoraMoeFFN

    model = _model()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    prompt = torch.tensor([[5, 17, 42, 8]])
    for layer in model.moe_layers():  # one sequence's step has 2 rows: gathered (the default limit is E // 4 = 1)
        layer.gathered_inference_max_rows = 2
    calls, kernel_calls = [], []
    for path in ("dense_inference", "gathered_inference"):
        original = getattr(MixLoraMoeFFN, f"_forward_{path}")
        monkeypatch.setattr(MixLoraMoeFFN, f"_forward_{path}",
                            lambda self, *a, path=path, original=original: kernel_calls.append(path) or original(self, *a))
    hook = model.moe_layers()[0].register_forward_hook(lambda *a: calls.append(1))
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                         do_sample=False, pad_token_id=0)
    hook.remove()
    assert out.shape == (1, 10) and len(calls) == 6  # one prefill + 5 cached steps
    # Every MoE layer of every step ran the fused formula's inference form: the prefill's 4 tokens x top-2
    # as dense masked experts, each cached step's 1 x top-2 gathered.
    layers = len(model.moe_layers())
    assert kernel_calls == ["dense_inference"] * layers + ["gathered_inference"] * (5 * layers)
    # Cached step-by-step generation agrees with a full forward over the generated sequence.
    with torch.no_grad():
        logits = model(input_ids=out[:, :-1]).logits
    assert torch.equal(logits[0, 3:].argmax(-1), out[0, 4:])
    merged = model.merge_and_unload()
    out2 = merged.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                           do_sample=False, pad_token_id=0)
    assert torch.equal(out, out2)
