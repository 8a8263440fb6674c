"""`mixlora-lit sweep`: real Optuna studies over real `fit` child processes (tiny model, real data and tokenizer),
on SQLite and on a real PostgreSQL server started here."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mixlora_lit import runs
from mixlora_lit.cli import main
from mixlora_lit.sweep.driver import check_spec
from mixlora_lit.sweep.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPACE = {"model.adapter.num_experts": {"type": "int", "low": 2, "high": 4},
         "model.adapter.top_k": {"type": "int", "low": 1, "high": 4},
         "model.adapter.r": {"type": "categorical", "choices": [2, 4]},
         "model.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


@pytest.fixture(scope="module")
def fit_config(tmp_path_factory, tiny_model_dir, prepared_data):
    """A tiny `fit` config: 2 steps on the real 5-task mix, validating at the end."""
    out = tmp_path_factory.mktemp("sweep-fit") / "fit.yaml"
    out.write_text(yaml.safe_dump({
        "seed_everything": 7,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "val_check_interval": 2, "num_sanity_val_steps": 0,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "checkpoint": {"every_n_train_steps": 2},
        "model": {"base": str(tiny_model_dir), "base_dtype": "fp32",
                  "adapter": {"method": "mixlora", "r": 4, "lora_alpha": 8, "num_experts": 4},
                  "optimizer": {"lr": 1e-3}},
        "data": {"data_dir": str(prepared_data[0]), "train_cap": 24, "dev_cap": 6, "test_cap": 6, "batch_size": 4,
                 "eval_batch_size": 8}}))
    return out


def write_sweep(tmp_path: Path, fit_config: Path, name: str = "s", **changes) -> Path:
    spec = {"fit_config": str(fit_config), "space": SPACE, "objective": {"metric": "val/avg_acc"},
            "sampler": {"name": "RandomSampler", "seed": 0}, "n_trials": 4,
            "storage": f"sqlite:///{tmp_path}/{name}.db", "study_name": name, "runs_dir": str(tmp_path / name)}
    spec.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # the space in the order given (grids run in it)
    return path


def study_of(path: Path, storage: str | None = None) -> optuna.Study:
    spec = load_spec(path, storage=storage)
    from mixlora_lit.sweep.driver import load_study

    return load_study(spec.storage, spec.study_name)


def sweep_command(path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mixlora_lit.cli", "sweep", "run", "--config", str(path), *extra]


def test_sqlite_sweep_completes_resumes_and_its_best_config_fits(fit_config, tmp_path, capsys):
    path = write_sweep(tmp_path, fit_config, n_trials=2)
    assert main(["sweep", "run", "--config", str(path)]) == 0
    progress = capsys.readouterr().out
    assert progress.count("COMPLETE value=") == 2 and "2/2 finished" in progress and "best: #" in progress
    study = study_of(path)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 and [t.number for t in trials] == [0, 1]
    for trial in trials:
        p = trial.params
        assert p["model.adapter.top_k"] <= p["model.adapter.num_experts"]
        record = runs.read_record(trial.user_attrs["run_dir"])  # the trial is a real fit with these overrides
        assert record.status == "finished" and record.test == {}  # a sweep never tests
        assert record.val["avg"] == pytest.approx(trial.value)
        assert record.adapter["num_experts"] == p["model.adapter.num_experts"]
        assert record.adapter["top_k"] == p["model.adapter.top_k"] and record.adapter["r"] == p["model.adapter.r"]
        assert trial.user_attrs["trainable_params"] == record.trainable_params
        assert trial.user_attrs["config"]["model"]["optimizer"]["lr"] == pytest.approx(p["model.optimizer.lr"])
        assert Path(trial.user_attrs["run_dir"]).is_relative_to(tmp_path / "s")
    # The same command resumes the study: one more trial to reach 3, the first two kept.
    assert main(["sweep", "run", "--config", str(path), "--n-trials", "3"]) == 0
    study = study_of(path)
    assert len(study.trials) == 3 and study.trials[2].state == TrialState.COMPLETE
    assert [t.params for t in study.trials[:2]] == [t.params for t in trials]
    capsys.readouterr()
    assert main(["sweep", "status", "--config", str(path)]) == 0
    table = capsys.readouterr().out
    assert table.count("COMPLETE") == 3 and "3 complete" in table
    best_yaml = tmp_path / "best.yaml"
    assert main(["sweep", "best", "--storage", f"sqlite:///{tmp_path}/s.db", "--study-name", "s",
                 "--out", str(best_yaml)]) == 0
    assert f"#{study.best_trial.number}" in capsys.readouterr().out
    from mixlora_lit.lightning.cli import run

    cli = run(["fit", f"--config={best_yaml}", f"--trainer.default_root_dir={tmp_path / 'best'}"])
    best = study.best_trial.params
    assert cli.model.mixlora_config.num_experts == best["model.adapter.num_experts"]
    assert cli.model.optim.lr == pytest.approx(best["model.optimizer.lr"])
    assert runs.read_record(cli.trainer.log_dir).status == "finished"


def test_pruning_stops_clearly_worse_trials_at_the_step_they_report(fit_config, tmp_path, capsys):
    """Top-1 routing over 2 experts gives some expert at least half the tokens; over 16 experts far less.
    A threshold on the routing's max load share prunes the 2-expert trial at its first report (step 1)."""
    grid = {"model.adapter.num_experts": [2, 16]}
    path = write_sweep(tmp_path, fit_config, space={"model.adapter.num_experts": {"type": "categorical",
                                                                                  "choices": [2, 16]}},
                       fixed={"model.adapter.top_k": 1, "trainer.max_steps": 3, "trainer.val_check_interval": 1,
                              "validate_at_start": True},
                       objective={"metric": "val/routing/max_load_share", "direction": "minimize"},
                       sampler={"name": "GridSampler", "search_space": grid},
                       pruner={"name": "ThresholdPruner", "upper": 0.45}, n_trials=2)
    assert main(["sweep", "run", "--config", str(path)]) == 0
    by_experts = {t.params["model.adapter.num_experts"]: t for t in study_of(path).trials}
    pruned, kept = by_experts[2], by_experts[16]
    assert pruned.state == TrialState.PRUNED and pruned.user_attrs["pruned_at_step"] == 1
    assert pruned.intermediate_values[1] >= 0.5
    assert runs.read_record(pruned.user_attrs["run_dir"]).global_step == 1  # the run stopped there
    # the pass before training (step 0, the untrained base) is never reported
    assert kept.state == TrialState.COMPLETE and sorted(kept.intermediate_values) == [1, 2, 3]
    assert [h["step"] for h in runs.read_run(kept.user_attrs["run_dir"]).eval_history] == [0, 1, 2, 3]
    assert kept.value < 0.45 and runs.read_record(kept.user_attrs["run_dir"]).global_step == 3


