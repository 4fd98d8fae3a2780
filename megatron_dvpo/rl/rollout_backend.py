"""The rollout backend: what samples the RL step's responses (docs/algorithm.md §2, step 1).

The RL step only calls ``generate`` and, after each policy update, ``sync_weights``. The
megatron sampler below is the first backend; one that keeps its own copy of the weights (a
megatron-core inference engine, a vLLM server) implements the same two methods, reloading the
policy's weights in ``sync_weights``, and the RL step does not change.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from megatron_dvpo.models.generation import Rollout, SamplingConfig, generate
from megatron_dvpo.models.guided import ValueGuide


class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], seed: int) -> Rollout: ...

    def sync_weights(self) -> None: ...


class MegatronSampler:
    """Samples from the policy's own training chunks (``models/generation.py``), with
    GVM-guided decoding (``rollout.guide_beta``) as its ``guide`` hook. It reads the trained
    weights in place, so ``sync_weights`` has nothing to copy."""

    def __init__(self, chunks: list[torch.nn.Module], sampling: SamplingConfig, eos_id: int,
                 pad_id: int, vocab_size: int, guide: Optional[ValueGuide] = None):
        self.chunks, self.sampling, self.guide = chunks, sampling, guide
        self.eos_id, self.pad_id, self.vocab_size = eos_id, pad_id, vocab_size

    def generate(self, prompts: list[list[int]], seed: int) -> Rollout:
        return generate(self.chunks, prompts, self.sampling, self.eos_id, self.pad_id,
                        self.vocab_size, seed, self.guide)

    def sync_weights(self) -> None:
        return None
