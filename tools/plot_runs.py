#!/usr/bin/env python
"""Render the key curves of one or more runs to a PNG, each at its full range (no smoothing, no
outlier trimming): is it learning (true and held-out reward, the scorer's value), is it
healthy (KL from the reference, entropy, response length).

    python tools/plot_runs.py RUN_DIR [RUN_DIR ...] --out curves.png [--tags TAG ...]

A run directory is a job's ``logging.run_dir`` (its ``tensorboard/`` is read) or a TensorBoard
directory itself. Each run is one line per panel, labelled with its directory's name; a tag a
run did not log is left out of that panel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The scorer's prediction of the reward, under each scorer's tag (docs/algorithm.md §4).
SCORER_TAGS = ("rollout/gvm_final_value_mean", "rollout/reward_model_score_mean",
               "rollout/scorer_reward_mean")
KEY_TAGS = ("eval/true_reward_mean", "rollout/true_reward_mean", "scorer", "rollout/kl_ref",
            "policy/entropy", "rollout/response_len_mean")


def _events_dir(run: Path) -> Path:
    return run / "tensorboard" if (run / "tensorboard").is_dir() else run


def run_label(run: Path) -> str:
    return run.name if run.name != "tensorboard" else run.parent.name


def style(ax, title: str, xlabel: str, legend: bool) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def plot_runs(runs: list[Path], out: Path, tags: tuple[str, ...] = KEY_TAGS) -> list[str]:
    """Write the PNG; returns the panels drawn (``scorer`` stands for whichever scorer tag a
    run logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_dvpo.demo import scalars

    logs = {run: scalars(_events_dir(run)) for run in runs}
    panels = []
    for tag in tags:
        found = {run: next((t for t in (SCORER_TAGS if tag == "scorer" else (tag,))
                            if t in log), None) for run, log in logs.items()}
        if any(found.values()):
            panels.append((tag, found))
    if not panels:
        raise SystemExit(f"none of {list(tags)} was logged in {[str(r) for r in runs]}")
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows),
                                squeeze=False)
    for ax, (tag, found) in zip(axes.flat, panels):
        for run, name in found.items():
            if name is not None:
                steps, values = zip(*logs[run][name])
                ax.plot(steps, values, marker="." if len(steps) < 30 else None,
                        label=run_label(run))
        style(ax, tag if tag != "scorer" else "the scorer's value", "step", len(runs) > 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    save(figure, out)
    return [tag for tag, _ in panels]


def save(figure, out: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def missing_runs(runs: list[Path]) -> bool:
    """Whether a run directory is missing (named in one error line)."""
    missing = [str(r) for r in runs if not _events_dir(r).is_dir()]
    if missing:
        print(f"error: no such run directory: {', '.join(missing)}", file=sys.stderr)
    return bool(missing)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tags", nargs="+", default=list(KEY_TAGS),
                        help="TensorBoard tags, one panel each ('scorer': the scorer's value)")
    args = parser.parse_args(argv)
    if missing_runs(args.runs):
        return 2
    drawn = plot_runs(args.runs, args.out, tuple(args.tags))
    print(f"wrote {args.out} ({', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
