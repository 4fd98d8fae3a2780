#!/usr/bin/env python
"""How well each GVM objective learns, against a Bradley-Terry reward model, on the same pairs.

    python tools/bench_gvm.py --out bench_gvm.json [--quick] [--budgets 300,900]
        [--tasks synthetic,bigram] [--objectives td,td_pairwise,v1_rm_scores,bradley_terry]
        [--seeds 1234] [--overrides gvm.pairwise_weight=2]

For each built-in synthetic task (``synthetic``: words and their positions; ``bigram``: word
pairs, compositional) it writes the same preference data, imports one tiny random model as the
common starting point, and trains each objective for each budget of steps on the same pairs:

- ``td``: TD(lambda) on +-1 labels (the paper's GVM);
- ``td_pairwise``: TD(lambda) plus Bradley-Terry on the pair's final values;
- ``v1_rm_scores``: the paper's first route: a Bradley-Terry reward model (the same budget)
  scores every training response (``megatron_dvpo.gvm.score``), and the GVM learns TD(lambda)
  from those scores (the same budget again);
- ``bradley_terry``: the reward model itself, the reference.

It reports held-out pairwise accuracy (last value and mean value) for each, per seed (the
value head, data order and dropout; the random start is common) and averaged over the seeds,
and, per task and budget, each GVM objective's gap to the reward model in points, on the means.
Single runs on ``bigram`` land near chance or near 80% depending on the seed, for every
objective, so compare means over several seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_dvpo.demo import _run, scalars  # noqa: E402

GVM_OBJECTIVES = ("td", "td_pairwise", "v1_rm_scores")
# The model of each task, the same for every objective: a word-pair rule needs more than the
# demo's 2 x 64 model (which stays at chance on it, whatever the objective).
TASK_MODELS = {"synthetic": ([], []),
               "bigram": (["--layers", "4", "--hidden", "128", "--heads", "4", "--kv-heads", "2"],
                          ["optimizer.lr=1e-3"])}


def make_task(work: Path, rule: str, train_rows: int, eval_rows: int) -> Path:
    data = work / rule
    _run(f"{rule} task", ["-m", "megatron_dvpo.data.synthetic", str(data), "--rule", rule,
                          "--train-rows", str(train_rows), "--eval-rows", str(eval_rows)])
    _run(f"{rule}: random start", ["tools/build_tiny_hf.py", "--tokenizer",
                                   str(data / "tokenizer.model"), "--out", str(data / "hf"),
                                   *TASK_MODELS[rule][0]])
    _run(f"{rule}: import", ["tools/convert_hf_to_megatron.py", "--hf", str(data / "hf"),
                             "--out", str(data / "init"), "--target", "gvm", "--overwrite"])
    return data


def train(data: Path, run: Path, objective: str, steps: int, train_path: Path,
          nproc: int, seed: int, overrides: list[str]) -> dict[str, float]:
    """Held-out accuracy of one run of the GVM trainer."""
    _run(f"{run.name}", [
        "-m", "megatron_dvpo.gvm.train", "--config", "examples/gvm_tiny.yaml",
        f"data.train_path={train_path}", f"data.eval_path={data}/eval.jsonl",
        f"data.tokenizer={data}/tokenizer.model", f"checkpoint.init_from={data}/init",
        f"logging.run_dir={run}", f"checkpoint.save_dir={run}/checkpoints",
        f"gvm.objective={objective}", f"train_steps={steps}", "gvm.eval_interval=0",
        f"logging.log_interval={steps}", "checkpoint.save_interval=0", f"seed={seed}",
        *TASK_MODELS[data.name][1], *overrides], nproc)
    logs = scalars(run / "tensorboard")
    return {"last": logs["gvm/pair_acc_last"][-1][1], "mean": logs["gvm/pair_acc_mean"][-1][1]}


def mean_runs(runs: dict[str, dict[str, float]]) -> dict:
    """Per-seed accuracies and their means."""
    return {"last": sum(r["last"] for r in runs.values()) / len(runs),
            "mean": sum(r["mean"] for r in runs.values()) / len(runs), "seeds": runs}


def run_task(data: Path, budgets: list[int], objectives: list[str], nproc: int,
             seeds: list[int], overrides: list[str]) -> dict:
    result = {}
    for steps in budgets:
        runs: dict[str, dict[str, dict]] = {}
        for seed in seeds:
            def one(name: str, objective: str, train_path: Path) -> None:
                runs.setdefault(name, {})[str(seed)] = train(
                    data, data / f"{name}-{steps}-{seed}", objective, steps, train_path, nproc,
                    seed, overrides)

            reward_model = data / f"bradley_terry-{steps}-{seed}"
            if "bradley_terry" in objectives or "v1_rm_scores" in objectives:
                one("bradley_terry", "bradley_terry", data / "train.jsonl")
            for objective in (o for o in objectives if o in ("td", "td_pairwise")):
                one(objective, objective, data / "train.jsonl")
            if "v1_rm_scores" in objectives:
                scored = data / f"scored-{steps}-{seed}.jsonl"
                _run("score the training responses with the reward model", [
                    "-m", "megatron_dvpo.gvm.score", "--ckpt", f"{reward_model}/checkpoints",
                    "--data", f"{data}/train.jsonl", "--out", str(scored),
                    f"logging.run_dir={reward_model}"], nproc)
                runs.setdefault("v1_rm_scores", {})[str(seed)] = train(
                    data, data / f"v1-{steps}-{seed}", "td", steps, scored, nproc, seed,
                    overrides)
        row = {name: mean_runs(r) for name, r in runs.items()}
        if "bradley_terry" in row:
            rm = row["bradley_terry"]["last"]
            for objective in (o for o in GVM_OBJECTIVES if o in row):
                best = max(row[objective]["last"], row[objective]["mean"])
                row[objective]["gap_to_rm_points"] = round(100 * (rm - best), 2)
        result[str(steps)] = row
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="tiny data and budgets (tests)")
    parser.add_argument("--tasks", default="synthetic,bigram")
    parser.add_argument("--objectives", default="td,td_pairwise,v1_rm_scores,bradley_terry")
    parser.add_argument("--budgets", default="300,900", help="training steps, comma-separated")
    parser.add_argument("--train-rows", type=int, default=8000)
    parser.add_argument("--eval-rows", type=int, default=400)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--seeds", default="1234", help="training seeds, comma-separated")
    parser.add_argument("--overrides", default="",
                        help="config overrides of every GVM run, comma-separated")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.budgets, args.train_rows, args.eval_rows = "20", 400, 40
    budgets = [int(b) for b in args.budgets.split(",")]
    objectives = args.objectives.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = [o for o in args.overrides.split(",") if o]
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
              "tasks": {}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for rule in args.tasks.split(","):
            data = make_task(Path(tmp), rule, args.train_rows, args.eval_rows)
            report["tasks"][rule] = run_task(data, budgets, objectives, args.nproc, seeds,
                                             overrides)
            Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["tasks"], indent=2))


if __name__ == "__main__":
    main()
