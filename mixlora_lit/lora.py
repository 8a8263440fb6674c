"""LoRA pieces shared by the attention adapters and the FFN experts.

`LoraAdapter` holds one low-rank update (A, B, dropout, scaling, optional DoRA magnitude) but
no base weight, so several experts can share one frozen `nn.Linear`. `LoraLinear` is a frozen
`nn.Linear` plus one adapter, used for q/k/v/o; it can merge its update into the base weight.

Adapter weights are kept in `adapter_dtype` (fp32 by default) while the base may be bf16: the
LoRA branch runs in the adapter dtype and its output is cast back, as PEFT does.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


# Below this drop probability, dropped positions are drawn directly (sparse) instead of a mask.
SPARSE_DROPOUT_MAX_P = 0.125


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], threshold: int, device: torch.device) -> torch.Tensor:
    """A boolean keep-mask, each element kept with probability 1 - threshold / 2**16.

    The bits come from full-range 64-bit draws cut into four 16-bit lanes: random number generation
    dominates dropout on CPU, and this draws a quarter as many numbers as one per element.
    """
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    return (bits.view(torch.int16)[:n] >= threshold - 32768).view(shape)


@torch.compiler.disable  # data-dependent size: under torch.compile it runs eagerly instead of recompiling per count
def dropped_positions(numel: int, threshold: int, device: torch.device, width: int | None = None,
                      row_order: bool | None = None) -> torch.Tensor:
    """Flat positions (int64, possibly repeated) of the elements that dropout zeroes, in a tensor of
    `numel` elements seen as rows of `width` (the last dimension; None: one row).

    Every element is dropped independently with probability p = threshold / 2**16, exactly as with a
    Bernoulli mask. For small p (the usual LoRA dropout of 0.05) the positions are drawn directly,
    N ~ Poisson(n * lam) of them, uniform with replacement, lam = -ln(1 - p). By Poisson splitting
    each element is then hit a Poisson(lam) number of times independently of the others, so it is
    hit at least once with probability 1 - e^-lam = p. That draws about 0.05 n random numbers
    instead of a mask of n, and the positions are all the caller needs to zero.

    With `row_order` (default: on the CPU only) each row draws its own count, Poisson(width * lam), so
    the positions come in row order and the gathers and scatters that use them sweep the tensor once
    (about twice as fast over a [1280, 1536] fp32 tensor as scattered positions). Without it (default
    off the CPU) the one count comes from the host's generator: per-row counts drawn on the device
    would need their total on the host, a synchronisation that stalls a GPU at every call, and
    scattered positions cost a GPU nothing extra. For larger p the positions come from a keep mask
    (`nonzero`, which synchronises).
    (torch.randint's modulo reduction adds a relative bias below width / 2**32.)
    """
    p = threshold / 65536
    if p > SPARSE_DROPOUT_MAX_P:
        return torch.nonzero(~dropout_keep_mask((numel,), threshold, device)).squeeze(1)
    if numel == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    lam = -math.log1p(-p)
    if not (torch.device(device).type == "cpu" if row_order is None else row_order):
        count = int(torch.poisson(torch.tensor(lam * numel, dtype=torch.float64)).item())  # a host tensor
        return torch.randint(numel, (count,), device=device)
    width = width or numel
    if numel % width:
        raise ValueError(f"{numel} elements are not rows of {width}")
    rate_dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no fp64
    rate = torch.full((numel // width,), lam * width, dtype=rate_dtype, device=device)
    starts = torch.repeat_interleave(torch.arange(0, numel, width, device=device), torch.poisson(rate).to(torch.int64))
    return starts.add_(torch.randint(width, starts.shape, device=device))


_optimizer_step_hook = None


def _count_optimizer_updates(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """torch's fused optimizers (`fused=True`: AdamW, Adam, SGD, Adagrad; torch 2.13, seen on CPU), and
    others' fused kernels (apex, bitsandbytes, DeepSpeed), update the parameters in place without bumping
    their version counters, which `weight_cache` relies on (a cache would then serve the weights before
    the step): after any optimizer's step, bump those of the parameters it could have updated (those with
    a gradient), as an in-place operation does. An extra bump is harmless (a cache rebuilt once more)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if params:
        torch.autograd.graph.increment_version(params)


