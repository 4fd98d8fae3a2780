"""``make demo``: the whole DVPO pipeline on the built-in synthetic task, through the user CLIs.

    python -m megatron_dvpo.demo [--workdir runs/demo] [--nproc 2]

1. write the synthetic task: a hidden word-scoring rule, prompts and a tokenizer;
2. build a tiny random Llama policy and save it as a Hugging Face checkpoint;
3. import it into megatron, as a policy and as the starting point of a GVM, and briefly SFT the
   policy on the task's responses so that it writes words;
4. sample the policy's own responses and rank them by the hidden rule into preference pairs;
5. pretrain the GVM on those pairs (TD(lambda));
6. run DVPO with the frozen GVM;
7. export the trained policy back to Hugging Face;
and print the true reward before and after, the GVM's accuracy and the TensorBoard directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The title of the reward model's stage (tools/bench_methods.py, the tests): a stamped stage is
# recognised by it
REWARD_MODEL_STAGE = "reward model on the same pairs"


def _run(title: str, args: list[str], nproc: int = 1, stamp: Path | None = None) -> str:
    """Run one stage as a user would: under torchrun with ``nproc`` > 1 ranks, else as one
    process. With ``stamp``, a stage already run with this very command (its stamp file says
    so) is not run again: tests and benchmarks share the stages they have in common."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable])
    command = ["torchrun" if nproc > 1 else "python", *args]
    print(f"\n== {title}\n$ {' '.join(command)}", flush=True)
    if stamp is not None and stamp.is_file():
        done = json.loads(stamp.read_text())
        if done["command"] == command:
            print("   (done before, with this command)", flush=True)
            return done["stdout"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"stage failed: {title}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    for line in lines[-4:]:
        print(f"   {line}")
    print(f"   ({time.perf_counter() - start:.0f}s)", flush=True)
    if stamp is not None:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"command": command, "stdout": proc.stdout}))
    return proc.stdout


