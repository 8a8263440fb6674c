"""The run directory: what a training or test run leaves on disk, in one place.

Lightning code writes through this module and sweeps and reports read through it; no other file
spells out a run file name. It imports neither torch nor Lightning, so a report can read copied
run folders on a laptop.

A run directory (`runs/<run_name>/version_N/`) holds:

    run.json                 the run record (`RunRecord`), rewritten atomically at the end of each stage
    config.yaml              the resolved LightningCLI config
    metrics.csv              every logged metric (Lightning's CSVLogger), TensorBoard events beside it
    eval_history.json        every evaluation pass: accuracy per task and tokens per expert per layer
    predictions/val.jsonl    one line per dev example of the last validation pass
    predictions/test.jsonl   one line per test example of the last test pass
    checkpoints/last.ckpt    trainable tensors + optimizer, scheduler and RNG state (resume)
    adapter/                 the trained adapter (`save_pretrained`) and its training config
    lm_eval/step_N.json      lm-evaluation-harness results, when that callback runs
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable
from .errors import UserError, MissingFileError

RUN_RECORD = "run.json"
CONFIG = "config.yaml"
METRICS = "metrics.csv"
EVAL_HISTORY = "eval_history.json"
PREDICTIONS_DIR = "predictions"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
ADAPTER_DIR = "adapter"
TRAINING_CONFIG = "training_config.yaml"  # inside adapter/: the config that trained it
LM_EVAL_DIR = "lm_eval"

STATUSES = ("running", "finished", "failed", "interrupted")  # interrupted: stopped by SIGTERM, resumable
SPLITS = ("val", "test")
# Every line of predictions/<split>.jsonl has at least these keys.
PREDICTION_KEYS = ("task", "id", "label", "prediction", "correct", "protocol")
SCHEMA_VERSION = 1
# Packages whose versions a run record keeps (distribution names).
VERSIONED_PACKAGES = ("mixlora-lit", "torch", "lightning", "transformers", "peft", "torchmetrics", "lm-eval",
                      "optuna")


# ---------------------------------------------------------------------- paths
def predictions_path(run_dir: str | os.PathLike, split: str) -> Path:
    if split not in SPLITS:
        raise UserError(f"split={split!r} is invalid: expected one of {list(SPLITS)}")
    return Path(run_dir) / PREDICTIONS_DIR / f"{split}.jsonl"


def adapter_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / ADAPTER_DIR


def last_checkpoint(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / LAST_CHECKPOINT


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint `--ckpt_path last` resumes under a run root: `last.ckpt` of the highest
    `version_N` that has one (or of `root` itself when it is a run directory), None if there is none."""
    root = Path(root)
    versions = []
    if root.is_dir():
        for child in root.iterdir():
            number = child.name.removeprefix("version_")
            if child.name.startswith("version_") and number.isdigit() and last_checkpoint(child).is_file():
                versions.append((int(number), last_checkpoint(child)))
    if versions:
        return max(versions)[1]
    return last_checkpoint(root) if last_checkpoint(root).is_file() else None


def lm_eval_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / LM_EVAL_DIR / f"step_{step}.json"


