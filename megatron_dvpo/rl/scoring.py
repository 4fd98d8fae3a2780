"""From a value model's raw outputs over a rollout to what the advantage estimators read.

Pure functions; nothing here runs a model or communicates. ``values`` is the ``[B, P + T]``
output of a value model over a rollout's tokens (prompts left-padded to width ``P``), so the
last prompt token of every row sits at column ``P - 1`` and response token ``t`` at ``P + t``.
"""

from __future__ import annotations

import torch

from megatron_dvpo.rl.advantages import released_value_whitening
from megatron_dvpo.gvm.td import gather_response_values


def rollout_q_view(values: torch.Tensor, prompt_width: int, response_lengths: torch.Tensor,
                   alignment: str = "qview") -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [B, T], q_prompt [B])``: the Q-view of a rollout, 0 past each response, read as
    the GVM was trained (``alignment``, docs/algorithm.md §1)."""
    prompts = torch.full_like(response_lengths, prompt_width)
    q, _, q_prompt = gather_response_values(values, prompts, response_lengths, alignment)
    return q, q_prompt


def reads_released_whitening(estimator: str, value_whitening: str) -> bool:
    """Whether the estimator reads the Q-view of raw outputs whitened per forward chunk, as
    the released code's ``gae`` does (docs/algorithm.md §2)."""
    return estimator == "gae" and value_whitening == "released"


def released_whitened_q_view(values: torch.Tensor, prompt_width: int,
                             response_lengths: torch.Tensor, alignment: str,
                             chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, q_prompt)`` from raw outputs whitened per forward chunk of ``chunk_rows`` rows,
    exactly as the released code does."""
    return rollout_q_view(released_value_whitening(values, chunk_rows), prompt_width,
                          response_lengths, alignment)
