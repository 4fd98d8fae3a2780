"""TD(lambda) targets and the GVM loss on the Q-view of a value model's outputs
(docs/algorithm.md §1).

Pure torch functions on one microbatch; nothing here communicates. Layout: ``values[b, p]`` is the
value-head output at position ``p`` of row ``b`` of a right-padded ``prompt + response`` batch.
The prompt of row ``b`` fills positions ``0 .. P_b-1`` and its response ``P_b .. P_b+T_b-1``, so
``q_t = values[b, P_b + t]`` and ``q_{-1} = values[b, P_b - 1]`` (the value of the prompt).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["ALIGNMENTS", "gather_response_values", "td_lambda_targets", "gvm_loss",
           "loss_token_count"]


def _lengths(name: str, lengths: torch.Tensor | Sequence[int], batch: int,
             device: torch.device) -> torch.Tensor:
    """``lengths`` as a 1-D int64 tensor on ``device``, checked to have one entry per row."""
    out = torch.as_tensor(lengths, device=device)
    if out.dtype.is_floating_point or out.dtype.is_complex or out.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {out.dtype}")
    if out.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(out.shape)}")
    return out.long()


def _check_unit_interval(**params: float) -> None:
    for name, value in params.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


# Which outputs the GVM is trained on (docs/algorithm.md §1): ``qview`` fits
# q_0 .. q_{T-1} (reward on q_{T-1}; q_{-1} too with train_prompt_value), ``released`` fits the
# outputs one position earlier, q_{-1} .. q_{T-2} (reward on q_{T-2}), as the released code does.
ALIGNMENTS = ("qview", "released")


def _response_layout(values: torch.Tensor, prompt_lengths, response_lengths):
    """Checked ``(prompt [B], response [B], mask [B, Tmax], steps [Tmax])`` of a batch."""
    if values.dim() != 2:
        raise ValueError(f"values must be [B, S], got shape {tuple(values.shape)}")
    batch, seq = values.shape
    prompt = _lengths("prompt_lengths", prompt_lengths, batch, values.device)
    response = _lengths("response_lengths", response_lengths, batch, values.device)
    if batch == 0:
        raise ValueError("values holds no rows")
    # One host sync for all three checks.
    min_p, min_t, max_end = torch.stack([prompt.min(), response.min(),
                                         (prompt + response).max()]).tolist()
    if min_p < 1:
        raise ValueError(f"every prompt needs at least one token (the position of q_-1), "
                         f"got prompt_lengths={prompt.tolist()}")
    if min_t < 1:
        raise ValueError(f"every response needs at least one token, "
                         f"got response_lengths={response.tolist()}")
    if max_end > seq:
        raise ValueError(f"prompt + response length {max_end} exceeds the sequence length {seq}")
    steps = torch.arange(int(response.max()), device=values.device)
    return prompt, response, steps.unsqueeze(0) < response.unsqueeze(1), steps


def _pick(values: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b, t]]`` where ``mask``, else 0; padded slots point at a valid position,
    and ``torch.where`` drops them and their gradient."""
    index = index.clamp(min=0, max=values.shape[1] - 1)
    return torch.where(mask, values.gather(1, index), values.new_zeros(()))


def _check_alignment(alignment: str) -> None:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {alignment!r}; choose one of {', '.join(ALIGNMENTS)}")