def _watch_optimizer_steps() -> None:
    """From the first cached weights on, every optimizer step in this process reports its in-place
    updates (a global post-step hook of torch.optim, registered once)."""
    global _optimizer_step_hook
    if _optimizer_step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _optimizer_step_hook = register_optimizer_step_post_hook(_count_optimizer_updates)


def weight_cache(owner: nn.Module, attr: str, linears: Callable[[], Iterable[nn.Module]], dtype: object,
                 build: Callable[[], Any]):
    """`build()`, remembered on `owner` until the `weight` of any of the modules `linears()` names changes
    (an optimizer step, a load, a move) or `dtype` differs (a dtype, or any comparable key of what else
    `build` depends on). For forwards without autograd (evaluation, generation), where the casts and
    concatenations of small adapter weights would otherwise repeat at every call. A change is what bumps
    a tensor's version counter, as every in-place operation does (see `_count_optimizer_updates` for the
    exception), or a new tensor in the module's place (`load_state_dict(assign=True)`, `.to()`).

    Checked at every call, so the check is kept cheap: a decoding step checks about 1,700 weights
    (SmolLM2, MixLoRA on every projection); walking the modules for them at each check made the checks
    about a tenth of the step. `linears()` is called once per owner and `attr`; the modules and their
    parameter dicts are remembered and each weight is read from its dict at each check, so a replaced
    Parameter is seen. A module replaced by another after that first call is not: the adapters' modules
    are fixed when the model is built."""
    if torch.compiler.is_compiling():
        # Traced by torch.compile: built inside the graph at each call instead, since reading a weight's
        # address or version counter (the check) would break the graph there, and the compiled decoder
        # into pieces (a compiled decoding step then took twice the eager one's time).
        return build()
    cached = owner.__dict__.get(attr)
    slots = cached[0] if cached is not None else [(m, m._parameters) for m in linears()]
    # A weight outside its module's parameter dict is read as an attribute: FSDP (original parameters) puts a
    # plain tensor there during its forwards, and parametrisations a property.
    weights = [params["weight"] if "weight" in params else module.weight for module, params in slots]
    key = (dtype, [w.data_ptr() for w in weights], [w._version for w in weights])
    if cached is not None and cached[1] == key:
        return cached[2]
    _watch_optimizer_steps()
    with torch.no_grad():
        value = build()
    owner.__dict__[attr] = (slots, key, value)
    return value


def keep_scale(threshold: int) -> float:
    """Inverted dropout's 1 / (1 - p) for a drop threshold out of 2**16."""
    return 65536.0 / (65536 - threshold) if threshold < 65536 else 0.0


