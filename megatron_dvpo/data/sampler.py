"""Deterministic, resumable batch sampling for data-parallel training."""

from __future__ import annotations

from typing import Iterator

import numpy as np


class DistributedBatchSampler:
    """Yields, per step, this DP rank's slice of a global batch, forever.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``; step ``k`` of an epoch takes its
    global batch from positions ``[k * G, (k + 1) * G)`` and rank ``r`` gets the ``r``-th
    contiguous share. The global batch of a step depends only on the seed and on the number of
    samples consumed before it, so restarting with ``consumed_samples`` from a checkpoint
    reproduces exactly the batches an uninterrupted run would have seen. The last partial global
    batch of each epoch is dropped, so every step has the same size.
    """

    def __init__(self, num_samples: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, consumed_samples: int = 0):
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple "
                             f"of the data-parallel size {dp_size}")
        if num_samples < global_batch_size:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global "
                             f"batch ({global_batch_size})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, {dp_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if consumed_samples < 0 or consumed_samples % global_batch_size:
            raise ValueError(f"consumed_samples={consumed_samples} must be a non-negative "
                             f"multiple of global_batch_size={global_batch_size}")
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.batches_per_epoch = num_samples // global_batch_size
        # Samples of every global batch handed out so far (all ranks), for checkpoints.
        self.consumed_samples = consumed_samples

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch_size // self.dp_size
        while True:
            epoch, first = divmod(self.consumed_samples // self.global_batch_size,
                                  self.batches_per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            for step in range(first, self.batches_per_epoch):
                start = step * self.global_batch_size + self.dp_rank * per_rank
                self.consumed_samples += self.global_batch_size
                yield order[start:start + per_rank].tolist()


class BatchSource:
    """This data-parallel rank's share of each next global batch of a dataset, resumable.

    The sampler is built on first use, after a resume has restored ``consumed_samples`` (the
    data position), so a restarted run sees exactly the batches an unbroken one would have.
    """

    def __init__(self, global_batch_size: int, dp_rank: int, dp_size: int, seed: int):
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.seed = seed
        self.consumed_samples = 0
        self._sampler: DistributedBatchSampler | None = None
        self._batches: Iterator[list[int]] | None = None

    def next_indices(self, num_samples: int) -> list[int]:
        if self._batches is None:
            self._sampler = DistributedBatchSampler(num_samples, self.global_batch_size,
                                                    self.dp_rank, self.dp_size, self.seed,
                                                    consumed_samples=self.consumed_samples)
            self._batches = iter(self._sampler)
        indices = next(self._batches)
        self.consumed_samples = self._sampler.consumed_samples
        return indices

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = state["consumed_samples"]
        self._sampler = self._batches = None
