"""`MixLoraLitModule`: trains MixLoRA or a PEFT baseline on the multi-task mix and reports accuracy.

The LM loss is computed from the decoder's hidden states at supervised positions only (the
answer tokens), so the vocabulary projection never runs over prompt tokens. Evaluation is the
paper's label-token protocol: hidden state after the prompt -> LM head -> argmax over the
example's choice label tokens. Checkpoints hold only what trains (plus optimizer, scheduler and
RNG state); the frozen base is rebuilt from `base` when a run resumes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric, Metric

from .. import adapter_io, runs
from ..base_models import check_source, load_base_model, parse_dtype
from ..baselines import get_lora_model, matched_lora_rank
from ..config import MixLoraConfig
from ..data.encoding import cloze_choice_scores, predict_label_tokens
from ..errors import TrainingDiverged, UserError
from ..model import MixLoraModel, get_mixlora_model
from .records import run_dir

Method = Literal["mixlora", "mixlora-switch", "lora", "dora", "base"]
BASE = "base"  # no adapter: the frozen base model (zero-shot rows; `test` and `validate` only)


class RoutingCounts(Metric):
    """Tokens per expert per layer, summed over an evaluation epoch (and across DDP ranks)."""

    full_state_update = False

    def __init__(self, layers: int, experts: int) -> None:
        super().__init__()
        self.add_state("counts", default=torch.zeros(layers, experts, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, counts: torch.Tensor) -> None:
        self.counts += counts.to(self.counts)

    def compute(self) -> torch.Tensor:
        return self.counts


# MixLoraConfig fields a training run sets; their types and defaults come from MixLoraConfig.
ADAPTER_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "num_experts", "top_k",
                  "router_aux_loss_coef", "router_init_range", "jitter_noise", "expert_capacity",
                  "router_z_loss_coef", "use_dora", "use_rslora")


def _adapter_settings_class() -> type:
    hints = typing.get_type_hints(MixLoraConfig)
    config_fields = {f.name: f for f in dataclasses.fields(MixLoraConfig)}
    specs: list[tuple[str, Any, Any]] = [("method", Method, dataclasses.field(default="mixlora"))]
    for name in ADAPTER_FIELDS:
        source = config_fields[name]
        if source.default_factory is not dataclasses.MISSING:
            default = dataclasses.field(default_factory=source.default_factory)
        else:
            default = dataclasses.field(default=source.default)
        specs.append((name, hints[name], default))
    specs.append(("match_rank", bool, dataclasses.field(default=False)))
    doc = """What to train. `method`: `mixlora` (top-k), `mixlora-switch`, `lora` or `dora` (HF PEFT baselines),
    or `base` (no adapter: the frozen base model, scored with `mixlora-lit test`; nothing to fit).

    The other fields are `MixLoraConfig`'s, with its defaults and documentation. For `lora`/`dora`, r, lora_alpha, lora_dropout,
    target_modules and use_rslora apply, and `match_rank: true` picks the rank whose trainable
    parameter count matches MixLoRA with this r and `num_experts` (the paper's r=80 for 16 x 8),
    keeping alpha/r. `use_dora` with a MixLoRA method gives MixDoRA experts.
    """
    return dataclasses.make_dataclass("AdapterSettings", specs, namespace={"__doc__": doc, "__module__": __name__})


AdapterSettings = _adapter_settings_class()


@dataclass
class OptimizerSettings:
    """AdamW and its schedule: `constant`, `linear` or `cosine` decay after a linear warm-up.

    `fused`: torch's fused AdamW kernel (one pass over each tensor instead of about ten operations):
    `None` (default) where torch runs it for every trainable tensor (floating point on CPU, CUDA, MPS,
    XPU) and no loss scaler runs (`16-mixed`), else torch's default; `true` insists (an error where it
    cannot run), `false` never. Same update up to rounding (about 1 ulp); on a 2-core CPU the quickstart's
    MixLoRA step (1,710 tensors) took about a quarter of the for-loop's time (`benchmarks/bench_optimizer.py`).
    """

    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    fused: bool | None = None


def _torch_default_kernels(params: list[torch.Tensor]) -> tuple[bool | None, bool]:
    """(fused AdamW takes every tensor of `params`, torch's AdamW defaults to foreach for them), by torch's
    own rule (plain tensor types, floating point, a device with such kernels); a private helper of
    torch's, so (None, False), unknown, where a torch lacks it."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
        fused = bool(params) and _default_to_fused_or_foreach(params, differentiable=False, use_fused=True)[0]
        return fused, _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
    except (ImportError, TypeError):
        return None, False


def build_adamw(params: list[torch.Tensor], settings: OptimizerSettings,
                grad_scaler: bool = False) -> tuple[torch.optim.AdamW, str]:
    """AdamW over `params` as `settings` say, and which implementation runs: `fused`, `foreach` or
    `for-loop` (`settings.fused`: None picks fused where torch has it for every tensor). `grad_scaler`:
    training runs with a loss scaler (`16-mixed`), for which Lightning skips `unscale_` with a fused
    optimizer: gradient clipping then fails and FSDP ranks stop agreeing on skipped steps, so None means
    not fused there, and True is refused. The optimizer keeps its implementation through `load_state_dict`
    (`keep_adamw_kernel`)."""
    can_fuse, foreach = _torch_default_kernels(params)
    if settings.fused and grad_scaler:
        raise UserError("model.optimizer.fused=true is invalid with trainer.precision=16-mixed: Lightning's loss "
                        "scaler leaves unscaling to a fused optimizer, which breaks gradient clipping and FSDP; "
                        "expected null or false, or bf16-mixed")
    if settings.fused and can_fuse is False:  # torch itself would fail only at the first step
        devices = sorted({f"{p.device.type} {str(p.dtype).removeprefix('torch.')}" for p in params})
        raise UserError(f"model.optimizer.fused=true is invalid here: torch has no fused AdamW for these "
                        f"parameters ({', '.join(devices)}); expected null or false")
    fused = bool(can_fuse) and not grad_scaler if settings.fused is None else settings.fused
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                  betas=tuple(settings.betas), fused=fused or None)
    optimizer.register_load_state_dict_post_hook(keep_adamw_kernel)
    return optimizer, "fused" if fused else "foreach" if foreach else "for-loop"


