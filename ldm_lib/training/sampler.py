"""Which dataset items each micro-batch gets: a pure function of the step, so runs resume exactly.

Optimizer step :math:`n` consumes the global batch of positions :math:`nG \\ldots nG + G - 1` of an
endless stream, :math:`G` = micro-batch size x accumulation steps x processes. Position :math:`p`
is item ``perm_e[p mod N]`` of epoch :math:`e = \\lfloor p / N \\rfloor`, with ``perm_e`` a random
permutation seeded by ``(seed, e)``. Micro-batch :math:`m` of process :math:`r` takes slice
:math:`m W + r` of the global batch. The same slicing cuts the noise that the trainer draws for the
whole global batch, so a run with accumulation or several processes computes exactly the loss of
the single big batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


def global_batch_items(step: int, global_batch: int, num_items: int, seed: int) -> list[tuple[int, int]]:
    """``(index, epoch)`` of every item of optimizer step ``step``'s global batch (the epoch seeds
    an item's augmentation, so a flip differs from one epoch to the next)."""
    out: list[tuple[int, int]] = []
    position = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(position, num_items)
        take = min(global_batch - len(out), num_items - offset)
        out += [
            (i, epoch) for i in epoch_permutation(num_items, seed, epoch)[offset : offset + take].tolist()
        ]
        position += take
    return out


def global_batch_indices(step: int, global_batch: int, num_items: int, seed: int) -> list[int]:
    """Dataset indices of optimizer step ``step``'s whole global batch."""
    return [index for index, _ in global_batch_items(step, global_batch, num_items, seed)]


class EpochItems(torch.utils.data.Dataset):
    """Wraps a dataset so that the sampler's ``(index, epoch)`` keys set the epoch (for datasets with
    ``set_epoch``, whose random augmentation depends on it) before fetching the item. Each
    DataLoader worker holds its own copy, so this is safe with workers."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def micro_slice(micro: int, rank: int, world_size: int, batch_size: int) -> slice:
    """The rows of the global batch that micro-batch ``micro`` of process ``rank`` trains on."""
    start = (micro * world_size + rank) * batch_size
    return slice(start, start + batch_size)


class StepSampler(Sampler[tuple[int, int]]):
    """Yields this process's ``(index, epoch)`` keys (for :class:`EpochItems`), micro-batch after
    micro-batch, from ``start_step`` on,
    forever; a ``DataLoader(batch_size=batch_size, sampler=...)`` turns them into micro-batches."""

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        grad_accum_steps: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        start_step: int = 0,
    ) -> None:
        if num_items < 1:
            raise ValueError("the dataset is empty: nothing to train on")
        self.num_items, self.batch_size, self.accum = num_items, batch_size, grad_accum_steps
        self.world_size, self.rank, self.seed, self.start_step = world_size, rank, seed, start_step
        self.global_batch = batch_size * grad_accum_steps * world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        while True:
            indices = global_batch_items(step, self.global_batch, self.num_items, self.seed)
            for micro in range(self.accum):
                yield from indices[micro_slice(micro, self.rank, self.world_size, self.batch_size)]
            step += 1
