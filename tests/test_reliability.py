"""Reliability (docs/reliability.md): interrupted fits resume exactly, files are never half written,
and every user error is one line.

The resume tests run real `mixlora-lit fit` child processes and kill them (SIGKILL, SIGTERM); the
reference is the same fit left alone, and resumed runs must end with the same adapter tensors
(bit for bit), the same metrics.csv rows and the same scores. The error catalogue runs each mistake
through the real command and checks the one line it prints.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import lightning.pytorch as pl
import torch
import yaml
from safetensors.torch import load_file

from conftest import fit_args
from preloaded_cli import run_commands
from mixlora_lit import runs
from mixlora_lit.adapter_io import CHECKSUMS_NAME, SAFETENSORS_NAME, save_adapter_atomically, verify_checksums
from mixlora_lit.lightning.resume import AtomicCheckpointIO

STEPS = 60
TASKS = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa"]
# Dropout on (the RNG state must be restored), validation and periodic checkpoints inside one epoch of
# 1000 training examples (250 batches), so every interruption is mid-epoch.
RESUME_ARGS = ("--model.adapter.lora_dropout=0.1", "--data.train_cap=200", "--trainer.val_check_interval=20",
               "--checkpoint.every_n_train_steps=10", "--test_after_fit=true")
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TIME_COLUMNS = ("per_sec", "time")  # throughput and timing columns differ between any two runs


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mixlora_lit.cli", *args]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=CHILD_ENV)


def _finish(args: list[str], log: Path, timeout: float = 600) -> None:
    child = _start(args, log)
    assert child.wait(timeout=timeout) == 0, log.read_text()[-3000:]


def _wait_for(condition, child: subprocess.Popen, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if child.poll() is not None:
            pytest.fail(f"the fit ended (exit {child.returncode}) before {what}")
        time.sleep(0.05)
    child.kill()
    pytest.fail(f"timed out waiting for {what}")


def _metric_rows(run_dir: Path) -> list[tuple]:
    """metrics.csv rows without throughput and timing columns, in a canonical order."""
    with open(run_dir / runs.METRICS) as fh:
        rows = [{k: v for k, v in row.items() if v != "" and not any(c in k for c in TIME_COLUMNS)}
                for row in csv.DictReader(fh)]
    return sorted(tuple(sorted(r.items())) for r in rows if len(r) > 2)


def _outcome(run_dir: Path) -> dict:
    """What a finished fit leaves that must not depend on interruptions."""
    record = runs.read_record(run_dir)
    history = [{k: h[k] for k in ("stage", "step", "acc", "routing_counts")} for h in runs.read_run(run_dir).eval_history]
    return {"adapter": load_file(runs.adapter_dir(run_dir) / SAFETENSORS_NAME),
            "metrics": _metric_rows(run_dir),
            "val": record.val, "test": record.test, "global_step": record.global_step, "history": history,
            "predictions": runs.read_jsonl(runs.predictions_path(run_dir, "test"))}


def _assert_same_outcome(resumed: dict, reference: dict) -> None:
    assert resumed["adapter"].keys() == reference["adapter"].keys()
    for key, tensor in reference["adapter"].items():
        assert torch.equal(resumed["adapter"][key], tensor), key  # bit-identical on CPU
    assert any(t.abs().sum() > 0 for k, t in reference["adapter"].items() if "lora_B" in k)  # it trained
    for key in ("global_step", "val", "test", "history", "predictions"):
        assert resumed[key] == reference[key], key
    assert resumed["metrics"] == reference["metrics"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prepared_data, tmp_path_factory):
    """The uninterrupted fit every resumed run is compared with (a child process, like them)."""
    root = tmp_path_factory.mktemp("reference")
    _finish(fit_args(tiny_model_dir, prepared_data, root, *RESUME_ARGS, steps=STEPS), root / "fit.log")
    return _outcome(root / "version_0")


def test_sigkill_mid_epoch_then_ckpt_path_last_ends_like_an_uninterrupted_fit(reference, tiny_model_dir,
                                                                             prepared_data, tmp_path):
    args = fit_args(tiny_model_dir, prepared_data, tmp_path, *RESUME_ARGS, steps=STEPS)
    child = _start(args, tmp_path / "killed.log")
    ckpt = tmp_path / "version_0" / runs.CHECKPOINTS_DIR / runs.LAST_CHECKPOINT
    try:
        _wait_for(ckpt.is_file, child, "the first checkpoint")
        time.sleep(random.uniform(0.2, 0.6))  # somewhere after it, mid-step or mid-validation
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    record = runs.read_record(tmp_path / "version_0")
    saved_step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert record.status == "running" and 10 <= saved_step < STEPS  # killed mid-epoch, before the end

    _finish([*args, "--ckpt_path=last"], tmp_path / "resumed.log")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("version_")) == ["version_0"]
    record = runs.read_record(tmp_path / "version_0")
    assert record.status == "finished" and record.resumed_from == str(ckpt)
    _assert_same_outcome(_outcome(tmp_path / "version_0"), reference)


def test_sigterm_writes_a_checkpoint_at_that_step_and_the_run_resumes_exactly(reference, tiny_model_dir,
                                                                              prepared_data, tmp_path):
    # No periodic checkpoint before the end: the only one to resume from is SIGTERM's.
    args = fit_args(tiny_model_dir, prepared_data, tmp_path, *RESUME_ARGS, steps=STEPS)
    args = [a if not a.startswith("--checkpoint.every_n_train_steps") else "--checkpoint.every_n_train_steps=1000"
            for a in args]
    log = tmp_path / "stopped.log"
    child = _start(args, log)
    record_path = tmp_path / "version_0" / runs.RUN_RECORD

    def trained_a_while():
        try:
            return json.loads(record_path.read_text())["global_step"] >= 20  # updated after each validation
        except (OSError, ValueError, KeyError):
            return False

    _wait_for(trained_a_while, child, "step 20")
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=120) == 143  # 128 + SIGTERM: what a scheduler expects
    last = [line for line in log.read_text().splitlines() if line.strip()][-1]
    match = re.fullmatch(r"mixlora-lit: stopped by SIGTERM at step (\d+); checkpoint (.+): resume with the same "
                         r"command and --ckpt_path last", last)
    assert match, last
    step, ckpt = int(match.group(1)), Path(match.group(2))
    assert ckpt == tmp_path / "version_0" / runs.CHECKPOINTS_DIR / runs.LAST_CHECKPOINT
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == step and 20 <= step < STEPS
    stopped = runs.read_record(tmp_path / "version_0")
    assert stopped.status == "interrupted" and stopped.error == f"stopped by SIGTERM at step {step}"

    # A resumption killed outright before training starts (SIGKILL at fit start, after the record was
    # rewritten at setup and the checkpoint restored) must not erase the run's start and wall time.
    killed = subprocess.run(_cli(*args, "--ckpt_path=last", f"--trainer.callbacks+={__name__}.KillAtFitStart"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
                            env={**CHILD_ENV, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                             os.environ.get("PYTHONPATH", "")])})
    assert killed.returncode == -signal.SIGKILL
    after_kill = runs.read_record(tmp_path / "version_0")
    assert after_kill.status == "running" and after_kill.started_at == stopped.started_at
    assert after_kill.wall_time_s >= stopped.wall_time_s

    _finish([*args, "--ckpt_path=last"], tmp_path / "resumed.log")
    _assert_same_outcome(_outcome(tmp_path / "version_0"), reference)
    # One run in its record: the start of the first process, and the wall time of all three.
    resumed = runs.read_record(tmp_path / "version_0")
    assert resumed.started_at == stopped.started_at and resumed.wall_time_s > after_kill.wall_time_s


class KillAtFitStart(pl.Callback):
    """Kills its own process (SIGKILL) at fit start: after setup and the checkpoint restore, before training."""

    def on_fit_start(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGKILL)


class SigtermDuringValidation(pl.Callback):
    """Sends this process a real SIGTERM in the middle of the second validation pass of a fit."""

    def __init__(self) -> None:
        self.passes = 0

    def on_validation_start(self, trainer, pl_module):
        self.passes += 1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.passes == 2 and batch_idx == 1 and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_validation_finishes_the_pass_then_resumes_exactly(tiny_model_dir, prepared_data, tmp_path):
    """A real SIGTERM delivered mid-validation (to this process, by a callback): the pass completes and is
    recorded, the checkpoint is taken after it, and the resumed fit equals an uninterrupted one."""
    from mixlora_lit.lightning.cli import run

    base = ("--model.adapter.lora_dropout=0.1", "--data.train_cap=40", "--trainer.val_check_interval=4",
            "--checkpoint.every_n_train_steps=1000")
    run(fit_args(tiny_model_dir, prepared_data, tmp_path / "full", *base, steps=12))
    args = fit_args(tiny_model_dir, prepared_data, tmp_path / "cut", *base, steps=12)
    with pytest.raises(SystemExit) as stopped:  # Lightning's SIGTERMException
        run([*args, f"--trainer.callbacks+={__name__}.SigtermDuringValidation"])
    assert type(stopped.value).__name__ == "SIGTERMException"
    path, step = stopped.value.mixlora_checkpoint
    assert step == 8 and Path(path).is_file()  # the second validation runs after step 8: completed, not cut
    history = runs.read_run(tmp_path / "cut" / "version_0").eval_history
    assert [h["step"] for h in history] == [4, 8]
    run([*args, "--ckpt_path=last"])
    full, cut = tmp_path / "full" / "version_0", tmp_path / "cut" / "version_0"
    a, b = load_file(runs.adapter_dir(full) / SAFETENSORS_NAME), load_file(runs.adapter_dir(cut) / SAFETENSORS_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs.read_run(cut).eval_history == runs.read_run(full).eval_history
    assert runs.read_record(cut).val == runs.read_record(full).val
    assert _metric_rows(cut) == _metric_rows(full)


# ---------------------------------------------------------------------- atomic files
# One process imports (Lightning: ~6 s) and, for each line it reads, forks a writer that rewrites the
# checkpoint until killed; it prints the writer's pid, then "reaped" once the test has killed it.
_WRITER = textwrap.dedent("""
    import os, sys, torch
    from mixlora_lit.lightning.resume import AtomicCheckpointIO
    io, path = AtomicCheckpointIO(), sys.argv[1]
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            n = 0
            while True:
                n += 1
                io.save_checkpoint({"n": n, "weights": torch.full((6_000_000,), float(n))}, path)
                print(n, flush=True)
        print("pid", pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
""")


def test_a_checkpoint_killed_while_written_leaves_the_previous_one_whole(tmp_path):
    """SIGKILL at random moments of a loop that rewrites a 24 MB checkpoint: the file is always a whole one."""
    path = tmp_path / "last.ckpt"
    seen = []
    server = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        for attempt in range(3):
            server.stdin.write("go\n")
            server.stdin.flush()
            pid, saved_once = None, False
            while pid is None or not saved_once:  # the writer's pid and its first finished save, in any order
                line = server.stdout.readline()
                assert line, "the writer did not start"
                if line.startswith("pid "):
                    pid = int(line.split()[1])
                else:
                    saved_once = True
            time.sleep(random.uniform(0.05, 0.5))
            os.kill(pid, signal.SIGKILL)
            while (line := server.stdout.readline()) and line.strip() != "reaped":
                pass  # saves finished before the kill
            saved = torch.load(path, map_location="cpu", weights_only=False)
            assert torch.equal(saved["weights"], torch.full((6_000_000,), float(saved["n"])))
            seen.append(saved["n"])
    finally:
        server.kill()
        server.wait()
    assert all(n >= 1 for n in seen)


def test_interrupted_writes_leave_the_previous_file(tmp_path, monkeypatch):
    """A failure at the last moment of a write (before the rename) keeps the old run.json, checkpoint and
    adapter files as they were, and leaves no temporary file."""
    record = tmp_path / runs.RUN_RECORD
    runs.write_json_atomic(record, {"v": 1})
    ckpt = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"v": 1}, ckpt)
    adapter = tmp_path / "adapter"
    save_adapter_atomically(adapter, lambda d: (d / SAFETENSORS_NAME).write_bytes(b"old weights"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed at the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        runs.write_json_atomic(record, {"v": 2})
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"v": 2}, ckpt)
    with pytest.raises(KeyboardInterrupt):
        save_adapter_atomically(adapter, lambda d: (d / SAFETENSORS_NAME).write_bytes(b"new weights"))
    monkeypatch.undo()
    assert json.loads(record.read_text()) == {"v": 1}
    assert torch.load(ckpt, weights_only=False) == {"v": 1}
    assert (adapter / SAFETENSORS_NAME).read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "last.ckpt", runs.RUN_RECORD]
    # The checksums go first and come back last: the old weights stay, unlisted rather than mislisted.
    assert sorted(p.name for p in adapter.iterdir()) == [SAFETENSORS_NAME]
    save_adapter_atomically(adapter, lambda d: (d / SAFETENSORS_NAME).write_bytes(b"new weights"))
    verify_checksums(adapter)
    assert sorted(p.name for p in adapter.iterdir()) == [SAFETENSORS_NAME, CHECKSUMS_NAME]


# ---------------------------------------------------------------------- the error catalogue
def _tiny_adapter(directory: Path, base_name: str, **shape) -> Path:
    from conftest import tiny_llama
    from mixlora_lit.config import MixLoraConfig
    from mixlora_lit.model import get_mixlora_model

    model = get_mixlora_model(tiny_llama(dtype=torch.float32, **shape), MixLoraConfig(r=2, lora_alpha=4, num_experts=2,
                                                                                      base_model_name_or_path=base_name))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def catalogue(tiny_model_dir, prepared_data, tmp_path_factory):
    """Every case's command, run through the real `mixlora-lit` entry point, each in its own process (three
    at a time, forked after the imports: tests/preloaded_cli.py): case -> (exit code, stderr, expected
    piece of the message, extra check data)."""
    tmp = tmp_path_factory.mktemp("catalogue")
    data_dir, _ = prepared_data

    def fit(*extra: str, root: str = "run") -> list[str]:
        return fit_args(tiny_model_dir, prepared_data, tmp / root, *extra, steps=2)

    cases: dict[str, tuple[list[str], str]] = {}
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("model:\n  adapter:\n    r: 16\n   top_k: 2\n")
    try:
        yaml.safe_load(bad_yaml.read_text())
    except yaml.YAMLError as err:  # yaml's own position is the oracle
        mark = err.problem_mark
        cases["malformed YAML"] = (fit(f"--config={bad_yaml}"), f"{bad_yaml}:{mark.line + 1}:{mark.column + 1}")
    cases["unknown config key"] = (fit("--model.adapter.num_expert=4"), "--model.adapter.num_expert=4")
    cases["wrong type"] = (fit("--model.adapter.r=abc"), 'key "model.adapter.r"')
    cases["top_k > num_experts"] = (fit("--model.adapter.top_k=9"), "top_k=9 is invalid")
    cases["r < 1"] = (fit("--model.adapter.r=0"), "r=0 is invalid")
    cases["unknown task"] = (fit("--data.tasks=[arc_easyy]"), "unknown task 'arc_easyy'")
    cases["unknown base alias"] = (fit("--model.base=smollm3-360m"), "'smollm3-360m'")
    cases["data folder missing"] = (fit(f"--data.data_dir={tmp / 'nowhere'}", "--data.prepare_source=null"),
                                    f"{tmp / 'nowhere'}")
    (tmp / "empty").mkdir()
    cases["data folder empty"] = (fit(f"--data.data_dir={tmp / 'empty'}", "--data.prepare_source=null"),
                                  "is not prepared")
    broken = tmp / "broken-data"
    _copy_data(data_dir, broken)
    lines = (broken / "piqa" / "dev.jsonl").read_text().splitlines()
    (broken / "piqa" / "dev.jsonl").write_text("\n".join(lines[:6] + [lines[6][:30]] + lines[7:]) + "\n")
    cases["corrupt JSONL line"] = (fit(f"--data.data_dir={broken}", "--data.prepare_source=null"),
                                   f"{broken / 'piqa' / 'dev.jsonl'}:7")
    stale = tmp / "stale-data"
    _copy_data(data_dir, stale)
    with open(stale / "boolq" / "train.jsonl") as fh:
        kept = fh.readlines()[:-3]
    (stale / "boolq" / "train.jsonl").write_text("".join(kept))
    cases["data changed since prepared"] = (fit(f"--data.data_dir={stale}", "--data.prepare_source=null"),
                                            f"{stale / 'boolq' / 'train.jsonl'} has")
    other = _tiny_adapter(tmp / "other-base-adapter", "some/other-model")
    eval_args = ["eval", f"--base={tiny_model_dir}", "--tasks", "arc_easy", "--limit", "2", f"--data-dir={data_dir}",
                 f"--out={tmp / 'eval.json'}"]
    cases["adapter for another base"] = ([*eval_args, f"--adapter={other}"], "was trained on base 'some/other-model'")
    shaped = _tiny_adapter(tmp / "shape-adapter", str(tiny_model_dir), hidden_size=64, intermediate_size=80)
    cases["adapter of another shape"] = ([*eval_args, f"--adapter={shaped}"], "different base")
    truncated = _tiny_adapter(tmp / "truncated-adapter", str(tiny_model_dir), hidden_size=48, intermediate_size=96,
                              vocab_size=97)
    weights = truncated / SAFETENSORS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cases["truncated adapter"] = ([*eval_args, f"--adapter={truncated}"], f"{weights} does not match its sha256")
    unlisted = _tiny_adapter(tmp / "unlisted-adapter", str(tiny_model_dir))
    (unlisted / CHECKSUMS_NAME).unlink()  # no checksum: safetensors itself must refuse the cut file
    cut = unlisted / SAFETENSORS_NAME
    cut.write_bytes(cut.read_bytes()[:100])
    cases["truncated adapter, no checksums"] = ([*eval_args, f"--adapter={unlisted}"], f"cannot read adapter weights {cut}")
    tampered = _tiny_adapter(tmp / "tampered-adapter", str(tiny_model_dir))
    blob = bytearray((tampered / SAFETENSORS_NAME).read_bytes())
    blob[-5] ^= 0xFF  # one byte of tensor data: the file still parses
    (tampered / SAFETENSORS_NAME).write_bytes(bytes(blob))
    cases["tampered adapter"] = ([*eval_args, f"--adapter={tampered}"], "does not match its sha256")
    fit_config = tmp / "fit.yaml"
    fit_config.write_text(yaml.safe_dump({"model": {"base": str(tiny_model_dir)}, "data": {"data_dir": str(data_dir)}}))
    sweep = tmp / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"fit_config": str(fit_config), "space": {"model.adapter.r": {"type": "int", "low": 0,
                                                                                                     "high": 8}},
                                     "objective": {"metric": "val/avg_acc", "direction": "maximize"}, "n_trials": 1,
                                     "storage": f"sqlite:///{tmp / 'sweep.db'}", "study_name": "s"}))
    cases["sweep space with invalid trials"] = (["sweep", "run", f"--config={sweep}"], "r=0 is invalid")
    a_file = tmp / "a-file"
    a_file.write_text("")
    cases["unwritable output directory"] = (fit(root="a-file/run"), f"{a_file / 'run'}")
    cases["unwritable report folder"] = (["report", "--runs", str(tmp), "--out", str(a_file / "report")],
                                         str(a_file / "report"))
    cases["ckpt_path last without a checkpoint"] = (fit("--ckpt_path=last", root="fresh"), "--ckpt_path last")
    cases["non-finite loss"] = (fit_args(tiny_model_dir, prepared_data, tmp / "nan", "--model.optimizer.lr=1e6",
                                         "--checkpoint.every_n_train_steps=1", "--data.train_cap=60", steps=40),
                                "non-finite training loss or weights at global step")
    cases["unknown task to prepare"] = (["data", "prepare", "--tasks", "arc_easyy", f"--out={tmp / 'd'}"],
                                        "unknown task 'arc_easyy'")
    cases["unknown model alias to prepare"] = (["models", "prepare", "smollm9"], "'smollm9'")
    cases["missing argument"] = (["report", "--runs", str(tmp)], "--out")

    done = run_commands([args for args, _ in cases.values()], env=CHILD_ENV, parallel=3)
    results = {name: (d.returncode, d.stderr, expected) for (name, (_, expected)), d in zip(cases.items(), done)}
    results["_tmp"] = tmp
    return results


def _copy_data(source: Path, target: Path) -> None:
    import shutil

    shutil.copytree(source, target)


CASES = ["malformed YAML", "unknown config key", "wrong type", "top_k > num_experts", "r < 1", "unknown task",
         "unknown base alias", "data folder missing", "data folder empty", "corrupt JSONL line",
         "data changed since prepared", "adapter for another base", "adapter of another shape", "truncated adapter",
         "truncated adapter, no checksums", "tampered adapter", "sweep space with invalid trials",
         "unwritable output directory", "unwritable report folder",
         "ckpt_path last without a checkpoint", "non-finite loss", "unknown task to prepare",
         "unknown model alias to prepare", "missing argument"]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line_naming_the_culprit(catalogue, case):
    code, stderr, expected = catalogue[case]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mixlora-lit: error: ")]
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    assert expected in errors[0], errors[0]


def test_the_non_finite_step_is_named_and_its_last_good_checkpoint_kept(catalogue):
    _, stderr, _ = catalogue["non-finite loss"]
    step = int(re.search(r"at global step (\d+)", stderr).group(1))
    ckpt = torch.load(next((catalogue["_tmp"] / "nan").rglob(runs.LAST_CHECKPOINT)), map_location="cpu",
                      weights_only=False)
    assert ckpt["global_step"] == step and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_debug_shows_the_traceback(tiny_model_dir, prepared_data, tmp_path):
    done = subprocess.run(_cli("--debug", *fit_args(tiny_model_dir, prepared_data, tmp_path, "--model.adapter.r=0")),
                          capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    assert done.returncode == 1 and "Traceback" in done.stderr and "r=0 is invalid" in done.stderr


def test_paths_with_spaces_work(tiny_model_dir, prepared_data, tmp_path):
    import shutil

    data = tmp_path / "my data"
    shutil.copytree(prepared_data[0], data)
    root = tmp_path / "my runs" / "first run"
    args = fit_args(tiny_model_dir, (data, None), root, "--test_after_fit=true", steps=2)
    done = subprocess.run(_cli(*args), capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = runs.read_record(root / "version_0")
    assert record.status == "finished" and set(record.test) == set(TASKS) | {"avg"}
    verify_checksums(root / "version_0" / "adapter")


# ---------------------------------------------------------------------- routing alarms
def test_routing_alarms_name_dead_experts_and_collapsed_layers():
    # 100 tokens, top-2: 200 assignments per layer. Layer 0 healthy; layer 1: expert 2 gets 95 of the
    # 100 tokens; layer 2: experts 1 and 3 get nothing.
    counts = [[50, 50, 50, 50], [30, 40, 95, 35], [100, 0, 100, 0]]
    alarms = runs.routing_alarms(counts, top_k=2)
    assert alarms["dead"] == {2: [1, 3]}
    assert alarms["collapsed"] == {1: (2, 0.95), 2: (0, 1.0)}
    assert runs.routing_alarms([[90, 5, 5]], top_k=1, collapse_share=0.9)["collapsed"] == {0: (0, 0.9)}
    assert runs.routing_alarms([[89, 6, 5]], top_k=1)["collapsed"] == {}


def test_the_module_warns_about_dead_experts_at_once_and_collapse_after_three_passes(tiny_model_dir):
    from mixlora_lit.lightning.module import MixLoraLitModule

    module = MixLoraLitModule(base=str(tiny_model_dir), adapter={"num_experts": 4, "top_k": 2, "r": 4})
    collapsed = [[50, 50, 50, 50], [5, 5, 95, 95]]  # layer 1: experts 2 and 3 take 95% each
    with pytest.warns(UserWarning, match=r"dead experts .*layer 1: experts \[1\]"):
        module._warn_unhealthy_routing([[50, 50, 50, 50], [70, 0, 65, 65]])
    import warnings

    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module._warn_unhealthy_routing(collapsed)
        assert not [w for w in caught if "collapse" in str(w.message)]
    with pytest.warns(UserWarning, match=r"router collapse .*layer 1: expert 2 takes 95% of tokens"):
        module._warn_unhealthy_routing(collapsed)


@pytest.mark.parametrize("torch_has_get_total_norm", [True, False])
def test_the_weight_check_after_each_update_names_a_non_finite_tensor_only(tiny_model_dir, monkeypatch,
                                                                           torch_has_get_total_norm):
    """The screen by one total norm stops on a NaN or inf weight and names it, and lets a finite weight
    too large for the norm (whose square overflows fp32) through, as the per-tensor check does; also
    with the fallback for torch < 2.6, which has no `get_total_norm`."""
    from mixlora_lit.errors import TrainingDiverged
    from mixlora_lit.lightning.module import MixLoraLitModule

    if not torch_has_get_total_norm:
        monkeypatch.delattr(torch.nn.utils, "get_total_norm")

    module = MixLoraLitModule(base=str(tiny_model_dir), adapter={"num_experts": 4, "top_k": 2, "r": 4})
    module.configure_model()
    module._check_finite_weights(0)
    name, param = [(n, p) for n, p in module.model.named_parameters() if p.requires_grad][7]
    with torch.no_grad():
        param.view(-1)[3] = 1e30  # finite, but the total norm is inf
        module._check_finite_weights(0)
        for bad in (float("nan"), float("inf")):
            param.view(-1)[3] = bad
            with pytest.raises(TrainingDiverged, match=f"made {re.escape(name)} non-finite"):
                module._check_finite_weights(5)


def test_latest_checkpoint_is_the_highest_version_with_one(tmp_path):
    assert runs.latest_checkpoint(tmp_path) is None
    for version in (0, 2, 10):
        (tmp_path / f"version_{version}" / runs.CHECKPOINTS_DIR).mkdir(parents=True)
    for version in (0, 2):
        runs.last_checkpoint(tmp_path / f"version_{version}").write_bytes(b"x")
    assert runs.latest_checkpoint(tmp_path) == runs.last_checkpoint(tmp_path / "version_2")  # 10 has none


# ---------------------------------------------------------------------- nothing runs code it was handed
class _Payload:
    """A pickle that creates a file when unpickled (what a malicious checkpoint or .bin would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_files_cannot_run_code(tiny_model_dir, prepared_data, tmp_path):
    """A reference-format `adapter_model.bin` and a `--ckpt_path` checkpoint carrying code are refused
    with one line (both are loaded with weights_only=True), and the code never runs."""
    marker = tmp_path / "code-ran"
    adapter = _tiny_adapter(tmp_path / "adapter", str(tiny_model_dir), hidden_size=48, intermediate_size=96)
    (adapter / SAFETENSORS_NAME).unlink()
    (adapter / CHECKSUMS_NAME).unlink()
    torch.save({"mixlora.layers.0.x": _Payload(marker)}, adapter / "adapter_model.bin")
    evil_ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": _Payload(marker)}, evil_ckpt)
    data_dir, _ = prepared_data
    commands = [["eval", f"--base={tiny_model_dir}", f"--adapter={adapter}", "--tasks", "arc_easy", "--limit", "2",
                 f"--data-dir={data_dir}"],
                ["validate", *fit_args(tiny_model_dir, prepared_data, tmp_path / "v", f"--ckpt_path={evil_ckpt}")[1:]]]
    results = run_commands([[a for a in args if not a.startswith(("--trainer.max_steps", "--trainer.val_check",
                                                                 "--trainer.log_every"))] for args in commands],
                           env=CHILD_ENV, parallel=2)
    assert not marker.exists()
    for done, expected in zip(results, ("weights_only=True", f"--ckpt_path {evil_ckpt}: refused to load")):
        last = [line for line in done.stderr.splitlines() if line.strip()][-1]
        assert done.returncode == 2 and last.startswith("mixlora-lit: error: ") and expected in last, done.stderr[-2000:]


def test_a_base_model_with_its_own_code_is_refused_without_running_it(tmp_path):
    import shutil

    from mixlora_lit.base_models import load_base_model
    from mixlora_lit.errors import UserError

    model_dir = tmp_path / "custom-model"
    shutil.copytree(Path(__file__).parent / "fixtures" / "remote_code_model", model_dir)
    with pytest.raises(UserError, match="trust_remote_code"):
        load_base_model(str(model_dir), dtype="fp32")
    assert not (model_dir / "code-ran").exists()


def test_validation_does_not_change_training(tiny_model_dir, prepared_data, tmp_path):
    """Two fits that differ only in how often they validate train identically (dropout on): a validation
    pass leaves the random state as the training step left it."""
    from mixlora_lit.lightning.cli import run

    common = ("--model.adapter.lora_dropout=0.1", "--data.train_cap=40")
    run(fit_args(tiny_model_dir, prepared_data, tmp_path / "often", *common, "--trainer.val_check_interval=2", steps=6))
    run(fit_args(tiny_model_dir, prepared_data, tmp_path / "once", *common, steps=6))

    def losses(run_dir: Path) -> dict[int, str]:
        with open(run_dir / runs.METRICS) as fh:
            return {int(r["step"]): r["train/lm_loss"] for r in csv.DictReader(fh) if r.get("train/lm_loss")}

    often, once = tmp_path / "often" / "version_0", tmp_path / "once" / "version_0"
    assert [h["step"] for h in runs.read_run(often).eval_history] == [2, 4, 6]
    assert losses(often) == losses(once) and len(set(losses(once).values())) > 3
    a, b = load_file(runs.adapter_dir(often) / SAFETENSORS_NAME), load_file(runs.adapter_dir(once) / SAFETENSORS_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


class SigtermAtTrainEnd(pl.Callback):
    """Sends this process a real SIGTERM after the last training step, before the fit ends."""

    def on_train_end(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_after_the_last_step_keeps_the_fit_and_skips_the_test_stage(tiny_model_dir, prepared_data, tmp_path):
    from mixlora_lit.errors import SIGTERM_EXIT, StoppedBySignal
    from mixlora_lit.lightning.cli import run

    args = fit_args(tiny_model_dir, prepared_data, tmp_path, "--test_after_fit=true",
                    f"--trainer.callbacks+={__name__}.SigtermAtTrainEnd", steps=3)
    with pytest.raises(StoppedBySignal) as stopped:
        run(args)
    assert stopped.value.code == SIGTERM_EXIT and "the test stage did not run" in stopped.value.note
    run_dir = tmp_path / "version_0"
    assert runs.read_record(run_dir).global_step == 3 and (runs.adapter_dir(run_dir) / SAFETENSORS_NAME).is_file()
    assert not runs.predictions_path(run_dir, "test").exists()
