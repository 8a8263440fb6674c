"""The sweep file: what to search, how, and where the study lives. Parsing and checks only (Optuna, no torch).

    fit_config: configs/quickstart.yaml        # the YAML `mixlora-lit fit` reads (relative to the sweep file or cwd)
    fixed: {trainer.max_steps: 200}            # dotted overrides applied to every trial
    space:                                     # dotted config paths -> distributions
      model.adapter.num_experts: {type: int, low: 2, high: 16, log: true}
      model.adapter.top_k: {type: int, low: 1, high: 4}        # never sampled above num_experts
      model.adapter.r: {type: categorical, choices: [4, 8, 16, 32]}
      model.optimizer.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    objective: {metric: val/avg_acc, direction: maximize}      # or a list of them: multi-objective
    sampler: {name: TPESampler, seed: 0}
    pruner: {name: MedianPruner, n_warmup_steps: 1}
    n_trials: 20                               # finished trials (complete or pruned) in the study, all workers
    max_failed_trials: 20                      # stop once this many trials failed (default n_trials)
    storage: sqlite:///runs/sweeps/<name>.db   # any SQLAlchemy URL; postgresql://user@host:port/db
    study_name: <name>
    runs_dir: runs/sweeps/<name>               # trial run directories (trial_NNNN/version_0)
    heartbeat: {interval: 60, grace_period: 180}
    archive: reports/<study>                   # copy each finished trial's compact record (and a SQLite study) here
    extends: ../lora.yaml                      # start from another sweep file: its keys, then this file's
                                               # (`fixed` merged key by key, every other key replaced)

A grid: `sampler: {name: GridSampler}` with only categorical dimensions runs every combination once,
in the order the space lists them (the last key varies fastest), so the first trials of an
interrupted grid are the most important ones; `n_trials` is the grid's size.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ..errors import UserError

TOP_K, NUM_EXPERTS = "model.adapter.top_k", "model.adapter.num_experts"
TRIAL_ENV = "MIXLORA_LIT_SWEEP_TRIAL"  # JSON: storage, study, trial_id, metric, pruner (set by the sweep worker)
# Run-record fields an objective may name besides the dev metrics (accuracy-vs-cost fronts).
RECORD_METRICS = ("trainable_params", "total_params", "tokens_per_s", "wall_time_s")
ROUTING_METRICS = ("load_entropy", "dead_expert_frac", "max_load_share")
KNOWN_KEYS = {"fit_config", "fixed", "space", "objective", "sampler", "pruner", "n_trials", "max_failed_trials",
              "storage", "study_name", "runs_dir", "heartbeat", "timeout", "archive", "extends"}
GRID = "GridSampler"
DISTRIBUTION_KEYS = {"int": {"type", "low", "high", "log", "step"}, "float": {"type", "low", "high", "log", "step"},
                     "categorical": {"type", "choices"}}


class SweepError(UserError):
    """A sweep file or option that cannot work; reported as one line before any trial runs."""


@dataclass
class Objective:
    metric: str
    direction: str = "maximize"


@dataclass
class SweepSpec:
    path: Path
    fit_config: Path
    space: dict[str, dict[str, Any]]
    objectives: list[Objective]
    fixed: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "TPESampler"})
    pruner: dict[str, Any] | None = None
    n_trials: int = 20
    max_failed_trials: int | None = None
    storage: str = ""
    study_name: str = ""
    runs_dir: Path = Path("runs/sweeps")
    heartbeat_interval: int = 60
    grace_period: int = 180
    timeout: float | None = None
    archive: Path | None = None

    @property
    def is_grid(self) -> bool:
        return self.sampler.get("name") == GRID

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the categorical space, in the file's order (the last key varies fastest)."""
        names = list(self.space)
        return [dict(zip(names, values)) for values in itertools.product(*(self.space[n]["choices"] for n in names))]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def failure_budget(self) -> int:
        return self.max_failed_trials if self.max_failed_trials is not None else self.n_trials


def _error(path: Path, message: str) -> SweepError:
    return SweepError(f"{path}: {message}")


