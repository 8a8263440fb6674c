"""`MixLoraLitModule`: trains MixLoRA or a PEFT baseline on the multi-task mix and reports accuracy.

The LM loss is computed from the decoder's hidden states at supervised positions only (the
answer tokens), so the vocabulary projection never runs over prompt tokens. Evaluation is the
paper's label-token protocol: hidden state after the prompt -> LM head -> argmax over the
example's choice label tokens. Checkpoints hold only what trains (plus optimizer, scheduler and
RNG state); the frozen base is rebuilt from `base` when a run resumes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric

from ..base_models import check_source, load_base_model
from ..baselines import get_lora_model, matched_lora_rank
from ..config import ALL_TARGETS, MixLoraConfig
from ..data.encoding import label_token_predictions
from ..model import MixLoraModel, get_mixlora_model

Method = Literal["mixlora", "mixlora-switch", "lora", "dora"]


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


def routing_health(counts: torch.Tensor) -> dict[str, float]:
    """Load entropy (normalised to [0, 1], mean over layers), dead-expert fraction, max load share."""
    counts = counts.double()
    share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(1) / math.log(counts.shape[1]) if counts.shape[1] > 1 \
        else torch.ones(counts.shape[0], dtype=torch.float64)
    return {"load_entropy": entropy.mean().item(), "dead_expert_frac": (counts == 0).double().mean().item(),
            "max_load_share": share.max().item()}


@dataclass
class AdapterSettings:
    """What to train. `method`: `mixlora` (top-k), `mixlora-switch`, `lora` or `dora` (HF PEFT baselines).

    r, lora_alpha, lora_dropout, target_modules: LoRA hyperparameters (MixLoRA: per expert).
    match_rank: for `lora`/`dora`, use the rank whose trainable parameter count matches MixLoRA with
        this r and `num_experts` (the paper's r=80 for 16 x 8), keeping alpha/r.
    The rest are `MixLoraConfig` fields; `router_init_range`/`jitter_noise` default to 0.02/0.0 for
    top-k and 1.0/0.01 for switch routing; `use_dora` gives MixDoRA experts.
    """

    method: Method = "mixlora"
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    match_rank: bool = False
    num_experts: int = 8
    top_k: int | None = None
    router_aux_loss_coef: float = 0.001
    router_init_range: float | None = None
    jitter_noise: float | None = None
    expert_capacity: int = 32
    router_z_loss_coef: float = 0.001
    use_dora: bool = False
    use_rslora: bool = False


@dataclass
class OptimizerSettings:
    """AdamW and its schedule: `constant`, `linear` or `cosine` decay after a linear warm-up."""

    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0


class MixLoraLitModule(pl.LightningModule):
    """One module for every method.

    Args:
        base: model alias (`smollm2-135m`, `gemma3-270m`), local HF directory or hub id.
        base_dtype: dtype of the frozen base; adapters stay fp32 (`bf16` on CPU; on GPU also
            `trainer.precision: bf16-mixed`).
        adapter: the method and its hyperparameters (`AdapterSettings`).
        optimizer: AdamW settings and the learning-rate schedule (`OptimizerSettings`).
        execution_path: `fused` (default) or `reference` (MixLoRA only; the paper's formula as written).
        gradient_checkpointing: recompute decoder layers in backward to save memory.
        recompute_experts: recompute only the MixLoRA experts in backward (their per-(token, expert)
            activations are MixLoRA's extra memory over LoRA; see benchmarks/README.md).
        compile: `torch.compile` the decoder (in place, so checkpoint and adapter keys do not change).
            Needs a C++ compiler on CPU; the first steps of training and of validation compile
            (tens of seconds). See benchmarks/README.md for what it buys.
    """

    def __init__(self, base: str = "smollm2-135m", base_dtype: Literal["bf16", "fp32", "fp16"] = "bf16",
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
            raise ValueError(f"optimizer.warmup_steps={optimizer.warmup_steps} is invalid: expected an integer >= 0")
        self.model: nn.Module | None = None
        self.task_names: list[str] = []
        self.eval_history: list[dict[str, Any]] = []
        self.strict_loading = False  # checkpoints omit the frozen base; on_load_checkpoint checks the rest

    # ------------------------------------------------------------------ construction
    def _mixlora_config(self) -> MixLoraConfig:
        a = self.adapter
        switch = a.method == "mixlora-switch"
        return MixLoraConfig(
            r=a.r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, target_modules=list(a.target_modules),
            routing_strategy=a.method, num_experts=a.num_experts, top_k=a.top_k,
            router_aux_loss_coef=a.router_aux_loss_coef,
            router_init_range=a.router_init_range if a.router_init_range is not None else (1.0 if switch else 0.02),
            jitter_noise=a.jitter_noise if a.jitter_noise is not None else (0.01 if switch else 0.0),
            expert_capacity=a.expert_capacity, router_z_loss_coef=a.router_z_loss_coef, use_dora=a.use_dora,
            use_rslora=a.use_rslora, base_model_name_or_path=self.hparams.base)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp, a = self.hparams, self.adapter
        base, self.tokenizer = load_base_model(hp.base, dtype=hp.base_dtype)
        if self.mixlora_config is not None:
            model = get_mixlora_model(base, self.mixlora_config)
            model.set_execution_path(hp.execution_path)
            model.set_recompute_experts(hp.recompute_experts)
            self.lora_rank = a.r
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
            raise FloatingPointError(
                f"non-finite training loss or weights at global step {self.global_step} (epoch {self.current_epoch}, batch "
                f"{batch_idx}): lm_loss={lm_loss.item()}, aux_loss={aux_loss.item()}; stopping. The last checkpoint "
                f"saved before this step is intact; lower the learning rate or check the data.")
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/lm_loss", lm_loss, batch_size=bs)
        self.log("train/aux_loss", aux_loss, batch_size=bs)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # A diverging update (finite loss, overflowing weights) must stop the run before a checkpoint stores it.
        for name, param in self.model.named_parameters():
            if param.requires_grad and not torch.isfinite(param).all():
                raise FloatingPointError(
                    f"non-finite training loss or weights at global step {self.global_step} (epoch {epoch}, batch "
                    f"{batch_idx}): the optimizer step made {name} non-finite; stopping. The last checkpoint saved "
                    f"before this step is intact; lower the learning rate or check the data.")

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
        if isinstance(self.model, MixLoraModel):
            layers = len(self.model.moe_layers())
            self.routing = nn.ModuleDict({s: RoutingCounts(layers, self.mixlora_config.num_experts)
                                          for s in ("val", "test")})
        self.acc.to(self.device)
        if hasattr(self, "routing"):
            self.routing.to(self.device)

    def setup(self, stage: str) -> None:
        self.configure_model()  # Lightning calls setup first; the metrics need the model's layer count
        # Metric state must not be created under inference mode (validation runs in it).
        with torch.inference_mode(False):
            self._ensure_metrics()

    def predictions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self._hidden(batch)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["last_index"]]
        return label_token_predictions(self._head(last), batch["last_index"], batch["choice_ids"])

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        preds = self.predictions(batch)
        correct = (preds == batch["label"]).float()
        for t, name in enumerate(self.task_names):
            sel = batch["task"] == t
            if sel.any():
                self.acc[stage][name].update(correct[sel])
        if isinstance(self.model, MixLoraModel):
            self.model.aux_loss(batch["attention_mask"])  # records the mask for the routing statistics
            self.routing[stage].update(self.model.routing_statistics())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"task": batch["task"], "prediction": self.predictions(batch), "label": batch["label"]}

    def _eval_epoch_end(self, stage: str) -> None:
        if self.trainer.sanity_checking:  # a partial pass: nothing to report
            for metric in list(self.acc[stage].values()) + ([self.routing[stage]] if hasattr(self, "routing") else []):
                metric.reset()
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
            avg = sum(scores.values()) / len(scores)
            self.log(f"{stage}/avg_acc", avg, prog_bar=stage == "val")
        entry: dict[str, Any] = {"stage": stage, "step": self.global_step, "acc": scores}
        if hasattr(self, "routing"):
            counts = self.routing[stage].compute()
            for key, value in routing_health(counts).items():
                self.log(f"{stage}/routing/{key}", value)
            entry["routing_counts"] = counts.long().tolist()
            self.routing[stage].reset()
        if scores:
            entry["avg_acc"] = sum(scores.values()) / len(scores)
        self.eval_history.append(entry)
        self._write_history()

    def on_validation_epoch_end(self) -> None:
        with torch.inference_mode(False):  # reset() must not leave inference tensors as metric state
            self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        with torch.inference_mode(False):
            self._eval_epoch_end("test")

    def _run_dir(self) -> Path | None:
        if self._trainer is None:
            return None
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(log_dir) if log_dir else None

    def _write_history(self) -> None:
        run_dir = self._run_dir()
        if run_dir is None or self.trainer.global_rank != 0 or self.trainer.sanity_checking:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "eval_history.json", "w", encoding="utf8") as fh:
            json.dump(self.eval_history, fh, indent=1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
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
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        expected, saved = self._trainable_keys(), set(checkpoint["state_dict"])
        if saved != expected:
            missing, extra = sorted(expected - saved), sorted(saved - expected)
            raise ValueError(f"checkpoint does not match this model: missing {missing[:3]}, unexpected {extra[:3]} "
                             f"(was it trained with another method, base or adapter shape?)")
        # Restored just before the next training batch: creating the dataloader iterator draws from the RNG.
        self._pending_rng = checkpoint.get("rng_state")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        rng, self._pending_rng = getattr(self, "_pending_rng", None), None
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        run_dir = self._run_dir()  # on every rank: trainer.log_dir is a collective call under DDP
        if run_dir is None or self.trainer.global_rank != 0:
            return
        self.export_adapter(run_dir / "adapter", training_config=run_dir / "config.yaml")

    def export_adapter(self, directory: str | os.PathLike, training_config: Path | None = None) -> Path:
        """save_pretrained of the trained adapter, with the resolved training config beside it."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if training_config is not None and training_config.is_file():
            (directory / "training_config.yaml").write_text(training_config.read_text())
        return directory


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
        raise ValueError(f"base={base!r} is invalid: {err}") from err
