"""`--source hub` scores like lm-eval: hub rows (verbatim fixtures, tests/fixtures/hub/README.md) convert
to the same records as the offline source, and our local lm-eval task YAMLs render those records
exactly as lm-eval's own built-in tasks render the hub rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mixlora_lit.base_models import cache_dir
from mixlora_lit.data.sources import DataError, hub_records, olmo_records

FIXTURES = Path(__file__).parent / "fixtures" / "hub"
TASKS = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa", "social_iqa", "hellaswag", "winogrande"]


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    """The fixtures laid out as `hub_dir/<task>/validation.jsonl` (BoolQ: SuperGLUE's schema)."""
    out = tmp_path_factory.mktemp("hub")
    for task in TASKS:
        (out / task).mkdir()
        source = FIXTURES / task / ("super_glue_validation.jsonl" if task == "boolq" else "validation.jsonl")
        shutil.copy(source, out / task / "validation.jsonl")
    return out


def _key(record: dict) -> tuple:
    return record["question"], tuple(record["choices"]), record["label"], record.get("context") or ""


@pytest.mark.parametrize("task", TASKS)
def test_hub_rows_convert_to_the_offline_records(task, hub_dir):
    """Each hub row becomes the very record the offline (OLMo) source has for that example: same
    question, context, choices and label (HellaSwag: WikiHow tags removed and `ctx_b` capitalised as
    lm-eval does; BoolQ: the passage with its title)."""
    ours = hub_records(task, "validation", hub_dir)
    rows = [json.loads(line) for line in (hub_dir / task / "validation.jsonl").read_text().splitlines()]
    assert len(ours) == len(rows) >= 4
    offline = {_key(r) for r in olmo_records(task, "validation", cache_dir() / "downloads")}
    if task == "hellaswag":
        # lm-eval turns WikiHow's "step. [title] Next" into "step.. Next"; the OLMo copy has a single
        # period there (3073 of the 10042 validation examples differ only so). The hub source follows
        # lm-eval, which test_local_task_yamls_render_like_lm_eval_builtin_tasks checks.
        assert any("[header]" in row["ctx"] for row in rows)  # the WikiHow rows really had tags to remove
        assert not any("[" in r["question"] or any("[" in c for c in r["choices"]) for r in ours)
        assert any(".." in c for r in ours for c in r["choices"])

        def single(record: dict) -> dict:
            return {**record, "question": record["question"].replace("..", "."),
                    "choices": [c.replace("..", ".") for c in record["choices"]]}

        ours = [single(r) for r in ours]
    missing = [r for r in ours if _key(r) not in offline]
    assert not missing, missing[:2]


def test_google_boolq_rows_are_refused_naming_the_dataset_to_use(tmp_path):
    (tmp_path / "boolq").mkdir()
    shutil.copy(FIXTURES / "boolq" / "google_validation.jsonl", tmp_path / "boolq" / "validation.jsonl")
    with pytest.raises(DataError, match=r"google/boolq's schema .* use aps/super_glue \(config boolq\)"):
        hub_records("boolq", "validation", tmp_path)


@pytest.fixture(scope="module")
def builtin_tasks():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexes lm-eval's installed task YAMLs (no download)


def _builtin_task(manager, name: str, rows: list[dict]):
    """lm-eval's own task `name` (its installed YAML: templates, process_docs, metrics) over `rows`."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own loader: includes and !function resolved

    config = dict(load_yaml(manager.task_index[name].yaml_path, resolve_func=True))
    config.update(custom_dataset=lambda **_: datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}),
                  training_split=None, validation_split="validation", test_split=None, fewshot_split=None,
                  dataset_kwargs=None)
    return ConfigurableTask(config=config)


def _rendered(task, doc) -> tuple:
    return (task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc), task.config.target_delimiter,
            [m["metric"] for m in task.config.metric_list])


@pytest.mark.parametrize("task", TASKS)
def test_local_task_yamls_render_like_lm_eval_builtin_tasks(task, hub_dir, builtin_tasks, tmp_path):
    """Context, choices, target, delimiter and metrics of every fixture example: our YAML over the
    converted record equals lm-eval's built-in task over the hub row."""
    from lm_eval.tasks import get_task_dict

    from mixlora_lit.evaluation.harness import task_manager

    rows = [json.loads(line) for line in (hub_dir / task / "validation.jsonl").read_text().splitlines()]
    builtin = _builtin_task(builtin_tasks, task, rows)
    theirs = list(builtin.validation_docs())
    (tmp_path / task).mkdir()  # the converted records as a prepared test split
    with open(tmp_path / task / "test.jsonl", "w") as fh:
        for record in hub_records(task, "validation", hub_dir):
            fh.write(json.dumps(record) + "\n")
    local = get_task_dict([task], task_manager("local", tmp_path))[task]
    ours = list(local.test_docs())
    assert len(ours) == len(theirs) == len(rows)
    for a, b in zip(ours, theirs):
        assert _rendered(local, a) == _rendered(builtin, b)
