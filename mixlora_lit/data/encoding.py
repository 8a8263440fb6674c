"""Tokenising rendered examples, and collating them into padded batches.

Two protocols. `paper` (and `paper_passage`), below: labels and next-token logits. `cloze`
(`encode_cloze`, `collate_cloze`): the answer texts, tokenised as lm-eval does (context and
context + continuation encoded, the continuation is what the second adds), scored by the summed
log-probability of each continuation's tokens; training appends the correct continuation and EOS.

Training example: prompt + " " + gold label + EOS, with only the answer tokens (label and EOS)
supervised; a prompt too long for `cutoff_len` loses tokens from its start (after BOS), so the
answer is never cut. Evaluation example: the prompt alone, plus the token id of every choice's
label (the last id of `tokenizer.encode(" " + label)`, the paper's rule): the prediction is the
argmax of the next-token logits at the last prompt position over those ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .tasks import ClozeTemplate, get_task
from ..errors import UserError

IGNORE_INDEX = -100


def label_token_id(tokenizer, label: str) -> int:
    return tokenizer.encode(" " + label, add_special_tokens=False)[-1]


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    return [label_token_id(tokenizer, label) for label in labels]


def _bos_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for Gemma, nothing for SmolLM2)."""
    with_special = tokenizer.encode("x", add_special_tokens=True)
    without = tokenizer.encode("x", add_special_tokens=False)
    return with_special[: len(with_special) - len(without)] if with_special[-len(without):] == without else []


@dataclass
class Encoded:
    input_ids: list[int]
    prompt_len: int  # tokens before the answer (all of them for evaluation examples)
    task: int  # index into the data module's task list
    label: int  # gold choice index
    choice_ids: list[int]  # label token id of every choice
    truncated: bool
    record_id: str = ""  # the prepared record's `id` (unique within its task)
    options: list[tuple[list[int], list[int]]] | None = None  # cloze: (context ids, continuation ids) per choice
    option_chars: list[int] | None = None  # cloze: characters per choice (acc_norm)


def encode_records(records: list[dict[str, Any]], tokenizer, protocol: str, task_index: dict[str, int],
                   cutoff_len: int, train: bool, desc: str = "tokenising") -> list[Encoded]:
    if not records:
        return []
    if protocol == "cloze":
        return encode_cloze(records, tokenizer, task_index, cutoff_len, train)
    prefix = _bos_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if train and tokenizer.eos_token_id is not None else []
    rendered = [get_task(r["task"]).render(r, protocol) for r in records]
    prompts = [p for p, _ in rendered]
    out: list[Encoded] = []
    chunk = 2048
    label_cache: dict[str, int] = {}
    answer_cache: dict[str, list[int]] = {}
    with tqdm(total=len(records), desc=desc, unit="ex", leave=False) as bar:
        for start in range(0, len(records), chunk):
            ids_batch = tokenizer(prompts[start:start + chunk], add_special_tokens=False)["input_ids"]
            for offset, body in enumerate(ids_batch):
                record = records[start + offset]
                labels = rendered[start + offset][1]
                for lab in labels:
                    if lab not in label_cache:
                        label_cache[lab] = label_token_id(tokenizer, lab)
                gold = labels[record["label"]]
                answer = []
                if train:
                    if gold not in answer_cache:
                        answer_cache[gold] = tokenizer.encode(" " + gold, add_special_tokens=False)
                    answer = answer_cache[gold] + eos
                room = cutoff_len - len(prefix) - len(answer)
                if room < 1:
                    raise UserError(f"cutoff_len={cutoff_len} leaves no room for the prompt of task "
                                    f"{record['task']!r} (answer needs {len(answer)} tokens)")
                truncated = len(body) > room
                body = body[-room:] if truncated else body
                prompt = prefix + body
                out.append(Encoded(prompt + answer, len(prompt), task_index[record["task"]], record["label"],
                                   [label_cache[lab] for lab in labels], truncated, str(record.get("id", ""))))
            bar.update(len(ids_batch))
    return out


