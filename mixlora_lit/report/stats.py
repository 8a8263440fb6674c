"""Paired statistics over per-example predictions: accuracy differences with bootstrap CIs and p-values.

Accuracies are fractions of examples (0.5 = 50%); the task average is the unweighted mean of the
per-task accuracies (the paper's average). Two methods are compared on the examples both were
scored on, matched by (task, id).

- Confidence interval: a hierarchical paired bootstrap. Each replicate resamples each method's
  seeds with replacement (when it has several), averages the resampled seeds per example, then
  resamples the examples with replacement within each task (the same examples for both methods:
  paired) and takes the difference of the task-averaged accuracies. The 2.5th and 97.5th
  percentiles of the replicates bound the 95% interval.
- p-value: a paired sign-flip permutation test on the per-example differences of the
  seed-averaged correctness (under the null the two methods are exchangeable on each example),
  with the same task-averaged statistic, two-sided, `(1 + extreme) / (1 + resamples)`. It is
  conditional on the seeds that ran (their variation is not in it; the CI's is), so with few seeds
  a p below 0.05 next to a CI that covers 0 says the seeds disagree: trust the CI.
- Per task with one seed each: McNemar's exact test (a binomial test on the discordant pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats


@dataclass
class Paired:
    """Two methods' correctness on shared examples: a [seeds_a, n], b [seeds_b, n] (0/1), task index [n]."""

    tasks: list[str]
    a: np.ndarray
    b: np.ndarray
    task_index: np.ndarray

    @property
    def n_examples(self) -> int:
        return int(self.task_index.shape[0])


def align(a_runs: list[list[dict]], b_runs: list[list[dict]], key: str = "correct") -> Paired:
    """Match prediction rows (one list per seed) of two methods by (task, id): the examples every seed
    of both methods scored."""
    def table(rows: list[dict]) -> dict[tuple[str, str], bool]:
        return {(str(r["task"]), str(r["id"])): bool(r[key]) for r in rows}

    a_tables, b_tables = [table(r) for r in a_runs], [table(r) for r in b_runs]
    if not a_tables or not b_tables:
        raise ValueError("align needs at least one run of each method")
    shared = set.intersection(*(set(t) for t in a_tables + b_tables))
    keys = sorted(shared)
    tasks = sorted({task for task, _ in keys})
    index = {task: i for i, task in enumerate(tasks)}
    return Paired(tasks=tasks,
                  a=np.array([[t[k] for k in keys] for t in a_tables], dtype=np.float64).reshape(len(a_tables), -1),
                  b=np.array([[t[k] for k in keys] for t in b_tables], dtype=np.float64).reshape(len(b_tables), -1),
                  task_index=np.array([index[task] for task, _ in keys], dtype=np.int64))


def task_average(correct: np.ndarray, task_index: np.ndarray, n_tasks: int) -> np.ndarray:
    """Unweighted mean over tasks of per-task accuracy; `correct` [..., n] -> [...]."""
    sums = np.zeros(correct.shape[:-1] + (n_tasks,))
    np.add.at(np.moveaxis(sums, -1, 0), task_index, np.moveaxis(correct, -1, 0))
    counts = np.bincount(task_index, minlength=n_tasks)
    return (sums / counts).mean(axis=-1)


def difference(p: Paired) -> float:
    """Task-averaged accuracy of a (seeds averaged) minus that of b."""
    n = len(p.tasks)
    return float(task_average(p.a.mean(0), p.task_index, n) - task_average(p.b.mean(0), p.task_index, n))


def _seed_means(m: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """[reps, n]: per replicate, the per-example mean over seeds resampled with replacement."""
    seeds = m.shape[0]
    if seeds == 1:
        return np.broadcast_to(m[0], (reps, m.shape[1]))
    weights = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=reps) / seeds  # [reps, seeds]
    return weights @ m


def bootstrap_ci(p: Paired, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0,
                 chunk: int = 500) -> tuple[float, float]:
    """Percentile interval of the hierarchical paired bootstrap (module docstring)."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(p.task_index == t) for t in range(len(p.tasks))]
    replicates = []
    for start in range(0, n_resamples, chunk):
        reps = min(chunk, n_resamples - start)
        diff = _seed_means(p.a, reps, rng) - _seed_means(p.b, reps, rng)  # [reps, n]
        per_task = []
        for members in groups:
            picks = members[rng.integers(0, len(members), size=(reps, len(members)))]  # [reps, n_t]
            per_task.append(np.take_along_axis(diff, picks, axis=1).mean(axis=1))
        replicates.append(np.mean(per_task, axis=0))
    values = np.concatenate(replicates)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def permutation_p_value(p: Paired, n_resamples: int = 10_000, seed: int = 0, chunk: int = 1000) -> float:
    """Two-sided paired sign-flip permutation test of the task-averaged difference (module docstring)."""
    rng = np.random.default_rng(seed + 1)
    d = p.a.mean(0) - p.b.mean(0)  # per example
    n_tasks = len(p.tasks)
    observed = abs(task_average(d, p.task_index, n_tasks))
    if not np.any(d):
        return 1.0
    extreme = 0
    for start in range(0, n_resamples, chunk):
        reps = min(chunk, n_resamples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(reps, d.shape[0]))
        stats = np.abs(task_average(signs * d, p.task_index, n_tasks))
        extreme += int(np.sum(stats >= observed - 1e-12))
    return (1 + extreme) / (1 + n_resamples)


def mcnemar_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """Exact McNemar test on paired 0/1 outcomes: binomial test of the discordant pairs at 1/2."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(scipy_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def compare(p: Paired, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """diff (a - b, fraction), its CI, the permutation p-value, and per task the difference and McNemar's p."""
    low, high = bootstrap_ci(p, n_resamples, seed=seed)
    out = {"diff": difference(p), "ci_low": low, "ci_high": high, "p_value": permutation_p_value(p, n_resamples, seed),
           "n_examples": p.n_examples, "n_seeds": [int(p.a.shape[0]), int(p.b.shape[0])], "tasks": list(p.tasks),
           "per_task": {}}
    for t, task in enumerate(p.tasks):
        sel = p.task_index == t
        entry = {"diff": float(p.a[:, sel].mean() - p.b[:, sel].mean()), "n_examples": int(sel.sum())}
        if p.a.shape[0] == 1 and p.b.shape[0] == 1:
            entry["p_mcnemar"] = mcnemar_p_value(p.a[0, sel], p.b[0, sel])
        out["per_task"][task] = entry
    return out


def mean_std(values: list[float | None]) -> dict:
    """Mean and sample standard deviation (ddof=1) of the values present; std None for fewer than two."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else None, "n": int(arr.size)}
