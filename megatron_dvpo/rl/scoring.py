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


def estimator_inputs(values: torch.Tensor, prompt_width: int, response_lengths: torch.Tensor,
                     alignment: str, estimator: str, value_whitening: str,
                     chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(q, q_prompt)`` an estimator reads: the plain Q-view, except that ``gae`` with
    ``value_whitening=released`` reads it from raw outputs whitened per forward chunk of
    ``chunk_rows`` rows, exactly as the released code does (docs/algorithm.md §2)."""
    if estimator == "gae" and value_whitening == "released":
        values = released_value_whitening(values, chunk_rows)
    return rollout_q_view(values, prompt_width, response_lengths, alignment)