def encode_pair(tokenizer, prefix: list[int], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into tokens: trailing spaces of the context move to
    the continuation; the continuation's tokens are what encoding context + continuation adds."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    head = tokenizer.encode(context, add_special_tokens=False)
    return prefix + head, whole[len(head):]


def _truncate(prefix: list[int], context: list[int], room: int) -> tuple[list[int], bool]:
    """Drop context tokens from the start (after the BOS prefix) to fit `room` tokens."""
    if len(context) <= room:
        return context, False
    return prefix + context[len(prefix):][-(room - len(prefix)):], True


def encode_cloze(records: list[dict[str, Any]], tokenizer, task_index: dict[str, int], cutoff_len: int,
                 train: bool) -> list[Encoded]:
    """Cloze examples. Training: the gold choice's context + continuation + EOS, the continuation and
    EOS supervised. Evaluation: every choice's (context, continuation) tokens and its length in characters."""
    prefix = _bos_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if train and tokenizer.eos_token_id is not None else []
    out = []
    for record in tqdm(records, desc="tokenising (cloze)", unit="ex", leave=False):
        template = get_task(record["task"]).template("cloze")
        assert isinstance(template, ClozeTemplate)
        pairs = [encode_pair(tokenizer, prefix, c, t) for c, t in template.options(record)]
        if any(not cont for _, cont in pairs):
            raise UserError(f"task {record['task']!r} record {record['id']!r}: a choice has no answer tokens")
        truncated = False
        options = []
        for context, continuation in pairs:
            room = cutoff_len - len(continuation) - len(eos)
            if room < len(prefix) + 1:
                raise UserError(f"cutoff_len={cutoff_len} leaves no room for the prompt of task {record['task']!r} "
                                f"(its answer needs {len(continuation) + len(eos)} tokens)")
            context, cut = _truncate(prefix, context, room)
            truncated |= cut
            options.append((context, continuation))
        gold_context, gold = options[record["label"]]
        ids = gold_context + gold + eos if train else gold_context + gold
        out.append(Encoded(ids, len(gold_context), task_index[record["task"]], record["label"], [], truncated,
                           str(record.get("id", "")), options=None if train else options,
                           option_chars=None if train else template.choice_lengths(record)))
    return out


def collate_cloze(examples: list[Encoded], pad_id: int) -> dict[str, Any]:
    """One row per (example, choice): context + continuation, right-padded. `score_row`, `score_pos`
    and `score_tok` list every continuation token (the row, the position whose logits predict it,
    the token), so only those positions reach the LM head."""
    rows = [(e, c, context + cont, len(context), len(cont)) for e, ex in enumerate(examples)
            for c, (context, cont) in enumerate(ex.options)]
    width = max(len(ids) for _, _, ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    score_row, score_pos, score_tok = [], [], []
    for r, (_, _, seq, n_context, n_cont) in enumerate(rows):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        score_row += [r] * n_cont
        score_pos += list(range(n_context - 1, n_context + n_cont - 1))
        score_tok += seq[n_context:]
    return {"input_ids": ids, "attention_mask": mask,
            "row_example": torch.tensor([e for e, *_ in rows]), "row_choice": torch.tensor([c for _, c, *_ in rows]),
            "row_chars": torch.tensor([float(examples[e].option_chars[c]) for e, c, *_ in rows]),
            "score_row": torch.tensor(score_row), "score_pos": torch.tensor(score_pos),
            "score_tok": torch.tensor(score_tok),
            "label": torch.tensor([e.label for e in examples]), "task": torch.tensor([e.task for e in examples]),
            "id": [e.record_id for e in examples]}


def cloze_choice_scores(logprobs: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities [P] of a `collate_cloze` batch -> ([B, C] summed log-likelihood of each
    choice, [B, C] per character), -inf where an example has fewer choices."""
    rows = batch["input_ids"].shape[0]
    row_sum = torch.zeros(rows, dtype=torch.float64, device=logprobs.device)
    row_sum.index_add_(0, batch["score_row"], logprobs.double())
    shape = (batch["label"].shape[0], int(batch["row_choice"].max()) + 1)
    total = torch.full(shape, float("-inf"), dtype=torch.float64, device=logprobs.device)
    total[batch["row_example"], batch["row_choice"]] = row_sum
    norm = torch.full(shape, float("-inf"), dtype=torch.float64, device=logprobs.device)
    norm[batch["row_example"], batch["row_choice"]] = row_sum / batch["row_chars"].double()
    return total, norm


def collate_train(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.prompt_len:n] = torch.tensor(e.input_ids[e.prompt_len:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "task": torch.tensor([e.task for e in examples])}


def collate_eval(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompts, the position of each prompt's last token, the choice label ids (-1 pads),
    and the record ids (a list of str, for per-example predictions)."""
    width = max(len(e.input_ids) for e in examples)
    max_choices = max(len(e.choice_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    choices = torch.full((len(examples), max_choices), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        choices[i, : len(e.choice_ids)] = torch.tensor(e.choice_ids)
    return {"input_ids": ids, "attention_mask": mask, "last_index": mask.sum(1) - 1, "choice_ids": choices,
            "label": torch.tensor([e.label for e in examples]), "task": torch.tensor([e.task for e in examples]),
            "id": [e.record_id for e in examples]}


def label_token_predictions(logits: torch.Tensor, last_index: torch.Tensor, choice_ids: torch.Tensor) -> torch.Tensor:
    """The paper's evaluation: argmax over the choices' label tokens of the logits after the prompt.

    logits: [B, S, V] (or [B, V] already at the last position); choice_ids: [B, C] with -1 padding.
    """
    if logits.dim() == 3:
        logits = logits[torch.arange(logits.shape[0], device=logits.device), last_index]
    scores = logits.gather(1, choice_ids.clamp_min(0)).float()
    scores = scores.masked_fill(choice_ids < 0, float("-inf"))
    return scores.argmax(dim=1)


def logits_at(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              last_index: torch.Tensor) -> torch.Tensor:
    """[B, V] logits at each row's `last_index`, projecting only those positions through the LM head
    (`logits_to_keep`) instead of every position of the batch."""
    positions = torch.unique(last_index)  # sorted; rows of similar length share positions
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions).logits
    return logits[torch.arange(logits.shape[0], device=logits.device), torch.searchsorted(positions, last_index)]


def predict_label_tokens(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The paper's prediction (choice index) for every example of a `collate_eval` batch on the model's device."""
    logits = logits_at(model, batch["input_ids"], batch["attention_mask"], batch["last_index"])
    return label_token_predictions(logits, batch["last_index"], batch["choice_ids"])
