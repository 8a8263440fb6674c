"""Optuna studies over `mixlora-lit fit`: one trial = one fit in a child process, with the trial's overrides.

Optuna is the engine: its RDB storage (SQLite for one machine, PostgreSQL for many) holds the
study, its heartbeats fail the trials of a killed worker, and its retry callback queues them
again. This module only turns a sweep file into `fit` commands and run records into values.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from .. import runs
from ..errors import StoppedBySignal, UserError
from .spec import TRIAL_ENV, NUM_EXPERTS, TOP_K, SweepError, SweepSpec, check_against_config, overrides, storage_url

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RECORD_ATTRS = ("trainable_params", "tokens_per_s", "wall_time_s")  # copied from the run record per trial
PARENT_ENV = "MIXLORA_LIT_PARENT_PID"  # a trial's fit process dies with the worker that started it


class TrialError(RuntimeError):
    """A trial that failed (the fit exited non-zero, or its record lacks the objective): FAIL, sweep goes on."""


# ---------------------------------------------------------------------- checks before any trial
def resolved_fit_config(spec: SweepSpec, values: dict[str, Any]) -> dict[str, Any]:
    """The fit parser's resolved config for the fit config + fixed + `values` (`fit --print_config`),
    so unknown keys and wrong types are caught by the same parser a trial uses."""
    from ..lightning.cli import run

    args = ["fit", f"--config={spec.fit_config}", *overrides(spec.fixed), *overrides(values), "--print_config"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run(args)
        except UserError as err:
            raise SweepError(f"{spec.path}: the fit config rejects these overrides: {err}") from None
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
                detail = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
                raise SweepError(f"{spec.path}: the fit config rejects these overrides: {detail.strip()}") from None
    resolved = yaml.safe_load(out.getvalue()) or {}
    _check_settings(spec, values, resolved)
    return resolved


def _check_settings(spec: SweepSpec, values: dict[str, Any], resolved: dict[str, Any]) -> None:
    """The checks the model and data module make on their settings before loading anything (MixLoRA's
    shape, task names, caps...), run on the resolved config of these values."""
    from ..lightning.datamodule import MultiTaskDataModule
    from ..lightning.module import MixLoraLitModule

    try:
        MixLoraLitModule(**resolved.get("model", {}))
        MultiTaskDataModule(**resolved.get("data", {}))
    except UserError as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise SweepError(f"{spec.path}: a trial with {shown} would fail: {err}") from None


def _probe(spec: SweepSpec, which: int) -> dict[str, Any]:
    """Values for one check pass: numbers at their low (even passes) or high end, categoricals at their
    `which`-th choice (the last one past the end), so that the passes together try every choice."""
    out = {}
    for name, dist in spec.space.items():
        if dist["type"] == "categorical":
            out[name] = dist["choices"][min(which, len(dist["choices"]) - 1)]
        else:
            out[name] = dist["low"] if which % 2 == 0 else dist["high"]
    if TOP_K in out and NUM_EXPERTS in out:
        out[TOP_K] = min(out[TOP_K], out[NUM_EXPERTS])
    return out


def _optuna_object(module, spec: SweepSpec, settings: dict[str, Any] | None, what: str):
    if settings is None:
        return None
    name, kwargs = settings["name"], {k: v for k, v in settings.items() if k != "name"}
    available = [n for n in module.__all__ if not n.startswith("Base") and n[0].isupper()]
    if name not in available:
        raise SweepError(f"{spec.path}: unknown {what} {name!r}; expected one of {available}")
    try:
        return getattr(module, name)(**kwargs)
    except (TypeError, ValueError) as err:
        raise SweepError(f"{spec.path}: {what} {name}: {err}") from None


def make_sampler(spec: SweepSpec, settings: dict[str, Any]):
    if spec.is_grid:
        # The driver enqueues every point of the categorical space in the file's order, so the sampler is
        # never asked for a value. Optuna's GridSampler itself is not used: it picks points in random order
        # and does not count enqueued trials as visited.
        return optuna.samplers.RandomSampler(seed=0)
    return _optuna_object(optuna.samplers, spec, settings, "sampler")


def check_spec(spec: SweepSpec) -> dict[str, Any]:
    """Everything that can be checked before a trial runs; returns the resolved base config."""
    for name, dist in spec.space.items():
        try:
            if dist["type"] == "int":
                optuna.distributions.IntDistribution(dist["low"], dist["high"], log=dist.get("log", False),
                                                     step=dist.get("step", 1))
            elif dist["type"] == "float":
                optuna.distributions.FloatDistribution(dist["low"], dist["high"], log=dist.get("log", False),
                                                       step=dist.get("step"))
        except ValueError as err:
            raise SweepError(f"{spec.path}: space.{name}: {err}") from None
    make_sampler(spec, dict(spec.sampler))
    _optuna_object(optuna.pruners, spec, spec.pruner, "pruner")
    passes = max([2] + [len(d["choices"]) for d in spec.space.values() if d["type"] == "categorical"])
    resolved = resolved_fit_config(spec, _probe(spec, 0))
    for which in range(1, passes):
        resolved_fit_config(spec, _probe(spec, which))
    check_against_config(spec, resolved)
    return resolved


# ---------------------------------------------------------------------- storage and study
def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None) -> RDBStorage:
    """RDB storage with heartbeats (a killed worker's trial is failed after the grace period and retried
    once). Workers racing to create a fresh schema retry a few times."""
    last: Exception | None = None
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # heartbeats and the retry callback are "experimental" in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                kwargs: dict[str, Any] = {"engine_kwargs": {"pool_pre_ping": True}}
                if heartbeat_interval:
                    kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
                return RDBStorage(storage_url(url), **kwargs)
        except SweepError:
            raise
        except Exception as err:  # noqa: BLE001 - SQLAlchemy and driver errors of every kind
            last = err
            text = str(err).lower()
            if not any(word in text for word in ("already exists", "duplicate", "unique", "locked")):
                break
            time.sleep(0.5 + random.random())
    first = str(last).strip().splitlines()[0] if last and str(last).strip() else type(last).__name__
    raise SweepError(f"storage {_redact(url)}: cannot open it: {first}")


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split("@", 1)[0].split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{rest.split('@', 1)[1]}"
    return url


def load_study(storage: str, study_name: str) -> optuna.Study:
    storage_url(storage, create=False)  # a mistyped SQLite path is an error, not a new empty database
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        raise SweepError(f"no study named {study_name!r} in {_redact(storage)}") from None


# ---------------------------------------------------------------------- trials
def sample(trial: optuna.Trial, spec: SweepSpec, resolved: dict[str, Any]) -> dict[str, Any]:
    """The trial's values, num_experts before top_k so that top_k never exceeds it."""
    adapter = (resolved.get("model") or {}).get("adapter") or {}
    values: dict[str, Any] = {}
    for name in sorted(spec.space, key=lambda n: n == TOP_K):
        dist = spec.space[name]
        if dist["type"] == "categorical":
            values[name] = trial.suggest_categorical(name, dist["choices"])
            continue
        high = dist["high"]
        if name == TOP_K:
            experts = values.get(NUM_EXPERTS, spec.fixed.get(NUM_EXPERTS, adapter.get("num_experts")))
            high = min(high, experts) if isinstance(experts, int) else high
        if dist["type"] == "int":
            values[name] = trial.suggest_int(name, dist["low"], high, step=dist.get("step", 1),
                                             log=dist.get("log", False))
        else:
            values[name] = trial.suggest_float(name, dist["low"], high, step=dist.get("step"),
                                               log=dist.get("log", False))
    return values


