"""The hand-written backward of `FusedLoraExperts` against plain autograd over the formula.

The oracle loops over (token, expert) assignments in fp64 and lets autograd differentiate; it
draws the same dropout mask (same seed, same sorted row order) so dropout is checked too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import batch, randomize_adapters, tiny_llama
from mixlora_lit import MixLoraConfig, get_mixlora_model
from mixlora_lit import kernels
from mixlora_lit.kernels import ExpertLayout, ExpertPlan, FusedLoraExperts
from mixlora_lit.lora import dropped_positions
from mixlora_lit.moe import MixLoraMoeFFN

T, H, FF, E, R = 12, 8, 12, 3, 4  # fp32 rows of 8, 12 and 4 values: 16-byte multiples (grouped matmuls)
SCALINGS = (0.5, 1.5, 2.0)


def _inputs(k: int, frozen_tokens: int, unused_expert: bool = False):
    gen = torch.Generator().manual_seed(k)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    experts = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    if unused_expert:  # the last expert gets no token (k = 1, so no token picks an expert twice)
        experts[experts == E - 1] = 0
    experts[:frozen_tokens, -1] = E  # some assignments go to the frozen FFN (switch overflow)
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64)
    params = []
    for _ in range(E):
        for n_in, n_out in ((H, FF), (H, FF), (FF, H)):  # gate, up, down: A [r, in], B [out, r]
            params += [rnd(R, n_in), rnd(n_out, R)]
    leaves = [rnd(T, H), rnd(T, FF), rnd(T, FF), weights] + params
    return experts, [t.requires_grad_(True) for t in leaves]


def _layout(experts, bucket, sync_free=False):
    """bucket: (compact bucket, uniform bucket); a uniform bucket > 0 forces the uniform layout."""
    compact, uniform = bucket
    if sync_free:
        return ExpertLayout(experts.reshape(-1), E, experts.shape[1], compact, sync_free=True)
    layout = ExpertLayout(experts.reshape(-1), E, experts.shape[1], compact, uniform, uniform_waste=float("inf"))
    assert layout.uniform == (uniform > 0)
    return layout


def _kernel(experts, leaves, threshold, bucket, grouped=False, sync_free=False, tiled=False):
    x, gate_base, up_base, weights, *params = leaves
    layout = _layout(experts, bucket, sync_free)
    plan = ExpertPlan(layout, E, R, SCALINGS, threshold, F.silu, grouped, tiled)
    assert plan.grouped == (sync_free or grouped and not layout.uniform)
    assert plan.tiled == (tiled and not plan.grouped and not layout.uniform and bucket[0] > 1)
    return FusedLoraExperts.apply(x, gate_base, up_base, layout.sorted_weights(weights), plan, *params)


def _oracle(experts, leaves, threshold, bucket, sync_free=False):
    x, gate_base, up_base, weights, *params = leaves
    k = experts.shape[1]
    # The kernel draws one mask over its rows (padding included); row of assignment a: inv[a].
    layout = _layout(experts, bucket, sync_free)
    keep = None
    if threshold:
        keep = torch.ones(layout.num_rows * FF, dtype=torch.bool)
        keep[dropped_positions(layout.num_rows * FF, threshold, x.device, FF)] = False
        keep = keep.view(layout.num_rows, FF)
    p = threshold / 65536
    s_g, s_u, s_d = SCALINGS
    h_rows, lora_rows = [], []
    for assignment in range(T * k):
        t, j = divmod(assignment, k)
        e = experts[t, j].item()
        w = weights[t, j]
        if e == E:  # the frozen FFN alone
            h = F.silu(gate_base[t]) * up_base[t]
            h_rows.append((t, w * h))
            continue
        a_g, b_g, a_u, b_u, a_d, b_d = params[6 * e:6 * e + 6]
        g = gate_base[t] + s_g * b_g @ (a_g @ x[t])
        u = up_base[t] + s_u * b_u @ (a_u @ x[t])
        h = F.silu(g) * u
        hd = h if keep is None else h * keep[layout.inv[assignment]] / (1 - p)
        h_rows.append((t, w * h))
        lora_rows.append((t, w * s_d * (b_d @ (a_d @ hd))))
    h_sum = torch.zeros(T, FF, dtype=torch.float64)
    lora_sum = torch.zeros(T, H, dtype=torch.float64)
    for t, v in h_rows:
        h_sum = h_sum.index_add(0, torch.tensor([t]), v.unsqueeze(0))
    for t, v in lora_rows:
        lora_sum = lora_sum.index_add(0, torch.tensor([t]), v.unsqueeze(0))
    return h_sum, lora_sum


@pytest.mark.parametrize("k,frozen_tokens,dropout,bucket,unused", [
    (1, 0, 0.0, (1, 0), False), (2, 0, 0.0, (1, 0), False), (2, 0, 0.05, (1, 0), False), (2, 0, 0.3, (1, 0), False),
    (3, 4, 0.3, (1, 0), False), (1, 5, 0.5, (1, 0), False), (2, 0, 0.0, (4, 0), False), (2, 0, 0.1, (8, 0), False),
    (3, 4, 0.3, (4, 0), False), (1, 5, 0.5, (16, 0), False), (1, 0, 0.3, (4, 0), True),
    # uniform blocks: all experts in one batched matmul
    (2, 0, 0.0, (1, 1), False), (2, 0, 0.1, (8, 4), False), (3, 4, 0.3, (4, 16), False), (1, 2, 0.3, (1, 4), True),
    # padded blocks as tiles of bucket[0] rows, each product one batched matmul over the tiles
    (2, 0, 0.0, (4, -1), False), (2, 0, 0.1, (8, -1), False), (3, 4, 0.3, (4, -1), False), (1, 5, 0.5, (2, -1), False),
    (1, 0, 0.3, (4, -1), True)])
def test_fused_lora_experts_matches_autograd_oracle(k, frozen_tokens, dropout, bucket, unused):
    """Also with expert blocks padded (per expert to a multiple of bucket[0] rows, or all to one size
    rounded to bucket[1]; bucket[1] -1: per expert, the products over tiles of bucket[0] rows): padding
    must change nothing; an expert without tokens gets no gradient."""
    threshold = int(round(dropout * 65536))
    experts, leaves = _inputs(k, frozen_tokens, unused)
    tiled = bucket[1] < 0
    bucket = (bucket[0], 0) if tiled else bucket
    cot = [torch.randn(T, FF, dtype=torch.float64), torch.randn(T, H, dtype=torch.float64)]
    results, raw = [], []
    for fn, extra in ((_kernel, {"tiled": tiled}), (_oracle, {})):
        torch.manual_seed(7)
        outs = fn(experts, leaves, threshold, bucket, **extra)
        grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot)), leaves, allow_unused=True)
        raw.append(grads)
        results.append(([o.detach() for o in outs], [torch.zeros_like(l) if g is None else g
                                                      for g, l in zip(grads, leaves)]))
    (k_outs, k_grads), (o_outs, o_grads) = results
    for a, b in zip(k_outs, o_outs):
        assert (a - b).abs().max().item() < 1e-10
    unused_params = range(4 + 6 * (E - 1), 4 + 6 * E) if unused else range(0)
    assert all(raw[0][i] is None for i in unused_params)  # as if the expert had not run
    assert sum(bool(g.abs().max() > 0) for g in o_grads) >= len(o_grads) - 1 - len(unused_params)
    for i, (a, b) in enumerate(zip(k_grads, o_grads)):
        assert (a - b).abs().max().item() < 1e-10, f"gradient of input {i}"


def _fp32_kernel_against_oracle(experts, leaves, threshold, bucket, grouped=False, sync_free=False):
    """The kernel in fp32 (grouped matmuls take no fp64) against the fp64 oracle: outputs compared,
    (kernel gradients, oracle gradients) returned."""
    leaves32 = [t.detach().float().requires_grad_(True) for t in leaves]
    cot = [torch.randn(T, FF, dtype=torch.float64), torch.randn(T, H, dtype=torch.float64)]
    results = []
    for fn, inputs, extra in ((_kernel, leaves32, {"grouped": grouped}), (_oracle, leaves, {})):
        torch.manual_seed(7)
        outs = fn(experts, inputs, threshold, bucket, sync_free=sync_free, **extra)
        grads = torch.autograd.grad(sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cot)), inputs,
                                    allow_unused=True)
        results.append(([o.detach().double() for o in outs], grads))
    (k_outs, k_grads), (o_outs, o_grads) = results
    for a, b in zip(k_outs, o_outs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    return k_grads, o_grads


@pytest.mark.parametrize("k,frozen_tokens,dropout,bucket,unused", [
    (2, 0, 0.0, (1, 0), False), (2, 0, 0.1, (8, 0), False), (3, 4, 0.3, (4, 0), False), (1, 0, 0.3, (4, 0), True)])
def test_grouped_matmul_path_matches_the_oracle(k, frozen_tokens, dropout, bucket, unused):
    """The products as `torch._grouped_mm` calls (fp32: it takes no fp64) against the fp64 oracle."""
    assert kernels.grouped_mm_supported(torch.float32, torch.device("cpu"), H, FF, R)
    assert not kernels.grouped_mm_supported(torch.float64, torch.device("cpu"), H, FF, R)
    experts, leaves = _inputs(k, frozen_tokens, unused)
    k_grads, o_grads = _fp32_kernel_against_oracle(experts, leaves, int(round(dropout * 65536)), bucket, grouped=True)
    unused_params = range(4 + 6 * (E - 1), 4 + 6 * E) if unused else range(0)
    assert all(k_grads[i] is None for i in unused_params)
    for i, (a, b) in enumerate(zip(k_grads, o_grads)):
        if i not in unused_params:
            assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-3), f"gradient of input {i}"


@pytest.mark.parametrize("k,dropout,bucket,unused", [
    (2, 0.0, 1, False), (2, 0.1, 1, False), (3, 0.3, 4, False), (1, 0.3, 1, True), (1, 0.05, 8, True)])
def test_sync_free_layout_matches_the_oracle(k, dropout, bucket, unused):
    """The layout built without reading the routing back to the host (grouped matmuls over device
    offsets; blocks padded to `bucket` rows, the spare rows closing the last block) against the fp64
    oracle, in fp32; an expert without tokens gets a zero gradient instead of none."""
    experts, leaves = _inputs(k, 0, unused)
    layout = _layout(experts, (bucket, 0), sync_free=True)
    assert layout.counts is None and layout.num_rows == T * k + (E * (bucket - 1) if bucket > 1 else 0)
    counts = torch.bincount(experts.reshape(-1), minlength=E)
    ends = ((counts + bucket - 1) // bucket * bucket).cumsum(0)  # each block rounded up to `bucket` rows
    ends[-1] = layout.num_rows  # from the host-side counts (the oracle's view) to the device offsets
    assert layout.offsets.tolist() == ends.tolist()
    k_grads, o_grads = _fp32_kernel_against_oracle(experts, leaves, int(round(dropout * 65536)), (bucket, 0),
                                                   sync_free=True)
    unused_params = range(4 + 6 * (E - 1), 4 + 6 * E) if unused else range(0)
    for i, (a, b) in enumerate(zip(k_grads, o_grads)):
        if i in unused_params:
            assert b is None and a is not None and not a.any()
        else:
            assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-3), f"gradient of input {i}"


@pytest.mark.parametrize("capability,plain,sync_free", [((8, 0), True, False), ((8, 9), True, False),
                                                         ((9, 0), True, True), ((10, 0), True, True),
                                                         ((12, 0), True, False), ((7, 5), False, False)])
def test_grouped_matmuls_count_as_sync_free_on_cuda_only_where_torch_has_its_own_kernel(monkeypatch, capability,
                                                                                       plain, sync_free):
    """torch runs `_grouped_mm` on CUDA from compute capability 8.0 (bf16), but only its CUTLASS kernels
    (9.x, 10.x) keep the offsets on the device; elsewhere it copies them to the host at every call.
    (No GPU here: the device's capability is what this policy reads, so it is set.)"""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert kernels.grouped_mm_supported(torch.bfloat16, cuda, 64, 128, 16) is plain
    assert kernels.grouped_mm_supported(torch.bfloat16, cuda, 64, 128, 16, sync_free=True) is (
        sync_free and torch.version.hip is None)
    assert not kernels.grouped_mm_supported(torch.float32, cuda, 64, 128, 16, sync_free=True)
    assert not kernels.grouped_mm_supported(torch.bfloat16, cuda, 64, 128, 4, sync_free=True)  # 8-byte rows


def test_sync_free_path_reads_nothing_back_from_the_device():
    """A training forward + backward of a MixLoRA FFN (with dropout) and of an attention LoRA on the
    "meta" device, which has shapes but no data: any read of a value on the host (`.item()`,
    `.tolist()`, `bincount`, `nonzero`, `repeat_interleave` without a size), which on a GPU waits for
    the device, fails there. The default layout does read (its control: it fails)."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    from mixlora_lit.lora import LoraLinear

    meta, bf16 = torch.device("meta"), torch.bfloat16
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=128, hidden_act="silu")).to(meta, bf16)
    ffn = MixLoraMoeFFN(mlp, MixLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, num_experts=4, top_k=2))
    ffn = ffn.to(meta).train()
    attention = LoraLinear(torch.nn.Linear(64, 64, bias=False, dtype=bf16, device=meta), r=16, lora_alpha=32,
                           lora_dropout=0.05).to(meta).train()
    assert ffn._plain_lora_everywhere() and ffn._expert_dropout_threshold() > 0
    x = torch.empty(40, 64, dtype=bf16, device=meta, requires_grad=True)
    with pytest.raises(NotImplementedError, match="bincount"):  # the default layout counts on the host
        ffn(x)
    ffn.sync_free = True
    (ffn(x).sum() + attention(x).sum()).backward()
    assert x.grad.shape == x.shape and x.grad.device == meta
    grads = [p.grad for p in ffn.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device == meta for g in grads)  # every expert, rows or not


def test_sync_free_model_trains_like_the_default_path(monkeypatch):
    """A whole model's loss and gradients with `set_sync_free` equal the default path's (fp32, no
    dropout); with switch routing, which it cannot serve, the usual layout runs."""
    layouts = []
    original = kernels.ExpertPlan.__init__

    def spy(self, layout, *args):
        layouts.append(layout.sync_free)
        original(self, layout, *args)

    monkeypatch.setattr(kernels.ExpertPlan, "__init__", spy)
    ids, mask = batch()
    results = []
    for sync_free in (False, True):
        torch.manual_seed(0)
        model = get_mixlora_model(tiny_llama(torch.float32), MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2))
        randomize_adapters(model)
        model.set_sync_free(sync_free)
        layouts.clear()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        assert layouts == [sync_free] * model.config.num_hidden_layers
        results.append((out.loss.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad  # none: no rows
                                            for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], rtol=1e-4, atol=1e-6), name
    switch = get_mixlora_model(tiny_llama(torch.float32), MixLoraConfig(r=4, lora_alpha=8, num_experts=4,
                                                           routing_strategy="mixlora-switch"))
    switch.set_sync_free(True)
    layouts.clear()
    switch(input_ids=ids, attention_mask=mask)
    assert layouts and not any(layouts)


def _spy_on_plans(monkeypatch) -> list:
    """The `ExpertPlan` of every `FusedLoraExperts` call from now on (the list fills as the kernel runs)."""
    plans = []
    original = kernels.FusedLoraExperts.apply

    def spy(*args):
        plans.append(args[4])
        return original(*args)

    monkeypatch.setattr(kernels.FusedLoraExperts, "apply", spy)
    return plans


def test_default_path_runs_the_fused_kernel(monkeypatch):
    """The model's default path goes through FusedLoraExperts (so the equivalence tests cover it)."""
    calls = _spy_on_plans(monkeypatch)
    model = get_mixlora_model(tiny_llama(), MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2),
                              adapter_dtype=torch.float64)
    randomize_adapters(model)
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)
    assert len(calls) == model.config.num_hidden_layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_blocks_are_padded_only_for_half_precision_on_cpu(monkeypatch, dtype):
    """oneDNN builds a kernel per bf16 matmul shape, so bf16 blocks are padded to few shapes;
    fp32 (MKL) blocks are not padded. An explicit `row_bucket` wins."""
    plans = _spy_on_plans(monkeypatch)
    model = get_mixlora_model(tiny_llama().to(dtype), MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2))
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)
    for plan in plans:
        counts, caps = plan.layout.counts[:4], plan.layout.capacities[:4]
        if dtype == torch.float32:
            assert caps == counts and not plan.tiled
        else:
            assert plan.layout.uniform and len(set(caps)) == 1 and caps[0] % 16 == 0 or \
                all(c % 64 == 0 and c >= n for c, n in zip(caps, counts))
            assert caps != counts  # this batch's counts are not all multiples of 16
            assert plan.tiled == (not plan.layout.uniform)  # padded blocks of different sizes: as tiles
    if dtype == torch.bfloat16:  # this small batch's layouts are uniform; without that option, tiles of 64 rows
        plans.clear()
        for module in model.modules():
            if isinstance(module, MixLoraMoeFFN):
                module.uniform_bucket = 0
        model(input_ids=ids, attention_mask=mask)
        assert plans and all(p.tiled and p.layout.bucket == 64 for p in plans)
    plans.clear()
    for module in model.modules():
        if isinstance(module, MixLoraMoeFFN):
            module.row_bucket, module.uniform_bucket = 8, 0
    model(input_ids=ids, attention_mask=mask)
    assert plans and all(all(c % 8 == 0 for c in p.layout.capacities[:4]) and p.tiled for p in plans)
    plans.clear()
    for module in model.modules():
        if isinstance(module, MixLoraMoeFFN):
            module.tiled_blocks = False
    model(input_ids=ids, attention_mask=mask)
    assert plans and not any(p.tiled for p in plans)


