"""Row permutations and the fused LoRA-experts function behind the MixLoRA FFN's default path.

Assignments (token, slot) are sorted by expert, so expert e owns one contiguous block of rows;
`tokens[i]` is the token of row i and `inv` maps assignment t*k + j to its row (see `ExpertLayout`).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from .lora import dropped_positions, keep_scale


def rows(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """src[idx] along dim 0, fast: contiguous rows copied as 8-byte words when they allow it
    (advanced indexing of 2-byte rows is an order of magnitude slower on CPU)."""
    src = src.contiguous()
    width = src.shape[-1] * src.element_size()
    if src.dim() == 2 and src.element_size() < 8 and width % 8 == 0 and src.data_ptr() % 8 == 0:
        return src.view(torch.int64).index_select(0, idx).view(src.dtype)
    return src.index_select(0, idx)


def rows_summed(sorted_rows: torch.Tensor, inv: torch.Tensor, k: int,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per token, the sum of its k sorted rows ([T*k, F] -> [T, F]), each times its entry of
    `weights` ([T*k], in assignment order) when given.

    `embedding_bag(mode="sum")` gathers, weights and sums in one pass, without a [T*k, F]
    intermediate (about twice as fast as gather-then-sum on CPU, and the weighting is free).
    """
    per_sample = None if weights is None else weights.reshape(-1, k).to(sorted_rows.dtype)
    return F.embedding_bag(inv.view(-1, k), sorted_rows.contiguous(), mode="sum", per_sample_weights=per_sample)


