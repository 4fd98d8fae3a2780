"""The loss tests train with where the loss itself is not under test."""

from __future__ import annotations

from megatron_dvpo.training.loss import Loss


def mean_logprob_loss(scale: float = 1.0) -> Loss:
    """Minus the mean log-prob of the batch's tokens (a mean per row, averaged over the rows of
    every microbatch and replica), times ``scale`` (NaN or Inf: a bad update)."""

    def terms(outputs, batch):
        return {"rows": -outputs["logprobs"].mean(1).sum() * scale}, {}

    return Loss(terms, lambda batch: {"rows": batch["tokens"].shape[0]})
