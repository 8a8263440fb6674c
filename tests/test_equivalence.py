"""The fused path computes exactly what the reference path (the paper's formula) computes.

fp64, tiny random Llama and Gemma3 models, every adapter tensor random: outputs and the
gradient of every adapter parameter agree to 1e-9.
"""

from __future__ import annotations

import pytest
import torch

from conftest import batch, randomize_adapters, tiny_gemma3, tiny_llama
from mixlora_lit import MixLoraConfig, get_mixlora_model

TOL = 1e-9


def _run(model, ids, mask, path):
    """path: `reference`, `fused`, or `per_expert_down` (fused with W2 per (token, expert), the ablation)."""
    model.set_execution_path("fused" if path == "per_expert_down" else path)
    for module in model.moe_layers():
        module.factor_down = path != "per_expert_down"
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask)
    weights = torch.linspace(-1, 1, out.logits.numel(), dtype=out.logits.dtype).reshape(out.logits.shape)
    loss = (out.logits * weights * mask.unsqueeze(-1)).sum() + out.aux_loss
    loss.backward()
    # An expert that received no token has no gradient (None): count that as zero.
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def _compare(model, ids, mask, dense_expected: bool, paths=("fused", "per_expert_down")):
    """Fused paths against the reference path (logits and every adapter gradient), and the no-grad
    default path: the dense masked one exactly when `dense_expected` (stated per variant by the test)."""
    ref_logits, ref_grads = _run(model, ids, mask, "reference")
    for path in paths:
        fused_logits, fused_grads = _run(model, ids, mask, path)
        assert (fused_logits - ref_logits).abs().max().item() <= TOL, path
        assert fused_grads.keys() == ref_grads.keys() and len(fused_grads) > 0
        for name in ref_grads:
            diff = (fused_grads[name] - ref_grads[name]).abs().max().item()
            assert diff <= TOL, f"{path}: gradient of {name} differs by {diff}"
    # Without autograd (evaluation, generation) the default path is the dense masked one; forced to
    # gather each row's expert (the path for a few rows: decoding one sequence), the same function.
    from mixlora_lit.moe import MixLoraMoeFFN

    for path, max_gathered in (("dense_inference", None), ("gathered_inference", 10**6)):
        name = f"_forward_{path}"
        original, calls = getattr(MixLoraMoeFFN, name), []

        def spy(self, *args, original=original, calls=calls):
            calls.append(1)
            return original(self, *args)

        setattr(MixLoraMoeFFN, name, spy)
        try:
            model.set_execution_path("fused")
            for module in model.moe_layers():
                module.factor_down = True
                module.gathered_inference_max_rows = max_gathered
            with torch.no_grad():
                no_grad_logits = model(input_ids=ids, attention_mask=mask).logits
        finally:
            setattr(MixLoraMoeFFN, name, original)
            for module in model.moe_layers():
                module.gathered_inference_max_rows = None
        assert (no_grad_logits - ref_logits).abs().max().item() <= TOL, path
        assert bool(calls) == dense_expected, path
    nonzero = 0
    for name in ref_grads:
        nonzero += bool(ref_grads[name].abs().max() > 0)
    # Every expert that received tokens must have a gradient: the check above is not vacuous.
    assert nonzero >= 0.9 * len(ref_grads)


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_fused_matches_reference(family, top_k):
    model = get_mixlora_model(MODELS[family](), MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4,
                                                              top_k=top_k), adapter_dtype=torch.float64)
    randomize_adapters(model)
    ids, mask = batch()
    _compare(model, ids, mask, dense_expected=True)


# Inference runs the experts as dense masked matmuls when gate, up and down all carry plain LoRA
# experts; DoRA experts and an FFN with an untargeted projection keep the fused path.
DENSE_INFERENCE = {"dora": False, "rslora": True, "switch": True, "switch_mlp_bias": True, "mlp_bias": True,
                   "ffn_subset": False, "expert_lora": True}


