"""`RunRecorder`: writes the run directory's records (`mixlora_lit.runs`) from a Lightning run.

Every file a run leaves behind besides Lightning's own (logs, checkpoints) is written here, through
`mixlora_lit.runs`: `run.json` at the start and end of each stage and after every evaluation pass,
`eval_history.json`, and `predictions/<split>.jsonl`. Rank 0 writes; the module has already
gathered every rank's predictions.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from .. import runs
from ..base_models import native_bf16
from .callbacks import TokenThroughput


def run_dir(trainer: pl.Trainer) -> Path:
    """The run directory: the logger's version folder, else `default_root_dir`.

    A collective call under DDP (`trainer.log_dir` broadcasts rank 0's value): call it on every rank.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def _command_line() -> str:
    """The command that runs this process, as a user would type it."""
    argv = list(sys.argv)
    if argv and (Path(argv[0]).name == "mixlora-lit" or argv[0].endswith(os.path.join("mixlora_lit", "cli.py"))):
        argv[0] = "mixlora-lit"
    return shlex.join(argv)


class RunRecorder(pl.Callback):
    """Keeps `run.json`, `eval_history.json` and the per-example predictions of a run up to date.

    Status: `running` from the start of each stage, `finished` when it ends, `failed` (with the error)
    when it raises. A run killed outright (SIGKILL, lost machine) keeps `running`; every file is
    replaced atomically, so it is never half written.
    """

    def __init__(self, run_name: str | None = None) -> None:
        self.run_name = run_name
        self._started = time.perf_counter()
        self._own_started_at = self._started_at = runs.timestamp()
        self._record: runs.RunRecord | None = None
        self._environment: dict[str, Any] | None = None
        self._directory: Path | None = None  # known from setup on: on_exception may run on one rank only
        self._prior_wall_time = 0.0
        self._previous: runs.RunRecord | None = None

    # ------------------------------------------------------------------ building the record
    def _environment_info(self, trainer: pl.Trainer) -> dict[str, Any]:
        if self._environment is None:
            gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
            extra = {"bf16_native": native_bf16(trainer.strategy.root_device)}
            self._environment = {"versions": runs.package_versions(), "git_commit": runs.git_commit(),
                                 "hardware": runs.hardware(threads=torch.get_num_threads(), gpu=gpu,
                                                           devices=trainer.world_size, **extra)}
        return self._environment

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, **changes: Any) -> runs.RunRecord:
        if self._record is None:
            dm = trainer.datamodule
            seed = os.environ.get("PL_GLOBAL_SEED")
            self._record = runs.RunRecord(
                method=pl_module.adapter.method, base=pl_module.hparams.base,
                protocol=getattr(dm, "protocol", "paper"), tasks=list(getattr(dm, "tasks", [])),
                seed=int(seed) if seed is not None else None,
                run_name=self.run_name, started_at=self._started_at, command=_command_line(),
                **self._environment_info(trainer))
        record = self._record
        dtype = getattr(pl_module, "base_torch_dtype", None)
        if dtype is not None:  # what `base_dtype` (e.g. `auto`) resolved to, once the model is built
            record.hardware["base_dtype"] = str(dtype).removeprefix("torch.")
        kernel = getattr(pl_module, "optimizer_kernel", None)
        if kernel is not None:  # what `optimizer.fused` resolved to: fused, foreach or for-loop AdamW
            record.hardware["optimizer_kernel"] = kernel
        record.adapter = pl_module.describe_adapter()
        trainable, total = pl_module.parameter_counts()
        record.trainable_params, record.total_params = trainable, total
        record.global_step = pl_module.trained_steps
        record.wall_time_s = round(self._prior_wall_time + time.perf_counter() - self._started, 3)
        throughput = next((cb for cb in trainer.callbacks if isinstance(cb, TokenThroughput)), None)
        if throughput is not None and throughput.history:
            record.tokens_per_s = runs.median(throughput.history)
        if trainer.ckpt_path:
            record.resumed_from = str(trainer.ckpt_path)
        for key, value in changes.items():
            setattr(record, key, value)
        return record

    def _continue_record(self, trainer: pl.Trainer) -> None:
        """A fit resumed in its own run directory (`--ckpt_path last`) keeps the run's start time and adds
        the wall time already spent (including the steps lost after the checkpoint). Called once the
        checkpoint is known (`trainer.ckpt_path` is set after `setup`), with the record read at `setup`."""
        previous, self._previous = self._previous, None
        directory, ckpt = self._directory, trainer.ckpt_path
        resumed = (previous is not None and directory is not None and bool(ckpt) and trainer.state.fn == "fit"
                   and Path(ckpt).resolve().parent.parent == directory.resolve())
        self._adopt(previous if resumed else None)

    def _adopt(self, previous: runs.RunRecord | None) -> None:
        """Count from `previous`'s start time and wall time, or (None) from this process's own."""
        self._prior_wall_time = (previous.wall_time_s or 0.0) if previous is not None else 0.0
        self._started_at = (previous.started_at or self._own_started_at) if previous is not None \
            else self._own_started_at
        if self._record is not None:
            self._record.started_at = self._started_at

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, **changes: Any) -> None:
        directory = run_dir(trainer)  # collective: every rank
        if trainer.global_rank != 0:
            return
        self._update(trainer, pl_module, **changes).write(directory)

    # ------------------------------------------------------------------ stages
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._directory = run_dir(trainer)  # collective: every rank
        try:  # the record this run replaces: a resumed fit continues it (on_train_start)
            self._previous = runs.read_record(self._directory) if stage == "fit" else None
        except (OSError, ValueError):
            self._previous = None
        # A fit in the folder of a run that did not finish is most likely its resumption: carry its start
        # and wall time from now on, so that a process killed before training starts (while the model
        # loads) does not erase them; on_train_start confirms or undoes this once the checkpoint is known.
        if self._previous is not None and self._previous.status != "finished":
            self._adopt(self._previous)
        self._write(trainer, pl_module, status="running", stage=stage, error=None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._continue_record(trainer)
        self._write(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._write(trainer, pl_module, status="finished", stage=stage)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        error = f"{type(exception).__name__}: {exception}"
        if trainer.global_rank != 0 or self._directory is None:  # no collective call: other ranks may be stuck
            return
        status = "failed"
        if type(exception).__name__ == "SIGTERMException":  # SigtermCheckpoint saved the step: resumable
            status, error = "interrupted", f"stopped by SIGTERM at step {trainer.global_step}"
        try:
            self._update(trainer, pl_module, status=status, error=error[:2000]).write(self._directory)
        except Exception:  # noqa: BLE001 - never hide the original error behind a record-keeping one
            pass

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        directory = run_dir(trainer)  # collective: every rank saves (rank 0 writes the file)
        if trainer.global_rank == 0 and self._record is not None:  # global step and throughput so far
            self._update(trainer, pl_module).write(directory)

    # ------------------------------------------------------------------ evaluation passes
    def _after_eval(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        if trainer.sanity_checking:
            return
        directory = run_dir(trainer)
        if trainer.global_rank != 0:
            return
        result = pl_module.last_eval.get(split)
        if result is None:
            return
        runs.write_eval_history(directory, pl_module.eval_history)
        if result["predictions"]:
            runs.write_predictions(directory, split, result["predictions"])
        record = self._update(trainer, pl_module)
        # Exact fractions from the per-example lines (the logged metric is the same in float32).
        exact = runs.accuracy_by_task(result["predictions"]) if result["predictions"] else None
        setattr(record, split, exact or runs.scores_with_average(result["acc"]))
        if result.get("acc_norm"):  # cloze: the per-character choice too
            rows = result["predictions"]
            setattr(record, f"{split}_norm", runs.accuracy_by_task(rows, key="correct_norm") if rows
                    else runs.scores_with_average(result["acc_norm"]))
        if result.get("routing"):
            record.routing[split] = result["routing"]
        record.write(directory)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_eval(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_eval(trainer, pl_module, "test")
