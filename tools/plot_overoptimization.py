#!/usr/bin/env python
"""Over-optimisation curves (Gao et al. 2022): the true reward, the scorer's value and a K-head
GVM's disagreement against the policy's KL from its start, for one or several runs side by side.

    python tools/plot_overoptimization.py RUN_DIR [RUN_DIR ...] --out overopt.png
        [--tensorboard DIR]

The x axis is ``rollout/kl_ref``, the summed KL of each step's responses to the reference,
which is the starting policy unless ``rl.reference`` names another (a run without a reference,
``rl.kl_coef=0``, has none and is refused). Each step's rollout gives a point (its
``rollout/true_reward_mean`` with ``rl.true_reward``); each evaluation gives a marker
(``eval/true_reward_mean`` at that step's KL; the start's at 0). Where the proxy keeps rising
and the true reward turns, the policy exploits its scorer: that KL is a stopping point, and a
KL coefficient that keeps the run left of it is the one to choose.

``--tensorboard DIR`` also writes each run's curves as TensorBoard scalars under
``DIR/<run>``, the step being the KL in millinats (``overoptimization/true_reward``,
``overoptimization/eval_true_reward``, ``overoptimization/scorer_value``,
``overoptimization/head_std``), so that TensorBoard draws them against KL too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plot_runs import (SCORER_TAGS, _events_dir, missing_runs, run_label, save,  # noqa: E402
                       style)

KL_TAG = "rollout/kl_ref"
PANELS = (("true_reward", "true reward"), ("scorer_value", "the scorer's value"),
          ("head_std", "heads' std (K-head GVM)"))


def curves(log: dict[str, list[tuple[int, float]]], name: str) -> dict[str, list]:
    """``{panel: [(kl, value), ...]}`` of one run's scalars, sorted by KL; ``eval_true_reward``
    holds the evaluations (at the KL of their step, the start's at 0)."""
    if KL_TAG not in log or not any(v for _, v in log[KL_TAG]):
        raise SystemExit(f"error: {name} logged no KL to a reference ({KL_TAG}); run it with "
                         "rl.kl_coef > 0 so that the reference is loaded")
    kl = dict(log[KL_TAG])
    kl.setdefault(0, 0.0)
    scorer = next((tag for tag in SCORER_TAGS if tag in log), None)
    tags = {"true_reward": "rollout/true_reward_mean", "scorer_value": scorer,
            "head_std": "rollout/gvm_head_std_final", "eval_true_reward": "eval/true_reward_mean"}
    return {panel: sorted((kl[step], value) for step, value in log[tag] if step in kl)
            for panel, tag in tags.items() if tag in log}


def write_tensorboard(found: dict[str, list], directory: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory))
    for panel, points in found.items():
        for kl, value in points:
            writer.add_scalar(f"overoptimization/{panel}", value, round(1000 * kl))
    writer.close()


def summary(found: dict[str, list]) -> dict[str, float]:
    """Where the true reward peaked and where the run ended, in KL and reward."""
    true = found.get("eval_true_reward") or found.get("true_reward") or []
    if not true:
        return {}
    best = max(true, key=lambda point: point[1])
    return {"kl_at_best_true_reward": best[0], "best_true_reward": best[1],
            "final_kl": true[-1][0], "final_true_reward": true[-1][1]}


def plot_overoptimization(runs: list[Path], out: Path, tensorboard: Path | None = None
                          ) -> dict[str, dict[str, float]]:
    """Write the PNG (and the TensorBoard scalars); returns each run's ``summary``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_dvpo.demo import scalars

    found = {run_label(run): curves(scalars(_events_dir(run)), str(run)) for run in runs}
    panels = [(key, title) for key, title in PANELS
              if any(key in run for run in found.values())]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for i, (label, run) in enumerate(found.items()):
            if key in run:
                ax.plot(*zip(*run[key]), color=f"C{i}", alpha=0.7, label=label)
            if key == "true_reward" and "eval_true_reward" in run:
                ax.plot(*zip(*run["eval_true_reward"]), "o", color=f"C{i}",
                        label=f"{label} (held out)")
        style(ax, title, "KL to the start (nats per response)", len(found) > 1)
    save(figure, out)
    if tensorboard is not None:
        for label, run in found.items():
            write_tensorboard(run, tensorboard / label)
    return {label: summary(run) for label, run in found.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tensorboard", type=Path, default=None,
                        help="also write the curves as TensorBoard scalars (step: millinats)")
    args = parser.parse_args(argv)
    if missing_runs(args.runs):
        return 2
    if args.tensorboard is not None and args.tensorboard.exists():
        print(f"error: --tensorboard {args.tensorboard} exists; name a new directory",
              file=sys.stderr)
        return 2
    result = plot_overoptimization(args.runs, args.out, args.tensorboard)
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