@pytest.mark.parametrize("variant", sorted(DENSE_INFERENCE))
def test_fused_matches_reference_variants(variant):
    overrides, cfg = {}, dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2)
    if variant == "dora":
        cfg["use_dora"] = True
    elif variant == "rslora":
        cfg["use_rslora"] = True
    elif variant == "switch":
        cfg.update(routing_strategy="mixlora-switch", top_k=1, expert_capacity=2)
    elif variant == "switch_mlp_bias":  # switch weights do not sum to one: W2's bias is scaled by them
        cfg.update(routing_strategy="mixlora-switch", top_k=1, expert_capacity=2)
        overrides = dict(mlp_bias=True, attention_bias=True)
    elif variant == "mlp_bias":
        overrides = dict(mlp_bias=True, attention_bias=True)
    elif variant == "ffn_subset":
        cfg["target_modules"] = ["q_proj", "v_proj", "up_proj", "down_proj"]
    elif variant == "expert_lora":
        cfg["expert_lora"] = {"r": 2, "lora_alpha": 3, "lora_dropout": 0.0}
    base = tiny_llama(**overrides)
    with torch.no_grad():  # transformers initialises biases to zero, which would hide bias handling
        for name, param in base.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model = get_mixlora_model(base, MixLoraConfig(**cfg), adapter_dtype=torch.float64)
    randomize_adapters(model)
    ids, mask = batch()
    if variant.startswith("switch"):  # the capacity must actually overflow for this test to mean something
        model(input_ids=ids, attention_mask=mask)
        assert any((m.last_routing.experts == 4).any() for m in model.moe_layers())
    _compare(model, ids, mask, dense_expected=DENSE_INFERENCE[variant])


def test_injection_preserves_base_outputs_at_init():
    """B starts at zero, so before training the adapted model is the base model."""
    base = tiny_gemma3()
    ids, mask = batch()
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
    model = get_mixlora_model(base, MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2),
                              adapter_dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    assert (got - expected).abs().max().item() <= 1e-12


@pytest.mark.parametrize("dropout", [0.05, 0.2])  # drawn positions and keep mask
def test_recomputing_experts_gives_the_same_gradients_in_training_with_dropout(dropout):
    """Recomputation in backward reproduces the forward exactly, dropout masks included."""
    grads = []
    for recompute in (False, True):
        model = get_mixlora_model(tiny_llama(), MixLoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, num_experts=4),
                                  adapter_dtype=torch.float64)
        randomize_adapters(model)
        model.train()
        model.set_recompute_experts(recompute)
        ids, mask = batch()
        torch.manual_seed(11)
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_mixed_precision_autocast_runs_and_is_as_accurate_as_the_reference_path():
    """fp32 weights under bf16 autocast (Lightning's `precision: bf16-mixed`): the fused kernel (with
    grad) and the dense and gathered inference paths run, and are as close to the fp32 result as the
    reference path."""
    model = get_mixlora_model(tiny_llama(dtype=torch.float32),
                              MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2, lora_dropout=0.0))
    randomize_adapters(model)
    ids, mask = batch()

    def run(path, autocast):
        model.set_execution_path(path)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, attention_mask=mask)
            loss = out.logits.float().pow(2).mean() + out.aux_loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        return grads, logits

    exact_grads, exact_logits = run("fused", autocast=False)
    errors = {}
    for path in ("reference", "fused"):
        grads, logits = run(path, autocast=True)
        assert torch.isfinite(grads).all() and grads.numel() == exact_grads.numel()
        errors[path] = ((grads - exact_grads).norm() / exact_grads.norm()).item(), \
            ((logits - exact_logits).norm() / exact_logits.norm()).item()
    for i in range(2):  # gradients, then logits
        assert 0 < errors["fused"][i] <= 1.5 * errors["reference"][i], errors  # relative to the reference
    # The no-grad logits above took the dense path (36 rows); forced, the gathered path under autocast too.
    model.set_execution_path("fused")
    for module in model.moe_layers():
        module.gathered_inference_max_rows = 10**6
        with torch.no_grad():
            assert module.current_path(ids.numel() * 2) == "gathered_inference"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        gathered = model(input_ids=ids, attention_mask=mask).logits.float()
    error = ((gathered - exact_logits).norm() / exact_logits.norm()).item()
    assert 0 < error <= 1.5 * errors["reference"][1], (error, errors)


