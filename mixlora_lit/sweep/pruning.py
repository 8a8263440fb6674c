"""Pruning inside a trial's `mixlora-lit fit` process, keyed on the global step.

optuna-integration's `PyTorchLightningPruningCallback` reports at `trainer.current_epoch`; our
step-limited runs validate several times inside epoch 0 and Optuna keeps only the first value per
step, so every later report would be dropped. This callback reports at `trainer.global_step`,
skips the pass before training (step 0: the untrained base, the same for every trial), and stops
the run cleanly when the pruner says so: the run record is written as usual, and the trial's
`pruned_at_step` user attribute tells the sweep worker to record the trial as PRUNED.
"""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import optuna

from .spec import TRIAL_ENV


class StepPruning(pl.Callback):
    """`pruner`: the sweep file's `{name: <optuna.pruners class>, ...arguments}` (a study's pruner is not
    kept in its storage, so each process that asks `should_prune` builds it)."""

    def __init__(self, storage: str, study: str, trial_id: int, metric: str, pruner: dict) -> None:
        self.metric = metric
        settings = {k: v for k, v in pruner.items() if k != "name"}
        loaded = optuna.load_study(study_name=study, storage=optuna.storages.RDBStorage(storage),
                                   pruner=getattr(optuna.pruners, pruner["name"])(**settings))
        self.trial = optuna.trial.Trial(loaded, trial_id)
        self.pruned_at: int | None = None

    @classmethod
    def from_env(cls) -> "StepPruning | None":
        raw = os.environ.get(TRIAL_ENV)
        if not raw:
            return None
        info = json.loads(raw)
        return cls(info["storage"], info["study"], int(info["trial_id"]), info["metric"], info["pruner"])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or trainer.global_step == 0 or self.pruned_at:
            return
        value = trainer.callback_metrics.get(self.metric)
        prune = False
        if trainer.global_rank == 0 and value is not None:  # one rank reports and asks; all ranks follow it
            self.trial.report(float(value), step=trainer.global_step)
            prune = self.trial.should_prune()
        if trainer.world_size > 1:
            prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned_at = trainer.global_step
            if trainer.global_rank == 0:
                self.trial.set_user_attr("pruned_at_step", trainer.global_step)
            pl_module.print(f"trial {self.trial.number}: pruned at step {trainer.global_step} "
                            f"({self.metric}={float(value):.4f})")
            trainer.should_stop = True
