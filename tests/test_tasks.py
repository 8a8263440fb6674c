"""Prompt renderings against the paper's templates, label tokens, custom tasks."""

from __future__ import annotations

import pytest

from mixlora_lit.data.encoding import label_token_id
from mixlora_lit.data.prepare import read_split
from mixlora_lit.data.tasks import BUILTIN_TASKS, get_task, load_task_file


def test_golden_arc_and_piqa_renderings_literal():
    arc = {"id": "x", "question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"],
           "label": 1}
    assert get_task("arc_easy").render(arc) == (
        "Please choose the correct answer to the question: Which gas do plants take in? (A) oxygen "
        "(B) carbon dioxide (C) helium\nAnswer:", ["A", "B", "C"])
    piqa = {"id": "y", "question": "Open a jar", "choices": ["Twist the lid.", "Bite the lid."], "label": 0}
    assert get_task("piqa").render(piqa)[0] == (
        "Below is a common task along with two possible solutions labeled (A) and (B). Please select the "
        "appropriate solution to achieve the task:\nOpen a jar\n\n(A) Twist the lid.\n(B) Bite the lid.\n\n"
        "Correct solution:")


def _reference_rendering(task, r):
    """The MixLoRA reference templates, written out per task from their source fields (REFERENCE.md)."""
    c = r["choices"]
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        prompt = "Please choose the correct answer to the question: " + r["question"]
        for label, text in zip("ABCDE", c):
            prompt += f" ({label}) {text}"
        return prompt + "\nAnswer:", list("ABCDE"[: len(c)])
    if task == "boolq":
        return ("Please answer the following question with true or false: " + f"{r['question']}?\nAnswer:",
                ["true", "false"])
    if task == "piqa":
        prompt = "Below is a common task along with two possible solutions labeled (A) and (B)."
        prompt += f" Please select the appropriate solution to achieve the task:\n{r['question']}\n"
        prompt += f"\n(A) {c[0]}\n(B) {c[1]}\n"
        return prompt + "\nCorrect solution:", ["A", "B"]
    if task == "social_iqa":
        prompt = "Please choose the correct answer to the question.\n"
        prompt += f"Question: {r['context']} {r['question']}"
        prompt += f"\n(A) {c[0]}\n(B) {c[1]}\n(C) {c[2]}"
        return prompt + "\nAnswer:", ["A", "B", "C"]
    if task == "hellaswag":
        prompt = "Please choose the correct ending to complete the given sentence.\n"
        prompt += f"Sentence: {r['context']}. {r['question']}"
        for label, text in zip("ABCD", c):
            prompt += f"\n({label}) {text}"
        return prompt + "\nAnswer:", ["A", "B", "C", "D"]
    if task == "winogrande":
        prompt = "Please choose the correct answer to fill in the blank to complete the given sentence.\n"
        prompt += f"Sentence: {r['question']}"
        prompt += f"\n(A) {c[0]}\n(B) {c[1]}"
        return prompt + "\nAnswer:", ["A", "B"]
    raise KeyError(task)


@pytest.mark.parametrize("task", [t.name for t in BUILTIN_TASKS])
def test_paper_renderings_match_reference_templates(task, prepared_data):
    out, _ = prepared_data
    for split in ("train", "test"):
        for record in read_split(task, split, out)[:50]:
            assert get_task(task).render(record, "paper") == _reference_rendering(task, record)


def test_real_examples_read_as_expected(prepared_data):
    out, _ = prepared_data
    boolq = read_split("boolq", "test", out)[0]
    assert boolq["question"] == "does ethanol take more energy make that produces" and boolq["label"] == 1
    assert boolq["context"].startswith("Ethanol fuel -- All biomass goes through")
    assert "Passage: Ethanol fuel" in get_task("boolq").render(boolq, "paper_passage")[0]
    hella = read_split("hellaswag", "test", out)[0]
    assert (hella["context"], hella["question"]) == ("Roof shingle removal", "A man is sitting on a roof. He")
    siqa = read_split("social_iqa", "test", out)[0]
    assert siqa["choices"][siqa["label"]] == "Find somewhere to go"


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_label_tokens_are_distinct_single_tokens(alias):
    from mixlora_lit.base_models import load_tokenizer

    tokenizer = load_tokenizer(alias)
    for labels in (list("ABCDE"), ["true", "false"]):
        ids = []
        for label in labels:
            pieces = tokenizer.encode(" " + label, add_special_tokens=False)
            assert len(pieces) == 1, (alias, label, pieces)
            ids.append(label_token_id(tokenizer, label))
        assert len(set(ids)) == len(ids), (alias, labels, ids)
    # Hub ARC items with numeric labels: " 1" is a space and a digit; the paper's rule (last id) keeps them apart.
    digits = [label_token_id(tokenizer, d) for d in "12345"]
    assert len(set(digits)) == 5


def test_task_from_yaml(tmp_path):
    path = tmp_path / "capitals.yaml"
    path.write_text(
        "name: capitals\nnum_choices: 3\naliases: [caps]\n"
        "templates:\n  paper:\n    template: \"Capital of {question}?{choices}\\nAnswer:\"\n"
        "    choice_format: \"\\n({label}) {text}\"\n")
    load_task_file(path)
    task = get_task("caps")
    rec = {"id": "1", "question": "France", "choices": ["Lyon", "Paris", "Nice"], "label": 1}
    assert task.render(rec) == ("Capital of France?\n(A) Lyon\n(B) Paris\n(C) Nice\nAnswer:", ["A", "B", "C"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnum_choices: 2\ntemplate: oops\n")
    with pytest.raises(ValueError, match=r"bad.yaml: missing key\(s\) \['templates'\]"):
        load_task_file(bad)


def test_unknown_protocol_is_named():
    with pytest.raises(ValueError, match=r"task 'piqa' has no protocol 'chat': expected one of \['cloze', 'paper'\]"):
        get_task("piqa").render({"question": "q", "choices": ["a", "b"], "label": 0}, "chat")
    with pytest.raises(ValueError, match=r"protocol 'cloze' has no label rendering"):  # cloze scores answer texts
        get_task("piqa").render({"question": "q", "choices": ["a", "b"], "label": 0}, "cloze")