def run_events(directory: Path) -> Path:
    """The directory of one run's event files: ``directory`` itself, or the one run below it
    (a run's ``<run_dir>/tensorboard`` holds its events one level down, ``events_dir``)."""
    directory = Path(directory)
    if any(directory.glob("events.out.tfevents.*")):
        return directory
    runs = sorted({path.parent for path in directory.rglob("events.out.tfevents.*")})
    if len(runs) != 1:
        raise ValueError(f"{directory}: {len(runs)} runs' event files below it "
                         f"({', '.join(str(run) for run in runs) or 'none'}); name one")
    return runs[0]


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) points of the run in ``directory`` (``run_events``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_events(directory)))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def _stages(work: Path, reuse: bool):
    """``_run`` for the stages of ``work``, stamped there when ``reuse``."""
    def run(title: str, args: list[str], nproc: int = 1) -> str:
        stamp = work / ".stages" / (re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_") + ".json")
        return _run(title, args, nproc, stamp if reuse else None)

    return run


def task_and_models(work: Path, rule: str = "synthetic", shape: tuple[str, ...] = (),
                    reuse: bool = False) -> tuple[Path, Path]:
    """Stages 1-3b into ``work``: a built-in task (``rule``), a tiny random HF policy
    (``shape``: tools/build_tiny_hf.py arguments), imported as a policy (``work/policy``) and
    as a zero-head GVM (``work/gvm_init``); returns (task data, policy) directories."""
    work.mkdir(parents=True, exist_ok=True)
    run = _stages(work, reuse)
    data, hf, policy = work / "synthetic", work / "hf_policy", work / "policy"
    run("1. synthetic task", ["-m", "megatron_dvpo.data.synthetic", str(data), "--rule", rule])
    run("2. tiny random HF policy", ["tools/build_tiny_hf.py", "--tokenizer",
                                     str(data / "tokenizer.model"), "--out", str(hf), *shape])
    run("3a. import the policy", ["tools/convert_hf_to_megatron.py", "--hf", str(hf), "--out",
                                  str(policy), "--overwrite"])
    run("3b. import a GVM starting point", ["tools/convert_hf_to_megatron.py", "--hf", str(hf),
                                            "--out", str(work / "gvm_init"), "--target", "gvm",
                                            "--overwrite"])
    return data, policy


def policy_and_gvm(work: Path, nproc: int = 2, sft_steps: int = 100, gvm_steps: int = 300,
                   rule: str = "synthetic", shape: tuple[str, ...] = (),
                   gvm_overrides: tuple[str, ...] = (), reuse: bool = False,
                   pair_args: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
    """Stages 1-5 into ``work``: ``task_and_models``, an SFT policy, preference pairs sampled
    from it (``pair_args``: more ``megatron_dvpo.sample`` options) and a GVM trained on them;
    returns (task data, policy, GVM) directories. With ``reuse``, stages that already ran in
    ``work`` with the same commands are skipped."""
    data, policy = task_and_models(work, rule, shape, reuse)
    run = _stages(work, reuse)
    sft = work / "sft"
    run("3c. SFT warm start", [
        "-m", "megatron_dvpo.sft", "--config", "examples/sft_tiny.yaml",
        f"data.train_path={data}/train.jsonl", f"data.tokenizer={data}/tokenizer.model",
        f"checkpoint.init_from={policy}", f"logging.run_dir={sft}",
        f"checkpoint.save_dir={sft}/checkpoints", f"train_steps={sft_steps}"], nproc)
    policy = sft / "checkpoints" / f"iter_{sft_steps:07d}"
    for split, seed in (("train", 0), ("eval", 1)):
        run(f"4. sample the policy into preference pairs ({split})",
            ["-m", "megatron_dvpo.sample", "--policy", str(policy), "--prompts",
             str(data / f"{split}.jsonl"), "--out", str(work / f"pairs_{split}.jsonl"),
             "--pairs", "--true-reward", f"{rule}:0", "--max-new-tokens", "12",
             "--seed", str(seed), *pair_args], nproc)
    gvm = train_value_model(work, "gvm", "5. pretrain the GVM", gvm_steps,
                            "gvm.eval_interval=25", *gvm_overrides, reuse=reuse)
    return data, policy, gvm


def train_value_model(work: Path, name: str, title: str, steps: int, *overrides: str,
                      reuse: bool = False) -> Path:
    """A value model trained on the pairs sampled into ``work`` (stage 5: the GVM; with
    ``gvm.objective=bradley_terry``, a reward model), from ``work/gvm_init``, in
    ``work/<name>``; returns its final checkpoint."""
    run = work / name
    _stages(work, reuse)(title, [
        "-m", "megatron_dvpo.gvm.train", "--config", "examples/gvm_tiny.yaml",
        f"data.train_path={work}/pairs_train.jsonl", f"data.eval_path={work}/pairs_eval.jsonl",
        f"data.tokenizer={work}/synthetic/tokenizer.model",
        f"checkpoint.init_from={work}/gvm_init", f"logging.run_dir={run}",
        f"checkpoint.save_dir={run}/checkpoints", f"train_steps={steps}",
        "logging.log_interval=5", "checkpoint.save_interval=0", *overrides])
    return run / "checkpoints" / f"iter_{steps:07d}"


def run_pipeline(work: Path, nproc: int = 2, sft_steps: int = 100, gvm_steps: int = 300,
                 dvpo_steps: int = 40, reuse: bool = False) -> dict:
    """All stages into ``work``; returns the headline numbers. With ``reuse``, stages 1-5
    that already ran in ``work`` with the same commands are skipped (``policy_and_gvm``)."""
    data, policy, gvm_ckpt = policy_and_gvm(work, nproc, sft_steps, gvm_steps, reuse=reuse)
    gvm_dir = work / "gvm"
    dvpo_dir = work / "dvpo"
    _run("6. DVPO", [
        "-m", "megatron_dvpo.rl.dvpo", "--config", "examples/dvpo_tiny.yaml",
        f"data.train_path={data}/train.jsonl", f"data.eval_path={data}/eval.jsonl",
        f"rl.policy={policy}", f"dvpo.gvm={gvm_ckpt}", f"logging.run_dir={dvpo_dir}",
        f"checkpoint.save_dir={dvpo_dir}/checkpoints", f"train_steps={dvpo_steps}"], nproc)
    _run("7. export the trained policy to HF", ["tools/convert_megatron_to_hf.py", "--ckpt",
                                                str(dvpo_dir / "checkpoints"), "--out",
                                                str(work / "hf_trained"), "--overwrite"])
    gvm_logs, dvpo_logs = scalars(gvm_dir / "tensorboard"), scalars(dvpo_dir / "tensorboard")
    true_reward = dvpo_logs["eval/true_reward_mean"]
    return {"true_reward_before": true_reward[0][1], "true_reward_after": true_reward[-1][1],
            "gvm_pair_acc_last": gvm_logs["gvm/pair_acc_last"][-1][1],
            "gvm_pair_acc_mean": gvm_logs["gvm/pair_acc_mean"][-1][1],
            "tensorboard": str(dvpo_dir / "tensorboard"), "exported": str(work / "hf_trained"),
            "exported_from": json.loads((work / "hf_trained" / "conversion.json").read_text())
            .get("source")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--nproc", type=int, default=2, help="ranks for sampling and DVPO")
    args = parser.parse_args(argv)
    from megatron_dvpo.rl.dashboard import rl_dashboard
    from megatron_dvpo.rl.scorers import GVMScorer

    start = time.perf_counter()
    result = run_pipeline(Path(args.workdir).resolve(), args.nproc)
    print("\n== result")
    print(f"true (hidden-rule) reward of the policy: {result['true_reward_before']:+.3f} before "
          f"DVPO, {result['true_reward_after']:+.3f} after")
    print(f"GVM held-out pairwise accuracy: {result['gvm_pair_acc_last']:.1%} (last value), "
          f"{result['gvm_pair_acc_mean']:.1%} (mean value)")
    link = rl_dashboard(GVMScorer.final_value_tag, true_reward=True).link()
    print(f"TensorBoard: tensorboard --logdir {result['tensorboard']} (the DVPO run; "
          f"--logdir {args.workdir}: the SFT and GVM runs beside it), then open {link}")
    print(f"trained policy in HF format: {result['exported']}")
    print(f"total {time.perf_counter() - start:.0f}s")
    (Path(args.workdir) / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
