"""Run records and Optuna studies -> plain data for the report (no torch, no Lightning).

Runs are grouped by (base, protocol, task set): runs that differ in any of these are never averaged
together. Single-task runs (the paper's Table 1) of one (base, protocol) form one group whose
tasks are the union of theirs. Inside a group, runs of one method with one configuration are that
method's seeds (for single-task groups, a seed's runs over the tasks together); runs of one
method with different configurations are told apart by the settings that differ. Two runs of the
same configuration and seed are duplicates: the newest counts, the others are listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import runs
from ..errors import UserError

# Settings that make two runs of a method different configurations (seeds aside).
_CONFIG_KEYS = ("r", "lora_alpha", "num_experts", "top_k", "trained_rank", "use_dora", "router_aux_loss_coef",
                "lora_dropout", "routing_strategy")
SINGLE_TASK = "single-task"


@dataclass
class MethodRuns:
    label: str
    method: str
    runs: list[runs.Run] = field(default_factory=list)

    def by_seed(self) -> dict[Any, list[runs.Run]]:
        out: dict[Any, list[runs.Run]] = {}
        for run in self.runs:
            out.setdefault(run.record.seed, []).append(run)
        return out

    @property
    def seeds(self) -> list[Any]:
        return sorted(self.by_seed(), key=str)

    def seed_predictions(self, split: str) -> list[list[dict]]:
        """One list of prediction rows per seed (a seed's single-task runs concatenated)."""
        return [[row for run in group for row in run.predictions[split]]
                for _, group in sorted(self.by_seed().items(), key=lambda kv: str(kv[0]))]


@dataclass
class Group:
    base: str
    protocol: str
    tasks: list[str]
    kind: str = "multi-task"  # or SINGLE_TASK: one run per task and seed
    methods: dict[str, MethodRuns] = field(default_factory=dict)
    series: str = ""  # `--runs SERIES=PATH`: runs compared only within their series

    @property
    def key(self) -> str:
        prefix = f"{self.series} | " if self.series else ""
        return f"{prefix}{self.base} | {self.protocol} | {self.kind}: {'+'.join(self.tasks)}"


@dataclass
class Collected:
    groups: list[Group]
    incomplete: list[dict[str, Any]]  # runs listed but not used: missing, failed, unfinished, no predictions


def _signature(run: runs.Run) -> dict[str, Any]:
    adapter = run.record.adapter or {}
    data = run.config.get("data") or {}
    trainer = run.config.get("trainer") or {}
    optimizer = (run.config.get("model") or {}).get("optimizer") or {}
    sig = {k: adapter.get(k) for k in _CONFIG_KEYS}
    sig.update({"lr": optimizer.get("lr"), "max_steps": trainer.get("max_steps"), "train_cap": data.get("train_cap")})
    return sig


def _group_key(record: runs.RunRecord) -> tuple:
    if len(record.tasks) == 1:
        return record.base, record.protocol, SINGLE_TASK
    return record.base, record.protocol, tuple(sorted(record.tasks))


def split_series(paths: list[str | Path]) -> dict[str, list[Path]]:
    """`SERIES=PATH` items (runs compared within their series, e.g. "paper settings" and "tuned") and plain paths
    (the series ""), in the order given. A path may be named in several series (a shared base-model row)."""
    out: dict[str, list[Path]] = {}
    for item in map(str, paths):
        label, sep, rest = item.partition("=")
        if sep and label.strip() and rest and not Path(item).exists():
            out.setdefault(label.strip(), []).append(Path(rest))
        else:
            out.setdefault("", []).append(Path(item))
    return out


def collect_runs(paths: list[str | Path], split: str = "test") -> Collected:
    groups: list[Group] = []
    incomplete: list[dict[str, Any]] = []
    for series, series_paths in split_series(paths).items():
        collected = _collect_series(series_paths, split, series)
        groups += collected.groups
        incomplete += [dict(item, series=series) if series else item for item in collected.incomplete]
    return Collected(groups=groups, incomplete=incomplete)


def _collect_series(paths: list[Path], split: str, series: str) -> Collected:
    incomplete: list[dict[str, Any]] = []
    roots = []
    for path in map(Path, paths):
        if not path.exists():
            incomplete.append({"path": str(path), "status": "missing", "reason": "path does not exist"})
        else:
            roots.append(path.resolve())
    dirs = runs.find_runs(roots)
    for root in roots:  # run folders without a record: killed before the first write, or older than records
        candidates = [root] if (root / runs.CONFIG).is_file() or (root / runs.METRICS).is_file() else []
        candidates += [p.parent for p in root.rglob(runs.CONFIG)]
        for directory in sorted(set(candidates)):
            if not (directory / runs.RUN_RECORD).is_file():
                incomplete.append({"path": str(directory), "status": "no record",
                                   "reason": f"no {runs.RUN_RECORD} (killed before its first write, or older)"})
        if not any(d == root or root in d.parents for d in dirs) and not (root / runs.CONFIG).is_file():
            incomplete.append({"path": str(root), "status": "empty", "reason": "no run directory found below it"})
    usable: list[runs.Run] = []
    for directory in dirs:
        try:
            run = runs.read_run(directory)
        except ValueError as err:
            incomplete.append({"path": str(directory), "status": "unreadable", "reason": str(err)})
            continue
        record = run.record
        rows = run.predictions.get(split)
        if record.status != "finished":
            reason = record.error or f"status {record.status} (stage {record.stage})"
        elif rows is None:
            reason = f"no predictions/{split}.jsonl (fit with --test_after_fit true, or mixlora-lit test)"
        elif not rows:
            reason = f"predictions/{split}.jsonl is empty"
        else:
            usable.append(run)
            continue
        incomplete.append({"path": str(directory), "status": record.status, "method": record.method,
                           "reason": reason})
    groups: dict[tuple, Group] = {}
    members: dict[tuple, list[runs.Run]] = {}
    for run in usable:
        key = _group_key(run.record)
        members.setdefault(key, []).append(run)
        if key not in groups:
            groups[key] = Group(base=key[0], protocol=key[1], tasks=[],
                                kind=SINGLE_TASK if key[2] == SINGLE_TASK else "multi-task", series=series)
    for key, group in groups.items():
        group.tasks = sorted({t for run in members[key] for t in run.record.tasks}, key=_task_order)
        by_method: dict[str, list[runs.Run]] = {}
        for run in members[key]:
            by_method.setdefault(run.record.method, []).append(run)
        for method, method_runs in sorted(by_method.items()):
            configs: dict[str, list[runs.Run]] = {}
            for run in method_runs:
                configs.setdefault(json.dumps(_signature(run), sort_keys=True, default=str), []).append(run)
            signatures = [json.loads(s) for s in configs]
            keys = sorted({k for s in signatures for k in s})
            differing = [k for k in keys if len({json.dumps(s.get(k)) for s in signatures}) > 1]
            for sig_text, config_runs in configs.items():
                sig = json.loads(sig_text)
                label = method if len(configs) == 1 else \
                    f"{method} ({', '.join(f'{k}={sig.get(k)}' for k in differing)})"
                kept = _drop_duplicate_seeds(config_runs, incomplete)
                if label in group.methods:
                    raise UserError(f"two configurations of {method} in group {group.key} share the label {label}")
                group.methods[label] = MethodRuns(label, method, kept)
    ordered = sorted(groups.values(), key=lambda g: g.key)
    return Collected(groups=ordered, incomplete=incomplete)


def _task_order(task: str) -> tuple[int, str]:
    from .published import EIGHT

    return (EIGHT.index(task), task) if task in EIGHT else (len(EIGHT), task)


def _drop_duplicate_seeds(config_runs: list[runs.Run], incomplete: list[dict[str, Any]]) -> list[runs.Run]:
    """One run per (seed, task set): the newest record wins; the others are listed as duplicates."""
    newest: dict[tuple, runs.Run] = {}
    for run in sorted(config_runs, key=lambda r: (r.record.updated_at or "", str(r.path))):
        key = (str(run.record.seed), tuple(sorted(run.record.tasks)))
        if key in newest:
            older = newest[key]
            incomplete.append({"path": str(older.path), "status": "duplicate", "method": older.record.method,
                               "reason": f"same configuration, seed and tasks as the newer {run.path}"})
        newest[key] = run
    return list(newest.values())


def _dev_caps(config: Any) -> dict[str, int] | None:
    """task -> the dev cap a trial's resolved config set (`data.dev_cap`, an int or a dict per task), or None
    when a task had no cap (its whole dev split: the count is not in the config)."""
    data = (config or {}).get("data") or {}
    cap, tasks = data.get("dev_cap"), data.get("tasks") or []
    caps = {t: cap.get(t) for t in tasks} if isinstance(cap, dict) else {t: cap for t in tasks}
    if not caps or not all(isinstance(c, int) and c > 0 for c in caps.values()):
        return None
    return caps


def collect_study(spec: str) -> dict[str, Any]:
    """`STORAGE_URL:STUDY_NAME` -> trials as plain data (needs optuna, not torch)."""
    import optuna

    from ..sweep.spec import storage_url

    storage, sep, name = spec.rpartition(":")
    if not sep or not storage or "://" not in storage:
        raise UserError(f"--study {spec!r}: expected STORAGE_URL:STUDY_NAME (e.g. sqlite:///runs/sweeps/x.db:mixlora)")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.load_study(study_name=name, storage=storage_url(storage, create=False))
    except KeyError:
        raise UserError(f"--study {spec!r}: no study named {name!r} in {storage}") from None
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({"number": t.number, "state": t.state.name, "values": t.values, "params": t.params,
                       "intermediate": {int(k): v for k, v in t.intermediate_values.items()},
                       "user_attrs": {k: v for k, v in t.user_attrs.items() if k != "config"},
                       "dev_cap_per_task": _dev_caps(t.user_attrs.get("config")),
                       "duration_s": t.duration.total_seconds() if t.duration else None})
    importances: dict[str, float] = {}
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    if len(study.directions) == 1 and len(complete) >= 3:
        try:
            importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        except (RuntimeError, ValueError, ZeroDivisionError):
            importances = {}
    pareto = [t.number for t in study.best_trials] if len(study.directions) > 1 and complete else []
    best = None
    if len(study.directions) == 1 and complete:
        best = study.best_trial.number
    return {"name": name, "storage": storage, "directions": [d.name.lower() for d in study.directions],
            "objectives": (study.user_attrs.get("sweep") or {}).get("objectives"), "trials": trials,
            "importances": importances, "pareto": pareto, "best": best}
