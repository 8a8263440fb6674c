"""Helpers the local lm-eval task YAMLs call: the prepared data, and WinoGrande's partial scoring.

lm-eval imports this file by path from the YAMLs (`!function utils.load_prepared`).
"""

from __future__ import annotations


def load_prepared(mixlora_task: str, data_dir: str | None = None, split: str = "test", **_):
    """The prepared split as a `datasets.DatasetDict` with a `test` split (no hub access)."""
    import datasets

    from mixlora_lit.data.prepare import read_split

    records = read_split(mixlora_task, split, data_dir)
    rows = [{"id": r["id"], "question": r["question"], "context": r.get("context") or "",
             "choices": r["choices"], "label": r["label"]} for r in records]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def winogrande_text(doc):  # the context index: which partial sentence is the right one
    return doc["label"]


def winogrande_choices(doc):
    cut = doc["question"].index("_")
    return [doc["question"][:cut] + option for option in doc["choices"]]


def winogrande_target(doc):
    cut = doc["question"].index("_") + 1
    return doc["question"][cut:].strip()


def boolq_target(doc):  # our label 0 = true; lm-eval's choices are ["no", "yes"]
    return 1 - doc["label"]
