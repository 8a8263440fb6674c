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


class _Recorder:
    """Every ATen call under it: (name, numel of each tensor it returns)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.calls = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outs = out if isinstance(out, (tuple, list)) else (out,)
                calls.append((str(func), [t.numel() for t in outs if isinstance(t, torch.Tensor)]))
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def largest(self) -> int:
        return max((n for _, sizes in self.calls for n in sizes), default=0)


def test_a_frozen_lm_head_is_not_copied_in_generations_first_step(tiny_model_dir):
    """Generation's first step projects a strided [B, 1, H] view (`logits_to_keep=1`). torch's matmul then
    runs a batched matmul against a frozen head's [V, H] weight expanded to [B, H, V] (the oracle below: a
    plain frozen Llama; torch's bf16 CPU kernel copies that expanded weight, 226 MB for SmolLM2 at B=4,
    which the profiler shows but a dispatch mode does not see); the models this library builds (MixLoRA, PEFT LoRA, a loaded base) hook
    the head to take a contiguous input instead: one `mm`, no tensor of the expanded weight's size, the
    same logits and the same generations."""
    from mixlora_lit.base_models import fold_lm_head_inputs, load_base_model
    from mixlora_lit.baselines import get_lora_model

    plain = tiny_llama(vocab_size=97)
    plain.requires_grad_(False)
    h = torch.randn(3, 5, 32, dtype=torch.float64)[:, -1:, :]
    assert not h.is_contiguous()
    expanded = 3 * 32 * 97
    with _Recorder() as rec, torch.no_grad():
        expected = plain.lm_head(h)
    assert "aten.bmm.default" in [c for c, _ in rec.calls] and rec.largest() >= expanded  # torch's own path

    lora = get_lora_model(tiny_llama(vocab_size=97), 4, 8, 0.0)
    hooked = fold_lm_head_inputs(fold_lm_head_inputs(tiny_llama(vocab_size=97)))  # idempotent
    assert len(hooked.lm_head._forward_pre_hooks) == 1
    for model in (_model(), lora, hooked):
        head = model.get_output_embeddings() if model is not lora else lora.base_model.model.lm_head
        assert not any(p.requires_grad for p in head.parameters()) or model is hooked
        head.requires_grad_(False)
        with _Recorder() as rec, torch.no_grad():
            got = head(h)
        assert "aten.bmm.default" not in [c for c, _ in rec.calls] and rec.largest() < expanded
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)

    # end to end on a loaded base (frozen, as under an adapter): the same tokens with and without the hook
    base, tok = load_base_model(str(tiny_model_dir), dtype="float32")
    base.requires_grad_(False)
    enc = tok(["the cat sat on", "a b"], return_tensors="pt", padding=True, padding_side="left")
    vocab, hidden = base.config.vocab_size, base.config.hidden_size
    with _Recorder() as rec, torch.no_grad():
        tokens = base.generate(**enc, max_new_tokens=4, do_sample=False)
    assert rec.largest() < 2 * hidden * vocab
    base.get_output_embeddings()._forward_pre_hooks.clear()
    with _Recorder() as rec, torch.no_grad():
        unhooked = base.generate(**enc, max_new_tokens=4, do_sample=False)
    assert rec.largest() >= 2 * hidden * vocab  # the expanded weight the hook avoids
    assert torch.equal(tokens, unhooked)