def test_tiled_blocks_match_per_expert_blocks_in_bf16(monkeypatch):
    """The tiles in bf16, where they are the default (the fp64 oracle cases above cannot reach the bf16
    casts): loss and every adapter gradient of a training step, with dropout, against one matmul per
    expert block on the same model, batch and dropout positions."""
    plans = _spy_on_plans(monkeypatch)
    model = get_mixlora_model(tiny_llama(torch.bfloat16), MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2,
                                                                       lora_dropout=0.1))
    randomize_adapters(model)
    model.train()
    ids, mask = batch(lengths=(9, 9, 7, 8))
    results = []
    for tiled in (True, False):
        for module in model.modules():
            if isinstance(module, MixLoraMoeFFN):
                module.uniform_bucket, module.tiled_blocks = 0, tiled
        model.zero_grad(set_to_none=True)
        plans.clear()
        torch.manual_seed(11)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        assert plans and all(p.tiled == tiled for p in plans)
        results.append((loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.requires_grad and "experts" in n}))
    (loss_t, grads_t), (loss_e, grads_e) = results
    assert torch.allclose(loss_t, loss_e, rtol=1e-2)
    assert grads_t.keys() == grads_e.keys() and len(grads_t) == 2 * 4 * 3 * 2  # layers x experts x gate/up/down x A/B
    for name, g in grads_t.items():
        ref = grads_e[name]
        assert g.dtype == ref.dtype == torch.float32
        assert ref.abs().max() > 0, name
        assert (g - ref).abs().max() <= 3e-2 * ref.abs().max(), name