def keep_adamw_kernel(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict`, which brings back the saved optimizer's `fused` and `foreach` flags, run
    the implementation `optimizer` was built with: a checkpoint written by a for-loop AdamW resumes fused,
    and the reverse, each with its `step` counters where that implementation wants them (fused: float32
    on the parameter's device; otherwise on the host, unless capturable, so no step reads the device)."""
    fused = bool(optimizer.defaults.get("fused"))
    host_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = (True, False) if fused else (None, optimizer.defaults.get("foreach"))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if not torch.is_tensor(state.get("step")):
                continue
            if fused:
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
            elif not group.get("capturable"):
                state["step"] = state["step"].to(device="cpu", dtype=host_dtype)


class MixLoraLitModule(pl.LightningModule):
    """One module for every method.

    Args:
        base: model alias (`smollm2-135m`, `gemma3-270m`), local HF directory or hub id.
        base_dtype: dtype of the frozen base; adapters stay fp32. `auto`: bf16 where the device runs it
            natively (GPUs; CPUs with AVX512-BF16 or AMX), else fp32 (AVX2-only CPUs emulate bf16, about
            6x slower than fp32). On GPU also `trainer.precision: bf16-mixed`. The dtype used is in
            run.json (`hardware.base_dtype`).
        adapter: the method and its hyperparameters (`AdapterSettings`).
        optimizer: AdamW settings and the learning-rate schedule (`OptimizerSettings`).
        execution_path: `fused` (default) or `reference` (MixLoRA only; the paper's formula as written).
        gradient_checkpointing: recompute decoder layers in backward to save memory.
        recompute_experts: recompute only the MixLoRA experts in backward (their per-(token, expert)
            activations are MixLoRA's extra memory over LoRA; see benchmarks/README.md).
        compile: `torch.compile` the decoder (in place, so checkpoint and adapter keys do not change).
            Needs a C++ compiler on CPU; the first steps of training and of validation compile
            (tens of seconds). The routed experts (training, and evaluation batches past the dense
            inference path) run eagerly inside the compiled decoder: their layout depends on the
            routing. See benchmarks/README.md for what it buys.
    """

    def __init__(self, base: str = "smollm2-135m", base_dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto",
                 adapter: AdapterSettings = AdapterSettings(), optimizer: OptimizerSettings = OptimizerSettings(),
                 execution_path: Literal["fused", "reference"] = "fused", gradient_checkpointing: bool = False,
                 recompute_experts: bool = False, compile: bool = False) -> None:
        super().__init__()
        if isinstance(adapter, dict):
            adapter = AdapterSettings(**adapter)
        if isinstance(optimizer, dict):
            optimizer = OptimizerSettings(**optimizer)
        self.save_hyperparameters({"base": base, "base_dtype": base_dtype, "adapter": asdict(adapter),
                                   "optimizer": asdict(optimizer), "execution_path": execution_path,
                                   "gradient_checkpointing": gradient_checkpointing,
                                   "recompute_experts": recompute_experts, "compile": compile})
        self.adapter, self.optim = adapter, optimizer
        _check_base(base)
        # Validate the adapter settings now, before any model is loaded.
        self.mixlora_config = self._mixlora_config() if adapter.method in ("mixlora", "mixlora-switch") else None
        if optimizer.warmup_steps < 0:
            raise UserError(f"optimizer.warmup_steps={optimizer.warmup_steps} is invalid: expected an integer >= 0")
        self.model: nn.Module | None = None
        self.optimizer_kernel: str | None = None  # set by configure_optimizers
        self.task_names: list[str] = []
        self.eval_history: list[dict[str, Any]] = []  # every evaluation pass: accuracy and routing counts
        self.last_eval: dict[str, dict[str, Any]] = {}  # split -> the last pass's scores and predictions
        self._pending_predictions: dict[str, list] = {"val": [], "test": []}
        self.strict_loading = False  # checkpoints omit the frozen base; on_load_checkpoint checks the rest

    # ------------------------------------------------------------------ construction
    def _mixlora_config(self) -> MixLoraConfig:
        a = self.adapter
        return MixLoraConfig(**{name: getattr(a, name) for name in ADAPTER_FIELDS}, routing_strategy=a.method,
                             base_model_name_or_path=self.hparams.base)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp, a = self.hparams, self.adapter
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        self.base_torch_dtype = parse_dtype(hp.base_dtype, device)
        base, self.tokenizer = load_base_model(hp.base, dtype=self.base_torch_dtype)
        if self.mixlora_config is not None:
            model = get_mixlora_model(base, self.mixlora_config)
            model.set_execution_path(hp.execution_path)
            model.set_recompute_experts(hp.recompute_experts)
            self.lora_rank = a.r
        elif a.method == BASE:
            model = base.requires_grad_(False)
            self.lora_rank = None
        else:
            rank, alpha = a.r, a.lora_alpha
            if a.match_rank:
                reference = MixLoraConfig(r=a.r, lora_alpha=a.lora_alpha, num_experts=a.num_experts,
                                          target_modules=list(a.target_modules), use_dora=a.method == "dora")
                rank = matched_lora_rank(base, reference, multiple_of=8 if a.r >= 8 else 1)
                alpha = a.lora_alpha / a.r * rank
            model = get_lora_model(base, rank, alpha, a.lora_dropout, a.target_modules,
                                   use_dora=a.method == "dora", use_rslora=a.use_rslora)
            self.lora_rank = rank
        if hp.gradient_checkpointing:
            causal_lm(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            causal_lm(model).enable_input_require_grads()
        if hp.get("compile", False):
            causal_lm(model).get_decoder().compile()
        self.model = model
        self.model.train(self.training)

    # ------------------------------------------------------------------ forward pieces
    def _hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        decoder = causal_lm(self.model).get_decoder()
        return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).last_hidden_state

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        lm = causal_lm(self.model)
        logits = lm.get_output_embeddings()(hidden)
        cap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _aux_loss(self, attention_mask: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, MixLoraModel):
            return self.model.aux_loss(attention_mask)
        return torch.zeros((), device=attention_mask.device)

    def losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(LM loss over supervised tokens, router aux loss, number of supervised tokens)."""
        hidden = self._hidden(batch)
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        logits = self._head(hidden[:, :-1][keep])  # only where a label is supervised
        lm_loss = F.cross_entropy(logits.float(), labels[keep])
        return lm_loss, self._aux_loss(batch["attention_mask"]), int(keep.sum())

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        lm_loss, aux_loss, n_tokens = self.losses(batch)
        loss = lm_loss + aux_loss
        if not torch.isfinite(loss):
            raise self._non_finite(batch_idx, f"lm_loss={lm_loss.item()}, aux_loss={aux_loss.item()}")
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/lm_loss", lm_loss, batch_size=bs)
        self.log("train/aux_loss", aux_loss, batch_size=bs)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._check_finite_weights(batch_idx)

    def _check_finite_weights(self, batch_idx: int) -> None:
        """A diverging update (finite loss, overflowing weights) must stop the run before a checkpoint
        stores it. One total norm (foreach kernels, one read of the device, instead of one per tensor:
        about 1,700 per step for MixLoRA on SmolLM2, each a GPU sync) screens every trainable tensor;
        only when it is not finite (a non-finite weight, or a norm past the dtype's range) is each checked."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            return
        total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
        with torch.no_grad():
            norm = (total_norm(trainable) if total_norm is not None else  # per tensor, still one read:
                    torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p).float() for p in trainable])))
        if not torch.isfinite(norm):
            for name, param in self.model.named_parameters():
                if param.requires_grad and not torch.isfinite(param).all():
                    raise self._non_finite(batch_idx, f"the optimizer step made {name} non-finite")

    def _non_finite(self, batch_idx: int, detail: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"non-finite training loss or weights at global step {self.global_step} (epoch {self.current_epoch}, "
            f"batch {batch_idx}): {detail}; stopping. The last checkpoint saved before this step is intact; "
            f"lower the learning rate or check the data.")

    # ------------------------------------------------------------------ evaluation
    def _ensure_metrics(self) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(dm, "tasks", []) or [])
        if not names:
            raise RuntimeError("MixLoraLitModule needs a MultiTaskDataModule (for the task names)")
        if names == self.task_names and hasattr(self, "acc"):
            return
        self.task_names = names
        self.acc = nn.ModuleDict({stage: nn.ModuleDict({t: MeanMetric() for t in names}) for stage in ("val", "test")})
        self.acc_norm = nn.ModuleDict({stage: nn.ModuleDict({t: MeanMetric() for t in names})
                                       for stage in ("val", "test")})  # cloze only
        if isinstance(self.model, MixLoraModel):
            layers = len(self.model.moe_layers())
            self.routing = nn.ModuleDict({s: RoutingCounts(layers, self.mixlora_config.num_experts)
                                          for s in ("val", "test")})
        self.acc.to(self.device)
        self.acc_norm.to(self.device)
        if hasattr(self, "routing"):
            self.routing.to(self.device)

    def setup(self, stage: str) -> None:
        self.configure_model()  # Lightning calls setup first; the metrics need the model's layer count
        # Metric state must not be created under inference mode (validation runs in it).
        with torch.inference_mode(False):
            self._ensure_metrics()

    def predictions(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The predicted choice of every example in an evaluation batch: (by label token or by summed
        log-likelihood, by log-likelihood per character for cloze batches else None)."""
        if "score_pos" not in batch:
            return predict_label_tokens(self.model, batch), None
        hidden = self._hidden(batch)
        logits = self._head(hidden[batch["score_row"], batch["score_pos"]]).float()  # continuation positions only
        logprobs = logits.log_softmax(-1).gather(1, batch["score_tok"].unsqueeze(1)).squeeze(1)
        total, norm = cloze_choice_scores(logprobs, batch)
        return total.argmax(1), norm.argmax(1)

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        preds, preds_norm = self.predictions(batch)
        correct = (preds == batch["label"]).float()
        correct_norm = (preds_norm == batch["label"]).float() if preds_norm is not None else None
        for t, name in enumerate(self.task_names):
            sel = batch["task"] == t
            if sel.any():
                self.acc[stage][name].update(correct[sel])
                if correct_norm is not None:
                    self.acc_norm[stage][name].update(correct_norm[sel])
        self._pending_predictions[stage].append(
            (batch["task"].tolist(), list(batch["id"]), batch["label"].tolist(), preds.tolist(),
             preds_norm.tolist() if preds_norm is not None else [None] * len(batch["id"])))
        if isinstance(self.model, MixLoraModel):
            self.routing[stage].update(self.model.routing_statistics(batch["attention_mask"]))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        preds, preds_norm = self.predictions(batch)
        return {"task": batch["task"], "id": batch["id"], "prediction": preds, "prediction_norm": preds_norm,
                "label": batch["label"]}

    def _gathered_predictions(self, stage: str) -> list[dict[str, Any]]:
        """This pass's per-example predictions from every rank, each example once."""
        protocol = getattr(self.trainer.datamodule, "protocol", None)
        rows = [{"task": self.task_names[t], "id": i, "label": y, "prediction": p, "correct": p == y,
                 "protocol": protocol, "step": self.trained_steps,
                 **({"prediction_norm": q, "correct_norm": q == y} if q is not None else {})}
                for tasks, ids, labels, preds, preds_norm in self._pending_predictions[stage]
                for t, i, y, p, q in zip(tasks, ids, labels, preds, preds_norm)]
        self._pending_predictions[stage] = []
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, rows)
            rows = [row for part in parts for row in part]
        unique = {(r["task"], r["id"]): r for r in rows}  # the eval shards are disjoint; this only guards
        return list(unique.values())

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = (list(self.acc[stage].values()) + list(self.acc_norm[stage].values())
                   + ([self.routing[stage]] if hasattr(self, "routing") else []))
        if self.trainer.sanity_checking:  # a partial pass: nothing to report
            for metric in metrics:
                metric.reset()
            self._pending_predictions[stage] = []
            return
        scores = {}
        for name in self.task_names:
            metric = self.acc[stage][name]
            if metric.update_count == 0:
                continue
            scores[name] = metric.compute().item()
            self.log(f"{stage}/{name}/acc", scores[name], sync_dist=False)
            metric.reset()
        if scores:
            self.log(f"{stage}/avg_acc", runs.scores_with_average(scores)["avg"], prog_bar=stage == "val")
        scores_norm = {}
        for name in self.task_names:
            metric = self.acc_norm[stage][name]
            if metric.update_count:
                scores_norm[name] = metric.compute().item()
                self.log(f"{stage}/{name}/acc_norm", scores_norm[name], sync_dist=False)
                metric.reset()
        if scores_norm:
            self.log(f"{stage}/avg_acc_norm", runs.scores_with_average(scores_norm)["avg"])
        entry: dict[str, Any] = {"stage": stage, "step": self.trained_steps, "acc": scores}
        if scores_norm:
            entry["acc_norm"] = scores_norm
        health = None
        if hasattr(self, "routing"):
            counts = self.routing[stage].compute().long().tolist()
            health = runs.routing_health(counts)
            for key, value in health.items():
                self.log(f"{stage}/routing/{key}", value)
            entry["routing_counts"] = counts
            self.routing[stage].reset()
            if stage == "val" and not self.trainer.sanity_checking:
                self._warn_unhealthy_routing(counts)
        if scores:
            entry["avg_acc"] = runs.scores_with_average(scores)["avg"]
        self.eval_history.append(entry)
        self.last_eval[stage] = {"acc": scores, "acc_norm": scores_norm, "routing": health,
                                 "predictions": self._gathered_predictions(stage)}

    def _warn_unhealthy_routing(self, counts: list[list[int]]) -> None:
        """Dead experts (no token in a validation pass) and collapse (one expert takes nearly all of a
        layer's tokens for COLLAPSE_PATIENCE validation passes in a row), named by layer."""
        top_k = self.mixlora_config.top_k if self.mixlora_config.routing_strategy == "mixlora" else 1
        alarms = runs.routing_alarms(counts, top_k)
        streak = getattr(self, "_collapse_streak", {})
        self._collapse_streak = {layer: streak.get(layer, 0) + 1 for layer in alarms["collapsed"]}
        step = self.trained_steps
        if alarms["dead"]:
            where = "; ".join(f"layer {layer}: experts {experts}" for layer, experts in alarms["dead"].items())
            rank_zero_warn(f"routing at step {step}: dead experts (no validation token): {where}")
        lasting = {layer: alarms["collapsed"][layer] for layer, n in self._collapse_streak.items()
                   if n >= runs.COLLAPSE_PATIENCE}
        if lasting:
            where = "; ".join(f"layer {layer}: expert {e} takes {share:.0%} of tokens"
                              for layer, (e, share) in lasting.items())
            rank_zero_warn(f"routing at step {step}: router collapse for {runs.COLLAPSE_PATIENCE}+ validations "
                           f"in a row: {where}")

    def on_validation_epoch_end(self) -> None:
        with torch.inference_mode(False):  # reset() must not leave inference tensors as metric state
            self._eval_epoch_end("val")
        # Validation inside a fit leaves the random state as the last training step left it (its data
        # loader draws a seed): training continues the same with or without evaluations, and a checkpoint
        # written after the pass holds the state the next step uses.
        rng = getattr(self, "_rng_after_step", None)
        if rng is not None and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng:
                torch.cuda.set_rng_state_all(rng["cuda"])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._rng_after_step = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._rng_after_step["cuda"] = torch.cuda.get_rng_state_all()

    def on_test_epoch_end(self) -> None:
        with torch.inference_mode(False):
            self._eval_epoch_end("test")

    # ------------------------------------------------------------------ what the run record needs
    def describe_adapter(self) -> dict[str, Any]:
        """The method's hyperparameters as trained (with the matched rank for LoRA/DoRA)."""
        if self.adapter.method == BASE:
            return {"method": BASE}
        out = asdict(self.adapter)
        if self.mixlora_config is not None:
            out.update(self.mixlora_config.to_dict())
        if getattr(self, "lora_rank", None) is not None:
            out["trained_rank"] = self.lora_rank
        return out

    @property
    def trained_steps(self) -> int:
        """Optimizer steps behind the current weights (validate/test restore them without the fit loop)."""
        return self.global_step or getattr(self, "_checkpoint_step", 0)

    def parameter_counts(self) -> tuple[int | None, int | None]:
        """(trainable, total) parameters of the adapted model; (None, None) before it is built."""
        if self.model is None:
            return None, None
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        if self.adapter.method == BASE:
            raise UserError("model.adapter.method=base has nothing to train: score the base model with "
                            "`mixlora-lit test --config ... --model.adapter.method=base`")
        hp = self.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) is not None  # 16-mixed
        optimizer, self.optimizer_kernel = build_adamw(params, hp, grad_scaler=scaler)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = hp.warmup_steps

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if hp.scheduler == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if hp.scheduler == "linear":
                return 1.0 - progress
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def _trainable_keys(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        checkpoint["mixlora_eval_history"] = self.eval_history  # a resumed fit's records keep earlier passes
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        expected, saved = self._trainable_keys(), set(checkpoint["state_dict"])
        if saved != expected:
            missing, extra = sorted(expected - saved), sorted(saved - expected)
            raise UserError(f"checkpoint does not match this model: missing {missing[:3]}, unexpected {extra[:3]} "
                            f"(was it trained with another method, base or adapter shape?)")
        # Restored just before the next training batch: creating the dataloader iterator draws from the RNG.
        self._pending_rng = checkpoint.get("rng_state")
        self._checkpoint_step = int(checkpoint.get("global_step", 0))
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.eval_history = list(checkpoint.get("mixlora_eval_history", []))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        rng, self._pending_rng = getattr(self, "_pending_rng", None), None
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        directory = run_dir(self.trainer)  # on every rank: a collective call under DDP
        if self.trainer.global_rank != 0:
            return
        self.export_adapter(runs.adapter_dir(directory), training_config=directory / runs.CONFIG)

    def export_adapter(self, directory: str | os.PathLike, training_config: Path | None = None) -> Path:
        """save_pretrained of the trained adapter, with the resolved training config beside it."""
        def write(folder: Path) -> None:
            if isinstance(self.model, MixLoraModel):
                adapter_io.write_adapter_files(self.model.adapter_state_dict(), self.model.mixlora_config, folder)
            else:  # PEFT LoRA / DoRA
                self.model.save_pretrained(folder)
            if training_config is not None and training_config.is_file():
                (folder / runs.TRAINING_CONFIG).write_text(training_config.read_text())

        return adapter_io.save_adapter_atomically(directory, write)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a MixLoraModel or a PEFT model."""
    if isinstance(model, MixLoraModel):
        return model.base_model
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _check_base(base: str) -> None:
    try:
        check_source(base)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"base={base!r} is invalid: {err}") from err
