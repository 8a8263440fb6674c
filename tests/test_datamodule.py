"""MultiTaskDataModule on real data and the real SmolLM2 tokenizer."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mixlora_lit.data.encoding import IGNORE_INDEX, label_token_predictions
from mixlora_lit.data.prepare import read_split
from mixlora_lit.data.sampling import MixtureBatchSampler, task_probabilities
from mixlora_lit.data.sources import DataError
from mixlora_lit.data.tasks import PAPER_MULTITASK, get_task
from mixlora_lit.lightning import MultiTaskDataModule


@pytest.fixture(scope="module")
def paper5(prepared_data):
    out, _ = prepared_data
    dm = MultiTaskDataModule(data_dir=str(out), batch_size=16, eval_batch_size=32, prepare_source=None)
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_supervised_tokens_decode_to_exactly_the_answers(paper5, prepared_data):
    out, _ = prepared_data
    tok = paper5.tokenizer
    records = [r for t in paper5.tasks for r in read_split(t, "train", out)]
    by_prompt = {}
    for r in records:
        prompt, labels = get_task(r["task"]).render(r)
        by_prompt[prompt] = labels[r["label"]]
    checked = 0
    for b, batch in zip(range(20), paper5.train_dataloader()):
        for i in range(batch["input_ids"].shape[0]):
            labels, ids, mask = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
            supervised = labels[labels != IGNORE_INDEX]
            answer = tok.decode(supervised, skip_special_tokens=True)
            assert supervised[-1].item() == tok.eos_token_id
            prompt_ids = ids[(labels == IGNORE_INDEX) & (mask == 1)]
            prompt = tok.decode(prompt_ids)
            assert answer == " " + by_prompt[prompt]
            assert torch.equal(ids[mask == 1][-len(supervised):], supervised)  # answer follows the prompt
            assert (labels[mask == 0] == IGNORE_INDEX).all()
            checked += 1
    assert checked == 320


def test_long_prompts_lose_their_start_not_the_answer(prepared_data):
    out, _ = prepared_data
    dm = MultiTaskDataModule(tasks=["piqa"], data_dir=str(out), cutoff_len=40, train_cap=50, dev_cap=10,
                             prepare_source=None)
    dm.setup("fit")
    tok = dm.tokenizer
    truncated = [e for e in dm.splits["train"] if e.truncated]
    assert len(truncated) >= 40
    for e in dm.splits["train"]:
        assert len(e.input_ids) <= 40
        answer = tok.decode(e.input_ids[e.prompt_len:], skip_special_tokens=True)
        assert answer in (" A", " B")
        assert tok.decode(e.input_ids[:e.prompt_len]).endswith("\n\nCorrect solution:")


def test_padding_fraction_under_15_percent(paper5):
    pad = total = 0
    for batch in paper5.train_dataloader():
        pad += (batch["attention_mask"] == 0).sum().item()
        total += batch["attention_mask"].numel()
    assert pad / total < 0.15, pad / total
    # Without length grouping the same stream pads far more: the grouping is doing the work.
    plain = MixtureBatchSampler([[i for i, e in enumerate(paper5.splits["train"]) if e.task == t]
                                 for t in range(5)], [len(e.input_ids) for e in paper5.splits["train"]], 16,
                                group_batches=1)
    lengths = [len(e.input_ids) for e in paper5.splits["train"]]
    pad_plain = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in plain)
    assert pad_plain / sum(len(b) * max(lengths[i] for i in b) for b in plain) > 2 * pad / total


@pytest.mark.parametrize("mixing,temperature", [("concat", 1.0), ("proportional", 1.0), ("temperature", 2.0),
                                                ("temperature", 8.0)])
def test_task_shares_follow_the_mixing_strategy(paper5, mixing, temperature):
    data = paper5.splits["train"]
    sizes = Counter(e.task for e in data)
    n = [sizes[t] for t in range(5)]
    if mixing == "temperature":  # stated here, not taken from the code under test: n_t^(1/T) / sum n^(1/T)
        expected = [n_t ** (1 / temperature) / sum(m ** (1 / temperature) for m in n) for n_t in n]
    else:  # concat and proportional: each task in proportion to its size, n_t / N
        expected = [n_t / sum(n) for n_t in n]
    assert task_probabilities(n, mixing, temperature) == pytest.approx(expected, abs=1e-12)
    sampler = MixtureBatchSampler([[i for i, e in enumerate(data) if e.task == t] for t in range(5)],
                                  [len(e.input_ids) for e in data], 16, mixing, temperature, num_samples=40_000)
    seen = Counter(data[i].task for batch in sampler for i in batch)
    total = sum(seen.values())
    for t in range(5):
        assert abs(seen[t] / total - expected[t]) < 0.01, (mixing, t, seen[t] / total, expected[t])
    if mixing == "temperature":  # small tasks (ARC-c: 1007 of 32034) really are up-weighted
        assert seen[1] / total > 1.5 * sizes[1] / len(data)


def test_concat_epoch_visits_each_example_once_and_ranks_split_it(paper5):
    data = paper5.splits["train"]
    per_task = [[i for i, e in enumerate(data) if e.task == t] for t in range(5)]
    lengths = [len(e.input_ids) for e in data]
    one = [i for b in MixtureBatchSampler(per_task, lengths, 16) for i in b]
    assert sorted(one) == list(range(len(data)))
    ranks = [MixtureBatchSampler(per_task, lengths, 16, num_replicas=2, rank=r) for r in (0, 1)]
    batches = [list(r) for r in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0])
    seen = [i for bs in batches for b in bs for i in b]
    assert set(seen) == set(range(len(data)))
    epoch0 = list(ranks[0])
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != epoch0


def test_eval_loaders_carry_tasks_and_label_tokens(paper5, prepared_data):
    out, manifest = prepared_data
    expected = {t: manifest["tasks"][t]["splits"]["test"]["count"] for t in PAPER_MULTITASK}
    seen = Counter()
    for batch in paper5.test_dataloader():
        assert batch["input_ids"].shape[0] == batch["task"].shape[0] == batch["choice_ids"].shape[0]
        for t in batch["task"].tolist():
            seen[paper5.tasks[t]] += 1
        last = batch["attention_mask"].sum(1) - 1
        assert torch.equal(batch["last_index"], last)
        valid = batch["choice_ids"] >= 0
        assert ((valid.sum(1) >= 2) & (valid.sum(1) <= 5)).all()
        assert (batch["label"] < valid.sum(1)).all()
    assert dict(seen) == expected
    tok = paper5.tokenizer
    batch = next(iter(paper5.val_dataloader()))
    assert tok.decode(batch["input_ids"][0][: batch["last_index"][0] + 1]).endswith(("Answer:", "solution:"))


def test_label_token_prediction_is_argmax_over_choice_tokens():
    logits = torch.zeros(2, 3, 10)
    logits[0, 1, 7] = 5.0  # token 7 is not a choice of example 0: ignored
    logits[0, 1, 4] = 2.0
    logits[1, 2, 9] = 1.0
    choice_ids = torch.tensor([[3, 4, -1], [8, 2, 9]])
    preds = label_token_predictions(logits, torch.tensor([1, 2]), choice_ids)
    assert preds.tolist() == [1, 2]


def test_bad_arguments_fail_before_loading_anything(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'arc'.*known tasks are"):
        MultiTaskDataModule(tasks=["arc"])
    with pytest.raises(ValueError, match=r"mixing='uniform' is invalid: expected one of"):
        MultiTaskDataModule(mixing="uniform")
    with pytest.raises(ValueError, match=r"train_cap names task\(s\) \['piqa'\]"):
        MultiTaskDataModule(tasks=["boolq"], train_cap={"piqa": 3})
    dm = MultiTaskDataModule(tasks=["boolq"], data_dir=str(tmp_path), prepare_source=None)
    dm.prepare_data()
    with pytest.raises(DataError, match=r"mixlora-lit data prepare --tasks boolq --out"):
        dm.setup("fit")
