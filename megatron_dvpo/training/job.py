"""What the training loop asks of a job (``loop.TrainingLoop``), and the defaults of a job that
has nothing to add to the optional parts."""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from megatron_dvpo.config import RunConfig
from megatron_dvpo.logging import Dashboard


class Job(Protocol):
    cfg: RunConfig
    units: dict  # the trained models by name, checkpointed together ("model" the main one)
    summary_tags: tuple[str, ...]  # the tags of the progress line

    @staticmethod
    def updates_per_step(cfg: RunConfig) -> int: ...  # optimizer steps of a unit per step

    def initialize(self) -> None: ...  # initial weights of a fresh run

    def step(self, step: int): ...  # one step: a StepResult

    def state_dict(self) -> dict: ...  # what a restart needs beyond the units

    def load_state_dict(self, state: dict) -> None: ...

    def start(self, resumed: bool) -> dict[str, float]: ...  # metrics before the first step

    def finish(self) -> dict[str, float]: ...  # metrics after the last step

    @property
    def frozen_models(self) -> dict[str, list[torch.nn.Module]]: ...  # forward-only models

    @property
    def sequence_length(self) -> int: ...  # of the trained sequences, for MFU

    dashboard: Optional[Dashboard]  # the run's TensorBoard link and Custom Scalars layout


class JobDefaults:
    """The optional parts for a job with nothing to add: one update a step, no metrics at the
    start or the end, no frozen models, sequences of ``data.seq_length``, no dashboard, and a
    job built from its config alone (its input checks resolve what they find into the
    config)."""

    dashboard: Optional[Dashboard] = None

    @staticmethod
    def updates_per_step(cfg: RunConfig) -> int:
        return 1

    @classmethod
    def build(cls, cfg: RunConfig, checked: object = None):
        return cls(cfg)

    def start(self, resumed: bool) -> dict[str, float]:
        return {}

    def finish(self) -> dict[str, float]:
        return {}

    @property
    def frozen_models(self) -> dict[str, list[torch.nn.Module]]:
        return {}

    @property
    def sequence_length(self) -> int:
        return self.cfg.data.seq_length
