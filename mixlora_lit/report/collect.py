"""Run records and Optuna studies -> plain data for the report (no torch, no Lightning).

Runs are grouped by (base, protocol, tasks): runs that differ in any of these are never averaged
together. Inside a group, runs of one method with one configuration are that method's seeds;
runs of one method with different configurations are told apart by the settings that differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import runs

# Settings that make two runs of a method different configurations (seeds aside).
_CONFIG_KEYS = ("r", "lora_alpha", "num_experts", "top_k", "trained_rank", "use_dora", "router_aux_loss_coef",
                "lora_dropout", "routing_strategy")


@dataclass
class MethodRuns:
    label: str
    method: str
    runs: list[runs.Run] = field(default_factory=list)

    @property
    def seeds(self) -> list[int | None]:
        return [r.record.seed for r in self.runs]


@dataclass
class Group:
    base: str
    protocol: str
    tasks: list[str]
    methods: dict[str, MethodRuns] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.base} | {self.protocol} | {'+'.join(self.tasks)}"


@dataclass
class Collected:
    groups: list[Group]
    incomplete: list[dict[str, Any]]  # runs listed but not used: missing, failed, unfinished, no predictions


def _signature(run: runs.Run) -> dict[str, Any]:
    adapter = run.record.adapter or {}
    data = run.config.get("data") or {}
    trainer = run.config.get("trainer") or {}
    optimizer = (run.config.get("model") or {}).get("optimizer") or {}
    sig = {k: adapter.get(k) for k in _CONFIG_KEYS if adapter.get(k) is not None}
    sig.update({"lr": optimizer.get("lr"), "max_steps": trainer.get("max_steps"),
                "train_cap": data.get("train_cap"), "global_step": run.record.global_step})
    return sig


def collect_runs(paths: list[str | Path], split: str = "test") -> Collected:
    incomplete: list[dict[str, Any]] = []
    usable: list[runs.Run] = []
    for path in map(Path, paths):
        if not path.exists():
            incomplete.append({"path": str(path), "status": "missing", "reason": "path does not exist"})
    dirs = runs.find_runs([p for p in map(Path, paths) if p.exists()])
    for directory in dirs:
        try:
            run = runs.read_run(directory)
        except ValueError as err:
            incomplete.append({"path": str(directory), "status": "unreadable", "reason": str(err)})
            continue
        record = run.record
        if record.status != "finished":
            incomplete.append({"path": str(directory), "status": record.status, "method": record.method,
                               "reason": record.error or f"status {record.status} (stage {record.stage})"})
        elif split not in run.predictions:
            incomplete.append({"path": str(directory), "status": record.status, "method": record.method,
                               "reason": f"no predictions/{split}.jsonl (run with --test_after_fit true)"})
        else:
            usable.append(run)
    groups: dict[tuple, Group] = {}
    for run in usable:
        r = run.record
        key = (r.base, r.protocol, tuple(r.tasks))
        groups.setdefault(key, Group(base=r.base, protocol=r.protocol, tasks=list(r.tasks)))
    for key, group in groups.items():
        members = [run for run in usable if (run.record.base, run.record.protocol, tuple(run.record.tasks)) == key]
        by_method: dict[str, list[runs.Run]] = {}
        for run in members:
            by_method.setdefault(run.record.method, []).append(run)
        for method, method_runs in sorted(by_method.items()):
            configs: dict[str, list[runs.Run]] = {}
            for run in method_runs:
                configs.setdefault(json.dumps(_signature(run), sort_keys=True, default=str), []).append(run)
            if len(configs) == 1:
                group.methods[method] = MethodRuns(method, method, method_runs)
                continue
            signatures = [json.loads(s) for s in configs]
            differing = [k for k in signatures[0] if len({json.dumps(s.get(k)) for s in signatures}) > 1]
            for sig_text, config_runs in configs.items():
                sig = json.loads(sig_text)
                label = f"{method} ({', '.join(f'{k}={sig.get(k)}' for k in differing)})"
                group.methods[label] = MethodRuns(label, method, config_runs)
    ordered = sorted(groups.values(), key=lambda g: g.key)
    return Collected(groups=ordered, incomplete=incomplete)


def collect_study(spec: str) -> dict[str, Any]:
    """`STORAGE_URL:STUDY_NAME` -> trials as plain data (needs optuna, not torch)."""
    import optuna

    from ..sweep.spec import storage_url

    storage, sep, name = spec.rpartition(":")
    if not sep or not storage or "://" not in storage:
        raise ValueError(f"--study {spec!r}: expected STORAGE_URL:STUDY_NAME (e.g. sqlite:///runs/sweeps/x.db:mixlora)")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.load_study(study_name=name, storage=storage_url(storage))
    except KeyError:
        raise ValueError(f"--study {spec!r}: no study named {name!r} in {storage}") from None
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({"number": t.number, "state": t.state.name, "values": t.values, "params": t.params,
                       "intermediate": {int(k): v for k, v in t.intermediate_values.items()},
                       "user_attrs": {k: v for k, v in t.user_attrs.items() if k != "config"},
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