class RowGather(torch.autograd.Function):
    """rows = src[idx] where every row of src is picked exactly k times (top-k routing).

    Autograd's own backward for indexing zero-fills a src-sized buffer and scatter-adds into it;
    here the backward is a gather by the inverse permutation and a sum over the k copies.
    """

    @staticmethod
    def forward(ctx, src: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return rows(src, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inv,) = ctx.saved_tensors
        return rows_summed(grad, inv, ctx.k), None, None, None


class RowSum(torch.autograd.Function):
    """out[t] = sum of the k rows assigned to token t (the adjoint of `RowGather`)."""

    @staticmethod
    def forward(ctx, sorted_rows: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(idx)
        return rows_summed(sorted_rows, inv, k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return rows(grad, idx), None, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: autocast's when it is on (mixed precision), else x's."""
    device = x.device.type
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return torch.get_autocast_dtype(device) if on else x.dtype


def autocast_off(device_type: str):
    """A context with autocast off on `device_type` (nothing to switch off where it has no autocast: "meta")."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class ExpertLayout:
    """Where each (token, slot) assignment goes in the expert-sorted rows.

    Expert e's assignments form one contiguous block (stable order, so by token within it); the
    block of index E, "frozen FFN only" (switch-router overflow), comes last. With `bucket` > 1
    each adapted expert's block is padded to a multiple of `bucket` rows, so that the per-expert
    matmuls see only a few distinct shapes. That matters on CPU: oneDNN builds a kernel for every
    new bf16 matmul shape (about 0.6 ms, ten times the matmul itself at these sizes), and the
    routing changes the block sizes at every step. Padding rows copy token 0 and carry routing
    weight 0: no output reads them, and every gradient through them is multiplied by that 0.

    With `uniform_bucket` > 0, every adapted expert's block gets the same size instead (the largest
    count rounded up to `uniform_bucket`) whenever that adds at most `uniform_waste` (a fraction)
    to the padded rows: all experts then run as one batched matmul (`torch.bmm` over [E, rows, .])
    instead of one matmul each, which removes most of the per-call cost when blocks are small.
    Near-balanced routing pads little either way; a skewed routing keeps per-expert blocks.

    With `sync_free`, nothing about the routing is read back to the host (on a GPU, reading the
    per-expert counts waits for the device to finish everything queued before it, several times per
    layer and step). Only for top-k routing (no frozen-FFN block): the row count is known from the
    shapes, T*k (plus `num_experts * (bucket - 1)` padding rows, the last of them in the last
    expert's block), and the blocks' ends stay on the device (`offsets`, for `torch._grouped_mm`).
    `counts` and `capacities` are then None, and every expert gets a gradient (zero without rows).

    Fields: `tokens` [rows] the token of each row; `inv` [T*k] the row of assignment t*k + j;
    `source` [rows] the assignment of each row (T*k on padding rows); `counts` and `capacities`
    per block (real rows, rows with padding); `uniform` whether the adapted blocks share one size;
    `offsets` (sync-free only) [E] int32, where each expert's block ends.
    """

    def __init__(self, flat_experts: torch.Tensor, num_experts: int, k: int, bucket: int = 1,
                 uniform_bucket: int = 0, uniform_waste: float = 0.1, sync_free: bool = False) -> None:
        num = flat_experts.numel()
        order = torch.argsort(flat_experts, stable=True)
        self.k = k
        self.bucket = bucket
        self.num_adapted = num_experts
        self.uniform = False
        self.sync_free = sync_free
        self.offsets: torch.Tensor | None = None
        device = flat_experts.device
        if sync_free:
            self.counts = self.capacities = None
            counts = torch.zeros(num_experts + 1, dtype=order.dtype, device=device).scatter_add_(
                0, flat_experts, torch.ones_like(flat_experts))
            self.num_rows = num + num_experts * (bucket - 1) if bucket > 1 else num
            caps = -(-counts // bucket) * bucket
            caps[num_experts - 1] += self.num_rows - caps.sum()  # the spare rows close the last block
            self.offsets = caps[:num_experts].cumsum(0).to(torch.int32)
        else:
            counts = torch.bincount(flat_experts, minlength=num_experts + 1)
            self.counts: list[int] | None = counts.tolist()
            self.capacities = [-(-n // bucket) * bucket if e < num_experts else n for e, n in enumerate(self.counts)]
            if uniform_bucket > 0 and num_experts > 1:
                size = -(-max(self.counts[:num_experts]) // uniform_bucket) * uniform_bucket
                if size * num_experts <= (1 + uniform_waste) * sum(self.capacities[:num_experts]):
                    self.capacities[:num_experts] = [size] * num_experts
                    self.uniform = True
            self.num_rows = sum(self.capacities)
            caps = torch.tensor(self.capacities, device=device) if self.num_rows != num else None
        row_of_sorted = torch.arange(num, device=device)  # row of the i-th assignment in sorted order
        self.tokens, self.source = order // k, order
        if self.num_rows != num:  # shift every block to its padded start; padding rows: token 0, no source
            shift = (caps.cumsum(0) - caps) - (counts.cumsum(0) - counts)
            row_of_sorted = row_of_sorted + shift[flat_experts[order]]
            self.tokens = torch.zeros(self.num_rows, dtype=order.dtype, device=device).index_put_(
                (row_of_sorted,), order // k)
            self.source = torch.full((self.num_rows,), num, dtype=order.dtype, device=device).index_put_(
                (row_of_sorted,), order)
        self.inv = torch.empty_like(order)
        self.inv[order] = row_of_sorted

    def sorted_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Routing weights [T, k] -> [rows, 1] in row order, 0 on padding rows (differentiable)."""
        flat = weights.reshape(-1)
        if self.num_rows != flat.numel():
            flat = torch.cat([flat, flat.new_zeros(1)])
        return flat[self.source].unsqueeze(1)

    def groups(self) -> list[tuple[int, int, slice, int]]:
        """The adapted experts' blocks as (first expert, last expert + 1, rows, rows per expert) groups
        of equal-size consecutive blocks, each run as one batched matmul: one group of all experts
        when the layout is uniform, else one group per non-empty expert."""
        if self.uniform:
            size = self.capacities[0]
            return [(0, self.num_adapted, slice(0, size * self.num_adapted), size)] if size else []
        out, start = [], 0
        for e, (n, cap) in enumerate(zip(self.counts[:self.num_adapted], self.capacities)):
            if n:
                out.append((e, e + 1, slice(start, start + cap), cap))
            start += cap
        return out


class ExpertPlan:
    """What `FusedLoraExperts` needs besides tensors: the routing layout and the LoRA constants."""

    def __init__(self, layout: ExpertLayout, num_adapted: int, rank: int, scalings: tuple[float, float, float],
                 dropout_threshold: int, act_fn: Callable[[torch.Tensor], torch.Tensor], grouped: bool = False,
                 tiled: bool = False) -> None:
        """grouped: run the products as `torch._grouped_mm` calls over all experts' blocks when the
        layout has blocks of different sizes (the caller checks `grouped_mm_supported`); always with a
        sync-free layout, whose block sizes only the device knows.

        tiled: otherwise, when the blocks are padded (`bucket` > 1) but not uniform, run each product as
        one batched matmul over tiles of `bucket` rows, every tile within one expert's block, with each
        tile's copy of its expert's weights (gathered per product: [tiles, K, N], a quarter to a half of
        the tiles' rows at rank 16 and 64-row tiles). One call per product instead of one per expert: on
        CPU in bf16 a rank-16 product over one expert's block runs at a fifth of a batched one's rate.
        The weight gradients are summed over each expert's tiles in at least fp32, each tile's product
        rounded to the compute dtype first (in bf16 a slightly larger error than one product per
        expert's block: mean absolute error about 1.1-1.2x in a check against fp64)."""
        if layout.num_adapted != num_adapted:
            raise ValueError(f"the layout has {layout.num_adapted} adapted experts, the plan {num_adapted}")
        self.layout = layout
        self.num_adapted = num_adapted  # experts with adapters; a last block (index E) runs the frozen FFN
        self.rank = rank
        self.scalings = scalings  # gate, up, down
        self.dropout_threshold = dropout_threshold  # of the down projection's LoRA input, out of 2**16
        self.act_fn = act_fn
        # `stacked_weights` computed ahead (a cache, for forwards without autograd), or None.
        self.stacks: list[torch.Tensor] | None = None
        self._groups: list[tuple[int, int, slice, int]] | None = None
        # rows of the frozen-FFN block, which comes last (none in a sync-free layout: top-k routing)
        self.frozen_rows = 0 if layout.sync_free else sum(layout.counts[num_adapted:])
        self.adapted_rows = layout.num_rows - self.frozen_rows
        self.grouped = layout.sync_free or (grouped and not layout.uniform and self.adapted_rows > 0)
        self.tiled = (tiled and not self.grouped and not layout.uniform and layout.bucket > 1
                      and self.adapted_rows > 0)
        # The expert of each tile of `bucket` rows (tiled only): capacities are multiples of the bucket. Built on
        # the host from the host's counts, then moved (nothing read back from a GPU).
        self.tile_expert = torch.arange(num_adapted).repeat_interleave(
            torch.tensor([c // layout.bucket for c in layout.capacities[:num_adapted]])
        ).to(layout.tokens.device) if self.tiled else None
        # Where each adapted expert's block ends (grouped matmuls' `offs`).
        self.offsets = layout.offsets if layout.sync_free else (
            torch.tensor(layout.capacities[:num_adapted], device=layout.tokens.device).cumsum(0).to(torch.int32)
            if self.grouped else None)

    def groups(self) -> list[tuple[int, int, slice, int]]:
        """`ExpertLayout.groups`, computed once per plan (every product of the kernel loops over them)."""
        if self._groups is None:
            self._groups = self.layout.groups()
        return self._groups

    def tile_weights(self, w: torch.Tensor) -> torch.Tensor:
        """w [E, K, N] (any strides) -> [tiles, K, N], each tile's expert's matrix. A transposed view of a
        contiguous stack is gathered from the stack and viewed transposed again (no transposing copy)."""
        if not w.is_contiguous() and w.transpose(1, 2).is_contiguous():
            return w.transpose(1, 2).index_select(0, self.tile_expert).transpose(1, 2)
        return w.index_select(0, self.tile_expert)

    def stacked_weights(self, params: tuple[torch.Tensor, ...], dtype: torch.dtype) -> list[torch.Tensor]:
        """The experts' LoRA weights stacked over experts and cast to `dtype` once per call:
        A_gate and A_up side by side [E, 2r, in], B_gate [E, F, r], B_up [E, F, r],
        A_down [E, r, F] with the dropout's 1 / (1 - p) folded in, B_down [E, H, r]."""
        e, r = self.num_adapted, self.rank
        a_gu = torch.cat([w for i in range(e) for w in (params[6 * i], params[6 * i + 2])]).to(dtype)
        stacks = [a_gu.view(e, 2 * r, -1)] + [torch.stack(params[j::6]).to(dtype) for j in (1, 3, 4, 5)]
        scale = keep_scale(self.dropout_threshold)
        if scale != 1.0:
            stacks[3].mul_(scale)  # a new tensor (torch.stack), never a parameter
        return stacks


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, *widths: int, sync_free: bool = False) -> bool:
    """Whether `torch._grouped_mm` runs the kernel's products here: a build that has it, a dtype it
    takes there (CPU: bf16, fp16, fp32; CUDA: bf16 on compute capability 8.0 or later; "meta", for
    shape checks: bf16, as CUDA), and every row width in bytes (hidden, FFN, rank) a multiple of 16.

    sync_free: also without reading the group offsets back to the host. On CUDA only torch's CUTLASS
    kernels do that (bf16 on compute capability 9.x or 10.x, Linux, not ROCm); elsewhere it falls back
    to one matmul per group after copying the offsets to the host, a synchronisation per call."""
    if not hasattr(torch, "_grouped_mm") or not all(w * dtype.itemsize % 16 == 0 for w in widths):
        return False
    if device.type == "cpu":
        return dtype in (torch.bfloat16, torch.float16, torch.float32)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if sync_free:
            return (dtype == torch.bfloat16 and major in (9, 10) and torch.version.hip is None
                    and sys.platform.startswith("linux"))
        return dtype == torch.bfloat16 and (major, minor) >= (8, 0)
    return device.type == "meta" and dtype == torch.bfloat16


def _bmm_view(t: torch.Tensor, rows: slice, experts: int, size: int) -> torch.Tensor:
    """Rows `rows` of a [rows, n] tensor as [experts, size, n] (a view)."""
    return t[rows].view(experts, size, t.shape[-1])


def _tile_view(plan: ExpertPlan, t: torch.Tensor) -> torch.Tensor:
    """The adapted rows of a [rows, n] tensor as [tiles, bucket, n] (a view; `plan.tiled`)."""
    return _bmm_view(t, slice(0, plan.adapted_rows), plan.tile_expert.numel(), plan.layout.bucket)


def block_mm(plan: ExpertPlan, a: torch.Tensor, w: torch.Tensor, acc: torch.Tensor | None = None,
             alpha: float = 1.0) -> torch.Tensor:
    """Per adapted expert e, the rows of e's block of `a` times w[e]: a [rows, K], w [E, K, N] (any
    strides) -> [adapted rows, N]. With `acc` ([>= adapted rows, N]), adds alpha times that into
    acc's first rows in place and returns acc."""
    n_rows = plan.adapted_rows
    if plan.grouped:
        out = torch._grouped_mm(a[:n_rows], w, offs=plan.offsets)
        if acc is None:
            return out
        acc[:n_rows].add_(out, alpha=alpha)
        return acc
    if plan.tiled:
        a_tiles, w_tiles = _tile_view(plan, a), plan.tile_weights(w)
        if acc is None:
            return torch.bmm(a_tiles, w_tiles).view(n_rows, w.shape[-1])
        _tile_view(plan, acc).baddbmm_(a_tiles, w_tiles, alpha=alpha)
        return acc
    out = a.new_empty(n_rows, w.shape[-1]) if acc is None else acc
    for e0, e1, sl, size in plan.groups():
        if e1 - e0 == 1:  # one expert: a plain matmul on row slices (fewer view ops than a 1-batch bmm)
            if acc is None:
                torch.mm(a[sl], w[e0], out=out[sl])
            else:
                acc[sl].addmm_(a[sl], w[e0], alpha=alpha)
        elif acc is None:
            torch.bmm(_bmm_view(a, sl, e1 - e0, size), w[e0:e1], out=_bmm_view(out, sl, e1 - e0, size))
        else:
            _bmm_view(acc, sl, e1 - e0, size).baddbmm_(_bmm_view(a, sl, e1 - e0, size), w[e0:e1], alpha=alpha)
    return out


def block_mm_t(plan: ExpertPlan, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per adapted expert e, (e's rows of a)^T times (e's rows of b): a [rows, M], b [rows, N] ->
    [E, M, N] (the weight gradients; undefined for an expert without rows). In the inputs' dtype, or at
    least fp32 when tiled."""
    n_rows = plan.adapted_rows
    if plan.grouped:
        return torch._grouped_mm(a[:n_rows].t(), b[:n_rows], offs=plan.offsets)
    if plan.tiled:  # per tile, then summed per expert in >= fp32 (as one matmul per expert accumulates)
        per_tile = torch.bmm(_tile_view(plan, a).transpose(1, 2), _tile_view(plan, b))
        total = per_tile.new_zeros(plan.num_adapted, a.shape[-1], b.shape[-1],
                                   dtype=torch.promote_types(per_tile.dtype, torch.float32))
        return total.index_add_(0, plan.tile_expert, per_tile.to(total.dtype))
    out = a.new_empty(plan.num_adapted, a.shape[-1], b.shape[-1])
    for e0, e1, sl, size in plan.groups():
        if e1 - e0 == 1:
            torch.mm(a[sl].t(), b[sl], out=out[e0])
            continue
        torch.bmm(_bmm_view(a, sl, e1 - e0, size).transpose(1, 2), _bmm_view(b, sl, e1 - e0, size), out=out[e0:e1])
    return out


def _with_frozen_rows(t: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """[adapted rows, N] -> [rows, N]: zeros for the frozen-FFN block (none with top-k routing)."""
    return torch.cat([t, t.new_zeros(plan.frozen_rows, t.shape[1])]) if plan.frozen_rows else t


class FusedLoraExperts(torch.autograd.Function):
    """All LoRA experts of one MixLoRA FFN with a hand-written backward.

    Inputs: the shared LoRA input x (dropout already applied) [T, H], the frozen gate and up
    outputs [T, F], the routing weights of the rows [rows, 1] (0 on padding rows), and per expert the weights
    (A_gate, B_gate, A_up, B_up, A_down, B_down). Outputs, per token:
        h_sum[t]   = sum_j w_j act(g_j) u_j                       [T, F]  (goes through W2 once)
        lora_sum[t] = sum_j w_j s_down B_down A_down drop(act(g_j) u_j)   [T, H]
    with g_j = W1 x + s_gate B_gate A_gate x (likewise u_j) for the expert of slot j.

    Autograd would keep about six [T*k, F] tensors per layer (gate, act, up, h, the dropout mask
    and the dropped h); this keeps the adapted gate and up and the dropped positions, and recomputes the
    rest in backward. It also replaces ~60 small autograd nodes per expert with one. The weights are
    cast once per call, stacked over experts, and every product runs over all experts' blocks at
    once (`block_mm`, `block_mm_t`: a batched matmul per group of equal-size blocks, see
    `ExpertLayout.groups`, one batched matmul over row tiles when `plan.tiled`, or one grouped matmul
    when `plan.grouped`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_base: torch.Tensor, up_base: torch.Tensor, weights: torch.Tensor,
                plan: ExpertPlan, *params: torch.Tensor):
        dtype, r = gate_base.dtype, plan.rank
        s_gate, s_up, s_down = plan.scalings
        stacks = plan.stacks if plan.stacks is not None else plan.stacked_weights(params, dtype)
        a_gu, b_g, b_u, a_d, b_d = stacks
        xs = rows(x, plan.layout.tokens)
        g = rows(gate_base, plan.layout.tokens)
        u = rows(up_base, plan.layout.tokens)
        low_gu = block_mm(plan, xs, a_gu.transpose(1, 2))  # [adapted rows, 2r]
        block_mm(plan, low_gu[:, :r], b_g.transpose(1, 2), acc=g, alpha=s_gate)
        block_mm(plan, low_gu[:, r:], b_u.transpose(1, 2), acc=u, alpha=s_up)
        h = plan.act_fn(g).mul_(u)
        w = weights.to(dtype)
        # Dropout of the down LoRA's input: zero the dropped positions of h for the A_down matmuls
        # and put the values back afterwards (h itself goes on to W2); no mask or copy of h.
        dropped = (dropped_positions(h.numel(), plan.dropout_threshold, h.device, h.shape[1]) if plan.dropout_threshold
                   else None)
        if dropped is not None:
            dropped_values = h.view(-1)[dropped]
            h.view(-1).index_fill_(0, dropped, 0)
        # The dropout's 1 / (1 - p) (1 without dropout) is folded into the small A matrix.
        low_d = block_mm(plan, h, a_d.transpose(1, 2))  # [adapted rows, r]
        lora_out = _with_frozen_rows(block_mm(plan, low_d, b_d.transpose(1, 2)), plan)  # no down LoRA there
        if dropped is not None:
            h.view(-1).index_copy_(0, dropped, dropped_values)  # repeated positions carry equal values
        # The routing weights (and s_down) go in as embedding_bag's per-sample weights: no pass over h.
        w_assign = w.view(-1)[plan.layout.inv]  # [T*k] in assignment order
        h_sum = rows_summed(h, plan.layout.inv, plan.layout.k, w_assign)
        lora_sum = rows_summed(lora_out, plan.layout.inv, plan.layout.k, w_assign * s_down)
        ctx.plan = plan
        ctx.param_dtypes = [p.dtype for p in params]
        # xs: the gathered x, not gathered again
        ctx.save_for_backward(xs, g, u, weights, dropped, low_gu, low_d, *stacks)
        return h_sum, lora_sum

    @staticmethod
    def backward(ctx, grad_h_sum: torch.Tensor, grad_lora_sum: torch.Tensor):
        # Everything here runs in the forward's dtype, whatever autocast state backward is called in.
        with autocast_off(grad_h_sum.device.type):
            return FusedLoraExperts._backward(ctx, grad_h_sum, grad_lora_sum)

    @staticmethod
    def _backward(ctx, grad_h_sum: torch.Tensor, grad_lora_sum: torch.Tensor):
        plan: ExpertPlan = ctx.plan
        xs, g, u, weights, dropped, low_gu, low_d, a_gu, b_g, b_u, a_d, b_d = ctx.saved_tensors
        dtype, r, n_rows = g.dtype, plan.rank, plan.adapted_rows
        s_gate, s_up, s_down = plan.scalings
        w = weights.to(dtype)
        # d loss / d (w h) and d loss / d lora_out per row (padding rows: their weight 0 stops them below)
        grad_hw = rows(grad_h_sum.to(dtype), plan.layout.tokens)
        grad_lora = rows(grad_lora_sum.to(dtype), plan.layout.tokens)
        with torch.enable_grad():
            g_leaf = g.detach().requires_grad_(True)
            act = plan.act_fn(g_leaf)
        h = act.detach() * u
        acc = torch.promote_types(dtype, torch.float32)  # routing-weight gradients summed in >= fp32
        grad_w = (grad_hw * h).sum(dim=1, keepdim=True).to(acc)
        grad_h = grad_hw.mul_(w)  # d/dh through the W2 path (grad_hw is not used again)
        if dropped is not None:
            # Dropped positions get only the W2 path's gradient: keep it to put back after the
            # LoRA path's additions below; h becomes the dropped input of A_down (h is not used again).
            w2_grad = grad_h.view(-1)[dropped]
            h.view(-1).index_fill_(0, dropped, 0)
        # Weight gradients per expert, stacked like the weights ([E, ...], in the compute dtype; >= fp32 tiled).
        t = block_mm(plan, grad_lora, b_d)  # [adapted rows, r]: d loss / d low_d, before the row's weight
        grad_w[:n_rows] += (t * low_d).sum(dim=1, keepdim=True, dtype=acc) * s_down
        row_scale = w[:n_rows] * s_down  # [adapted rows, 1]
        grad_low = t.mul_(row_scale)
        grad_b_d = block_mm_t(plan, grad_lora, low_d * row_scale)  # scales [., r], not [., H]
        grad_a_d = block_mm_t(plan, grad_low, h)
        block_mm(plan, grad_low, a_d, acc=grad_h)  # a_d holds the 1 / (1 - p)
        scale = keep_scale(plan.dropout_threshold)
        if scale != 1.0:
            grad_a_d.mul_(scale)
        if dropped is not None:
            grad_h.view(-1).index_copy_(0, dropped, w2_grad)
        grad_u = grad_h * act.detach()
        (grad_g,) = torch.autograd.grad(act, g_leaf, grad_h.mul_(u))
        grad_low_gu = torch.cat([block_mm(plan, grad_g, b_g).mul_(s_gate), block_mm(plan, grad_u, b_u).mul_(s_up)],
                                dim=1)  # [adapted rows, 2r]
        grad_a_gu = block_mm_t(plan, grad_low_gu, xs)
        grad_xs = _with_frozen_rows(block_mm(plan, grad_low_gu, a_gu), plan)
        grad_b_g = block_mm_t(plan, grad_g, low_gu[:, :r]).mul_(s_gate)
        grad_b_u = block_mm_t(plan, grad_u, low_gu[:, r:]).mul_(s_up)
        grad_x = rows_summed(grad_xs, plan.layout.inv, plan.layout.k)
        grad_gate = rows_summed(grad_g, plan.layout.inv, plan.layout.k)
        grad_up = rows_summed(grad_u, plan.layout.inv, plan.layout.k)
        # Experts that got no rows get no gradient (None), as if they had not run; in a sync-free
        # layout, which does not know which those are, a zero one (the grouped products give zeros).
        # The per-expert views come from one `unbind` per stack (not an index per expert and weight:
        # on a GPU, where these steps are bound by the host, every operator call counts).
        e_count, dtype0 = plan.num_adapted, ctx.param_dtypes[0]
        a_gate, a_up = grad_a_gu.to(dtype0).view(e_count, 2, r, -1).unbind(1)
        per_expert = list(zip(*(t.unbind(0) for t in (a_gate, grad_b_g.to(dtype0), a_up, grad_b_u.to(dtype0),
                                                      grad_a_d.to(dtype0), grad_b_d.to(dtype0)))))
        counts = plan.layout.counts if plan.layout.counts is not None else [1] * e_count
        grad_params = [g if count else None for count, grads in zip(counts, per_expert) for g in grads]
        return (grad_x, grad_gate, grad_up, grad_w.to(weights.dtype), None, *grad_params)
