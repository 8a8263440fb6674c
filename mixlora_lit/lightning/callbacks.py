"""Callbacks: training throughput in tokens per second."""

from __future__ import annotations

import time
from collections import deque

import lightning.pytorch as pl
from ..errors import UserError


class TokenThroughput(pl.Callback):
    """Logs `train/tokens_per_sec` (real, non-padding tokens) and `train/examples_per_sec`,
    averaged over the last `window` optimizer steps. `history` keeps every logged tokens/s value
    (the run record reports their median)."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._steps: deque[tuple[float, int, int]] = deque(maxlen=window)
        self._start = 0.0
        self.history: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = int(batch["attention_mask"].sum()) * trainer.world_size
        self._steps.append((time.perf_counter() - self._start, tokens, batch["input_ids"].shape[0] * trainer.world_size))
        elapsed = sum(s[0] for s in self._steps)
        if elapsed > 0:
            self.history.append(sum(s[1] for s in self._steps) / elapsed)
            pl_module.log("train/tokens_per_sec", self.history[-1], prog_bar=True)
            pl_module.log("train/examples_per_sec", sum(s[2] for s in self._steps) / elapsed)


class LmEvalCallback(pl.Callback):
    """lm-evaluation-harness on the in-memory model, at the end of fit and every N validations.

    Logs `lm_eval/<task>/<metric>` to the trainer's loggers and writes lm-eval's full results to
    `<run dir>/lm_eval/step_<N>.json`. Runs on rank 0 only (the other ranks wait); the model goes
    back to the mode it was in (training, during fit).

    Args:
        tasks: lm-eval task names (arc_easy, arc_challenge, boolq, openbookqa, piqa, social_iqa,
            hellaswag, winogrande).
        limit: examples per task (None: the whole test split).
        every_n_val_epochs: also run after every N-th validation (0: only at the end of fit).
        source: `local` (shipped task YAMLs over the prepared data, offline) or `hub` (lm-eval's own tasks).
        label_token: also compute the paper's label-token accuracy on the same examples (`label_token/<task>/acc`).
    """

    def __init__(self, tasks: list[str] = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa"],
                 limit: int | None = 100, every_n_val_epochs: int = 0, source: str = "local", batch_size: int = 16,
                 label_token: bool = True) -> None:
        from ..evaluation.harness import check_lm_eval_tasks

        self.tasks = check_lm_eval_tasks(tasks)
        if source not in ("local", "hub"):
            raise UserError(f"source={source!r} is invalid: expected 'local' or 'hub'")
        self.limit, self.every, self.source = limit, every_n_val_epochs, source
        self.batch_size, self.label_token = batch_size, label_token
        self._validations = 0
        self.history: list[dict] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self.every:
            return
        self._validations += 1
        if self._validations % self.every == 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.history or self.history[-1]["step"] != trainer.global_step:  # not already run at this step
            self.run(trainer, pl_module)

    def run(self, trainer, pl_module) -> dict | None:
        import json

        from .. import runs
        from ..evaluation.harness import label_token_accuracy, lm_eval_scores, run_lm_eval
        from .records import run_dir

        directory = run_dir(trainer)  # collective under DDP: every rank
        results = None
        if trainer.global_rank == 0:
            dm = getattr(trainer, "datamodule", None)
            data_dir = getattr(dm, "data_dir", None)
            model, tokenizer = pl_module.model, pl_module.tokenizer
            results = run_lm_eval(model, tokenizer, self.tasks, self.limit, self.source, data_dir, self.batch_size)
            metrics = {f"lm_eval/{t}/{m}": v for t, ms in lm_eval_scores(results).items() for m, v in ms.items()}
            if self.label_token:
                paper = label_token_accuracy(model, tokenizer, self.tasks, self.limit, data_dir,
                                             batch_size=self.batch_size)
                results["label_token"] = {"protocol": "paper: next-token logits over the label tokens",
                                          "results": paper}
                metrics.update({f"label_token/{t}/acc": s["acc"] for t, s in paper.items()})
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()
            out = runs.write_text_atomic(runs.lm_eval_path(directory, trainer.global_step),
                                         json.dumps(results, indent=1, default=str))
            self.history.append({"step": trainer.global_step, "metrics": metrics, "file": str(out)})
        trainer.strategy.barrier("lm_eval")
        return results
