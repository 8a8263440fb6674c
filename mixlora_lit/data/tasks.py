"""The task registry: what each task looks like and how its examples are rendered as prompts.

A prepared example is a normalised record (one JSON line):

    {"id": str, "task": str, "question": str, "choices": [str, ...], "label": int,
     "context": str | null,            # BoolQ passage, SocialIQA context, HellaSwag activity label
     "choice_labels": [str, ...] | null}  # the source's own option labels, when it has them

A task renders a record with a template per protocol. The `paper` protocol reproduces the MixLoRA
reference templates and answer labels (letters; the next-token logits over the label tokens score
them); `paper_passage` is the same with the BoolQ passage included (the reference omits it).
`cloze` is lm-eval's multiple-choice format (OLMES calls it RC): the question as the shipped
lm-eval task YAMLs render it, each choice's answer text as the continuation, scored by its
log-likelihood; training targets the correct answer's text. Adding a task is one `Task(...)` here, or one YAML
file with the same fields (see `load_task_file` and the README).
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from ..errors import UserError

LETTERS = tuple(string.ascii_uppercase)
TASKS_ENV = "MIXLORA_LIT_TASKS"


@dataclass(frozen=True)
class PromptTemplate:
    """`template` may use {question}, {context} and {choices}; each choice renders with `choice_format`
    ({label}, {text}). `labels`: fixed answer words (e.g. true/false), or None for letters A, B, ..."""

    template: str
    choice_format: str = ""
    labels: tuple[str, ...] | None = None

    def answer_labels(self, record: dict[str, Any]) -> list[str]:
        n = len(record["choices"])
        if self.labels is not None:
            return list(self.labels)
        if record.get("choice_labels"):
            return list(record["choice_labels"])
        return list(LETTERS[:n])

    def render(self, record: dict[str, Any]) -> tuple[str, list[str]]:
        """(prompt, answer label of each choice); training appends " " + the gold label."""
        labels = self.answer_labels(record)
        choices = "".join(self.choice_format.format(label=lab, text=text)
                          for lab, text in zip(labels, record["choices"]))
        prompt = self.template.format(question=record["question"], context=record.get("context") or "",
                                      choices=choices)
        return prompt, labels


@dataclass(frozen=True)
class ClozeTemplate:
    """Answer-text rendering, as lm-eval's multiple-choice tasks do it: a context (`template` with
    {question} and {context}) and, per choice, the continuation `delimiter + text`. `choice_texts`
    fixes the texts in label order (BoolQ: yes, no). `partial` (WinoGrande): each choice fills the
    blank `_` of the question to make its own context, and the rest of the sentence is the
    continuation of every choice."""

    template: str = ""
    choice_texts: tuple[str, ...] | None = None
    partial: bool = False
    delimiter: str = " "

    def options(self, record: dict[str, Any]) -> list[tuple[str, str]]:
        """(context, continuation) per choice, in label order."""
        if self.partial:
            question = record["question"]
            cut = question.index("_")
            target = self.delimiter + question[cut + 1:].strip()
            return [(question[:cut] + choice, target) for choice in record["choices"]]
        context = self.template.format(question=record["question"], context=record.get("context") or "")
        texts = self.choice_texts or record["choices"]
        return [(context, self.delimiter + text) for text in texts]

    def choice_lengths(self, record: dict[str, Any]) -> list[int]:
        """Characters per choice for `acc_norm`, as lm-eval counts them (its choice strings)."""
        if self.partial:
            return [len(context) for context, _ in self.options(record)]
        return [len(text) for text in (self.choice_texts or record["choices"])]


@dataclass(frozen=True)
class Task:
    name: str
    num_choices: int | tuple[int, int]  # fixed, or (min, max) when it varies (ARC)
    templates: dict[str, PromptTemplate | ClozeTemplate]
    # The split the paper evaluates on, as named by the source (prepared as our `test`).
    eval_split: str = "validation"
    aliases: tuple[str, ...] = ()
    description: str = ""

    @property
    def protocols(self) -> list[str]:
        return sorted(self.templates)

    def template(self, protocol: str) -> PromptTemplate:
        if protocol in self.templates:
            return self.templates[protocol]
        if protocol.startswith("paper") and "paper" in self.templates:
            return self.templates["paper"]  # variants fall back to the paper rendering for other tasks
        raise UserError(f"task {self.name!r} has no protocol {protocol!r}: expected one of {self.protocols}")

    def render(self, record: dict[str, Any], protocol: str = "paper") -> tuple[str, list[str]]:
        template = self.template(protocol)
        if isinstance(template, ClozeTemplate):
            raise UserError(f"protocol {protocol!r} has no label rendering: use template(protocol).options()")
        return template.render(record)

    def check_choices(self, n: int) -> bool:
        lo, hi = (self.num_choices, self.num_choices) if isinstance(self.num_choices, int) else self.num_choices
        return lo <= n <= hi


_MC_QUESTION = PromptTemplate("Please choose the correct answer to the question: {question}{choices}\nAnswer:",
                              " ({label}) {text}")
_BOOLQ = PromptTemplate("Please answer the following question with true or false: {question}?\nAnswer:",
                        labels=("true", "false"))
_BOOLQ_PASSAGE = PromptTemplate(
    "Please answer the following question about the passage with true or false.\n"
    "Passage: {context}\nQuestion: {question}?\nAnswer:", labels=("true", "false"))
_PIQA = PromptTemplate(
    "Below is a common task along with two possible solutions labeled (A) and (B). Please select the "
    "appropriate solution to achieve the task:\n{question}\n{choices}\n\nCorrect solution:", "\n({label}) {text}")
_SIQA = PromptTemplate("Please choose the correct answer to the question.\nQuestion: {context} {question}"
                       "{choices}\nAnswer:", "\n({label}) {text}")
_HELLASWAG = PromptTemplate("Please choose the correct ending to complete the given sentence.\n"
                            "Sentence: {context}. {question}{choices}\nAnswer:", "\n({label}) {text}")
_WINOGRANDE = PromptTemplate("Please choose the correct answer to fill in the blank to complete the given "
                             "sentence.\nSentence: {question}{choices}\nAnswer:", "\n({label}) {text}")

# The cloze renderings of the shipped lm-eval task YAMLs (mixlora_lit/evaluation/lm_eval_tasks/).
_QA_CLOZE = ClozeTemplate("Question: {question}\nAnswer:")
_CLOZE = {
    "arc_easy": _QA_CLOZE, "arc_challenge": _QA_CLOZE, "piqa": _QA_CLOZE,
    "boolq": ClozeTemplate("{context}\nQuestion: {question}?\nAnswer:", choice_texts=("yes", "no")),
    "openbookqa": ClozeTemplate("{question}"),
    "social_iqa": ClozeTemplate("Q: {context} {question}\nA:"),
    "hellaswag": ClozeTemplate("{context}: {question}"),
    "winogrande": ClozeTemplate(partial=True),
}

BUILTIN_TASKS: tuple[Task, ...] = (
    Task("arc_easy", (3, 5), {"paper": _MC_QUESTION, "cloze": _CLOZE["arc_easy"]}, eval_split="test",
         aliases=("arc-e", "arce"), description="ARC-Easy grade-school science questions"),
    Task("arc_challenge", (3, 5), {"paper": _MC_QUESTION, "cloze": _CLOZE["arc_challenge"]}, eval_split="test",
         aliases=("arc-c", "arcc"), description="ARC-Challenge grade-school science questions"),
    Task("boolq", 2, {"paper": _BOOLQ, "paper_passage": _BOOLQ_PASSAGE, "cloze": _CLOZE["boolq"]}, aliases=(),
         description="BoolQ yes/no questions (the paper's prompt omits the passage)"),
    Task("openbookqa", 4, {"paper": _MC_QUESTION, "cloze": _CLOZE["openbookqa"]}, eval_split="test",
         aliases=("obqa",), description="OpenBookQA elementary science"),
    Task("piqa", 2, {"paper": _PIQA, "cloze": _CLOZE["piqa"]}, description="PIQA physical commonsense"),
    Task("social_iqa", 3, {"paper": _SIQA, "cloze": _CLOZE["social_iqa"]}, aliases=("siqa", "socialiqa"),
         description="SocialIQA social commonsense"),
    Task("hellaswag", 4, {"paper": _HELLASWAG, "cloze": _CLOZE["hellaswag"]},
         description="HellaSwag sentence completion"),
    Task("winogrande", 2, {"paper": _WINOGRANDE, "cloze": _CLOZE["winogrande"]},
         description="WinoGrande (XL) pronoun resolution"),
)

PAPER_MULTITASK = ("arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa")
PAPER_ALL = tuple(t.name for t in BUILTIN_TASKS)

_REGISTRY: dict[str, Task] = {}
_ALIASES: dict[str, str] = {}


def register_task(task: Task, replace: bool = False) -> Task:
    if task.name in _REGISTRY and not replace:
        raise UserError(f"task {task.name!r} is already registered")
    if "paper" not in task.templates:
        raise UserError(f"task {task.name!r} needs a 'paper' template (the default protocol)")
    _REGISTRY[task.name] = task
    for alias in task.aliases:
        _ALIASES[alias] = task.name
    return task


def load_task_file(path: str | os.PathLike) -> Task:
    """Register a task from YAML:

        name: my_task
        num_choices: 3            # or [min, max]
        eval_split: validation    # optional
        templates:
          paper: {template: "Question: {question}{choices}\\nAnswer:", choice_format: "\\n({label}) {text}"}
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with keys name, num_choices, templates")
    missing = [k for k in ("name", "num_choices", "templates") if k not in data]
    if missing:
        raise UserError(f"{path}: missing key(s) {missing}")
    unknown = sorted(set(data) - {"name", "num_choices", "templates", "eval_split", "aliases", "description"})
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; allowed: name, num_choices, templates, eval_split, "
                        f"aliases, description")
    templates = {}
    for protocol, spec in data["templates"].items():
        if isinstance(spec, str):
            spec = {"template": spec}
        bad = sorted(set(spec) - {"template", "choice_format", "labels"})
        if bad or "template" not in spec:
            raise UserError(f"{path}: templates.{protocol} needs `template` (and optional choice_format, "
                            f"labels); got keys {sorted(spec)}")
        labels = tuple(spec["labels"]) if spec.get("labels") else None
        templates[protocol] = PromptTemplate(spec["template"], spec.get("choice_format", ""), labels)
    num = data["num_choices"]
    task = Task(str(data["name"]), tuple(num) if isinstance(num, list) else int(num), templates,
                eval_split=data.get("eval_split", "validation"), aliases=tuple(data.get("aliases", ())),
                description=data.get("description", ""))
    return register_task(task, replace=True)


def _load_env_tasks() -> None:
    for directory in filter(None, os.environ.get(TASKS_ENV, "").split(os.pathsep)):
        for path in sorted(Path(directory).glob("*.y*ml")):
            load_task_file(path)


for _task in BUILTIN_TASKS:
    register_task(_task)
_load_env_tasks()


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise UserError(f"unknown task {name!r}: known tasks are {task_names()} "
                        f"(aliases {sorted(_ALIASES)}); add one with a YAML file in ${TASKS_ENV}")
    return _REGISTRY[key]


def resolve_tasks(names) -> list[str]:
    if isinstance(names, str):
        names = [n for n in names.replace(",", " ").split() if n]
    out = []
    for name in names:
        if name in ("paper5", "multitask"):
            out += list(PAPER_MULTITASK)
        elif name in ("all", "paper8"):
            out += list(PAPER_ALL)
        else:
            out.append(get_task(name).name)
    return list(dict.fromkeys(out))