def load_spec(path: str | os.PathLike, storage: str | None = None, study_name: str | None = None,
              n_trials: int | None = None, timeout: float | None = None,
              fit_config: str | os.PathLike | None = None) -> SweepSpec:
    """Read and check a sweep file; command-line values override the file's."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise _error(path, f"not valid YAML{where}: {getattr(err, 'problem', err)}") from err
    if not isinstance(data, dict):
        raise _error(path, "expected a mapping with at least fit_config, space and objective")
    data = _extend(path, data, seen=(path.resolve(),))
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        raise _error(path, f"unknown key(s) {unknown}; known keys: {sorted(KNOWN_KEYS)}")
    for key in ("fit_config", "space", "objective"):
        if key not in data:
            raise _error(path, f"missing key {key!r}")
    if fit_config is not None:  # the command line's
        if not Path(fit_config).is_file():
            raise SweepError(f"--fit-config {fit_config}: no such file")
        fit_config = Path(fit_config)
    else:
        fit_config = _resolve(path, data["fit_config"])
        if not fit_config.is_file():
            raise _error(path, f"fit_config {data['fit_config']!r} not found (looked for {fit_config})")
    space = data["space"] or {}
    if not isinstance(space, dict) or not space:
        raise _error(path, "space is empty: name at least one dotted config path with a distribution")
    for name, dist in space.items():
        _check_distribution(path, name, dist)
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _error(path, "fixed must map dotted config paths to values")
    both = sorted(set(fixed) & set(space))
    if both:
        raise _error(path, f"{both} are both fixed and searched")
    objectives = _objectives(path, data["objective"])
    name = study_name or data.get("study_name") or path.stem
    heartbeat = data.get("heartbeat") or {}
    if not isinstance(heartbeat, dict):
        raise _error(path, f"heartbeat must be a mapping {{interval: S, grace_period: S}}, got {heartbeat!r}")
    interval = int(heartbeat.get("interval", 60))
    grace = int(heartbeat.get("grace_period", 3 * interval))
    if interval < 1 or grace <= interval:
        raise _error(path, f"heartbeat needs interval >= 1 and grace_period > interval (got {interval}, {grace})")
    sampler = data.get("sampler") or {"name": "TPESampler"}
    if isinstance(sampler, dict) and sampler.get("name") == GRID:
        numeric = [name for name, dist in space.items() if dist["type"] != "categorical"]
        if numeric:
            raise _error(path, f"sampler {GRID} needs categorical dimensions only; {numeric} are not")
        given = sampler.get("search_space")
        if set(sampler) - {"name", "search_space"} or given is not None and given != {
                name: dist["choices"] for name, dist in space.items()}:
            raise _error(path, f"sampler {GRID}: its grid is the space's categorical choices; give no other "
                               f"arguments (search_space, if given, must equal them)")
        grid_size = math.prod(len(dist["choices"]) for dist in space.values())
        if n_trials is None and "n_trials" in data and int(data["n_trials"]) != grid_size:
            raise _error(path, f"n_trials={data['n_trials']} but the grid has {grid_size} points (leave n_trials out)")
        n_trials = grid_size if n_trials is None else n_trials
    spec = SweepSpec(
        path=path, fit_config=fit_config, space=space, objectives=objectives, fixed=fixed,
        sampler=sampler, pruner=data.get("pruner"),
        n_trials=int(n_trials if n_trials is not None else data.get("n_trials", 20)),
        max_failed_trials=data.get("max_failed_trials"),
        storage=storage or data.get("storage") or f"sqlite:///runs/sweeps/{name}.db", study_name=name,
        runs_dir=Path(data.get("runs_dir") or f"runs/sweeps/{name}"), heartbeat_interval=interval,
        grace_period=grace, timeout=timeout if timeout is not None else data.get("timeout"),
        archive=Path(data["archive"]) if data.get("archive") else None)
    if spec.n_trials < 1:
        raise _error(path, f"n_trials={spec.n_trials} is invalid: expected an integer >= 1")
    for key in ("sampler", "pruner"):
        value = getattr(spec, key)
        if value is not None and not (isinstance(value, dict) and isinstance(value.get("name"), str)):
            raise _error(path, f"{key} must be a mapping with a 'name' (an optuna.{key}s class) and its arguments")
    _check_top_k(spec)
    return spec


def _extend(path: Path, data: dict[str, Any], seen: tuple[Path, ...]) -> dict[str, Any]:
    """`extends: PARENT.yaml`: the parent's keys (its fit_config resolved against the parent's folder),
    then this file's; `fixed` is merged key by key."""
    parent_name = data.get("extends")
    if not parent_name:
        return data
    parent_path = _resolve(path, str(parent_name))
    if not parent_path.is_file():
        raise _error(path, f"extends {parent_name!r}: no such sweep file (looked for {parent_path})")
    if parent_path.resolve() in seen:
        raise _error(path, f"extends {parent_name!r}: a cycle of sweep files")
    try:
        parent = yaml.safe_load(parent_path.read_text(encoding="utf8"))
    except yaml.YAMLError as err:
        raise _error(parent_path, f"not valid YAML: {getattr(err, 'problem', err)}") from err
    if not isinstance(parent, dict):
        raise _error(parent_path, "expected a mapping")
    parent = _extend(parent_path, parent, seen + (parent_path.resolve(),))
    if "fit_config" in parent:
        parent["fit_config"] = str(_resolve(parent_path, str(parent["fit_config"])))
    merged = {**{k: v for k, v in parent.items() if k != "extends"}, **{k: v for k, v in data.items() if k != "extends"}}
    merged["fixed"] = {**(parent.get("fixed") or {}), **(data.get("fixed") or {})}
    return merged


