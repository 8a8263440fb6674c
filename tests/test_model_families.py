"""Every supported decoder family: injection is the identity at init, and fused == reference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

from conftest import batch, randomize_adapters
from mixlora_lit import MixLoraConfig, MixLoraMoeFFN, get_mixlora_model

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v carry biases
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8, "hidden_activation": "gelu_pytorch_tanh"}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 4}),
}


def _build(family):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    return getattr(transformers, model_cls)(config).double().eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family(family):
    base = _build(family)
    ids, mask = batch()
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
    model = get_mixlora_model(base, MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2),
                              adapter_dtype=torch.float64)
    assert base.config.model_type == family
    assert sum(isinstance(m, MixLoraMoeFFN) for m in model.modules()) == 2
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits - expected).abs().max().item() < 1e-12
    randomize_adapters(model)
    outputs = {}
    for path in ("fused", "reference"):
        model.set_execution_path(path)
        with torch.no_grad():
            outputs[path] = model(input_ids=ids, attention_mask=mask).logits
    assert (outputs["fused"] - outputs["reference"]).abs().max().item() < 1e-9
    assert (outputs["fused"] - expected).abs().max().item() > 1e-3


def test_model_layer_does_not_import_lightning():
    code = ("import sys, mixlora_lit, mixlora_lit.model, mixlora_lit.base_models, mixlora_lit.baselines, "
            "mixlora_lit.adapter_io, mixlora_lit.evaluation.harness; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