def test_multi_objective_gives_a_pareto_front_and_turns_pruning_off(fit_config, tmp_path, capsys):
    path = write_sweep(tmp_path, fit_config, space={"model.adapter.r": {"type": "categorical", "choices": [2, 8]}},
                       objective=[{"metric": "val/avg_acc", "direction": "maximize"},
                                  {"metric": "trainable_params", "direction": "minimize"}],
                       sampler={"name": "GridSampler", "search_space": {"model.adapter.r": [2, 8]}},
                       pruner={"name": "MedianPruner"}, n_trials=2)
    assert main(["sweep", "run", "--config", str(path)]) == 0
    assert "pruning is off (Optuna cannot prune multi-objective studies)" in capsys.readouterr().out
    study = study_of(path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    params = {t.params["model.adapter.r"]: t.values[1] for t in study.trials}
    assert params[2] < params[8]  # the trainable-parameter objective is the run record's count
    front = study.best_trials
    assert front and all(t.state == TrialState.COMPLETE for t in front)
    assert main(["sweep", "best", "--config", str(path)]) == 0
    assert "Pareto front" in capsys.readouterr().out


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(fit_config, tmp_path, capsys):
    """lr=1e6 diverges (the fit stops with a non-finite loss): FAIL with the reason; lr=1e-3 completes."""
    path = write_sweep(tmp_path, fit_config, space={"model.optimizer.lr": {"type": "categorical",
                                                                           "choices": [1.0e6, 1.0e-3]}},
                       fixed={"trainer.max_steps": 6, "trainer.val_check_interval": 6, "data.train_cap": 60},
                       sampler={"name": "GridSampler", "search_space": {"model.optimizer.lr": [1.0e6, 1.0e-3]}},
                       n_trials=2, max_failed_trials=2)  # the grid's two points, in either order
    assert main(["sweep", "run", "--config", str(path)]) == 0
    trials = {t.params["model.optimizer.lr"]: t for t in study_of(path).trials}
    assert trials[1.0e6].state == TrialState.FAIL
    assert "non-finite training loss" in trials[1.0e6].user_attrs["fail_reason"]
    assert runs.read_record(trials[1.0e6].user_attrs["run_dir"]).status == "failed"
    assert trials[1.0e-3].state == TrialState.COMPLETE


def test_a_killed_worker_s_trial_fails_after_the_grace_period_and_its_retry_resumes_it(fit_config, tmp_path):
    long = {"trainer.max_steps": 1000, "trainer.val_check_interval": 1000, "data.train_cap": 1200}
    path = write_sweep(tmp_path, fit_config, fixed=long, heartbeat={"interval": 1, "grace_period": 3}, n_trials=1)
    worker = subprocess.Popen(sweep_command(path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until the trial's fit is training
            if list((tmp_path / "s" / "trial_0000").rglob(runs.LAST_CHECKPOINT)):
                break
            assert worker.poll() is None, "the worker ended before its trial trained"
            time.sleep(0.2)
        else:
            pytest.fail("the trial never started training")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    time.sleep(1)
    alive = subprocess.run(["pgrep", "-f", str(tmp_path / "s" / "trial_0000")], capture_output=True,
                           text=True).stdout.split()
    assert not alive, "the trial's fit outlived its killed worker"
    assert [t.state for t in study_of(path).trials] == [TrialState.RUNNING]
    time.sleep(4)  # past the grace period
    # A second worker (the same command, shorter trials) fails the stale trial and runs its retry.
    killed_at = torch.load(next((tmp_path / "s" / "trial_0000").rglob(runs.LAST_CHECKPOINT)), map_location="cpu",
                           weights_only=False)["global_step"]
    resumed = {"trainer.max_steps": killed_at + 2, "trainer.val_check_interval": killed_at + 2,
               "data.train_cap": 1200}
    path = write_sweep(tmp_path, fit_config, fixed=resumed, heartbeat={"interval": 1, "grace_period": 3}, n_trials=1)
    assert main(["sweep", "run", "--config", str(path)]) == 0
    trials = study_of(path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0
    assert trials[1].params == trials[0].params
    # The retry continues the killed trial's fit from its checkpoint, in its folder.
    assert trials[1].user_attrs["resumed_trial"] == 0
    assert trials[1].user_attrs["run_dir"].endswith("trial_0000/version_0")
    record = runs.read_record(trials[1].user_attrs["run_dir"])
    assert record.status == "finished" and record.resumed_from.endswith(runs.LAST_CHECKPOINT)
    assert record.global_step == killed_at + 2


# ---------------------------------------------------------------------- PostgreSQL
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server (Debian's package) as a non-root user, on a loopback port, in a temporary
    directory; stopped afterwards."""
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if found is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
    bindir = Path(found).resolve().parent
    home = Path(tempfile.mkdtemp(prefix="mixlora-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(home, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = home / "data", _free_port()
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "mixlora"], check=True,
                   capture_output=True)
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w", "-o",
                    f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mixlora", "sweeps"],
                       check=True, capture_output=True)
        yield f"postgresql://mixlora@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def test_two_workers_share_one_postgresql_study(fit_config, tmp_path, postgres_url):
    path = write_sweep(tmp_path, fit_config, name="pg", n_trials=4)
    workers = [subprocess.Popen(sweep_command(path, "--storage", postgres_url), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert all("COMPLETE" in out for out in outputs)  # both workers ran trials
    trials = study_of(path, storage=postgres_url).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert 4 <= len(complete) <= 5  # the total, not per worker (at most workers - 1 extra)
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers)
    # each worker samples its own stream (the file's seed plus the worker's pid): no repeated trials
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)
    assert len({t.user_attrs["run_dir"] for t in complete}) == len(complete)


# ---------------------------------------------------------------------- bad input
BAD = [
    ({"space": {**SPACE, "model.adapter.num_exprts": {"type": "int", "low": 2, "high": 4}}}, "num_exprts"),
    ({"fixed": {"trainer.max_stepz": 3}}, "max_stepz"),
    ({"space": {**SPACE, "model.adapter.top_k": {"type": "int", "low": 3, "high": 4}}},
     "model.adapter.top_k (at least 3) can exceed model.adapter.num_experts (as low as 2)"),
    ({"space": {}}, "space is empty"),
    ({"sampler": {"name": "TPESamplr"}}, "unknown sampler 'TPESamplr'"),
    ({"pruner": {"name": "MedianPrunr"}}, "unknown pruner 'MedianPrunr'"),
    ({"objective": {"metric": "val/bogus"}}, "objective metric 'val/bogus' is not logged"),
    ({"objective": {"metric": "test/avg_acc"}}, "never test"),
    ({"space": {"model.adapter.r": {"type": "int", "low": 8, "high": 2}}}, "space.model.adapter.r"),
    ({"storage": "postgresql://nobody@127.0.0.1:9/none"}, "cannot open it"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_input_is_one_line_before_any_trial(change, message, fit_config, tmp_path, capsys):
    path = write_sweep(tmp_path, fit_config, **change)
    assert main(["sweep", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixlora-lit: error: ") and message in err[0], err
    assert not (tmp_path / "s").exists()  # no trial ran
    db = tmp_path / "s.db"
    if db.exists():
        assert not optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials


@pytest.mark.parametrize("name", ["mixlora", "lora", "dora"])
def test_shipped_sweeps_pass_every_check(name, monkeypatch):
    """The shipped sweep files parse, their overrides are accepted by the fit parser, and the budgets match."""
    monkeypatch.chdir(ROOT)
    spec = load_spec(ROOT / "sweeps" / f"{name}.yaml")
    check_spec(spec)
    reference = load_spec(ROOT / "sweeps" / "mixlora.yaml")
    assert spec.n_trials == reference.n_trials
    budget = ("trainer.max_steps", "trainer.val_check_interval", "data.train_cap", "data.dev_cap")
    assert {k: spec.fixed[k] for k in budget} == {k: reference.fixed[k] for k in budget}
    assert json.dumps(spec.pruner) == json.dumps(reference.pruner)


def test_cloze_sweeps_may_select_on_acc_norm_and_paper_sweeps_may_not(fit_config, tmp_path):
    """The protocol is a sweep setting like any other: per-character accuracy exists only for cloze runs."""
    cloze = write_sweep(tmp_path, fit_config, name="c", fixed={"data.protocol": "cloze"},
                        objective={"metric": "val/avg_acc_norm"})
    check_spec(load_spec(cloze))
    paper = write_sweep(tmp_path, fit_config, name="p", objective={"metric": "val/boolq/acc_norm"})
    assert main(["sweep", "run", "--config", str(paper)]) == 2


# ---------------------------------------------------------------------- grid studies (the Table 2 study's engine)
GRID_SPACE = {"seed_everything": {"type": "categorical", "choices": [1, 2]},
              "model.adapter.method": {"type": "categorical", "choices": ["mixlora", "lora"]}}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def test_a_grid_runs_every_point_once_in_file_order_and_commits_each_finished_run(fit_config, tmp_path, monkeypatch,
                                                                                   capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    for key in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{key}_NAME", "study")
        monkeypatch.setenv(f"GIT_{key}_EMAIL", "study@example.org")
    (repo / "elsewhere.txt").write_text("staged by someone else: must not be committed with the study")
    _git(repo, "add", "elsewhere.txt")
    archive = repo / "reports" / "grid"
    # Two points, seeds in the file's order (not sorted: 2 before 1); the order over several dimensions is
    # test_the_studys_tuning_sweeps_search_the_shipped_spaces_with_one_budget's (grid_points of main.yaml).
    space = {"seed_everything": {"type": "categorical", "choices": [2, 1]},
             "model.adapter.method": {"type": "categorical", "choices": ["lora"]}}
    path = write_sweep(tmp_path, fit_config, space=space, sampler={"name": "GridSampler"},
                       fixed={"test_after_fit": True, "trainer.max_steps": 1, "trainer.val_check_interval": 1},
                       objective={"metric": "trainable_params"}, archive=str(archive))
    yaml_spec = yaml.safe_load(path.read_text())
    yaml_spec.pop("n_trials")  # a grid's size is its number of trials
    path.write_text(yaml.safe_dump(yaml_spec, sort_keys=False))
    assert main(["sweep", "run", "--config", str(path), "--commit"]) == 0
    trials = study_of(path).trials
    expected = [{"seed_everything": s, "model.adapter.method": "lora"} for s in (2, 1)]
    assert [t.params for t in trials] == expected and all(t.state == TrialState.COMPLETE for t in trials)
    # Each finished run: a compact record (test predictions included, no checkpoint or adapter) and a commit.
    for trial in trials:
        copy = archive / "runs" / "s" / f"trial_{trial.number:04d}"
        record = runs.read_record(copy)
        assert record.status == "finished" and record.seed == trial.params["seed_everything"]
        assert record.method == trial.params["model.adapter.method"]
        assert runs.read_jsonl(copy / "predictions" / "test.jsonl") == runs.read_jsonl(
            Path(trial.user_attrs["run_dir"]) / "predictions" / "test.jsonl")
        assert not list(copy.rglob("*.ckpt")) and not (copy / runs.ADAPTER_DIR).exists()
    log = _git(repo, "log", "--format=%s").splitlines()
    assert len(log) == 2 and all(f"s: trial {n} complete" in line for n, line in zip(range(1, -1, -1), log))
    assert "elsewhere.txt" not in _git(repo, "ls-tree", "-r", "--name-only", "HEAD")
    assert _git(repo, "status", "--porcelain", "--", "reports") == ""  # everything archived is committed
    # The committed study database is a consistent copy that Optuna reads.
    copy = optuna.load_study(study_name="s", storage=f"sqlite:///{archive / 's.db'}")
    assert [t.params for t in copy.trials] == expected
    progress = capsys.readouterr().out
    assert "2/2 finished | a grid: every point runs, none is selected" in progress and "best: #" not in progress
    assert main(["sweep", "run", "--config", str(path), "--commit"]) == 0  # nothing left to run
    assert "already has 2 finished trials" in capsys.readouterr().out and len(study_of(path).trials) == 2


def test_sigterm_stops_a_grid_worker_and_the_next_run_continues_the_trial_from_its_checkpoint(fit_config, tmp_path):
    long = {"trainer.max_steps": 1000, "trainer.val_check_interval": 1000, "checkpoint.every_n_train_steps": 2,
            "data.train_cap": 1200}
    space = dict(GRID_SPACE, seed_everything={"type": "categorical", "choices": [1]})  # 2 points
    path = write_sweep(tmp_path, fit_config, space=space, sampler={"name": "GridSampler"}, fixed=long,
                       objective={"metric": "trainable_params"}, n_trials=2)
    log = tmp_path / "worker.log"
    with open(log, "w") as fh:
        worker = subprocess.Popen(sweep_command(path), stdout=fh, stderr=subprocess.STDOUT)
    checkpoints = tmp_path / "s" / "trial_0000" / "version_0" / runs.CHECKPOINTS_DIR
    deadline = time.time() + 120
    while not (checkpoints / runs.LAST_CHECKPOINT).is_file():
        assert worker.poll() is None and time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)  # the worker alone, as `kill PID` does
    assert worker.wait(timeout=120) == 143
    last = [line for line in log.read_text().splitlines() if line.strip()][-1]
    assert last.startswith("mixlora-lit: stopped by SIGTERM (sweep 's')"), last
    trials = study_of(path).trials
    assert len(trials) == 1 and trials[0].state == TrialState.FAIL and trials[0].user_attrs["interrupted"]
    stopped_at = torch.load(checkpoints / runs.LAST_CHECKPOINT, map_location="cpu", weights_only=False)["global_step"]
    assert runs.read_record(checkpoints.parent).status == "interrupted"

    short = dict(long, **{"trainer.max_steps": stopped_at + 2, "trainer.val_check_interval": stopped_at + 2})
    path = write_sweep(tmp_path, fit_config, space=space, sampler={"name": "GridSampler"}, fixed=short,
                       objective={"metric": "trainable_params"}, n_trials=2)
    assert main(["sweep", "run", "--config", str(path)]) == 0
    trials = study_of(path).trials
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert trials[1].params == trials[0].params and trials[1].user_attrs["resumed_trial"] == 0
    record = runs.read_record(trials[1].user_attrs["run_dir"])
    assert trials[1].user_attrs["run_dir"].endswith("trial_0000/version_0") and record.status == "finished"
    assert record.resumed_from == str(checkpoints / runs.LAST_CHECKPOINT) and record.global_step == stopped_at + 2
    assert [t.params for t in trials[1:]] == [{"seed_everything": 1, "model.adapter.method": m}
                                              for m in ("mixlora", "lora")]


def test_a_grid_takes_categorical_dimensions_only(fit_config, tmp_path, capsys):
    path = write_sweep(tmp_path, fit_config, sampler={"name": "GridSampler"})
    assert main(["sweep", "run", "--config", str(path)]) == 2
    assert "sampler GridSampler needs categorical dimensions only; ['model.adapter.num_experts', " \
           "'model.adapter.top_k', 'model.optimizer.lr'] are not" in capsys.readouterr().err


def test_the_studys_tuning_sweeps_search_the_shipped_spaces_with_one_budget():
    """Item 3 of the Table 2 study: each method tuned with its shipped sweep's space, objective and sampler,
    and the same trials, steps, data and seed for all three (`extends` merges `fixed`, replaces the rest)."""
    budgets = []
    for method in ("mixlora", "lora", "dora"):
        shipped = load_spec(ROOT / "sweeps" / f"{method}.yaml")
        tune = load_spec(ROOT / "sweeps" / "table2_smollm2" / f"tune_{method}.yaml")
        assert tune.space == shipped.space and tune.objectives == shipped.objectives
        assert tune.sampler == shipped.sampler and tune.pruner is None
        assert tune.fit_config.resolve() == (ROOT / "configs" / "studies" / "table2_smollm2.yaml").resolve()
        assert tune.fixed["model.adapter.method"] == method
        for key, value in shipped.fixed.items():  # the shipped fixed values stay unless the study sets them
            assert tune.fixed[key] == value or key in yaml.safe_load(
                (ROOT / "sweeps" / "table2_smollm2" / f"tune_{method}.yaml").read_text())["fixed"]
        budgets.append((tune.n_trials, {k: v for k, v in tune.fixed.items()
                                        if k not in ("model.adapter.method", "model.adapter.match_rank")}))
    assert budgets[0] == budgets[1] == budgets[2]
    n_trials, fixed = budgets[0]
    assert n_trials == 4 and fixed["trainer.max_steps"] == 40 and fixed["data.train_cap"] is None
    main_grid = load_spec(ROOT / "sweeps" / "table2_smollm2" / "main.yaml")
    assert main_grid.is_grid and main_grid.n_trials == 9 and main_grid.grid_points()[:3] == [
        {"data.protocol": "paper", "seed_everything": 1, "model.adapter.method": m} for m in ("mixlora", "lora", "dora")]
    cloze = load_spec(ROOT / "sweeps" / "table2_smollm2" / "cloze.yaml")  # the same runs but protocol and cutoff
    assert cloze.is_grid and cloze.n_trials == 9 and {p["data.protocol"] for p in cloze.grid_points()} == {"cloze"}
    assert cloze.fixed == {**main_grid.fixed, "data.cutoff_len": 1024} and cloze.fit_config == main_grid.fit_config
    tuned = load_spec(ROOT / "sweeps" / "table2_smollm2" / "tuned.yaml",
                      fit_config=ROOT / "sweeps" / "table2_smollm2" / "tuned.yaml")  # any existing file
    assert tuned.fixed["trainer.max_steps"] == main_grid.fixed["trainer.max_steps"]  # the main runs' budget
    assert tuned.fixed["data.test_cap"] == 500 and tuned.n_trials == 3
    # Item 4: MixLoRA's expert count x top-k with the MixLoRA tuning budget, at that sweep's best settings
    # (run.sh passes its `sweep best --out` file as the fit config).
    shape = load_spec(ROOT / "sweeps" / "table2_smollm2" / "shape.yaml",
                      fit_config=ROOT / "sweeps" / "table2_smollm2" / "tuned.yaml")
    tune_mixlora = load_spec(ROOT / "sweeps" / "table2_smollm2" / "tune_mixlora.yaml")
    assert shape.is_grid and shape.n_trials == 6 and shape.fixed == tune_mixlora.fixed
    assert set(shape.space) == {"model.adapter.num_experts", "model.adapter.top_k"}


def test_extends_reports_a_missing_parent_and_a_cycle(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    for name, message in (("a.yaml", "a cycle of sweep files"), ("c.yaml", "extends 'nowhere.yaml': no such sweep file")):
        assert main(["sweep", "run", "--config", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err


def test_a_sampled_sweep_continues_its_interrupted_trial_instead_of_drawing_new_settings(fit_config, tmp_path):
    long = {"trainer.max_steps": 1000, "trainer.val_check_interval": 1000, "checkpoint.every_n_train_steps": 2,
            "data.train_cap": 1200}
    path = write_sweep(tmp_path, fit_config, fixed=long, n_trials=1)  # RandomSampler over SPACE
    worker = subprocess.Popen(sweep_command(path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "s" / "trial_0000" / "version_0" / runs.CHECKPOINTS_DIR / runs.LAST_CHECKPOINT
    deadline = time.time() + 120
    while not checkpoint.is_file():
        assert worker.poll() is None and time.time() < deadline
        time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=120) == 143
    stopped_at = torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
    short = dict(long, **{"trainer.max_steps": stopped_at + 2, "trainer.val_check_interval": stopped_at + 2})
    path = write_sweep(tmp_path, fit_config, fixed=short, n_trials=1, max_failed_trials=1)
    assert main(["sweep", "run", "--config", str(path)]) == 0  # the interrupted trial is no failure
    interrupted, resumed = study_of(path).trials
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["interrupted"]
    assert resumed.state == TrialState.COMPLETE and resumed.params == interrupted.params
    assert resumed.user_attrs["resumed_trial"] == 0
    assert runs.read_record(resumed.user_attrs["run_dir"]).global_step == stopped_at + 2