def _resolve(path: Path, value: str) -> Path:
    candidate = Path(value)
    if candidate.is_absolute() or candidate.is_file():
        return candidate
    beside = path.parent / candidate
    return beside if beside.is_file() else candidate


def _check_distribution(path: Path, name: str, dist: Any) -> None:
    if not isinstance(name, str) or "." not in name and name not in ("seed_everything",):
        raise _error(path, f"space key {name!r} is not a dotted config path (e.g. model.adapter.r)")
    if not isinstance(dist, dict) or dist.get("type") not in DISTRIBUTION_KEYS:
        raise _error(path, f"space.{name}: expected {{type: int|float|categorical, ...}}, got {dist!r}")
    extra = sorted(set(dist) - DISTRIBUTION_KEYS[dist["type"]])
    if extra:
        raise _error(path, f"space.{name}: unknown key(s) {extra} for type {dist['type']}")
    if dist["type"] == "categorical":
        choices = dist.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _error(path, f"space.{name}: categorical needs a non-empty list of choices")
        return
    low, high = dist.get("low"), dist.get("high")
    number = int if dist["type"] == "int" else (int, float)
    if not isinstance(low, number) or not isinstance(high, number) or isinstance(low, bool) or low > high:
        raise _error(path, f"space.{name}: needs numeric low <= high for type {dist['type']} (got {low}, {high})")
    if dist.get("log") and low <= 0:
        raise _error(path, f"space.{name}: log scale needs low > 0 (got {low})")


def _objectives(path: Path, value: Any) -> list[Objective]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"metric": item}
        if not isinstance(item, dict) or not isinstance(item.get("metric"), str):
            raise _error(path, f"objective: expected {{metric: ..., direction: maximize|minimize}}, got {item!r}")
        direction = item.get("direction", "maximize")
        if direction not in ("maximize", "minimize"):
            raise _error(path, f"objective {item['metric']}: direction={direction!r}, expected maximize or minimize")
        if item["metric"].startswith("test/"):
            raise _error(path, f"objective {item['metric']!r}: a sweep selects on the dev split (val/...), never test")
        out.append(Objective(item["metric"], direction))
    if not out:
        raise _error(path, "objective: name at least one metric")
    return out


