"""Saving, loading, config JSON, bad input, and interoperability with the reference package."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import batch, randomize_adapters, tiny_llama
from mixlora_lit import MixLoraConfig, MixLoraModel, get_mixlora_model
from mixlora_lit.adapter_io import CHECKSUMS_NAME, REFERENCE_WEIGHTS_NAME, SAFETENSORS_NAME


def _eval_logits(model):
    model.eval()
    ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _trained(cfg=None, **base_kwargs):
    cfg = cfg or MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2)
    model = get_mixlora_model(tiny_llama(dtype=torch.float32, **base_kwargs), cfg)
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("cfg", [
    MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2),
    MixLoraConfig(r=4, lora_alpha=8, num_experts=3, use_dora=True, target_modules=["q_proj", "gate_proj", "down_proj"]),
    MixLoraConfig(r=2, lora_alpha=4, num_experts=4, routing_strategy="mixlora-switch", expert_capacity=3),
])
def test_save_load_round_trip_reproduces_logits_exactly(tmp_path, cfg):
    model = _trained(cfg)
    expected = _eval_logits(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", SAFETENSORS_NAME, CHECKSUMS_NAME]
    loaded = MixLoraModel.from_pretrained(tiny_llama(dtype=torch.float32), tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(_eval_logits(loaded), expected)
    assert loaded.mixlora_config == model.mixlora_config


def test_weight_keys_use_reference_names(tmp_path):
    from safetensors.torch import load_file

    _trained().save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / SAFETENSORS_NAME))
    assert "mixlora.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "mixlora.layers.1.mlp.moe_gate.weight" in keys
    assert "mixlora.layers.1.mlp.down_proj.experts.3.lora_B.weight" in keys
    # 2 layers x (4 attention x 2 + 3 projections x 4 experts x 2 + router)
    assert len(keys) == 2 * (8 + 24 + 1)


def test_config_json_round_trip(tmp_path):
    cfg = MixLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, num_experts=8, top_k=2, jitter_noise=0.01,
                        use_rslora=True, expert_lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
                        base_model_name_or_path="smollm2-135m")
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "routing_strategy", "num_experts", "top_k",
                "router_aux_loss_coef", "router_init_range", "jitter_noise", "use_dora", "use_rslora",
                "expert_capacity", "router_z_loss_coef", "peft_type", "task_type", "expert_lora"):
        assert key in data, key
    assert MixLoraConfig.from_pretrained(tmp_path) == cfg
    assert MixLoraConfig.from_dict(cfg.to_dict()) == cfg


def test_reference_style_target_modules_dict_is_read():
    cfg = MixLoraConfig.from_dict({"r": 8, "lora_alpha": 16, "target_modules": {"q_proj": True, "k_proj": False,
                                                                               "up_proj": True},
                                   "routing_strategy": "mixlora", "num_experts": 4, "router_loss": True})
    assert cfg.target_modules == ["q_proj", "up_proj"]


@pytest.mark.parametrize("kwargs,field,allowed", [
    (dict(top_k=9, num_experts=8), "top_k", "[1, num_experts=8]"),
    (dict(r=0), "r", "integer >= 1"),
    (dict(routing_strategy="mixlora-dynamic"), "routing_strategy", "['mixlora', 'mixlora-switch']"),
    (dict(target_modules=["q_proj", "fc1"]), "target_modules", "subset of"),
    (dict(target_modules=["q_proj", "v_proj"]), "target_modules", "at least one FFN module"),
    (dict(lora_dropout=1.0), "lora_dropout", "[0, 1)"),
    (dict(routing_strategy="mixlora-switch", top_k=2), "top_k", "1 for routing_strategy"),
    (dict(num_experts=0), "num_experts", "integer >= 1"),
])
def test_bad_config_raises_naming_field_and_allowed_values(kwargs, field, allowed):
    with pytest.raises(ValueError) as err:
        MixLoraConfig(**kwargs)
    assert f"MixLoraConfig.{field}=" in str(err.value) and allowed in str(err.value)


def test_unknown_config_key_is_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "num_expert": 4}))
    with pytest.raises(ValueError, match=r"unknown MixLoRA config key\(s\) \['num_expert'\]"):
        MixLoraConfig.from_pretrained(tmp_path)


def test_target_module_absent_from_model_is_refused():
    from transformers import PhiConfig, PhiForCausalLM

    phi = PhiForCausalLM(PhiConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4))
    with pytest.raises(ValueError, match=r"MixLoraConfig.target_modules=.*'phi'.*not found"):
        get_mixlora_model(phi, MixLoraConfig())


def test_mismatched_base_names_first_mismatching_tensor(tmp_path):
    _trained().save_pretrained(tmp_path)
    other = tiny_llama(dtype=torch.float32, hidden_size=48)
    with pytest.raises(ValueError) as err:
        MixLoraModel.from_pretrained(other, tmp_path)
    msg = str(err.value)
    assert "'mixlora.layers.0.self_attn.q_proj.lora_A.weight'" in msg and "(4, 32)" in msg and "(4, 48)" in msg


def test_adapter_for_more_layers_is_refused(tmp_path):
    _trained(num_hidden_layers=3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mixlora.layers.2."):
        MixLoraModel.from_pretrained(tiny_llama(dtype=torch.float32), tmp_path)


def test_corrupt_weights_file_is_named(tmp_path):
    _trained().save_pretrained(tmp_path)
    path = tmp_path / SAFETENSORS_NAME
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        MixLoraModel.from_pretrained(tiny_llama(dtype=torch.float32), tmp_path)


def test_reference_bin_export_and_load(tmp_path):
    model = _trained()
    expected = _eval_logits(model)
    model.export_reference(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", REFERENCE_WEIGHTS_NAME]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MIXLORA" and config["act_fn"] == "silu" and config["lora_dropout"] > 0
    loaded = MixLoraModel.from_pretrained(tiny_llama(dtype=torch.float32), tmp_path)
    assert torch.equal(_eval_logits(loaded), expected)


def test_reference_package_reproduces_our_logits(tmp_path):
    """The reference `mixlora` package (PyPI 0.2.3) loads our export and computes the same logits."""
    import mixlora  # installed by `make assets`: a missing oracle is a failure, not a skip
    base_dir = tmp_path / "base"
    tiny_llama(dtype=torch.float32).save_pretrained(base_dir)
    cfg = MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2,
                        base_model_name_or_path=str(base_dir))
    from transformers import AutoModelForCausalLM

    model = get_mixlora_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), cfg)
    randomize_adapters(model)
    model.eval()
    ids, mask = batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
    model.export_reference(tmp_path / "adapter")
    ref_model, _ = mixlora.MixLoraModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    ref_model.eval()
    with torch.no_grad():
        theirs = ref_model(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - tiny_llama(dtype=torch.float32)(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-2