def _failure_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower():
            return line[:500]
    return lines[-1][:500] if lines else "no output"


class Objective:
    """Runs one trial: a `mixlora-lit fit` child process, then its run record gives the value(s)."""

    def __init__(self, spec: SweepSpec, resolved: dict[str, Any], prune: bool) -> None:
        self.spec, self.resolved, self.prune = spec, resolved, prune
        self.runs_dir = spec.runs_dir.resolve()
        self.child: subprocess.Popen | None = None  # the running trial's fit
        self.stopping = False  # SIGTERM came: the running trial is checkpointed and the worker stops

    def command(self, trial_dir: Path, values: dict[str, Any], number: int, resume: bool = False) -> list[str]:
        """The trial's fit; `fixed` may turn `test_after_fit` on (a study that tests every trial)."""
        return [sys.executable, "-m", "mixlora_lit.cli", "fit", f"--config={self.spec.fit_config}",
                "--test_after_fit=false", *overrides(self.spec.fixed), *overrides(values),
                f"--trainer.default_root_dir={trial_dir}", f"--run_name={self.spec.study_name}/trial_{number:04d}",
                *(["--ckpt_path=last"] if resume else [])]

    def interrupted_trial(self, trial: optuna.Trial, values: dict[str, Any]) -> int | None:
        """The newest earlier trial with these values that was interrupted (by SIGTERM, or its worker was
        killed) and left a checkpoint: this trial continues it in its folder."""
        for old in sorted(trial.study.get_trials(deepcopy=False), key=lambda t: -t.number):
            if old.state != TrialState.FAIL or old.params != values or old.number == trial.number:
                continue
            if old.user_attrs.get("fail_reason") and not old.user_attrs.get("interrupted"):
                continue  # a real failure: start afresh
            if runs.latest_checkpoint(self.runs_dir / f"trial_{old.number:04d}") is not None:
                return old.number
        return None

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        spec = self.spec
        values = sample(trial, spec, self.resolved)
        for key in ("run_dir", "config", "pruned_at_step", "fail_reason", "interrupted", "resumed_trial", "routing",
                    *RECORD_ATTRS):
            if key in trial.user_attrs:  # a retried trial starts with the stale trial's attributes
                trial.set_user_attr(key, None)
        resumed = self.interrupted_trial(trial, values)
        number = trial.number if resumed is None else resumed
        trial_dir = self.runs_dir / f"trial_{number:04d}"
        if resumed is not None:
            trial.set_user_attr("resumed_trial", resumed)
        elif trial_dir.exists():  # left by an earlier study with the same runs_dir: kept, moved aside
            trial_dir.rename(trial_dir.with_name(f"{trial_dir.name}.old-{int(time.time())}"))
        trial_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        if self.prune:
            env[TRIAL_ENV] = json.dumps({"storage": storage_url(spec.storage), "study": spec.study_name,
                                         "trial_id": trial._trial_id, "metric": spec.objectives[0].metric,
                                         "pruner": spec.pruner})
        log = trial_dir / "fit.log"
        with open(log, "a" if resumed is not None else "w", encoding="utf8") as fh:
            self.child = subprocess.Popen(self.command(trial_dir, values, number, resume=resumed is not None),
                                          stdout=fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
            code = self.child.wait()
            self.child = None
        run_dir = trial_dir / "version_0"  # a fresh folder: the fit's first logger version
        record = runs.read_record(run_dir) if run_dir.is_dir() else None
        if run_dir.is_dir():
            trial.set_user_attr("run_dir", str(run_dir))
            config_file = run_dir / runs.CONFIG
            if config_file.is_file():
                trial.set_user_attr("config", yaml.safe_load(config_file.read_text()))
        if record is not None:
            for key in RECORD_ATTRS:
                trial.set_user_attr(key, getattr(record, key))
            if (record.routing or {}).get("val"):  # MixLoRA: routing health of the last dev pass
                trial.set_user_attr("routing", record.routing["val"])
        if code != 0 and self.stopping:
            trial.set_user_attr("interrupted", True)
            self._fail(trial, f"interrupted by SIGTERM (fit exited with code {code}); the next `sweep run` "
                              f"continues it from its checkpoint (log: {log})")
        if code != 0:
            self._fail(trial, f"fit exited with code {code}: {_failure_line(log)} (log: {log})")
        if record is None:
            self._fail(trial, f"fit left no run record under {trial_dir}")
        pruned = trial.study._storage.get_trial_user_attrs(trial._trial_id).get("pruned_at_step")
        if pruned is not None:
            raise optuna.TrialPruned(f"pruned at step {pruned}")
        results = []
        for objective in spec.objectives:
            value = runs.record_metric(record, objective.metric)
            if value is None:
                self._fail(trial, f"the run record of {run_dir} has no value for {objective.metric}")
            results.append(float(value))
        return results[0] if len(results) == 1 else results

    @staticmethod
    def _fail(trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("fail_reason", reason)  # shown by the progress line and `sweep status`
        raise TrialError(reason)


# ---------------------------------------------------------------------- the worker
def _counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = {state: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    return counts


def _real_failures(study: optuna.Study) -> int:
    """Failed trials that count against `max_failed_trials`: not those interrupted by SIGTERM (resumed by the
    next run) or failed by a heartbeat (retried by Optuna)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL
               and t.user_attrs.get("fail_reason") and not t.user_attrs.get("interrupted"))


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queue again the settings of trials interrupted by SIGTERM that no later trial has taken up, so that
    the next trial continues them from their checkpoint instead of the sampler drawing new settings."""
    trials = study.get_trials(deepcopy=False)
    queued = []
    for t in sorted(trials, key=lambda t: -t.number):
        if t.state != TrialState.FAIL or not t.user_attrs.get("interrupted"):
            continue
        if any(o.state != TrialState.FAIL and _trial_params(o) == t.params for o in trials):
            continue
        study.enqueue_trial(t.params)
        trials = study.get_trials(deepcopy=False)
        queued.append(t.number)
    return queued


def _format_values(trial: optuna.trial.FrozenTrial) -> str:
    if trial.values is None:
        return "-"
    return ", ".join(f"{v:.4g}" for v in trial.values)


def _format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                    for k, v in params.items())


def best_summary(study: optuna.Study, grid: bool = False) -> str:
    """The best trial so far; for a grid (every point runs once), nothing is selected."""
    if grid:
        return "a grid: every point runs, none is selected"
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return "best: none yet"
    if len(study.directions) > 1:
        return f"Pareto front: trials {[t.number for t in study.best_trials]}"
    best = study.best_trial
    return f"best: #{best.number} {best.value:.4g} ({_format_params(best.params)})"


def _trial_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return trial.params or trial.system_attrs.get("fixed_params", {})  # a waiting trial has only fixed_params


def next_grid_point(spec: SweepSpec, study: optuna.Study) -> dict[str, Any] | None:
    """The first grid point (in the file's order) with no finished, running or waiting trial, and not
    failed twice for a reason other than an interruption; None when every point is taken."""
    trials = study.get_trials(deepcopy=False)
    for point in spec.grid_points():
        same = [t for t in trials if _trial_params(t) == point]
        if any(t.state != TrialState.FAIL for t in same):
            continue
        failures = [t for t in same if t.user_attrs.get("fail_reason") and not t.user_attrs.get("interrupted")]
        if len(failures) < 2:
            return point
    return None


def archive_trial(spec: SweepSpec, trial: optuna.trial.FrozenTrial, commit: bool) -> str | None:
    """Copy a finished trial's compact record (and a SQLite study) under `spec.archive`; commit them with `commit`."""
    from . import archive

    if spec.archive is None or trial.state == TrialState.RUNNING:
        return None
    written: list[Path] = []
    number = trial.user_attrs.get("resumed_trial", trial.number)
    trial_dir = spec.runs_dir.resolve() / f"trial_{number:04d}"
    run_dir = trial_dir / "version_0"
    if run_dir.is_dir() and not trial.user_attrs.get("interrupted"):  # an interrupted run is archived when done
        dest = spec.archive / "runs" / spec.study_name / trial_dir.name
        archive.archive_run(run_dir, dest, log=trial_dir / "fit.log")
        written.append(dest.parent)  # the study's folder: a copy whose commit failed goes with this one
    database = archive.sqlite_file(spec.storage)
    if database is not None and database.is_file():
        written.append(archive.copy_sqlite(database, spec.archive / database.name))
    if not commit:
        return f"archived in {spec.archive}"
    params = _format_params(trial.params)
    state = "interrupted" if trial.user_attrs.get("interrupted") else trial.state.name.lower()
    what = "study database" if trial.user_attrs.get("interrupted") else "compact record and study database"
    outcome = archive.git_commit(written, f"{spec.study_name}: trial {trial.number} {state} ({params}); {what}")
    return f"archived in {spec.archive}, {outcome}"


def run_sweep(spec: SweepSpec, echo=print, commit: bool = False) -> optuna.Study:
    """One worker: run trials until the study holds `n_trials` finished ones (all workers together).

    A grid study runs its points in order. SIGTERM stops the worker: the running trial's fit writes a
    checkpoint, the trial is marked interrupted, and the next `sweep run` continues it from there.
    With `spec.archive`, every finished trial's compact record is copied there (and committed with `commit`).
    """
    resolved = check_spec(spec)
    pruner = _optuna_object(optuna.pruners, spec, spec.pruner, "pruner")
    if spec.multi_objective and pruner is not None:
        echo(f"[sweep] {spec.study_name}: {len(spec.objectives)} objectives: pruning is off "
             f"(Optuna cannot prune multi-objective studies)")
        pruner = None
    prune = pruner is not None and spec.objectives[0].metric.startswith("val/")
    storage = open_storage(spec.storage, spec.heartbeat_interval, spec.grace_period)
    sampler_settings = dict(spec.sampler)
    if sampler_settings.get("seed") is not None:  # each worker its own stream: workers must not repeat trials
        sampler_settings["seed"] = int(sampler_settings["seed"]) + os.getpid()
    sampler = make_sampler(spec, sampler_settings)
    study = None
    for attempt in range(4):  # workers starting together on a fresh database race to create the study
        try:
            study = optuna.create_study(storage=storage, study_name=spec.study_name, directions=spec.directions,
                                        sampler=sampler, pruner=pruner or optuna.pruners.NopPruner(),
                                        load_if_exists=True)
            break
        except Exception as err:  # noqa: BLE001
            if attempt == 3 or "duplicate" not in str(err).lower() and "unique" not in str(err).lower():
                raise SweepError(f"study {spec.study_name!r} in {_redact(spec.storage)}: {err}") from None
            time.sleep(0.5 + random.random())
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in spec.directions]:
        raise SweepError(f"study {spec.study_name!r} already exists with directions "
                         f"{[d.name.lower() for d in study.directions]}, not {spec.directions}")
    study.set_user_attr("sweep", {"file": str(spec.path), "fit_config": str(spec.fit_config),
                                  "objectives": [o.metric for o in spec.objectives], "fixed": spec.fixed})
    objective = Objective(spec, resolved, prune)

    def done() -> bool:
        counts = _counts(study)
        return (sum(counts[s] for s in FINISHED) >= spec.n_trials
                or _real_failures(study) >= spec.failure_budget and not spec.is_grid)

    def enqueue() -> bool:
        """Grid studies: queue the next point; False when none is left for this worker."""
        if not spec.is_grid:
            return True
        if any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False)):
            return True  # a retried trial (or another worker's point) goes first
        point = next_grid_point(spec, study)
        if point is None:
            return False
        study.enqueue_trial(point)
        return True

    def progress(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        duration = trial.duration.total_seconds() if trial.duration else 0.0
        reason = ""
        if trial.state == TrialState.FAIL:
            reason = f" ({trial.user_attrs.get('fail_reason', '')[:300]})"
        counts = _counts(study_)
        echo(f"[sweep] {spec.study_name} trial {trial.number}: {trial.state.name} value={_format_values(trial)} "
             f"{_format_params(trial.params)} in {duration:.0f} s{reason} | "
             f"{sum(counts[s] for s in FINISHED)}/{spec.n_trials} finished | {best_summary(study_, spec.is_grid)}", flush=True)
        archived = archive_trial(spec, trial, commit)
        if archived:
            echo(f"[sweep] {spec.study_name} trial {trial.number}: {archived}", flush=True)
        if objective.stopping or done() or not enqueue():
            study_.stop()

    if done():
        echo(f"[sweep] {spec.study_name}: already has {spec.n_trials} finished trials; {best_summary(study, spec.is_grid)}")
        return study
    echo(f"[sweep] {spec.study_name}: storage {_redact(spec.storage)}, {spec.n_trials} finished trials wanted, "
         f"{sum(_counts(study)[s] for s in FINISHED)} so far; trial runs in {spec.runs_dir}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our progress line replaces Optuna's per-trial log

    def on_sigterm(signum: int, frame: Any) -> None:
        objective.stopping = True
        child = objective.child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # the fit checkpoints and exits; a second SIGTERM is harmless

    if not spec.is_grid:
        resumed = requeue_interrupted(study)
        if resumed:
            echo(f"[sweep] {spec.study_name}: continuing interrupted trial(s) {resumed} from their checkpoints")
    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        if enqueue():
            study.optimize(objective, n_trials=None, timeout=spec.timeout, callbacks=[progress], catch=(TrialError,),
                           gc_after_trial=True)
    except (optuna.exceptions.OptunaError, sqlalchemy_error()) as err:
        raise SweepError(f"study {spec.study_name!r}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if objective.stopping:
        raise StoppedBySignal(f"(sweep {spec.study_name!r}): the running trial keeps its checkpoint; run the same "
                              f"`sweep run` command to continue")
    counts = _counts(study)
    if _real_failures(study) >= spec.failure_budget and sum(counts[s] for s in FINISHED) < spec.n_trials \
            and not spec.is_grid:
        raise SweepError(f"study {spec.study_name!r}: stopped after {_real_failures(study)} failed trials "
                         f"(max_failed_trials={spec.failure_budget}); see `sweep status` and the trials' fit.log")
    return study


def sqlalchemy_error() -> type[Exception]:
    from sqlalchemy.exc import SQLAlchemyError

    return SQLAlchemyError


# ---------------------------------------------------------------------- reading a study
def status_table(study: optuna.Study) -> str:
    rows = [f"{'#':>4}  {'state':<9}{'value':>18}  {'seconds':>8}  params"]
    for trial in study.get_trials(deepcopy=False):
        duration = f"{trial.duration.total_seconds():.0f}" if trial.duration else "-"
        note = trial.user_attrs.get("pruned_at_step")
        params = _format_params(trial.params) + (f" (pruned at step {note})" if note is not None else "")
        rows.append(f"{trial.number:>4}  {trial.state.name:<9}{_format_values(trial):>18}  {duration:>8}  {params}")
    counts = _counts(study)
    rows.append(", ".join(f"{n} {s.name.lower()}" for s, n in counts.items() if n) + f" | {best_summary(study)}")
    return "\n".join(rows)


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise SweepError(f"study {study.study_name!r} has no complete trial yet")
    return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]


def best_fit_config(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    """The trial's resolved fit config as a ready-to-run YAML (`mixlora-lit fit --config best.yaml`)."""
    if trial.state != TrialState.COMPLETE:
        raise SweepError(f"trial {trial.number} of {study.study_name!r} is {trial.state.name}, not COMPLETE")
    config = trial.user_attrs.get("config")
    if not config:
        raise SweepError(f"trial {trial.number} of {study.study_name!r} recorded no config")
    config = dict(config)
    config["run_name"] = f"{study.study_name}/best"
    config["trainer"] = dict(config.get("trainer") or {}, default_root_dir=None)
    config.pop("ckpt_path", None)
    header = (f"# Best trial #{trial.number} of study {study.study_name!r}: "
              f"{', '.join(f'{v:.4g}' for v in trial.values)}\n"
              f"# params: {json.dumps(trial.params)}\n# mixlora-lit fit --config THIS_FILE\n")
    return header + yaml.safe_dump(config, sort_keys=False)