def gather_response_values(values: torch.Tensor, prompt_lengths: torch.Tensor | Sequence[int],
                           response_lengths: torch.Tensor | Sequence[int],
                           alignment: str = "qview"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Q-view of a padded ``[B, S]`` value tensor: what estimators and metrics read.

    Returns ``q [B, Tmax]`` (``q[b, t] = values[b, P_b + t]``, 0 past ``T_b``), the boolean
    ``mask [B, Tmax]`` of real response tokens, and ``q_prompt [B]`` (``values[b, P_b - 1]``),
    with ``Tmax = max(T_b)``. Built with ``gather`` so gradients reach exactly those positions.
    For a ``released``-aligned GVM the output at the last response token was never trained, so
    ``q_{T-1}`` reads the last trained one, ``q_{T-2}`` (``q_{-1}`` for one-token responses).
    """
    _check_alignment(alignment)
    prompt, response, mask, steps = _response_layout(values, prompt_lengths, response_lengths)
    offset = steps.unsqueeze(0)
    if alignment == "released":
        offset = torch.minimum(offset, (response - 2).unsqueeze(1))
    q = _pick(values, prompt.unsqueeze(1) + offset, mask)
    q_prompt = values.gather(1, (prompt - 1).unsqueeze(1)).squeeze(1)
    return q, mask, q_prompt


def _prefix_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Per-row count of a mask that must be a non-empty prefix (a right-padded response)."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    if not torch.equal(prefix, mask) or bool((lengths == 0).any()):
        raise ValueError("each mask row must be a non-empty prefix (response tokens then padding)")
    return lengths


def td_lambda_targets(q: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                      gamma: float, lam: float) -> torch.Tensor:
    """Semi-gradient TD(lambda) targets ``G [B, T]`` for the Q-view ``q``; 0 at padding.

    The only reward is ``rewards[b]`` on the last token and ``q_{T_b} := 0``, so the backward
    recursion ``G_t = r_t + gamma * ((1 - lam) * q_{t+1} + lam * G_{t+1})`` (padding read as 0)
    equals ``q_t + sum_j (gamma * lam)^j delta_{t+j}``. Computed without gradient on a detached
    ``q`` (semi-gradient), in at least float32 so bf16 inputs do not accumulate rounding.
    """
    _check_unit_interval(gamma=gamma, lam=lam)
    if q.shape != mask.shape:
        raise ValueError(f"q {tuple(q.shape)} and mask {tuple(mask.shape)} must have the "
                         "same shape")
    lengths = _prefix_lengths(mask)
    if rewards.shape != (q.shape[0],):
        raise ValueError(f"rewards must have shape ({q.shape[0]},), got {tuple(rewards.shape)}")
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        q = torch.where(mask, q.detach().to(dtype), 0.0)
        rewards = rewards.detach().to(device=q.device, dtype=dtype)
        batch, steps = q.shape
        targets = torch.zeros_like(q)
        next_q = next_g = q.new_zeros(batch)
        for t in range(steps - 1, -1, -1):
            reward_t = torch.where(lengths == t + 1, rewards, 0.0)
            g = reward_t + gamma * ((1.0 - lam) * next_q + lam * next_g)
            targets[:, t] = torch.where(mask[:, t], g, 0.0)
            next_q, next_g = q[:, t], targets[:, t]
    return targets


def loss_token_count(response_lengths: torch.Tensor | Sequence[int],
                     train_prompt_value: bool = False) -> int:
    """Number of squared-error terms ``gvm_loss`` sums: every response token, plus one per row
    for ``q_{-1}`` when it is trained: the count the update divides the summed loss by, over the
    global batch (``training/loss.py``), for the mean of docs/algorithm.md."""
    lengths = torch.as_tensor(response_lengths)
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"response_lengths must be a 1-D integer sequence, got {lengths}")
    if bool((lengths < 1).any()):
        raise ValueError(f"every response needs at least one token, got {lengths.tolist()}")
    return int(lengths.sum()) + (lengths.numel() if train_prompt_value else 0)


def gvm_loss(values: torch.Tensor, prompt_lengths: torch.Tensor | Sequence[int],
             response_lengths: torch.Tensor | Sequence[int], rewards: torch.Tensor,
             gamma: float, lam: float, train_prompt_value: bool = False,
             alignment: str = "qview") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``0.5 * sum (v_t - G_t)^2`` over the trained outputs.

    The trained outputs ``v_0 .. v_{T-1}`` are ``q_0 .. q_{T-1}`` (``qview``) or
    ``q_{-1} .. q_{T-2}`` (``released``), the reward on the last of them. A sum, not a mean, so
    microbatches and data-parallel ranks add up exactly once the trainer divides by the global
    ``loss_token_count``. With ``train_prompt_value`` (``qview`` only; ``released`` always
    trains ``q_{-1}``) each row adds ``0.5 * (q_{-1} - G_0)^2``, pulling ``V(s_0)`` toward the
    first token's target. Gradient flows only through the predictions; targets are constants.

    ``stats`` holds detached sums in the loss dtype, ready to stack and all-reduce: ``tokens``
    (loss terms), ``sq_err_sum`` (over those terms), ``response_sq_err_sum`` (over the trained
    response outputs only, without the ``q_{-1}`` terms), ``response_tokens``, ``rows``,
    ``value_sum`` (over the trained outputs) and ``final_value_sum`` (``v_{T_b-1}``, the
    predicted reward, over rows).
    """
    _check_alignment(alignment)
    if alignment == "released":
        prompt, _, mask, steps = _response_layout(values, prompt_lengths, response_lengths)
        q = _pick(values, (prompt - 1).unsqueeze(1) + steps.unsqueeze(0), mask)
        train_prompt_value = False  # q_{-1} is the first trained output already
        q_prompt = None
    else:
        q, mask, q_prompt = gather_response_values(values, prompt_lengths, response_lengths)
    if rewards.shape != (q.shape[0],):
        raise ValueError(f"rewards must have shape ({q.shape[0]},), got {tuple(rewards.shape)}")
    targets = td_lambda_targets(q, mask, rewards, gamma, lam)
    err = torch.where(mask, q - targets, 0.0)
    response_sq_err = err.square().sum()
    sq_err, tokens = response_sq_err, mask.sum()
    if train_prompt_value:
        sq_err = sq_err + (q_prompt - targets[:, 0]).square().sum()
        tokens = tokens + q.shape[0]
    loss = 0.5 * sq_err
    lengths = mask.sum(1)
    with torch.no_grad():
        q_det = q.detach()
        stats = {
            "tokens": tokens,
            "sq_err_sum": sq_err.detach(),
            # the documented loss is the mean over response tokens: the q_{-1} terms apart
            "response_sq_err_sum": response_sq_err.detach(),
            "response_tokens": mask.sum(),
            "rows": torch.tensor(q.shape[0], device=q.device),
            "value_sum": q_det.sum(),
            "final_value_sum": q_det.gather(1, (lengths - 1).unsqueeze(1)).sum(),
        }
        stats = {k: v.to(loss.dtype) for k, v in stats.items()}
    return loss, stats