class FastDropout(nn.Module):
    """Inverted dropout that zeroes drawn positions (`dropped_positions`) instead of multiplying by a
    Bernoulli mask: for p = 0.05 on CPU, about 0.05 random numbers per element instead of one, and
    no mask tensor. The drop probability is quantised to multiples of 2**-16.

    `zero_dropped(x)` returns x with the dropped elements zeroed but not rescaled, for callers that
    fold `keep_scale` into a small weight (the LoRA A matrix) instead of scaling the activations.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = int(round(p * 65536))
        self.keep_scale = keep_scale(self.threshold)

    @property
    def active(self) -> bool:
        return self.training and self.threshold > 0

    def zero_dropped(self, x: torch.Tensor) -> torch.Tensor:
        out = x.contiguous().clone()
        out.view(-1).index_fill_(0, dropped_positions(x.numel(), self.threshold, x.device, x.shape[-1]), 0)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        return self.zero_dropped(x).mul_(self.keep_scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LoraAdapter(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        base_weight: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.r = r
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout = FastDropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.use_dora = use_dora
        if use_dora:
            if base_weight is None:
                raise ValueError("DoRA needs the base weight to initialise its magnitude")
            # m starts at ||W||_row, so the adapter is the identity at initialisation.
            self.lora_magnitude = nn.Parameter(
                torch.linalg.vector_norm(base_weight.detach().to(dtype), dim=1).to(device)
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.weight.dtype

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B A dropout(x), computed in the activation dtype.

        The weights (fp32 masters) are cast to the activations' dtype, not the other way round: casting
        a bf16 activation to fp32 costs more than the LoRA matmuls themselves, and bf16 matmuls are fast
        on these CPUs and on GPUs. Gradients still accumulate into the fp32 weights.
        """
        if self.plain_inference():
            a, b = self.inference_weights(x.dtype)
            return F.linear(F.linear(x, a), b)
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        # lora_dropout is a FastDropout or an Identity. Dropout's 1 / (1 - p) and the LoRA scaling
        # go into the small matrices, not the [tokens, features] activations.
        if isinstance(self.lora_dropout, FastDropout) and self.lora_dropout.active:
            x, a = self.lora_dropout.zero_dropped(x), a * self.lora_dropout.keep_scale
        return F.linear(F.linear(x, a), b * self.scaling)

    def plain_inference(self) -> bool:
        """No autograd and no active dropout (evaluation, decoding): the cached `inference_weights` apply."""
        return not torch.is_grad_enabled() and not (isinstance(self.lora_dropout, FastDropout) and self.lora_dropout.active)

    def inference_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, scaling * B) in `dtype`, for forwards without autograd, cached until the weights change."""
        return weight_cache(self, "_inference_weights", lambda: (self.lora_A, self.lora_B), dtype,
                            lambda: (self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype) * self.scaling))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def dora_scale(self, base: nn.Linear) -> torch.Tensor:
        """m / ||W + s B A||_row; the norm is detached as in the DoRA paper (sec. 4.3) and PEFT."""
        weight = base.weight.to(self.dtype) + self.delta_weight()
        norm = torch.linalg.vector_norm(weight, dim=1).detach()
        return self.lora_magnitude / norm

    def adapted_output(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        """Output of the adapted layer given the frozen layer's output `base_out = base(x)`."""
        delta = self.delta(x)
        if not self.use_dora:
            return base_out + delta.to(base_out.dtype)
        delta = delta.to(self.dtype)
        bias = base.bias
        linear = base_out if bias is None else base_out - bias
        out = self.dora_scale(base) * (linear.to(self.dtype) + delta)
        out = out.to(base_out.dtype)
        return out if bias is None else out + bias


class LoraLinear(LoraAdapter):
    """A frozen `nn.Linear` with one LoRA (or DoRA) adapter; used for attention projections."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False,
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(base_layer.in_features, base_layer.out_features, r, lora_alpha, lora_dropout,
                         use_rslora, use_dora, base_weight=base_layer.weight, dtype=adapter_dtype,
                         device=base_layer.weight.device)
        self.base_layer = base_layer
        self.merged = False
        self._dora_norm: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # some transformers code reads `proj.weight.dtype`
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base_layer(x)
        if self.merged:
            return base_out
        if self.plain_inference() and not self.use_dora and base_out.dtype == x.dtype:
            # Evaluation and decoding: the update added into the fresh base output in one matmul
            # (base_out += (x A^T) (s B)^T), two operations fewer per projection than `delta` + add.
            a, b = self.inference_weights(x.dtype)
            base_out.view(-1, base_out.shape[-1]).addmm_(F.linear(x.reshape(-1, x.shape[-1]), a), b.t())
            return base_out
        return self.adapted_output(x, base_out, self.base_layer)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base_layer.weight
        merged = weight.to(self.dtype) + self.delta_weight()
        if self.use_dora:
            norm = torch.linalg.vector_norm(merged, dim=1)
            self._dora_norm = norm
            merged = (self.lora_magnitude / norm).unsqueeze(1) * merged
        weight.copy_(merged.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Exact in fp32/fp64; in bf16 the round trip loses the low bits of the base weight."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        current = weight.to(self.dtype)
        if self.use_dora:
            current = current * (self._dora_norm / self.lora_magnitude).unsqueeze(1)
            self._dora_norm = None
        weight.copy_((current - self.delta_weight()).to(weight.dtype))
        self.merged = False

