"""Task mixing and length-grouped batching for the multi-task training stream.

Mixing strategies (what fraction of training examples each task contributes):
* `concat`: every example once per epoch, shuffled together (the paper).
* `proportional`: examples drawn with task probability n_t / sum n (examples-proportional).
* `temperature`: task probability proportional to n_t ** (1 / T) (T=1 is proportional; large T
  approaches uniform), which up-weights small tasks.
For the two sampling strategies an epoch has `num_samples` examples (default: all of them) and
each task cycles through its own reshuffled examples, so none repeats before all were seen.

Length grouping: the epoch's index stream is cut into windows of `group_batches` batches; each
window is sorted by length and split into batches; batch order is then shuffled. This keeps
padding low while mixing and task shares stay those of the stream.
"""

from __future__ import annotations

import math
import random
from typing import Iterator, Sequence

import torch.distributed as dist
from ..errors import UserError

MIXING = ("concat", "proportional", "temperature")


def task_probabilities(sizes: Sequence[int], mixing: str, temperature: float = 2.0) -> list[float]:
    if mixing not in MIXING:
        raise UserError(f"mixing {mixing!r} is invalid: expected one of {list(MIXING)}")
    if mixing == "temperature":
        if temperature <= 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        weights = [n ** (1.0 / temperature) if n else 0.0 for n in sizes]
    else:
        weights = [float(n) for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


class MixtureBatchSampler:
    """Yields lists of dataset indices. `task_indices[t]` lists the indices of task t's examples."""

    def __init__(self, task_indices: Sequence[Sequence[int]], lengths: Sequence[int], batch_size: int,
                 mixing: str = "concat", temperature: float = 2.0, num_samples: int | None = None, seed: int = 42,
                 group_batches: int = 64, num_replicas: int | None = None, rank: int | None = None) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.task_indices = [list(ix) for ix in task_indices]
        self.lengths = lengths
        self.batch_size = batch_size
        self.mixing = mixing
        self.probs = task_probabilities([len(ix) for ix in self.task_indices], mixing, temperature)
        total = sum(len(ix) for ix in self.task_indices)
        self.num_samples = total if (mixing == "concat" or num_samples is None) else int(num_samples)
        self.seed = seed
        self.group_batches = group_batches
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._skip = 0
        # Lightning calls `dataloader.batch_sampler.sampler.set_epoch(epoch)` each epoch.
        self.sampler = _EpochSetter(self)

    def skip_next(self, batches: int) -> None:
        """Skip the first `batches` batches of the next iteration (resuming mid-epoch exactly)."""
        self._skip = batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _stream(self, rng: random.Random) -> list[int]:
        if self.mixing == "concat":
            stream = [i for ix in self.task_indices for i in ix]
            rng.shuffle(stream)
            return stream
        cycles = [list(ix) for ix in self.task_indices]
        positions = [len(c) for c in cycles]  # start exhausted: the first draw shuffles
        tasks = rng.choices(range(len(cycles)), weights=self.probs, k=self.num_samples)
        stream = []
        for t in tasks:
            if positions[t] >= len(cycles[t]):
                rng.shuffle(cycles[t])
                positions[t] = 0
            stream.append(cycles[t][positions[t]])
            positions[t] += 1
        return stream

    def _batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        stream = self._stream(rng)
        window = self.batch_size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, len(stream), window):
            chunk = sorted(stream[start:start + window], key=lambda i: self.lengths[i])
            batches += [chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        # Every rank gets the same number of batches: repeat a few from the front if needed.
        per_rank = math.ceil(len(batches) / self.num_replicas)
        batches += batches[: per_rank * self.num_replicas - len(batches)]
        return batches[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        skip, self._skip = self._skip, 0
        return iter(batches[skip:])

    def __len__(self) -> int:
        # Windows hold a whole number of batches, so only the last batch of the epoch can be short.
        return math.ceil(math.ceil(self.num_samples / self.batch_size) / self.num_replicas)


class _EpochSetter:
    def __init__(self, owner: MixtureBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)