# ---------------------------------------------------------------------- atomic writes
def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(fh)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    A process killed at any point leaves either the previous file or the new one, never a mix (the
    temporary file is in the same directory, so the rename is atomic on a POSIX filesystem).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp makes 0600; keep what a plain open() would give
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`write_atomic` of a text file (UTF-8)."""
    data = text.encode("utf8")
    return write_atomic(path, lambda fh: fh.write(data))


def _file_mode(path: Path) -> int:
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------------- the record
@dataclass
class RunRecord:
    """What one run did, as plain data (the content of `run.json`).

    `val` and `test` map task -> accuracy plus `avg` (the unweighted mean over tasks) for the last
    pass of that split; `routing` maps split -> routing health (MixLoRA only); `status` is
    `running` until the stage in progress ends, then `finished`, `failed` (with `error`), or `interrupted`
    (SIGTERM: a checkpoint was written and the run resumes with `--ckpt_path last`).
    """

    method: str
    base: str
    protocol: str
    tasks: list[str]
    seed: int | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    global_step: int = 0
    wall_time_s: float = 0.0
    tokens_per_s: float | None = None  # median of the training throughput windows
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    val_norm: dict[str, float] = field(default_factory=dict)  # cloze: acc_norm (per character), same layout
    test_norm: dict[str, float] = field(default_factory=dict)
    status: str = "running"
    error: str | None = None
    stage: str | None = None  # the stage in progress or last ended: fit, validate, test, predict
    routing: dict[str, dict[str, float]] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)  # the method's hyperparameters
    run_name: str | None = None
    command: str | None = None  # the command line that ran this stage
    resumed_from: str | None = None
    started_at: str | None = None
    updated_at: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    hardware: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise UserError(f"status={self.status!r} is invalid: expected one of {list(STATUSES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = RUN_RECORD) -> "RunRecord":
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a JSON object, found {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("method", "base", "protocol", "tasks") if k not in data]
        if missing:
            raise UserError(f"{source}: run record lacks key(s) {missing}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, run_dir: str | os.PathLike) -> Path:
        self.updated_at = timestamp()
        return write_json_atomic(Path(run_dir) / RUN_RECORD, self.to_dict())


def record_metric(record: RunRecord, metric: str) -> float | None:
    """A logged metric's value as the record keeps it: `val/avg_acc`, `val/<task>/acc`,
    `val/routing/<stat>` (and the same for `test/`), or a record field such as `tokens_per_s`."""
    split, _, rest = metric.partition("/")
    if split in SPLITS and rest:
        if rest in ("avg_acc", "avg_acc_norm"):
            return getattr(record, split if rest == "avg_acc" else f"{split}_norm").get("avg")
        if rest.startswith("routing/"):
            return record.routing.get(split, {}).get(rest.split("/", 1)[1])
        task, _, name = rest.partition("/")
        if name in ("acc", "acc_norm"):
            return getattr(record, split if name == "acc" else f"{split}_norm").get(task)
        return None
    value = getattr(record, metric, None) if metric in {f.name for f in dataclasses.fields(RunRecord)} else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def scores_with_average(per_task: dict[str, float]) -> dict[str, float]:
    """{task: acc} plus `avg`, the unweighted mean over tasks (the paper's average)."""
    out = dict(per_task)
    if per_task:
        out["avg"] = sum(per_task.values()) / len(per_task)
    return out


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def median(values: Iterable[float]) -> float | None:
    ordered = sorted(v for v in values if v is not None and math.isfinite(v))
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# ---------------------------------------------------------------------- environment
def package_versions(packages: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the git work tree holding `path` (default: this package), `+dirty` if modified."""
    where = str(path or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(threads: int | None = None, gpu: str | None = None, devices: int = 1,
             **extra: Any) -> dict[str, Any]:
    """CPU model and the threads the run computes with, or the GPU's name; `extra` (such as the
    base's dtype and whether the device runs bf16 natively) is added as given."""
    out: dict[str, Any] = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads,
                           "platform": platform.platform()}
    if gpu:
        out["gpu"] = gpu
    out["devices"] = devices
    out.update(extra)
    return out


def write_eval_history(run_dir: str | os.PathLike, history: list[dict[str, Any]]) -> Path:
    return write_json_atomic(Path(run_dir) / EVAL_HISTORY, history)


# ---------------------------------------------------------------------- predictions
def write_predictions(run_dir: str | os.PathLike, split: str, rows: list[dict[str, Any]]) -> Path:
    """predictions/<split>.jsonl, one JSON object per example, sorted by task then id."""
    for row in rows[:1]:
        missing = [k for k in PREDICTION_KEYS if k not in row]
        if missing:
            raise UserError(f"prediction rows lack key(s) {missing}")
    ordered = sorted(rows, key=lambda r: (str(r["task"]), str(r["id"])))
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in ordered)
    return write_text_atomic(predictions_path(run_dir, split), text)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a malformed line raises ValueError naming the file and the line."""
    rows = []
    with open(path, encoding="utf8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from err
    return rows


def accuracy_by_task(rows: Iterable[dict[str, Any]], key: str = "correct") -> dict[str, float]:
    """{task: fraction of rows with `key` true} plus `avg` (unweighted mean over tasks)."""
    counts: dict[str, list[int]] = {}
    for row in rows:
        hit_total = counts.setdefault(row["task"], [0, 0])
        hit_total[0] += bool(row[key])
        hit_total[1] += 1
    return scores_with_average({task: hits / total for task, (hits, total) in counts.items()})


# ---------------------------------------------------------------------- routing health
def routing_health(counts: list[list[float]]) -> dict[str, float]:
    """Routing health from tokens per expert per layer (`counts[layer][expert]`).

    load_entropy: entropy of each layer's expert shares over log(E) (1 = uniform), mean over layers;
    dead_expert_frac: fraction of (layer, expert) pairs that received no token;
    max_load_share: the largest share any expert took in any layer (1/E is perfectly balanced).
    """
    if not counts or not counts[0]:
        raise ValueError("routing_health needs counts[layer][expert] with at least one layer and expert")
    experts = len(counts[0])
    entropies, dead, max_share = [], 0, 0.0
    for layer in counts:
        if len(layer) != experts:
            raise ValueError("routing_health: every layer needs the same number of experts")
        total = float(sum(layer))
        shares = [c / total if total > 0 else 0.0 for c in layer]
        if experts > 1:
            entropy = -sum(s * math.log(s) for s in shares if s > 0)
            entropies.append(entropy / math.log(experts))
        else:
            entropies.append(1.0)
        dead += sum(1 for c in layer if c == 0)
        max_share = max(max_share, max(shares))
    return {"load_entropy": sum(entropies) / len(entropies), "dead_expert_frac": dead / (len(counts) * experts),
            "max_load_share": max_share}


COLLAPSE_SHARE = 0.9  # an expert that receives this share of a layer's tokens has taken the layer over
COLLAPSE_PATIENCE = 3  # validation passes in a row before a collapse is warned about


def routing_alarms(counts: list[list[float]], top_k: int, collapse_share: float = COLLAPSE_SHARE) -> dict[str, Any]:
    """Unhealthy routing in one evaluation pass, from tokens per expert per layer (`counts[layer][expert]`,
    each token counted once for each of its `top_k` experts).

    dead: layer -> experts that received no token; collapsed: layer -> (expert, share of the layer's
    tokens that went to it) where that share is at least `collapse_share` (with top-k routing a token
    reaches k experts, so each expert's share of tokens is its count over tokens = total / k).
    """
    dead: dict[int, list[int]] = {}
    collapsed: dict[int, tuple[int, float]] = {}
    for layer, row in enumerate(counts):
        tokens = sum(row) / max(top_k, 1)
        if tokens <= 0:
            continue
        empty = [e for e, c in enumerate(row) if c == 0]
        if empty:
            dead[layer] = empty
        top = max(range(len(row)), key=lambda e: row[e])
        if len(row) > top_k and row[top] / tokens >= collapse_share:
            collapsed[layer] = (top, row[top] / tokens)
    return {"dead": dead, "collapsed": collapsed}


# ---------------------------------------------------------------------- reading a run
@dataclass
class Run:
    """A run directory read into plain data. `record` is None for a directory without run.json
    (a run from before run records, or one killed before its first write)."""

    path: Path
    record: RunRecord | None
    config: dict[str, Any]  # config.yaml (the resolved LightningCLI config), {} if absent
    eval_history: list[dict[str, Any]]
    predictions: dict[str, list[dict[str, Any]]]
    has_adapter: bool
    has_checkpoint: bool

    @property
    def status(self) -> str | None:
        return self.record.status if self.record else None


def read_record(run_dir: str | os.PathLike) -> RunRecord | None:
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
    return RunRecord.from_dict(data, source=str(path))


def read_run(run_dir: str | os.PathLike) -> Run:
    """Load a finished or unfinished run directory; files a run has not written yet are empty."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"run directory {run_dir} does not exist")
    history_path = run_dir / EVAL_HISTORY
    history = []
    if history_path.is_file():
        try:
            history = json.loads(history_path.read_text(encoding="utf8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{history_path}: not valid JSON ({err.msg}, line {err.lineno})") from err
    predictions = {split: read_jsonl(predictions_path(run_dir, split)) for split in SPLITS
                   if predictions_path(run_dir, split).is_file()}
    config: dict[str, Any] = {}
    if (run_dir / CONFIG).is_file():
        import yaml  # PyYAML: a dependency of every Lightning install, imported only here

        try:
            config = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf8")) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{run_dir / CONFIG}: not valid YAML ({err})") from err
    return Run(path=run_dir, record=read_record(run_dir), config=config, eval_history=history,
               predictions=predictions,
               has_adapter=adapter_dir(run_dir).is_dir(), has_checkpoint=last_checkpoint(run_dir).is_file())


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """metrics.csv as rows of {column: value} with the empty cells left out (Lightning's CSVLogger layout)."""
    import csv

    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf8", newline="") as fh:
        for row in csv.DictReader(fh):
            parsed = {}
            for key, value in row.items():
                if value not in (None, ""):
                    try:
                        parsed[key] = float(value)
                    except ValueError:
                        continue
            rows.append(parsed)
    return rows


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories (those holding run.json) among `paths` and below them, sorted and unique."""
    found: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise MissingFileError(f"{root} does not exist")
        if (root / RUN_RECORD).is_file():
            found.add(root)
        found.update(p.parent for p in root.rglob(RUN_RECORD))
    return sorted(found)
