"""`mixlora-lit data prepare`: normalised JSONL per task and split, plus a manifest.

Splits: `test` is the paper's evaluation split (ARC/OBQA test, the others validation); `dev` is
a seeded held-out slice of train (default 10%, at most 500) for model selection and sweeps, so
nothing is ever tuned on `test`; `train` is the rest, in source order.

Each task is written to temporary files and moved into place only when complete, and the
manifest (record count and sha256 per file) is rewritten after each task, so an interrupted run
resumes where it stopped and a failed run deletes nothing already prepared.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..base_models import cache_dir
from ..files import sha256_file
from .sources import DataError, Record, directory_records, hub_records, iter_jsonl, olmo_records, validate_all
from .tasks import get_task, resolve_tasks

DATA_ENV = "MIXLORA_LIT_DATA"
MANIFEST = "manifest.json"
SPLITS = ("train", "dev", "test")


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or cache_dir() / "data")


def dev_size(n_train: int, fraction: float, maximum: int) -> int:
    return min(maximum, int(round(n_train * fraction)))


def read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.is_file():
        return {"tasks": {}}
    try:
        return json.loads(path.read_text(encoding="utf8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is corrupt ({err.msg}); re-run `mixlora-lit data prepare --out {out} --force`") from err


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf8")
    os.replace(tmp, out / MANIFEST)


def _is_current(out: Path, entry: dict[str, Any] | None, params: dict[str, Any]) -> bool:
    if not entry or entry.get("params") != params:
        return False
    for split in SPLITS:
        info = entry["splits"].get(split)
        path = out / entry["task"] / f"{split}.jsonl"
        if info is None or not path.is_file() or path.stat().st_size != info["bytes"]:
            return False
        if sha256_file(path) != info["sha256"]:
            return False
    return True


def _load_source(task: str, source: str, hub_dir: Path | None) -> tuple[list[Record], list[Record], list[Record] | None]:
    """(train, test, dev or None) records of one task from one source."""
    spec = get_task(task)
    if source == "olmo":
        downloads = cache_dir() / "downloads"
        return olmo_records(task, "train", downloads), olmo_records(task, spec.eval_split, downloads), None
    if source == "hub":
        return hub_records(task, "train", hub_dir), hub_records(task, spec.eval_split, hub_dir), None
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"--source {source!r} is not 'olmo', 'hub' or an existing directory")
    return (directory_records(task, "train", root), directory_records(task, "test", root),
            directory_records(task, "dev", root))


def _write_jsonl(records: list[Record], path: Path) -> dict[str, Any]:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    return {"tmp": tmp, "count": len(records), "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}


def prepare(tasks=("all",), source: str = "olmo", out: str | os.PathLike | None = None, seed: int = 42,
            dev_fraction: float = 0.1, dev_max: int = 500, force: bool = False,
            hub_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Prepare `tasks`; skip those already prepared with the same parameters. Returns the manifest."""
    names = resolve_tasks(tasks)
    if not 0 <= dev_fraction < 1 or dev_max < 0:
        raise DataError(f"dev_fraction must be in [0, 1) and dev_max >= 0, got {dev_fraction}, {dev_max}")
    out = Path(out) if out is not None else default_data_dir()
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    manifest.setdefault("tasks", {})
    source_key = source if source in ("olmo", "hub") else str(Path(source).resolve())
    params = {"source": source_key, "seed": seed, "dev_fraction": dev_fraction, "dev_max": dev_max}
    bar = tqdm(names, desc="preparing tasks", unit="task", disable=not progress)
    for task in bar:
        bar.set_postfix_str(task)
        if not force and _is_current(out, manifest["tasks"].get(task), params):
            continue
        train, test, dev = _load_source(task, source, Path(hub_dir) if hub_dir else None)
        where = f"{source} {task}"
        train, test = validate_all(train, task, f"{where} train"), validate_all(test, task, f"{where} test")
        if dev is None:
            order = list(range(len(train)))
            random.Random(f"{seed}:{task}").shuffle(order)
            held = set(order[: dev_size(len(train), dev_fraction, dev_max)])
            dev = [train[i] for i in sorted(held)]
            train = [r for i, r in enumerate(train) if i not in held]
        else:
            dev = validate_all(dev, task, f"{where} dev")
        overlap = {r["id"] for r in dev} & {r["id"] for r in train}
        if overlap:
            raise DataError(f"{where}: dev and train share record ids, e.g. {sorted(overlap)[:3]}")
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        written = {split: _write_jsonl(recs, folder / f"{split}.jsonl")
                   for split, recs in (("train", train), ("dev", dev), ("test", test))}
        for split, info in written.items():  # all three files are complete: move them into place
            os.replace(info.pop("tmp"), folder / f"{split}.jsonl")
        manifest["tasks"][task] = {"task": task, "params": params, "splits": written}
        _write_manifest(out, manifest)
    return manifest


def read_split(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[Record]:
    """Records of one prepared task split, validated, with a clear error when not prepared."""
    name = get_task(task).name
    if split not in SPLITS:
        raise DataError(f"split {split!r} is invalid: expected one of {list(SPLITS)}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    path = data_dir / name / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"task {name!r} is not prepared in {data_dir} ({path} is missing): run "
                        f"`mixlora-lit data prepare --tasks {name} --out {data_dir}`")
    from .sources import validate_record

    records = [validate_record(rec, name, f"{path}:{line}") for line, rec in iter_jsonl(path)]
    _check_against_manifest(data_dir, name, split, path)  # after parsing: a broken line is named first
    if not records:
        raise DataError(f"{path} has no records: re-run `mixlora-lit data prepare --tasks {name} --out {data_dir} "
                        f"--force`")
    return records


def _check_against_manifest(data_dir: Path, task: str, split: str, path: Path) -> None:
    """A prepared file whose size differs from the manifest's was changed or cut short after preparing.

    Prepared records are untokenised text with the answer as a label, so one folder serves every
    tokenizer and protocol; only the content itself can go stale."""
    entry = read_manifest(data_dir)["tasks"].get(task)
    info = (entry or {}).get("splits", {}).get(split)
    if info and path.stat().st_size != info.get("bytes"):
        raise DataError(f"{path} has {path.stat().st_size} bytes but {data_dir / MANIFEST} recorded {info['bytes']} "
                        f"when it was prepared: it was changed or truncated since; re-run `mixlora-lit data prepare "
                        f"--tasks {task} --out {data_dir} --force`")
