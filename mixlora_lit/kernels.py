"""Row permutations and the fused LoRA-experts function behind the MixLoRA FFN's default path.

Assignments (token, slot) are sorted by expert, so expert e owns one contiguous block of rows;
`tokens[i]` is the token of sorted row i and `inv` its inverse (row of assignment t*k + j).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .lora import dropout_keep_mask, keep_scale


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


class ExpertPlan:
    """What `FusedLoraExperts` needs besides tensors: the routing layout and the LoRA constants."""

    def __init__(self, tokens: torch.Tensor, inv: torch.Tensor, k: int, counts: Sequence[int], num_adapted: int,
                 rank: int, scalings: tuple[float, float, float], dropout_threshold: int,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.tokens, self.inv, self.k = tokens, inv, k
        self.counts = list(counts)
        self.num_adapted = num_adapted  # experts with adapters; a last block (index E) runs the frozen FFN
        self.rank = rank
        self.scalings = scalings  # gate, up, down
        self.dropout_threshold = dropout_threshold  # of the down projection's LoRA input, out of 2**16
        self.act_fn = act_fn

    @property
    def frozen_rows(self) -> int:
        """Rows of the frozen-FFN block, which comes last in the sorted order."""
        return sum(self.counts[self.num_adapted:])

    def blocks(self):
        """(expert, row slice) of every non-empty block of adapted experts."""
        start = 0
        for e, n in enumerate(self.counts):
            if n and e < self.num_adapted:
                yield e, slice(start, start + n)
            start += n


class FusedLoraExperts(torch.autograd.Function):
    """All LoRA experts of one MixLoRA FFN with a hand-written backward.

    Inputs: the shared LoRA input x (dropout already applied) [T, H], the frozen gate and up
    outputs [T, F], the routing weights of the sorted rows [T*k, 1], and per expert the weights
    (A_gate, B_gate, A_up, B_up, A_down, B_down). Outputs, per token:
        h_sum[t]   = sum_j w_j act(g_j) u_j                       [T, F]  (goes through W2 once)
        lora_sum[t] = sum_j w_j s_down B_down A_down drop(act(g_j) u_j)   [T, H]
    with g_j = W1 x + s_gate B_gate A_gate x (likewise u_j) for the expert of slot j.

    Autograd would keep about six [T*k, F] tensors per layer (gate, act, up, h, the dropout mask
    and the dropped h); this keeps the adapted gate and up and a boolean mask, and recomputes the
    rest in backward. It also replaces ~60 small autograd nodes per expert with one.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_base: torch.Tensor, up_base: torch.Tensor, weights: torch.Tensor,
                plan: ExpertPlan, *params: torch.Tensor):
        dtype, r = gate_base.dtype, plan.rank
        s_gate, s_up, s_down = plan.scalings
        xs = rows(x, plan.tokens)
        g = rows(gate_base, plan.tokens)
        u = rows(up_base, plan.tokens)
        lows_gu: dict[int, torch.Tensor] = {}
        for e, sl in plan.blocks():
            a_g, b_g, a_u, b_u = (p.to(dtype) for p in params[6 * e:6 * e + 4])
            low = xs[sl] @ torch.cat([a_g, a_u]).t()  # [n, 2r]
            g[sl].addmm_(low[:, :r], b_g.t(), alpha=s_gate)
            u[sl].addmm_(low[:, r:], b_u.t(), alpha=s_up)
            lows_gu[e] = low
        h = plan.act_fn(g).mul_(u)
        keep = dropout_keep_mask(h.shape, plan.dropout_threshold, h.device) if plan.dropout_threshold else None
        w = weights.to(dtype)
        lora_out = torch.empty(h.shape[0], x.shape[1], dtype=dtype, device=x.device)
        lora_out[h.shape[0] - plan.frozen_rows:].zero_()  # the frozen-FFN block has no down LoRA
        lows_d: dict[int, torch.Tensor] = {}
        scale = keep_scale(plan.dropout_threshold)
        for e, sl in plan.blocks():
            a_d, b_d = (p.to(dtype) for p in params[6 * e + 4:6 * e + 6])
            # The dropout's 1 / (1 - p) is folded into the small A matrix.
            hd, a_d = (h[sl], a_d) if keep is None else (torch.where(keep[sl], h[sl], 0), a_d * scale)
            low = hd @ a_d.t()  # [n, r]
            torch.mm(low, b_d.t(), out=lora_out[sl])
            lows_d[e] = low
        lora_out.mul_(w * s_down)
        h_sum = rows_summed(h.mul_(w), plan.inv, plan.k)
        lora_sum = rows_summed(lora_out, plan.inv, plan.k)
        ctx.plan = plan
        ctx.lows_gu, ctx.lows_d = lows_gu, lows_d
        ctx.save_for_backward(x, g, u, weights, keep, *params)
        return h_sum, lora_sum

    @staticmethod
    def backward(ctx, grad_h_sum: torch.Tensor, grad_lora_sum: torch.Tensor):
        # Everything here runs in the forward's dtype, whatever autocast state backward is called in.
        with torch.autocast(grad_h_sum.device.type, enabled=False):
            return FusedLoraExperts._backward(ctx, grad_h_sum, grad_lora_sum)

    @staticmethod
    def _backward(ctx, grad_h_sum: torch.Tensor, grad_lora_sum: torch.Tensor):
        plan: ExpertPlan = ctx.plan
        x, g, u, weights, keep, *params = ctx.saved_tensors
        dtype = g.dtype
        s_gate, s_up, s_down = plan.scalings
        w = weights.to(dtype)
        grad_hw = rows(grad_h_sum.to(dtype), plan.tokens)  # d loss / d (w h) per sorted row
        grad_lora = rows(grad_lora_sum.to(dtype), plan.tokens)
        with torch.enable_grad():
            g_leaf = g.detach().requires_grad_(True)
            act = plan.act_fn(g_leaf)
        h = act.detach() * u
        acc = torch.promote_types(dtype, torch.float32)  # routing-weight gradients summed in >= fp32
        grad_w = (grad_hw * h).sum(dim=1, keepdim=True).to(acc)
        grad_h = grad_hw.mul_(w)  # d/dh through the W2 path (grad_hw is not used again)
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
            if keep is None:
                grad_a_d = grad_low.t() @ h[sl]
                grad_h[sl] += grad_low @ a_d
            else:
                grad_a_d = (grad_low.t() @ torch.where(keep[sl], h[sl], 0)).mul_(scale)
                grad_h[sl] += torch.where(keep[sl], grad_low @ (a_d * scale), 0)
            grad_params[6 * e + 4] = grad_a_d.to(params[6 * e + 4].dtype)
            grad_params[6 * e + 5] = grad_b_d.to(params[6 * e + 5].dtype)
        grad_u = grad_h * act.detach()
        (grad_g,) = torch.autograd.grad(act, g_leaf, grad_h.mul_(u))
        xs = rows(x, plan.tokens)
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
        grad_x = rows_summed(grad_xs, plan.inv, plan.k)
        grad_gate = rows_summed(grad_g, plan.inv, plan.k)
        grad_up = rows_summed(grad_u, plan.inv, plan.k)
        return (grad_x, grad_gate, grad_up, grad_w.to(weights.dtype), None, *grad_params)

