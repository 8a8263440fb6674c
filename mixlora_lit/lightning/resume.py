"""Interrupted runs: atomic checkpoints, a checkpoint on SIGTERM, and resuming in the same run directory.

- `AtomicCheckpointIO`: every checkpoint Lightning writes goes to a temporary file in the target's
  directory, is fsynced and renamed over the old one. Lightning's own writer stages the file in the
  system temporary directory and moves it, which is a copy (not atomic, no fsync) when that directory
  is on another filesystem than the run, as on most clusters.
- `SigtermCheckpoint`: Lightning stops a run at the end of the batch in progress when it receives
  SIGTERM (what SLURM and other schedulers send before a kill); this callback then writes
  `checkpoints/last.ckpt`, so `--ckpt_path last` continues from that very step.
- `ResumableCSVLogger`: `metrics.csv` of a resumed run keeps the rows logged before the checkpoint's
  step (the steps after it are trained and logged again) instead of being deleted by CSVLogger.
"""

from __future__ import annotations

import csv
import io
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from .. import runs


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes are atomic: temporary file beside the target, fsync, rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote filesystems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()  # serialise first: a failure while pickling never touches the file
        torch.save(checkpoint, buffer)
        runs.write_atomic(path, lambda fh: fh.write(buffer.getbuffer()))


def is_sigterm(exception: BaseException) -> bool:
    return type(exception).__name__ == "SIGTERMException"


def validates_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether the fit loop runs a validation pass right after the training batch in progress (the
    loop's own rule, so it agrees with the loop)."""
    loop = trainer.fit_loop.epoch_loop
    return bool(trainer.enable_validation) and loop._should_check_val_fx(trainer.fit_loop._data_fetcher)


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose every-n-steps save, on a step followed by a validation pass, is written at the
    end of that pass instead of before it.

    Lightning resumes a checkpoint written at the end of a training batch by skipping the validation that
    was due after that batch, so a fit resumed from there would miss one evaluation. Written after the
    pass, the checkpoint holds the pass's scores, and Lightning resumes it without validating twice. (The
    module leaves the random state after a validation pass as the training step left it, so the
    checkpoint also holds the state the next step uses.)
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and pl_module.automatic_optimization and not self._should_skip_saving_checkpoint(trainer) \
                and validates_after_this_batch(trainer):
            self._defer_save_until_validation = True  # ModelCheckpoint's own mechanism: saved on_validation_end
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class SigtermCheckpoint(pl.Callback):
    """On SIGTERM during a fit, write `last.ckpt` where a resumed fit continues exactly, then let
    Lightning stop the run.

    The signal is held back (Lightning's own handler would stop the loops at once, in the middle of a
    validation pass if one is running) until the next point where ModelCheckpoint itself would save:
    the end of the training batch in progress, or, when a validation pass follows that batch (or is
    running), the end of that pass, which is completed and recorded. There the checkpoint is written
    and the signal passed on to Lightning, which ends the fit. Under DDP the ranks agree on the point
    (any rank that received the signal stops them all).
    """

    def __init__(self) -> None:
        self._directory: Path | None = None
        self._held = False
        self._after_validation = False
        self._lightning_handler: Any = None
        self.saved: tuple[str, int] | None = None
        self.pending = False  # SIGTERM came after the last step (set at teardown)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        callback = trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None)
        self._directory = Path(dirpath) if dirpath else Path(trainer.log_dir or trainer.default_root_dir) / \
            runs.CHECKPOINTS_DIR  # collective under DDP: every rank runs setup

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has installed its SIGTERM handler by now (after on_fit_start); put ours in front of it.
        if threading.current_thread() is threading.main_thread():
            self._lightning_handler = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._hold)

    def _hold(self, signum: int, frame: Any) -> None:
        self._held = True

    def _any_rank_held(self, trainer: pl.Trainer) -> bool:
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(self._held, all=False))
        return self._held

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._lightning_handler is None or not self._any_rank_held(trainer):
            return
        if validates_after_this_batch(trainer):
            self._after_validation = True
        else:
            self._stop(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._lightning_handler is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self._after_validation or self._any_rank_held(trainer):
            self._stop(trainer)

    def _stop(self, trainer: pl.Trainer) -> None:
        self._held = self._after_validation = False
        path = self._directory / runs.LAST_CHECKPOINT
        trainer.save_checkpoint(path)  # every rank, at the same batch
        self.saved = (str(path), trainer.global_step)
        handler, self._lightning_handler = self._lightning_handler, None
        signal.signal(signal.SIGTERM, handler)
        if callable(handler):
            handler(signal.SIGTERM, None)  # Lightning's: the loops stop after this batch or pass

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if is_sigterm(exception) and self.saved is not None:
            exception.mixlora_checkpoint = self.saved  # for the one-line exit message

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._lightning_handler is not None and signal.getsignal(signal.SIGTERM) == self._hold:
            signal.signal(signal.SIGTERM, self._lightning_handler)
        self._lightning_handler = None
        self.pending = self._held  # came after the last step: the CLI stops before its next stage
        self._held = False


class _ResumedWriter(ExperimentWriter):
    """ExperimentWriter that keeps the rows of an existing metrics.csv logged before `keep_before`."""

    def __init__(self, log_dir: str, keep_before: int) -> None:
        self.keep_before = keep_before
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="", encoding="utf8") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            kept = [row for row in reader if row.get("step") and int(float(row["step"])) < self.keep_before]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept)
        runs.write_text_atomic(path, out.getvalue())
        self.metrics_keys = header  # later saves append under the same header (or rewrite it for new keys)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that continues `metrics.csv` of the version it resumes (see `_ResumedWriter`)."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._resume_step is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedWriter(self.log_dir, keep_before=self._resume_step)
        return super().experiment


def checkpoint_step(path: str | Path) -> int:
    """The global step stored in a Lightning checkpoint (loaded as data only, memory-mapped)."""
    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("global_step", 0))
