"""lm-evaluation-harness on an in-memory model, and the paper's label-token accuracy beside it.

Two different measurements, always labelled as such in results:
* `lm_eval` (lm-eval's standard multiple-choice scoring): the log-likelihood of each answer text
  after the question; `acc` picks the highest, `acc_norm` the highest per character.
* `label_token` (the paper's protocol): the letter/label prompt, next-token logits restricted to the
  label tokens, argmax.

`source="local"` uses the task YAMLs shipped in `lm_eval_tasks/` over the prepared data (offline);
`source="hub"` uses lm-eval's built-in tasks of the same names (needs the hub).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..data.encoding import collate_eval, encode_records, predict_label_tokens
from ..data.prepare import default_data_dir, read_split
from ..data.tasks import PAPER_ALL, get_task
from ..errors import UserError

LOCAL_TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
LM_EVAL_TASKS = PAPER_ALL  # the same names as lm-eval's built-in tasks


def check_lm_eval_tasks(tasks) -> list[str]:
    names = []
    for task in tasks:
        name = get_task(task).name if task not in LM_EVAL_TASKS else task
        if name not in LM_EVAL_TASKS:
            raise UserError(f"no lm-eval task for {task!r}: available are {list(LM_EVAL_TASKS)}")
        names.append(name)
    return names


def task_manager(source: str = "local", data_dir: str | os.PathLike | None = None):
    from lm_eval.tasks import TaskManager

    if source == "local":
        data_dir = str(data_dir or default_data_dir())
        return TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=False,
                           metadata={"data_dir": data_dir})
    if source == "hub":
        return TaskManager()
    raise UserError(f"lm-eval source {source!r} is invalid: expected 'local' or 'hub'")


def run_lm_eval(model: torch.nn.Module, tokenizer, tasks, limit: int | float | None = None, source: str = "local",
                data_dir: str | os.PathLike | None = None, batch_size: int = 16, log_samples: bool = False,
                ) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` over the in-memory model (wrapped by `HFLM`, no export to disk)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = check_lm_eval_tasks(tasks)
    if source == "local":
        for name in names:  # fail early with the prepare command rather than deep inside lm-eval
            read_split(name, "test", data_dir)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=task_manager(source, data_dir),
                                  log_samples=log_samples, bootstrap_iters=0)
    finally:
        model.train(was_training)
    results["mixlora_lit"] = {"protocol": "lm_eval multiple-choice log-likelihood", "source": source,
                              "limit": limit}
    return results


def lm_eval_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {"acc": .., "acc_norm": ..}} from lm-eval's results (its keys look like `acc,none`)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in ("acc", "acc_norm") and filt == "none" and isinstance(value, (int, float)):
                out.setdefault(task, {})[metric] = float(value)
    return out


@torch.no_grad()
def label_token_accuracy(model: torch.nn.Module, tokenizer, tasks, limit: int | None = None,
                         data_dir: str | os.PathLike | None = None, split: str = "test", protocol: str = "paper",
                         batch_size: int = 16, cutoff_len: int = 512) -> dict[str, dict[str, float]]:
    """The paper's protocol over the prepared split: {task: {"acc": .., "n": ..}}."""
    names = [get_task(t).name for t in tasks]
    index = {t: i for i, t in enumerate(names)}
    was_training = model.training
    model.eval()
    scores: dict[str, dict[str, float]] = {}
    try:
        for name in names:
            records = read_split(name, split, data_dir)[: limit or None]
            examples = sorted(encode_records(records, tokenizer, protocol, index, cutoff_len, train=False),
                              key=lambda e: len(e.input_ids))
            correct = 0
            for start in range(0, len(examples), batch_size):
                batch = collate_eval(examples[start:start + batch_size], tokenizer.pad_token_id)
                device = next(model.parameters()).device
                preds = predict_label_tokens(model, {k: v.to(device) if torch.is_tensor(v) else v
                                                     for k, v in batch.items()})
                correct += int((preds.cpu() == batch["label"]).sum())
            scores[name] = {"acc": correct / max(1, len(examples)), "n": len(examples)}
    finally:
        model.train(was_training)
    return scores


def format_table(lm_eval: dict[str, dict[str, float]] | None, label_token: dict[str, dict[str, float]] | None) -> str:
    tasks = sorted(set(lm_eval or {}) | set(label_token or {}))
    header = f"{'task':<15}{'lm-eval acc':>13}{'lm-eval acc_norm':>18}{'label-token acc (paper)':>25}"
    rows = [header, "-" * len(header)]

    def fmt(value):
        return f"{value:.4f}" if value is not None else "-"

    for task in tasks:
        a = (lm_eval or {}).get(task, {})
        b = (label_token or {}).get(task, {})
        rows.append(f"{task:<15}{fmt(a.get('acc')):>13}{fmt(a.get('acc_norm')):>18}{fmt(b.get('acc')):>25}")
    return "\n".join(rows)
