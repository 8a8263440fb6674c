"""The MixLoRA mixture-of-experts FFN.

Expert i is the frozen FFN with its own LoRA on gate, up and down:
    E_i(x) = (W2 + dW2_i) [act((W1 + dW1_i) x) * (W3 + dW3_i) x],   y = sum_{i in top-k} w_i E_i(x).

Two execution paths compute the same function:

* ``reference``: each routed expert runs its whole FFN on its tokens (the formula as written).
* ``fused`` (default): W1 x and W3 x run once for all tokens; each expert adds only its LoRA
  deltas on its own tokens; and because W2 is linear and frozen,
  sum_i w_i W2 h_i = W2 (sum_i w_i h_i), so the base down projection runs once per token on the
  gate-weighted sum and only dW2_i runs per (token, expert). A DoRA down projection rescales
  W2 h_i per expert, which breaks that identity, so with DoRA experts W2 runs per (token,
  expert) and everything else stays fused.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from .config import FFN_TARGETS, MixLoraConfig
from .kernels import (ExpertLayout, ExpertPlan, FusedLoraExperts, RowGather, RowSum, autocast_off, compute_dtype,
                      grouped_mm_supported)
from .lora import FastDropout, LoraAdapter, weight_cache
from .routers import Routing, SwitchRouter, TopKRouter
from .errors import UserError

EXECUTION_PATHS = ("fused", "reference")


class MoeProjection(nn.Module):
    """A frozen FFN projection shared by all experts, plus one LoRA per expert."""

    def __init__(self, base_layer: nn.Linear, num_experts: int, r: int, lora_alpha: float, lora_dropout: float,
                 use_rslora: bool, use_dora: bool, adapter_dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.experts = nn.ModuleList(
            LoraAdapter(base_layer.in_features, base_layer.out_features, r, lora_alpha, lora_dropout,
                        use_rslora, use_dora, base_weight=base_layer.weight, dtype=adapter_dtype,
                        device=base_layer.weight.device)
            for _ in range(num_experts)
        )

    @property
    def use_dora(self) -> bool:
        return self.experts[0].use_dora

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the frozen projection alone
        return self.base_layer(x)


class MixLoraMoeFFN(nn.Module):
    """Drop-in replacement for a LLaMA-style gated MLP (Llama, Mistral, Qwen2, Gemma 1/2/3)."""

    def __init__(self, mlp: nn.Module, config: MixLoraConfig, adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.execution = "fused"
        # W2 once per token on the gate-weighted sum. False runs it per (token, expert) as the
        # reference code's fast path does: an ablation benchmarks/bench_step.py measures.
        self.factor_down = True
        # Recompute the experts in backward instead of keeping their [tokens x k, FFN] activations:
        # MixLoRA's extra activation memory is per (token, expert); this trades compute for memory.
        self.recompute_experts = False
        # Without autograd (evaluation, generation), run every expert's low-rank product densely
        # and mask: no sorting, gathers or per-expert loop, which dominate at inference batch sizes.
        self.dense_inference = True
        # ... up to this many (token, expert) rows: beyond, the dense products' E-fold work on every row
        # costs more than the sorted path's gathers (measured on CPU before session 19's dense path: the
        # sorted path wins from about 200 tokens at top-2 on SmolLM2's FFN; `benchmarks/README.md`).
        self.dense_inference_max_rows = 384
        # ... and up to this many rows, each row gathers its own expert's LoRA matrices instead of
        # multiplying by all E experts' (`_forward_gathered_inference`): decoding one sequence, where
        # reading every expert's weights at each step is what the step costs. Gathering copies the rows'
        # matrices, so it reads about 2 * rows / E of the dense path's bytes. None: E // 4 (2 rows of 8
        # experts: one sequence at top-2, half the bytes; `benchmarks/bench_decode.py` measured 0.94-1.02x
        # the dense path's decoding step there in five runs, within the machine's noise, and no clear
        # gain at 4 rows, where the bytes break even).
        self.gathered_inference_max_rows: int | None = None
        # Pad each expert's rows to a multiple of this in the LoRA-experts kernel (see ExpertLayout).
        # None: 64 for bf16/fp16 or off the CPU (oneDNN builds a kernel per bf16 matmul shape; on an
        # H100 no padding made the step 1.58x slower), 1 for fp32 on the CPU (MKL has no per-shape
        # cost; unpadded was 0.944x the padded step's time on the quickstart's batches).
        self.row_bucket: int | None = None
        # When giving every expert the same block size (the largest count rounded up to this) costs
        # little padding, the kernel runs all experts as one batched matmul (see ExpertLayout). 0: never.
        # None: 16 where rows are padded (above), else 1.
        self.uniform_bucket: int | None = None
        # ... when that adds at most this fraction of rows to the per-expert layout.
        self.uniform_waste = 0.1
        # Otherwise, run each product of all experts' blocks as one `torch._grouped_mm` (CPU; see
        # kernels.grouped_mm_supported) instead of one batched matmul per expert.
        self.grouped_mm = False
        # Otherwise, where the blocks are padded but of different sizes, run each product as one batched
        # matmul over the blocks' tiles of `row_bucket` rows (see ExpertPlan); off: one matmul per expert.
        self.tiled_blocks = True
        # Build the routing layout on the device without reading anything back to the host, and run the
        # products as grouped matmuls (top-k routing, where `grouped_mm_supported(..., sync_free=True)`;
        # else the usual layout): for GPUs, where each read-back stalls the device (see ExpertLayout).
        # Experts without rows then get zero gradients rather than none. Blocks padded to
        # `sync_free_bucket` rows.
        # Off by default: not yet timed on a GPU (`benchmarks/bench_gpu_step.py`, fused_syncfree).
        self.sync_free = False
        self.sync_free_bucket = 1
        act = getattr(mlp, "act_fn", None)
        if act is None:
            if config.act_fn is None:
                raise UserError(f"{type(mlp).__name__} has no act_fn and MixLoraConfig.act_fn is not set")
            act = ACT2FN[config.act_fn]
        self.act_fn: Callable[[torch.Tensor], torch.Tensor] = act
        r, alpha, dropout = config.expert_hparams()
        for name in FFN_TARGETS:
            base = getattr(mlp, name)
            if name in config.target_modules:
                base = MoeProjection(base, config.num_experts, r, alpha, dropout, config.use_rslora,
                                     config.use_dora, adapter_dtype)
            self.add_module(name, base)
        hidden = self._base("gate_proj").in_features
        device = self._base("gate_proj").weight.device
        if config.routing_strategy == "mixlora-switch":
            self.moe_gate = SwitchRouter(hidden, config.num_experts, config.expert_capacity,
                                         config.router_init_range, config.jitter_noise, adapter_dtype, device)
        else:
            self.moe_gate = TopKRouter(hidden, config.num_experts, config.top_k, config.router_init_range,
                                       config.jitter_noise, adapter_dtype, device)
        # Filled by each forward; read by MixLoraModel for the auxiliary loss and routing statistics.
        self.last_routing: Routing | None = None

    # ------------------------------------------------------------------ helpers
    def _base(self, name: str) -> nn.Linear:
        module = getattr(self, name)
        return module.base_layer if isinstance(module, MoeProjection) else module

    def _expert(self, name: str, e: int) -> LoraAdapter | None:
        module = getattr(self, name)
        if isinstance(module, MoeProjection) and e < self.num_experts:
            return module.experts[e]
        return None

    def _project(self, name: str, e: int, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        adapter = self._expert(name, e)
        return base_out if adapter is None else adapter.adapted_output(x, base_out, self._base(name))

    def _down_is_factored(self) -> bool:
        down = getattr(self, "down_proj")
        return self.factor_down and not (isinstance(down, MoeProjection) and down.use_dora)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routing = self.moe_gate(x, batch_shape=tuple(shape[:-1]) if len(shape) == 3 else None)
        self.last_routing = routing
        paths = {"reference": self._forward_reference, "dense_inference": self._forward_dense_inference,
                 "gathered_inference": self._forward_gathered_inference,
                 "fused_recompute": self._forward_fused_recompute, "fused": self._forward_fused}
        return paths[self.current_path(routing.experts.numel())](x, routing).reshape(shape)

    def current_path(self, rows: int = 0) -> str:
        """The path a forward over `rows` (token, expert) assignments takes now, all computing the same function:

        - `reference`: chosen with `set_execution_path("reference")`, the paper's formula as written;
        - `dense_inference`: without autograd, no dropout, plain LoRA on gate, up and down, and at most
          `dense_inference_max_rows` assignments (decoding steps, small batches);
        - `gathered_inference`: the same, at most `gathered_inference_max_rows` assignments (decoding
          one sequence);
        - `fused_recompute`: training with `recompute_experts`, the fused path recomputed in backward;
        - `fused`: everything else (the one-kernel experts when `_plain_lora_everywhere()`).
        """
        if self.execution == "reference":
            return "reference"
        if torch.is_grad_enabled():
            return "fused_recompute" if self.recompute_experts and self.training else "fused"
        if (self.dense_inference and rows <= self.dense_inference_max_rows and self._plain_lora_everywhere()
                and not self._expert_dropout_threshold()):
            gathered = self.gathered_inference_max_rows
            return "gathered_inference" if rows <= (self.num_experts // 4 if gathered is None else gathered) \
                else "dense_inference"
        return "fused"

    # The routed paths (training, and inference past the dense path's rows) run eagerly under torch.compile
    # (`model.compile`), the frozen gate, up and down projections inside them included: their layout is
    # data-dependent Python state (expert counts, block groups), which dynamo would trace into and recompile
    # per routing outcome until it hits its recompile limit. Everything around them (attention, norms, the
    # router) still compiles. (A sync-free layout has static shapes and might compile; not tried.)
    @torch.compiler.disable
    def _forward_fused_recompute(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        # Dropout masks are reproduced in the recomputation (the RNG state is restored).
        return checkpoint(self._forward_fused, x, routing, use_reentrant=False)

    def _forward_reference(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Each routed (token, expert) pair runs the expert's whole FFN: the paper's formula."""
        y = torch.zeros_like(x)
        for e in range(self.num_experts + 1):
            tokens, slot = torch.where(routing.experts == e)
            if tokens.numel() == 0:
                continue
            xe = x[tokens]
            gate = self._project("gate_proj", e, xe, self._base("gate_proj")(xe))
            up = self._project("up_proj", e, xe, self._base("up_proj")(xe))
            h = self.act_fn(gate) * up
            out = self._project("down_proj", e, h, self._base("down_proj")(h))
            weight = routing.weights[tokens, slot].unsqueeze(1)
            y.index_add_(0, tokens, (out * weight.to(out.dtype)).to(y.dtype))
        return y

    def _shared_lowrank(self) -> list[str]:
        """Gate/up projections whose experts are plain LoRA: their A matmuls can share one input."""
        return [n for n in ("gate_proj", "up_proj")
                if isinstance(getattr(self, n), MoeProjection) and not getattr(self, n).use_dora]

    def _plain_lora_everywhere(self) -> bool:
        """Gate, up and down all carry plain LoRA experts: the case `FusedLoraExperts` computes."""
        return self.execution == "fused" and self.factor_down and all(
            isinstance(getattr(self, n), MoeProjection) and not getattr(self, n).use_dora for n in FFN_TARGETS)

    def _forward_dense_inference(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The fused formula for inference, with the experts' LoRA products as masked dense matmuls.

        Each of the T*k rows (token t, slot j) takes A x for all E experts at once ([E*r] columns),
        zeroes every block but its expert's, and multiplies by the experts' B matrices laid side by
        side ([E*r, F]): the same sum as the routed expert's B A x, in a few large matmuls. The
        extra work (E-fold on the rank-r products) is small next to the frozen FFN at these ranks.
        At these sizes (decoding steps) the cost is the weights read and the number of operations: gate
        and up share one A matmul and one batched B matmul, the LoRA scalings live in the cached B
        matrices, and the down LoRA's routing weights and slot sum are applied before its B matmul
        (B is shared by the slots, so sum_j w_j B (mask_j A h_j) = B sum_j w_j mask_j A h_j).
        """
        projections = [getattr(self, n) for n in FFN_TARGETS]  # gate, up, down
        dtype, num_tokens, k = compute_dtype(x), x.shape[0], routing.experts.shape[1]
        a_gu, a_down, b_gu, b_down, column_expert = self._dense_weights(projections, dtype)
        rows, width = num_tokens * k, column_expert.shape[0]
        # [T, k, E*r]: 1 in the columns of the slot's expert (none for index E, the frozen FFN alone)
        select = (routing.experts.unsqueeze(-1) == column_expert).to(dtype)
        # [2, T, k, E*r]: gate's and up's A x, masked per slot, as one batch of [T*k, E*r] rows each
        # (written into a [2, T, k, E*r] buffer: the product would otherwise take the transposed input's layout.
        # torch.compile rewrites `out=` and its layout with it, so there the product is made contiguous.)
        low_all = F.linear(x, a_gu).view(num_tokens, 2, 1, width).transpose(0, 1)
        if torch.compiler.is_compiling():
            low = (low_all * select).contiguous()
        else:
            low = torch.mul(low_all, select, out=torch.empty(2, num_tokens, k, width, dtype=dtype, device=x.device))
        h = self._inference_hidden(x, torch.bmm(low.view(2, rows, width), b_gu).view(2, num_tokens, k, -1))
        w = routing.weights.to(dtype)  # [T, k]
        low_down = F.linear(h.view(rows, -1), a_down).view(num_tokens, k, width).mul_(select.mul_(w.unsqueeze(-1)))
        return self._inference_output(h, w, low_down.sum(1) @ b_down)

    def _inference_hidden(self, x: torch.Tensor, gate_up_lora: torch.Tensor) -> torch.Tensor:
        """act(W1 x + gate LoRA) * (W3 x + up LoRA), [T, k, F], from the experts' gate and up LoRA outputs
        [2, T, k, F] (summed into in place): the frozen outputs once per token, broadcast over the slots."""
        gate = gate_up_lora[0].add_(self._base("gate_proj")(x).unsqueeze(1))
        up = gate_up_lora[1].add_(self._base("up_proj")(x).unsqueeze(1))
        return self.act_fn(gate).mul_(up)

    def _inference_output(self, h: torch.Tensor, w: torch.Tensor, down_lora: torch.Tensor) -> torch.Tensor:
        """W2 (sum_j w_j h_j) + the routing-weighted down LoRAs already summed per token ([T, H]) + the bias
        times sum_j w_j: the factored down projection of the no-grad paths."""
        h_sum = torch.bmm(w.unsqueeze(1), h).view(h.shape[0], -1)  # sum_j w_j h_j, as [T, 1, k] @ [T, k, F]
        base_down = self._base("down_proj")
        y = torch.addmm(down_lora, h_sum, base_down.weight.t())
        if base_down.bias is not None:
            y = y + w.sum(dim=1, keepdim=True) * base_down.bias
        return y

    def _forward_gathered_inference(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The dense path's formula with each (token, slot) row's own expert gathered instead of all E
        masked: for a few rows (decoding one sequence: at most `gathered_inference_max_rows`), where the
        dense path's cost is reading every expert's matrices at each step. Gathering reads only the routed
        experts' (and writes them once); the products are batched matmuls over the rows. Reads the
        same cached weights as the dense path, viewed per expert."""
        projections = [getattr(self, n) for n in FFN_TARGETS]  # gate, up, down
        dtype, num_tokens, k = compute_dtype(x), x.shape[0], routing.experts.shape[1]
        a_gu, a_down, b_gu, b_down, _ = self._dense_weights(projections, dtype)
        num_experts, rank, rows = self.num_experts, projections[0].experts[0].r, num_tokens * k
        experts, w = routing.experts.reshape(rows), routing.weights.to(dtype)
        w_lora, valid = w.reshape(rows, 1, 1), None
        if isinstance(self.moe_gate, SwitchRouter):  # index E (over capacity): the frozen FFN alone, no LoRA
            valid = (experts < num_experts).to(dtype)
            w_lora = w_lora * valid.view(rows, 1, 1)
            experts = experts.clamp(max=num_experts - 1)
        hidden = x.shape[1]
        # [2*T*k, r, 1]: gate's then up's A x per row, with each row's own expert's A
        a_rows = a_gu.view(2, num_experts, rank, hidden).index_select(1, experts).view(2 * rows, rank, hidden)
        x_rows = x.view(1, num_tokens, 1, hidden).expand(2, num_tokens, k, hidden).reshape(2 * rows, hidden, 1)
        low = torch.bmm(a_rows, x_rows)
        if valid is not None:
            low.view(2, rows, rank).mul_(valid.view(1, rows, 1))
        b_rows = b_gu.view(2, num_experts, rank, -1).index_select(1, experts).view(2 * rows, rank, -1)
        h = self._inference_hidden(x, torch.bmm(low.view(2 * rows, 1, rank), b_rows).view(2, num_tokens, k, -1))
        ffn = h.shape[-1]
        low_down = torch.bmm(a_down.view(num_experts, rank, ffn).index_select(0, experts), h.view(rows, ffn, 1))
        lora = torch.bmm(low_down.mul_(w_lora).view(rows, 1, rank),
                         b_down.view(num_experts, rank, -1).index_select(0, experts))  # [T*k, 1, H]
        return self._inference_output(h, w, lora.view(num_tokens, k, -1).sum(1))

    def _dense_weights(self, projections: list[MoeProjection], dtype: torch.dtype):
        """In `dtype`, cached until a weight changes: every expert's gate and up A stacked [2*E*r, in]
        (gate first), the down A stacked [E*r, F], the B matrices stacked and transposed ([E*r, out],
        gate's and up's as one [2, E*r, F]) with each projection's LoRA scaling folded in, and the
        expert of each of the E*r columns."""
        def build():
            a = [torch.cat([e.lora_A.weight for e in p.experts]).to(dtype) for p in projections]
            b = [(torch.cat([e.lora_B.weight for e in p.experts], dim=1) * p.experts[0].scaling).t().contiguous()
                 .to(dtype) for p in projections]
            r = projections[0].experts[0].r
            column_expert = torch.arange(self.num_experts, device=a[0].device).repeat_interleave(r)
            return torch.cat([a[0], a[1]]), a[2], torch.stack([b[0], b[1]]), b[2], column_expert

        return weight_cache(self, "_dense_cache", lambda: _adapter_linears(projections), dtype, build)

    def _expert_dropout_threshold(self) -> int:
        """The experts' active LoRA dropout (out of 2**16): 0 in eval mode or without dropout.
        Dropout also applies in training mode without autograd, so the dense path then steps aside."""
        dropout = self._expert("down_proj", 0).lora_dropout
        return dropout.threshold if isinstance(dropout, FastDropout) and dropout.active else 0

    def _forward_fused_experts(self, source, gate_base, up_base, routing, layout):
        projections = [getattr(self, n) for n in FFN_TARGETS]  # gate, up, down
        # Under mixed precision (autocast) the inputs arrive in mixed dtypes: run the experts in
        # autocast's dtype, with autocast off inside (the kernel casts the fp32 masters itself).
        dtype = compute_dtype(source)
        rank = projections[2].experts[0].r
        grouped = self.grouped_mm and grouped_mm_supported(dtype, source.device, source.shape[1], gate_base.shape[1],
                                                           rank)
        plan = ExpertPlan(layout, self.num_experts, rank, tuple(p.experts[0].scaling for p in projections),
                          self._expert_dropout_threshold(), self.act_fn, grouped, self.tiled_blocks)
        params = [w for e in range(self.num_experts) for p in projections
                  for w in (p.experts[e].lora_A.weight, p.experts[e].lora_B.weight)]
        if not torch.is_grad_enabled():  # evaluation: the stacked, cast weights last until a weight changes
            plan.stacks = weight_cache(self, "_stack_cache", lambda: _adapter_linears(projections),
                                       (dtype, plan.dropout_threshold), lambda: plan.stacked_weights(params, dtype))
        with autocast_off(source.device.type):
            h_sum, lora_sum = FusedLoraExperts.apply(source.to(dtype), gate_base.to(dtype), up_base.to(dtype),
                                                     layout.sorted_weights(routing.weights), plan, *params)
        base_down = self._base("down_proj")
        y = F.linear(h_sum, base_down.weight) + lora_sum
        if base_down.bias is not None:  # sum_j w_j b: every assignment went through W2
            y = y + routing.weights.sum(dim=1, keepdim=True).to(y.dtype) * base_down.bias
        return y

    def _sync_free_applies(self, dtype: torch.dtype, device: torch.device, hidden: int, ffn: int) -> bool:
        """`sync_free` is on and can hold: top-k routing (no frozen-FFN block), grouped matmuls here."""
        return (self.sync_free and isinstance(self.moe_gate, TopKRouter)
                and grouped_mm_supported(dtype, device, hidden, ffn, self._expert("down_proj", 0).r, sync_free=True))

    def row_buckets(self, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
        """(row_bucket, uniform_bucket) for the kernel's inputs in `dtype` on `device`, `None` resolved."""
        padded = device.type != "cpu" or dtype in (torch.bfloat16, torch.float16)
        row = self.row_bucket if self.row_bucket is not None else (64 if padded else 1)
        uniform = self.uniform_bucket if self.uniform_bucket is not None else (16 if padded else 1)
        return row, uniform

    @torch.compiler.disable  # see _forward_fused_recompute
    def _forward_fused(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        num_tokens = x.shape[0]
        k = routing.experts.shape[1]
        gate_base = self._base("gate_proj")(x)
        up_base = self._base("up_proj")(x)
        down = self._base("down_proj")

        # Sort (token, slot) assignments by expert so each expert reads one contiguous slice
        # (padded to `row_bucket` rows for the kernel, whose matmuls then repeat their shapes).
        plain = self._plain_lora_everywhere()
        flat, dtype = routing.experts.reshape(-1), compute_dtype(x)
        if plain and self._sync_free_applies(dtype, x.device, x.shape[1], gate_base.shape[1]):
            layout = ExpertLayout(flat, self.num_experts, k, self.sync_free_bucket, sync_free=True)
        elif plain:
            layout = ExpertLayout(flat, self.num_experts, k, *self.row_buckets(dtype, x.device),
                                  self.uniform_waste)
        else:
            layout = ExpertLayout(flat, self.num_experts, k)
        # The gate and up LoRAs of every expert read the same token x: one dropout mask per token
        # serves them all (drawn once per layer instead of once per expert and projection).
        shared = self._shared_lowrank()
        source = getattr(self, shared[0]).experts[0].lora_dropout(x) if shared else x
        if plain:
            return self._forward_fused_experts(source, gate_base, up_base, routing, layout)
        tokens, inv, counts = layout.tokens, layout.inv, layout.counts
        weights = layout.sorted_weights(routing.weights)
        gs, us = RowGather.apply(gate_base, tokens, inv, k), RowGather.apply(up_base, tokens, inv, k)
        xs = RowGather.apply(source, tokens, inv, k)
        # Per-expert chunks via split, not slicing: the backward of a slice allocates a zero-filled
        # gradient the size of the whole tensor for every expert; split's backward concatenates once.
        xs_c, gs_c, us_c, w_c = (torch.split(t, counts) for t in (xs, gs, us, weights))

        def gate_up(e: int) -> tuple[torch.Tensor, torch.Tensor]:
            xe, ge, ue = xs_c[e], gs_c[e], us_c[e]
            if e >= self.num_experts or not shared:
                return self._project("gate_proj", e, xe, ge), self._project("up_proj", e, xe, ue)
            adapters = [getattr(self, n).experts[e] for n in shared]
            a = F.linear(xe, torch.cat([ad.lora_A.weight for ad in adapters]).to(xe.dtype))  # [n, sum of r]
            lows = torch.split(a, [ad.r for ad in adapters], dim=1)
            outs = {name: (ge if name == "gate_proj" else ue)
                    + F.linear(low, ad.lora_B.weight.to(low.dtype)).to(ge.dtype) * ad.scaling
                    for name, ad, low in zip(shared, adapters, lows)}
            gate = outs["gate_proj"] if "gate_proj" in outs else self._project("gate_proj", e, xe, ge)
            up = outs["up_proj"] if "up_proj" in outs else self._project("up_proj", e, xe, ue)
            return gate, up

        factored = self._down_is_factored()
        h_parts: list[torch.Tensor] = []  # w * h, summed per token and sent through W2 once
        h_slices: list[slice] = []
        out_parts: list[torch.Tensor] = []  # per-assignment additions to the output
        out_slices: list[slice] = []
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            sl = slice(start, start + count)
            start += count
            we = w_c[e]
            gate, up = gate_up(e)
            h = self.act_fn(gate) * up
            adapter = self._expert("down_proj", e)
            if factored or (adapter is None and e == self.num_experts):
                h_parts.append(h * we.to(h.dtype))
                h_slices.append(sl)
                if adapter is not None:
                    out_parts.append(adapter.delta(h) * we.to(h.dtype))
                    out_slices.append(sl)
            else:  # DoRA down projection (or factor_down off): W2 runs per (token, expert)
                out = down(h) if adapter is None else adapter.adapted_output(h, down(h), down)
                out_parts.append(out * we.to(out.dtype))
                out_slices.append(sl)

        y = torch.zeros_like(x)
        if h_parts:
            h_tokens = _gather_slices(tokens, h_slices)
            if len(h_tokens) == len(tokens):  # every assignment: each token's k rows, summed without scatter
                h_sum = RowSum.apply(torch.cat(h_parts), tokens, inv, k)
            else:
                h_sum = torch.zeros(num_tokens, gate_base.shape[1], dtype=gate_base.dtype, device=x.device)
                h_sum = h_sum.index_add(0, h_tokens, torch.cat(h_parts))
            y = F.linear(h_sum, down.weight)
            if down.bias is not None:  # sum_i w_i b = (sum_i w_i) b over the factored assignments
                w_sum = torch.zeros(num_tokens, 1, dtype=weights.dtype, device=x.device)
                w_sum.index_add_(0, h_tokens, _gather_slices(weights, h_slices))
                y = y + w_sum.to(y.dtype) * down.bias
        if out_parts:
            y = y.index_add(0, _gather_slices(tokens, out_slices), torch.cat(out_parts).to(y.dtype))
        return y


def _adapter_linears(projections: list[MoeProjection]) -> list[nn.Linear]:
    """The experts' lora_A and lora_B modules of `projections` (the weights a cache of them depends on)."""
    return [lin for p in projections for e in p.experts for lin in (e.lora_A, e.lora_B)]


def _gather_slices(t: torch.Tensor, slices: list[slice]) -> torch.Tensor:
    if len(slices) == 1 or (slices and slices[0].start == 0 and slices[-1].stop == t.shape[0]
                            and all(a.stop == b.start for a, b in zip(slices, slices[1:]))):
        return t[slices[0].start:slices[-1].stop]
    return torch.cat([t[sl] for sl in slices])


def set_recompute_experts(model: nn.Module, enabled: bool = True) -> None:
    """Recompute the fused expert computation in backward (less memory, some more compute)."""
    for module in model.modules():
        if isinstance(module, MixLoraMoeFFN):
            module.recompute_experts = enabled


def set_sync_free(model: nn.Module, enabled: bool = True, bucket: int = 1) -> None:
    """Build every MixLoRA FFN's routing layout on the device, with nothing read back to the host, and
    run its expert products as grouped matmuls (`MixLoraMoeFFN.sync_free`; for GPUs), blocks padded to
    `bucket` rows. Where it cannot apply the usual layout runs: switch routing, experts other than plain
    LoRA on gate, up and down (DoRA, `factor_down` off), or no grouped matmul that keeps its offsets on
    the device for this dtype and device (on CUDA: bf16 on compute capability 9.x/10.x; see
    `kernels.grouped_mm_supported`). Experts without rows then get zero gradients, not none, so AdamW
    still applies their momentum and weight decay: a change to training, not only to speed."""
    for module in model.modules():
        if isinstance(module, MixLoraMoeFFN):
            module.sync_free, module.sync_free_bucket = enabled, bucket


def set_execution_path(model: nn.Module, path: str) -> None:
    """Switch every MixLoRA FFN in `model` between the fused and the reference path."""
    if path not in EXECUTION_PATHS:
        raise UserError(f"execution path {path!r} is invalid: expected one of {list(EXECUTION_PATHS)}")
    for module in model.modules():
        if isinstance(module, MixLoraMoeFFN):
            module.execution = path
