"""PEFT LoRA/DoRA baselines and the parameter-matched rank."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_llama
from mixlora_lit import MixLoraConfig, get_mixlora_model
from mixlora_lit.baselines import get_lora_model, lora_parameter_count, matched_lora_rank, mixlora_parameter_count


def _llama2_7b_on_meta():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def test_paper_rank_80_for_llama2_7b():
    base = _llama2_7b_on_meta()
    cfg = MixLoraConfig(r=16, lora_alpha=32, num_experts=8, top_k=2)
    # Per layer: attention 4 x 16 x (4096 + 4096), experts 8 x 3 x 16 x (4096 + 11008), router 8 x 4096.
    expected = 32 * (4 * 16 * 8192 + 8 * 3 * 16 * 15104 + 8 * 4096)
    assert mixlora_parameter_count(base, cfg) == expected
    assert matched_lora_rank(base, cfg) == 81
    assert matched_lora_rank(base, cfg, multiple_of=16) == 80


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_count_matches_peft(use_dora):
    base = tiny_llama(dtype=torch.float32)
    peft_model = get_lora_model(base, r=5, lora_alpha=10, use_dora=use_dora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameter_count(tiny_llama(dtype=torch.float32), 5, use_dora=use_dora) == trainable
    out = peft_model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 97)


@pytest.mark.parametrize("cfg", [
    MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2),
    MixLoraConfig(r=4, lora_alpha=8, num_experts=3, use_dora=True, target_modules=["q_proj", "up_proj"]),
    MixLoraConfig(r=4, lora_alpha=8, num_experts=2, expert_lora={"r": 2, "lora_alpha": 4}),
])
def test_mixlora_count_matches_injected_model(cfg):
    expected = mixlora_parameter_count(tiny_llama(dtype=torch.float32), cfg)
    model = get_mixlora_model(tiny_llama(dtype=torch.float32), cfg)
    assert model.get_nb_trainable_parameters()[0] == expected
