"""Signs that the policy is gaming its frozen scorer rather than learning the task.

A GVM is fixed while the policy moves, so responses unlike anything it was trained on can get
values it never meant; the usual symptoms are repetition, responses cut at the length limit,
values outside the range the GVM produced on its own data, and a collapsing entropy. Pure
functions; the RL step logs them (``rollout/repeat_rate``, ``rollout/truncated_rate``,
``rollout/gvm_value_ood_rate``) and warns, or stops, past ``rl.gaming_*`` thresholds.
"""

from __future__ import annotations

import torch

REPEAT_N = 2  # n-gram size of the repetition measure


def repeat_counts(tokens: torch.Tensor, lengths: torch.Tensor, n: int = REPEAT_N
                  ) -> tuple[float, float]:
    """(repeated n-grams, n-grams) over responses ``tokens [B, T]`` of ``lengths``: an n-gram
    is repeated when it occurred earlier in the same response."""
    repeated = total = 0
    for row, length in zip(tokens.tolist(), lengths.tolist()):
        seen = set()
        for i in range(max(length - n + 1, 0)):
            gram = tuple(row[i:i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return float(repeated), float(total)


def truncated(tokens: torch.Tensor, lengths: torch.Tensor, eos_id: int,
              max_new_tokens: int) -> torch.Tensor:
    """[B] bool: responses that reached ``max_new_tokens`` without ending in EOS."""
    last = tokens.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return (lengths >= max_new_tokens) & (last != eos_id)


def out_of_range(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Entries of ``values`` outside ``[low, high]`` (the GVM's range on its training data)."""
    return (values < low) | (values > high)


# A GVM whose values on its own training data span less than this share of the gap between its
# labels has learned no ranking (the bench_methods bigram GVM at 53%: 0.004 against 2).
FLAT_VALUE_SHARE = 0.01


def flat_value_range(value_range: tuple[float, float], label_gap: float) -> str | None:
    """Why a GVM is nearly constant, or None: DVPO's whitened advantages would follow its
    noise (README, "Choosing a method")."""
    span = value_range[1] - value_range[0]
    if span >= FLAT_VALUE_SHARE * abs(label_gap):
        return None
    return (f"its values on its own training data span {span:.3g} (p0.5 .. p99.5), under "
            f"{FLAT_VALUE_SHARE:g} of its labels' gap {abs(label_gap):g}: it has not learned "
            "to rank, and DVPO's advantages would follow its noise")


def gaming_warnings(metrics: dict[str, float], thresholds: dict[str, tuple[str, float]]
                    ) -> list[str]:
    """``tag value > limit`` (or ``< limit`` for a ``min``) for each metric past its
    threshold; ``thresholds``: tag -> ("max" | "min", limit)."""
    found = []
    for tag, (kind, limit) in thresholds.items():
        if tag not in metrics:
            continue
        value = metrics[tag]
        if (kind == "max" and value > limit) or (kind == "min" and value < limit):
            found.append(f"{tag} {value:.3g} {'>' if kind == 'max' else '<'} {limit:g}")
    return found
