"""Callbacks: training throughput in tokens per second."""

from __future__ import annotations

import time
from collections import deque

import lightning.pytorch as pl


class TokenThroughput(pl.Callback):
    """Logs `train/tokens_per_sec` (real, non-padding tokens) and `train/examples_per_sec`,
    averaged over the last `window` optimizer steps."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._steps: deque[tuple[float, int, int]] = deque(maxlen=window)
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = int(batch["attention_mask"].sum()) * trainer.world_size
        self._steps.append((time.perf_counter() - self._start, tokens, batch["input_ids"].shape[0] * trainer.world_size))
        elapsed = sum(s[0] for s in self._steps)
        if elapsed > 0:
            pl_module.log("train/tokens_per_sec", sum(s[1] for s in self._steps) / elapsed, prog_bar=True)
            pl_module.log("train/examples_per_sec", sum(s[2] for s in self._steps) / elapsed)
