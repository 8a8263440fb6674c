"""Row permutations and the fused LoRA-experts function behind the MixLoRA FFN's default path.

Assignments (token, slot) are sorted by expert, so expert e owns one contiguous block of rows;
`tokens[i]` is the token of row i and `inv` maps assignment t*k + j to its row (see `ExpertLayout`).
"""

from __future__ import annotations

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


def rows_summed(sorted_rows: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the sum of its k sorted rows ([T*k, F] -> [T, F]).

    `embedding_bag(mode="sum")` gathers and sums in one pass, without a [T*k, F] intermediate
    (about twice as fast as gather-then-sum on CPU).
    """
    return F.embedding_bag(inv.view(-1, k), sorted_rows.contiguous(), mode="sum")


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
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class ExpertLayout:
    """Where each (token, slot) assignment goes in the expert-sorted rows.

    Expert e's assignments form one contiguous block (stable order, so by token within it); the
    block of index E, "frozen FFN only" (switch-router overflow), comes last. With `bucket` > 1
    each adapted expert's block is padded to a multiple of `bucket` rows, so that the per-expert
    matmuls see only a few distinct shapes. That matters on CPU: oneDNN builds a kernel for every
    new bf16 matmul shape (about 0.6 ms, ten times the matmul itself at these sizes), and the
    routing changes the block sizes at every step. Padding rows copy token 0 and carry routing
    weight 0: no output reads them, and every gradient through them is multiplied by that 0.

    Fields: `tokens` [rows] the token of each row; `inv` [T*k] the row of assignment t*k + j;
    `source` [rows] the assignment of each row (T*k on padding rows); `counts` and `capacities`
    per block (real rows, rows with padding).
    """

    def __init__(self, flat_experts: torch.Tensor, num_experts: int, k: int, bucket: int = 1) -> None:
        num = flat_experts.numel()
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=num_experts + 1)
        self.k = k
        self.counts: list[int] = counts.tolist()
        self.capacities = [-(-n // bucket) * bucket if e < num_experts else n for e, n in enumerate(self.counts)]
        self.num_rows = sum(self.capacities)
        device = flat_experts.device
        row_of_sorted = torch.arange(num, device=device)  # row of the i-th assignment in sorted order
        self.tokens, self.source = order // k, order
        if self.num_rows != num:  # shift every block to its padded start; padding rows: token 0, no source
            caps = torch.tensor(self.capacities, device=device)
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

    def blocks(self, num_adapted: int):
        """(expert, row slice with padding) of every non-empty adapted expert's block."""
        start = 0
        for e, (n, cap) in enumerate(zip(self.counts, self.capacities)):
            if n and e < num_adapted:
                yield e, slice(start, start + cap)
            start += cap


class ExpertPlan:
    """What `FusedLoraExperts` needs besides tensors: the routing layout and the LoRA constants."""

    def __init__(self, layout: ExpertLayout, num_adapted: int, rank: int, scalings: tuple[float, float, float],
                 dropout_threshold: int, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.layout = layout
        self.num_adapted = num_adapted  # experts with adapters; a last block (index E) runs the frozen FFN
        self.rank = rank
        self.scalings = scalings  # gate, up, down
        self.dropout_threshold = dropout_threshold  # of the down projection's LoRA input, out of 2**16
        self.act_fn = act_fn

    @property
    def frozen_rows(self) -> int:
        """Rows of the frozen-FFN block, which comes last."""
        return sum(self.layout.counts[self.num_adapted:])

    def blocks(self):
        """(expert, row slice) of every non-empty block of adapted experts (padding included)."""
        return self.layout.blocks(self.num_adapted)


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
    rest in backward. It also replaces ~60 small autograd nodes per expert with one.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_base: torch.Tensor, up_base: torch.Tensor, weights: torch.Tensor,
                plan: ExpertPlan, *params: torch.Tensor):
        dtype, r = gate_base.dtype, plan.rank
        s_gate, s_up, s_down = plan.scalings
        xs = rows(x, plan.layout.tokens)
        g = rows(gate_base, plan.layout.tokens)
        u = rows(up_base, plan.layout.tokens)
        lows_gu: dict[int, torch.Tensor] = {}
        for e, sl in plan.blocks():
            a_g, b_g, a_u, b_u = (p.to(dtype) for p in params[6 * e:6 * e + 4])
            low = xs[sl] @ torch.cat([a_g, a_u]).t()  # [n, 2r]
            g[sl].addmm_(low[:, :r], b_g.t(), alpha=s_gate)
            u[sl].addmm_(low[:, r:], b_u.t(), alpha=s_up)
            lows_gu[e] = low
        h = plan.act_fn(g).mul_(u)
        w = weights.to(dtype)
        # Dropout of the down LoRA's input: zero the dropped positions of h for the A_down matmuls
        # and put the values back afterwards (h itself goes on to W2); no mask or copy of h.
        dropped = dropped_positions(h.numel(), plan.dropout_threshold, h.device) if plan.dropout_threshold else None
        if dropped is not None:
            dropped_values = h.view(-1)[dropped]
            h.view(-1).index_fill_(0, dropped, 0)
        lora_out = torch.empty(h.shape[0], x.shape[1], dtype=dtype, device=x.device)
        lora_out[h.shape[0] - plan.frozen_rows:].zero_()  # the frozen-FFN block has no down LoRA
        lows_d: dict[int, torch.Tensor] = {}
        scale = keep_scale(plan.dropout_threshold)
        for e, sl in plan.blocks():
            a_d, b_d = (p.to(dtype) for p in params[6 * e + 4:6 * e + 6])
            # The dropout's 1 / (1 - p) (1 without dropout) is folded into the small A matrix.
            low = h[sl] @ (a_d * scale).t()  # [n, r]
            torch.mm(low, b_d.t(), out=lora_out[sl])
            lows_d[e] = low
        if dropped is not None:
            h.view(-1).index_copy_(0, dropped, dropped_values)  # repeated positions carry equal values
        lora_out.mul_(w * s_down)
        h_sum = rows_summed(h.mul_(w), plan.layout.inv, plan.layout.k)
        lora_sum = rows_summed(lora_out, plan.layout.inv, plan.layout.k)
        ctx.plan = plan
        ctx.lows_gu, ctx.lows_d = lows_gu, lows_d
        ctx.save_for_backward(x, g, u, weights, dropped, *params)
        return h_sum, lora_sum

    @staticmethod
    def backward(ctx, grad_h_sum: torch.Tensor, grad_lora_sum: torch.Tensor):
        # Everything here runs in the forward's dtype, whatever autocast state backward is called in.
        with torch.autocast(grad_h_sum.device.type, enabled=False):
            return FusedLoraExperts._backward(ctx, grad_h_sum, grad_lora_sum)

    @staticmethod
    def _backward(ctx, grad_h_sum: torch.Tensor, grad_lora_sum: torch.Tensor):
        plan: ExpertPlan = ctx.plan
        x, g, u, weights, dropped, *params = ctx.saved_tensors
        dtype = g.dtype
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
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        scale = keep_scale(plan.dropout_threshold)
        for e, sl in plan.blocks():
            a_d, b_d = (p.to(dtype) for p in params[6 * e + 4:6 * e + 6])
            low = ctx.lows_d[e]
            t = grad_lora[sl] @ b_d  # [n, r]: d loss / d low, before the per-row weight
            grad_w[sl] += (t * low).sum(dim=1, keepdim=True, dtype=acc) * s_down
            row_scale = w[sl] * s_down  # [n, 1]
            grad_low = t.mul_(row_scale)
            grad_b_d = grad_lora[sl].t() @ (low * row_scale)  # scales [n, r], not [n, H]
            grad_a_d = (grad_low.t() @ h[sl]).mul_(scale)
            grad_h[sl].addmm_(grad_low, a_d * scale)
            grad_params[6 * e + 4] = grad_a_d.to(params[6 * e + 4].dtype)
            grad_params[6 * e + 5] = grad_b_d.to(params[6 * e + 5].dtype)
        if dropped is not None:
            grad_h.view(-1).index_copy_(0, dropped, w2_grad)
        grad_u = grad_h * act.detach()
        (grad_g,) = torch.autograd.grad(act, g_leaf, grad_h.mul_(u))
        xs = rows(x, plan.layout.tokens)
        grad_xs = torch.empty_like(xs)
        grad_xs[xs.shape[0] - plan.frozen_rows:].zero_()
        for e, sl in plan.blocks():
            a_g, b_g, a_u, b_u = (p.to(dtype) for p in params[6 * e:6 * e + 4])
            low = ctx.lows_gu[e]
            r = low.shape[1] // 2
            gg, gu = grad_g[sl], grad_u[sl]
            grad_low = torch.cat([gg @ b_g, gu @ b_u], dim=1)
            grad_low[:, :r] *= s_gate
            grad_low[:, r:] *= s_up
            grad_a = grad_low.t() @ xs[sl]
            torch.mm(grad_low, torch.cat([a_g, a_u]), out=grad_xs[sl])
            grad_params[6 * e] = grad_a[:r].to(params[6 * e].dtype)
            grad_params[6 * e + 1] = (gg.t() @ low[:, :r]).mul_(s_gate).to(params[6 * e + 1].dtype)
            grad_params[6 * e + 2] = grad_a[r:].to(params[6 * e + 2].dtype)
            grad_params[6 * e + 3] = (gu.t() @ low[:, r:]).mul_(s_up).to(params[6 * e + 3].dtype)
        grad_x = rows_summed(grad_xs, plan.layout.inv, plan.layout.k)
        grad_gate = rows_summed(grad_g, plan.layout.inv, plan.layout.k)
        grad_up = rows_summed(grad_u, plan.layout.inv, plan.layout.k)
        return (grad_x, grad_gate, grad_up, grad_w.to(weights.dtype), None, *grad_params)

