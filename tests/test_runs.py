"""`mixlora_lit.runs`: the run-directory contract, without torch or Lightning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy.stats import entropy

from mixlora_lit import runs

ROOT = Path(__file__).resolve().parents[1]


def test_runs_imports_neither_torch_nor_lightning():
    code = ("import sys, mixlora_lit.runs; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'pytorch_lightning')]; "
            "assert not bad, bad[:5]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_routing_health_against_scipy_entropy():
    counts = [[10, 0, 30, 60], [25, 25, 25, 25], [0, 0, 0, 7]]
    health = runs.routing_health(counts)
    # scipy normalises the counts itself; entropy in base E is the entropy over log(E).
    expected_entropy = sum(entropy(layer, base=4) for layer in counts) / 3
    assert health["load_entropy"] == pytest.approx(expected_entropy, rel=1e-12)
    assert health["dead_expert_frac"] == pytest.approx(4 / 12)
    assert health["max_load_share"] == 1.0
    balanced = runs.routing_health([[5, 5], [3, 3]])
    assert balanced == {"load_entropy": pytest.approx(1.0), "dead_expert_frac": 0.0, "max_load_share": 0.5}
    with pytest.raises(ValueError, match="same number of experts"):
        runs.routing_health([[1, 2], [1, 2, 3]])


def test_accuracy_by_task_is_the_fraction_correct_and_the_unweighted_task_mean():
    rows = ([{"task": "a", "correct": c} for c in (True, True, False, True)]
            + [{"task": "b", "correct": c} for c in (False, True)])
    acc = runs.accuracy_by_task(rows)
    assert acc == {"a": 0.75, "b": 0.5, "avg": 0.625}  # (3/4 + 1/2) / 2, not 4/6


def test_record_round_trips_and_rejects_a_bad_status(tmp_path):
    record = runs.RunRecord(method="lora", base="smollm2-135m", protocol="paper", tasks=["boolq"], seed=3,
                            val={"boolq": 0.5, "avg": 0.5})
    record.write(tmp_path)
    loaded = runs.read_record(tmp_path)
    assert loaded == record and loaded.updated_at is not None
    with pytest.raises(ValueError, match="status='done' is invalid"):
        runs.RunRecord(method="lora", base="b", protocol="paper", tasks=[], status="done")
    (tmp_path / runs.RUN_RECORD).write_text('{"method": "lora"}')
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['base', 'protocol', 'tasks'\]"):
        runs.read_record(tmp_path)


def test_read_run_of_an_unfinished_directory_and_find_runs(tmp_path):
    empty = tmp_path / "a" / "version_0"
    empty.mkdir(parents=True)
    run = runs.read_run(empty)
    assert run.record is None and run.predictions == {} and run.eval_history == [] and not run.has_adapter
    done = tmp_path / "b" / "version_3"
    runs.RunRecord(method="mixlora", base="x", protocol="paper", tasks=["piqa"]).write(done)
    runs.write_predictions(done, "test", [{"task": "piqa", "id": "2", "label": 0, "prediction": 0, "correct": True,
                                           "protocol": "paper"},
                                          {"task": "piqa", "id": "1", "label": 1, "prediction": 0, "correct": False,
                                           "protocol": "paper"}])
    assert runs.find_runs([tmp_path]) == [done]
    assert runs.find_runs([done, tmp_path / "b"]) == [done]
    loaded = runs.read_run(done)
    assert loaded.status == "running" and [r["id"] for r in loaded.predictions["test"]] == ["1", "2"]
    with pytest.raises(FileNotFoundError):
        runs.find_runs([tmp_path / "missing"])


def test_a_corrupt_predictions_line_names_the_file_and_line(tmp_path):
    path = runs.predictions_path(tmp_path, "val")
    path.parent.mkdir(parents=True)
    path.write_text('{"task": "a", "correct": true}\n{"task": "a", "corr\n')
    with pytest.raises(ValueError, match=r"val\.jsonl:2: not valid JSON"):
        runs.read_run(tmp_path)


def test_an_interrupted_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / runs.RUN_RECORD
    runs.write_json_atomic(path, {"status": "running", "n": 1})

    def killed(*args, **kwargs):  # the process dies between writing the temporary file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        runs.write_json_atomic(path, {"status": "finished", "n": 2})
    assert json.loads(path.read_text()) == {"status": "running", "n": 1}
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == [runs.RUN_RECORD]  # no temporary file left behind


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_sigkill_during_rewrites_never_leaves_a_half_written_record(tmp_path):
    """A child rewrites a large record as fast as it can; SIGKILL it at staggered moments."""
    path = tmp_path / runs.RUN_RECORD
    code = ("import sys; from mixlora_lit import runs\n"
            "i = 0\n"
            "while True:\n"
            "    i += 1\n"
            "    runs.write_json_atomic(sys.argv[1], {'i': i, 'pad': ['x' * 100] * 20000})\n")
    seen = set()
    for attempt in range(6):
        path.unlink(missing_ok=True)  # the last attempt's record
        child = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT)
        # Kill it once it is rewriting in its loop: a later record each attempt (writes are synced, so on
        # a loaded machine a fixed delay after the first write could land before the second, every time).
        deadline = time.time() + 60
        while not (path.exists() and json.loads(path.read_text())["i"] > attempt + 1):
            assert time.time() < deadline and child.poll() is None, "the child did not rewrite its record"
            time.sleep(0.01)
        time.sleep(0.01 + 0.013 * attempt)
        child.send_signal(signal.SIGKILL)
        child.wait()
        data = json.loads(path.read_text())  # always a whole record
        assert len(data["pad"]) == 20000
        seen.add(data["i"])
    assert len(seen) > 1  # the kills landed at different points of the rewriting


def test_median_and_environment():
    assert runs.median([3.0, 1.0, 2.0, float("nan")]) == 2.0 and runs.median([]) is None
    assert runs.median([1.0, 4.0]) == 2.5
    versions = runs.package_versions()
    assert versions["python"].count(".") == 2 and "mixlora-lit" in versions
    commit = runs.git_commit(ROOT)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert commit.split("+")[0] == head.stdout.strip()
    hw = runs.hardware(threads=2)
    assert hw["threads"] == 2 and hw["cpu"] and hw["cpu_count"] >= 1