class _UntrackedSGD(torch.optim.Optimizer):
    """Updates through `.data`, as optimizers with their own fused kernels do: no version counter moves."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize("update", ["in_place", "fused_adamw", "untracked_optimizer", "assigned", "parametrized"])
@pytest.mark.parametrize("moe_path", ["dense_inference", "fused"])
def test_inference_weight_caches_follow_every_weight_change(moe_path, update):
    """Without autograd, the casts and stacks of adapter weights are cached (attention LoRA, and the
    MoE's dense path or the sorted path's stacked expert weights); an in-place update (as an optimizer
    step or a load makes) must be seen at the next forward, also a step of torch's fused AdamW or of an
    optimizer writing through `.data`, neither of which bumps the weights' version counters itself; and
    so must new Parameters put in the old ones' place (`load_state_dict(assign=True)`), whose tensors are
    new, their counters and storage unrelated to the cached ones'; and weights that leave their module's
    parameter dict for an attribute (a parametrisation here; FSDP does the same in its forwards). Oracle:
    the reference path, which builds nothing from cache."""
    model = get_mixlora_model(tiny_llama(), MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2),
                              adapter_dtype=torch.float64)
    randomize_adapters(model)
    model.eval()
    ids, mask = batch()
    for module in model.moe_layers():
        module.dense_inference_max_rows = 10**6 if moe_path == "dense_inference" else 0
        with torch.no_grad():
            assert module.current_path(ids.numel() * 2) == moe_path

    def logits(path):
        model.set_execution_path(path)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    before = logits("fused")
    assert (before - logits("reference")).abs().max().item() <= TOL
    assert (logits("fused") - before).abs().max().item() == 0  # served from the caches, unchanged
    gen = torch.Generator().manual_seed(5)
    adapters = [p for name, p in model.named_parameters() if p.requires_grad and ("lora_B" in name or "lora_A" in name)]
    if update == "assigned":
        names = [name for name, p in model.named_parameters() if p.requires_grad and ("lora_B" in name or "lora_A" in name)]
        model.load_state_dict({name: p.detach() + torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2
                               for name, p in zip(names, adapters)}, strict=False, assign=True)
        params = dict(model.named_parameters())
        assert all(params[name] is not p for name, p in zip(names, adapters))  # new Parameter objects
    elif update == "parametrized":
        class Doubled(torch.nn.Module):
            def forward(self, weight):
                return 2 * weight

        adapter_linears = [m for name, m in model.named_modules() if name.endswith(("lora_A", "lora_B"))]
        assert adapter_linears
        for module in adapter_linears:
            torch.nn.utils.parametrize.register_parametrization(module, "weight", Doubled())
            assert "weight" not in module._parameters
    elif update != "in_place":
        for p in adapters:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        optimizer = (torch.optim.AdamW(adapters, lr=0.2, fused=True) if update == "fused_adamw"
                     else _UntrackedSGD(adapters, lr=0.2))
        versions = [p._version for p in adapters]
        optimizer.step()
        assert [p._version for p in adapters] != versions  # counted by the library's hook, not by torch
    else:
        with torch.no_grad():
            for p in adapters:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    after = logits("fused")
    assert (after - before).abs().max().item() > 1e-3
    assert (after - logits("reference")).abs().max().item() <= TOL


def test_large_inference_batches_take_the_sorted_path_and_match_the_reference():
    """Without autograd, batches over `dense_inference_max_rows` assignments run the sorted (fused) path."""
    model = get_mixlora_model(tiny_llama(), MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2),
                              adapter_dtype=torch.float64)
    randomize_adapters(model)
    model.eval()
    ids, mask = batch()
    paths = []
    for module in model.moe_layers():
        module.dense_inference_max_rows = ids.numel() * 2 - 1  # this batch has one row more
        paths.append(module.current_path(ids.numel() * 2))
    assert set(paths) == {"fused"}
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=mask).logits
        model.set_execution_path("reference")
        reference = model(input_ids=ids, attention_mask=mask).logits
    assert (fused - reference).abs().max().item() <= TOL


def test_no_grad_paths_by_row_count_and_a_decoding_step_matches_the_reference():
    """Without autograd the path follows the (token, expert) row count: gathered experts up to E // 4
    rows (unless `gathered_inference_max_rows` says otherwise), dense masked experts up to
    `dense_inference_max_rows`, the sorted path beyond; with autograd always the fused one. A one-token
    step of one sequence (2 rows of 8 experts, gathered) agrees with the reference path."""
    model = get_mixlora_model(tiny_llama(), MixLoraConfig(r=4, lora_alpha=8, num_experts=8, top_k=2),
                              adapter_dtype=torch.float64)
    randomize_adapters(model)
    model.eval()
    module = model.moe_layers()[0]
    with torch.no_grad():
        assert [module.current_path(n) for n in (1, 2, 3, 384, 385)] == [
            "gathered_inference", "gathered_inference", "dense_inference", "dense_inference", "fused"]
        module.gathered_inference_max_rows = 3
        assert module.current_path(3) == "gathered_inference" and module.current_path(4) == "dense_inference"
        module.gathered_inference_max_rows = 0
        assert module.current_path(1) == "dense_inference"
        module.gathered_inference_max_rows = None
    assert module.current_path(1) == "fused"  # autograd on
    ids, mask = batch()
    with torch.no_grad():
        step = model(input_ids=ids[:1, :1]).logits
        model.set_execution_path("reference")
        reference = model(input_ids=ids[:1, :1]).logits
    assert (step - reference).abs().max().item() <= TOL


def test_no_grad_paths_trace_under_torch_compile():
    """`torch.compile` of a MixLoRA model traces each no-grad path into its graph (dynamo, then AOT
    autograd's functionalisation: the `aot_eager` backend, which stops short of inductor's C++ build)
    and computes what eager computes: a decoding step of one sequence (gathered experts), a small batch
    (dense masked experts) and, compiled around it, the sorted path, which runs eagerly. The dense path
    once failed to compile: it viewed an `out=` product whose layout functionalisation changes."""
    from mixlora_lit.moe import MixLoraMoeFFN

    torch._dynamo.reset()
    model = get_mixlora_model(tiny_llama(), MixLoraConfig(r=4, lora_alpha=8, num_experts=8, top_k=2),
                              adapter_dtype=torch.float64)
    randomize_adapters(model)
    model.eval()
    ids, mask = batch()
    traced = {}
    originals = {path: getattr(MixLoraMoeFFN, f"_forward_{path}") for path in ("gathered_inference", "dense_inference")}

    def spy(path):
        def forward(self, *args):
            traced.setdefault(path, []).append(torch.compiler.is_compiling())
            return originals[path](self, *args)
        return forward

    try:
        for path in originals:
            setattr(MixLoraMoeFFN, f"_forward_{path}", spy(path))
        compiled = torch.compile(model, backend="aot_eager")
        for inputs, max_rows in (({"input_ids": ids[:1, :1]}, None), ({"input_ids": ids, "attention_mask": mask}, None),
                                 ({"input_ids": ids, "attention_mask": mask}, 0)):
            for module in model.moe_layers():
                module.dense_inference_max_rows = 384 if max_rows is None else max_rows
            with torch.no_grad():
                eager, graph = model(**inputs).logits, compiled(**inputs).logits
            assert (graph - eager).abs().max().item() <= TOL
    finally:
        for path, original in originals.items():
            setattr(MixLoraMoeFFN, f"_forward_{path}", original)
        torch._dynamo.reset()
    # each path ran eagerly (model) and was traced (compiled)
    assert {path: set(calls) for path, calls in traced.items()} == {path: {False, True} for path in originals}
    # ... in one graph (`fullgraph` raises at a graph break): the weight caches' check once broke it, at
    # every projection, reading a weight's address
    from mixlora_lit.lora import LoraLinear

    layer = model.moe_layers()[0]
    layer.dense_inference_max_rows = 384  # 1 token: gathered experts, 6: dense
    attention = next(m for m in model.modules() if isinstance(m, LoraLinear))
    weight = layer._base("gate_proj").weight
    for module, tokens in ((layer, 1), (layer, 6), (attention, 6)):
        x = torch.randn(1, tokens, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(tokens))
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                graph, eager = torch.compile(module, backend="aot_eager", fullgraph=True)(x), module(x)
        finally:
            torch._dynamo.reset()
        assert (graph - eager).abs().max().item() <= TOL