def _range(dist: dict[str, Any] | None, value: Any) -> tuple[float, float] | None:
    """(smallest, largest) value a distribution (or a fixed value) can give; None when unknown."""
    if dist is None:
        return (value, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if dist["type"] == "categorical":
        numbers = [c for c in dist["choices"] if isinstance(c, (int, float)) and not isinstance(c, bool)]
        return (min(numbers), max(numbers)) if numbers else None
    return dist["low"], dist["high"]


def _check_top_k(spec: SweepSpec) -> None:
    """top_k is never sampled above num_experts: an int top_k's upper bound follows the sampled
    num_experts; every trial must still have a valid top_k."""
    top_dist, experts_dist = spec.space.get(TOP_K), spec.space.get(NUM_EXPERTS)
    if top_dist is None and experts_dist is None:
        return
    top = _range(top_dist, spec.fixed.get(TOP_K))
    experts = _range(experts_dist, spec.fixed.get(NUM_EXPERTS))
    if top is None or experts is None:
        return  # the other one comes from the fit config: checked against the resolved config later
    if top_dist is not None and top_dist["type"] == "categorical" and top[1] > experts[0]:
        raise _error(spec.path, f"space.{TOP_K} choices go up to {top[1]} but {NUM_EXPERTS} can be {experts[0]}: "
                                f"use an int range (its upper bound follows num_experts) or smaller choices")
    if top[0] > experts[0]:
        raise _error(spec.path, f"{TOP_K} (at least {top[0]}) can exceed {NUM_EXPERTS} (as low as {experts[0]}): "
                                f"some trials would have no valid top_k")


def check_against_config(spec: SweepSpec, resolved: dict[str, Any]) -> None:
    """Checks that need the fit config resolved: top_k vs num_experts there, and the objective metrics."""
    from ..config import ROUTER_DEFAULTS
    from ..data.tasks import resolve_tasks

    adapter = ((resolved.get("model") or {}).get("adapter") or {})
    tasks = resolve_tasks((resolved.get("data") or {}).get("tasks") or [])
    methods = {spec.fixed.get("model.adapter.method", adapter.get("method", "mixlora"))}
    if "model.adapter.method" in spec.space:
        methods = set(spec.space["model.adapter.method"].get("choices") or methods)
    if (TOP_K in spec.space) != (NUM_EXPERTS in spec.space):
        searched, other = (TOP_K, NUM_EXPERTS) if TOP_K in spec.space else (NUM_EXPERTS, TOP_K)
        value = spec.fixed.get(other, adapter.get(other.rsplit(".", 1)[1]))
        if value is None and other == TOP_K:  # None: the routing strategy's default
            value = max(ROUTER_DEFAULTS.get(m, ROUTER_DEFAULTS["mixlora"])["top_k"] for m in methods)
        top = _range(spec.space.get(TOP_K), value if other == TOP_K else None)
        experts = _range(spec.space.get(NUM_EXPERTS), value if other == NUM_EXPERTS else None)
        categorical_top = spec.space.get(TOP_K, {}).get("type") == "categorical"
        if top is not None and experts is not None and (top[0] > experts[0] or
                                                        (categorical_top or other == TOP_K) and top[1] > experts[0]):
            raise _error(spec.path, f"{TOP_K} (up to {top[1]}) can exceed {NUM_EXPERTS} (as low as {experts[0]}; "
                                    f"{searched} searched, {other} from the fit config)")
    known = {"val/avg_acc", *(f"val/{t}/acc" for t in tasks), *RECORD_METRICS}
    protocols = {spec.fixed.get("data.protocol", (resolved.get("data") or {}).get("protocol", "paper"))}
    if "data.protocol" in spec.space:
        protocols = set(spec.space["data.protocol"].get("choices") or protocols)
    if protocols == {"cloze"}:  # only cloze runs log the per-character accuracy
        known |= {"val/avg_acc_norm", *(f"val/{t}/acc_norm" for t in tasks)}
    if all(str(m).startswith("mixlora") for m in methods):  # only MixLoRA runs log routing health
        known |= {f"val/routing/{m}" for m in ROUTING_METRICS}
    for objective in spec.objectives:
        if objective.metric not in known:
            raise _error(spec.path, f"objective metric {objective.metric!r} is not logged by these runs; "
                                    f"expected one of {sorted(known)}")


def cli_value(value: Any) -> str:
    """A value as LightningCLI reads it after `--key=` (YAML flow syntax for lists and mappings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    if isinstance(value, float) and not math.isfinite(value):
        raise SweepError(f"cannot pass the non-finite value {value} on the command line")
    return str(value)


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"--{key}={cli_value(value)}" for key, value in values.items()]


def storage_url(url: str, create: bool = True) -> str:
    """The URL users type, made to work with the locked drivers; SQLite's folder is created (with
    `create`), else a missing SQLite file is an error."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise SweepError(f"storage {url!r} is not a database URL (sqlite:///file.db, postgresql://user@host/db)")
    if scheme in ("postgresql", "postgres"):
        try:
            import psycopg  # noqa: F401 - SQLAlchemy's default driver for a plain postgresql:// URL
            return f"postgresql://{rest}"
        except ImportError:
            return f"postgresql+psycopg2://{rest}"
    if scheme == "sqlite" and rest.startswith("/") and rest not in ("/", "/:memory:"):
        if not create and not Path(rest[1:]).is_file():
            raise SweepError(f"storage {url}: no such SQLite file {rest[1:]}")
        Path(rest[1:]).parent.mkdir(parents=True, exist_ok=True)
    return url
