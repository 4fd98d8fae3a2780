#!/usr/bin/env python
"""One-shot GPU smoke run: does the whole stack work on this GPU, and how fast, in one JSON.

    python tools/gpu_smoke.py --out smoke.json             # one GPU, ~9 minutes at most
    python tools/gpu_smoke.py --out smoke.json --dry-run   # tiny shapes, any machine (tests)

For a bare Python 3.12 + CUDA torch with no package registry: beyond what such an image holds,
it needs only megatron-core (a ~2.4 MB wheel) and this repository on ``PYTHONPATH``. Transformer
Engine is too large to bring, so FP8 is reported as not run, with the precision check's reason.

Each phase runs in its own process group under its own time limit (a hang or a crash costs that
phase, not the report; a phase past its limit is killed with every process it started, its
torchrun workers too), on a Llama-3.2-1B-shaped random model unless ``--dry-run``. Every phase
runs in bf16 (on a CPU too, for the dry run) and checks numbers, not only that it ran: each
reports ``checks`` (name -> passed), and the script exits 1 naming the failed ones.

- ``env``: Python, torch, CUDA, the GPU, megatron-core, Transformer Engine, the FP8 verdict;
- ``nccl``: a process group as trainers make it (``cpu:gloo,cuda:nccl``): an all-reduce of a
  device tensor and of a host tensor, and a broadcast;
- ``models``: a random HF policy of the shape, imported as policy and as value model;
- ``training``: bf16 forward-backward + optimizer steps: tokens/s, model TFLOP/s, MFU; finite
  losses;
- ``sampler``: our KV-cache sampler against HF ``generate`` on the same weights and lengths;
- ``gvm_scoring``: the value model's forward over rollout-sized batches: tokens/s;
- ``gvm_step``: GVM training steps through its command line: finite losses, no skipped update;
- ``dvpo_step`` / ``ppo_step``: full steps through the command lines with the frozen models
  colocated: generation / scoring / training split, peak memory; finite losses, no skipped
  update (PPO's critic trains in bf16 too);
- ``checkpoint``: a dist-checkpoint save and load of the policy: weights and the loaded model's
  logits equal the saved model's, bit for bit;
- ``multi_gpu``: with two or more GPUs, NCCL TP=2 against one device (log-probs, values,
  gradients, stepped weights) and DP=2 with different data per rank against DP=1 (a GVM, DVPO
  and PPO step), through tests/distributed/; with one, reported as not run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

PHASES = {  # name -> time limit in seconds of the full run: 540 s, 9 minutes, in all
    "env": 30, "nccl": 30, "models": 75, "training": 60, "sampler": 60, "gvm_scoring": 25,
    "gvm_step": 45, "dvpo_step": 65, "ppo_step": 65, "checkpoint": 25, "multi_gpu": 60,
}
BF16 = ["precision.params_dtype=bf16"]
FULL_SHAPE = "llama3.2-1b"


def sizes(dry_run: bool) -> SimpleNamespace:
    """Benchmark sizes: a real shape on a GPU, a tiny one for the dry run."""
    if dry_run:
        return SimpleNamespace(shape="tiny", steps=2, warmup=1, train_seq=32, train_micro_batch=2,
                               train_micro_batches=2, gen_batch=4, gen_prompt_len=8,
                               gen_new_tokens=8, rl_steps=2, rl_batch=8, rl_micro_batch=4,
                               rl_new_tokens=8)
    return SimpleNamespace(shape=FULL_SHAPE, steps=6, warmup=2, train_seq=2048,
                           train_micro_batch=4, train_micro_batches=2, gen_batch=32,
                           gen_prompt_len=128, gen_new_tokens=128, rl_steps=3, rl_batch=32,
                           rl_micro_batch=8, rl_new_tokens=128)


# -- phases (each runs in a child process) -----------------------------------------------------

def phase_env(work: Path, args) -> dict:
    import platform

    import torch

    from megatron_dvpo.config import load_config
    from megatron_dvpo.errors import InputError
    from megatron_dvpo.mcore_compat import MCORE_VERSION
    from megatron_dvpo.models.precision import Hardware, plan_precision

    hw = Hardware.detect()
    cfg = load_config(None, ["precision.params_dtype=bf16", "precision.fp8=hybrid",
                             "precision.fp8_recipe=tensorwise"])
    try:
        plan_precision(cfg.precision, cfg.parallel, cfg.model, hw)
        fp8 = "would run (not measured by this script)"
    except InputError as e:
        fp8 = f"not run: {e}"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if hw.cuda else None,
            "capability": list(hw.capability) if hw.capability else None,
            "megatron_core": MCORE_VERSION, "transformer_engine": hw.te_version, "fp8": fp8}


def phase_nccl(work: Path, args) -> dict:
    import torch

    from megatron_dvpo.config import ParallelConfig
    from megatron_dvpo.device import device, process_group_backend
    from megatron_dvpo.distributed import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=0)
    start = time.perf_counter()
    on_device = torch.ones(1024, device=device())
    torch.distributed.all_reduce(on_device)
    host = torch.ones(4)
    torch.distributed.all_reduce(host)  # gloo beside NCCL, for host metadata
    torch.distributed.broadcast(on_device, 0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    checks = {"device_all_reduce": bool(on_device[0] == 1), "host_all_reduce": bool(host[0] == 1)}
    result = {"backend": process_group_backend(torch.cuda.is_available()), "checks": checks,
              "seconds": time.perf_counter() - start}
    shutdown()
    return result


def phase_models(work: Path, args) -> dict:
    from bench_dvpo_vs_ppo import build_models
    from bench_gpu import SHAPES

    start = time.perf_counter()
    models = build_models(work / "models", SHAPES[sizes(args.dry_run).shape] + ["--dtype", "bf16"])
    (work / "models.json").write_text(json.dumps({k: str(v) for k, v in models.items()}))
    return {"shape": sizes(args.dry_run).shape, "seconds": time.perf_counter() - start}


def _models(work: Path) -> dict[str, Path]:
    return {k: Path(v) for k, v in json.loads((work / "models.json").read_text()).items()}


def _in_process_world():
    from megatron_dvpo.config import ParallelConfig
    from megatron_dvpo.distributed import init_distributed

    init_distributed(ParallelConfig(), seed=1234)


def phase_training(work: Path, args) -> dict:
    from bench_gpu import bench_training

    from megatron_dvpo.perf import dense_bf16_peak_tflops

    _in_process_world()
    result = bench_training(_models(work)["policy"], BF16, sizes(args.dry_run),
                            dense_bf16_peak_tflops())
    result["checks"] = {"losses_finite": all(math.isfinite(v) for v in result["losses"])}
    return result


def phase_sampler(work: Path, args) -> dict:
    import torch
    from bench_gpu import bench_generation, bench_hf_generate

    from megatron_dvpo.data.tokenizer import load_tokenizer

    _in_process_world()
    models, size = _models(work), sizes(args.dry_run)
    vocab = load_tokenizer(str(models["hf"])).vocab_size
    ours = bench_generation(models["policy"], BF16, size, vocab)
    hf = bench_hf_generate(models["hf"], size, vocab, torch.bfloat16)
    return {"ours": ours, "hf_generate": hf,
            "ours_over_hf": ours["tokens_per_s"] / hf["tokens_per_s"]}


def phase_gvm_scoring(work: Path, args) -> dict:
    import torch

    from megatron_dvpo.config import load_config
    from megatron_dvpo.device import device
    from megatron_dvpo.models import forward
    from megatron_dvpo.rl.scorers import frozen_model

    _in_process_world()
    size = sizes(args.dry_run)
    value = _models(work)["value"]
    cfg = load_config(value / "config.yaml", BF16)
    gvm = frozen_model(cfg, cfg.model, str(value))
    seq = size.gen_prompt_len + size.gen_new_tokens
    tokens = torch.randint(3, 200, (size.rl_batch, seq), device=device())
    batches = forward.make_microbatches(size.rl_micro_batch, tokens=tokens)
    first = forward.token_values(gvm, batches)
    start = time.perf_counter()
    for _ in range(size.steps):
        values = forward.token_values(gvm, batches)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / size.steps
    return {"tokens_per_s": tokens.numel() / seconds, "seconds_per_batch": seconds,
            "checks": {"values_finite": bool(torch.isfinite(values).all()),
                       "values_repeatable": torch.equal(first, values)}}


def phase_gvm_step(work: Path, args) -> dict:
    from megatron_dvpo.demo import _run, scalars

    models, size = _models(work), sizes(args.dry_run)
    run = work / "gvm_step"
    _run("gvm_step", ["-m", "megatron_dvpo.gvm.train", "--config", "examples/gvm_tiny.yaml",
                      f"data.train_path={models['prompts']}", "data.eval_path=null",
                      f"data.tokenizer={models['hf']}", f"checkpoint.init_from={models['value']}",
                      f"logging.run_dir={run}", "checkpoint.save_dir=null",
                      f"train_steps={size.rl_steps + 1}", "logging.log_interval=1",
                      f"data.global_batch_size={size.rl_batch}",
                      f"data.micro_batch_size={size.rl_micro_batch}",
                      f"data.seq_length={32 + size.rl_new_tokens}", *BF16])
    logs = scalars(run / "tensorboard")
    losses = [v for _, v in logs["gvm/loss"]]
    return {"losses": losses, "step_time_s": logs["perf/step_time_s"][-1][1],
            "checks": {"losses_finite": all(math.isfinite(v) for v in losses),
                       "no_skipped_update": "train/skipped_updates" not in logs}}


def _rl_step(work: Path, args, method: str) -> dict:
    from bench_dvpo_vs_ppo import run_method

    models, size = _models(work), sizes(args.dry_run)
    module, extra = {"dvpo_step": ("megatron_dvpo.rl.dvpo", [f"dvpo.gvm={models['value']}",
                                                              "rl.kl_coef=0.05"]),
                     "ppo_step": ("megatron_dvpo.rl.ppo", [f"ppo.reward_model={models['value']}",
                                                            "rl.kl_coef=0.05"])}[method]
    step_args = SimpleNamespace(steps=size.rl_steps, batch=size.rl_batch,
                                micro_batch=size.rl_micro_batch, max_new_tokens=size.rl_new_tokens,
                                nproc=1, overrides=[f"data.seq_length={32 + size.rl_new_tokens}",
                                                    *BF16])
    result = run_method(method, module, work, models, step_args, extra)
    result["checks"] = {"losses_finite": result["losses_finite"],
                        "no_skipped_update": result["skipped_updates"] == 0}
    return result


def phase_dvpo_step(work: Path, args) -> dict:
    return _rl_step(work, args, "dvpo_step")


def phase_ppo_step(work: Path, args) -> dict:
    return _rl_step(work, args, "ppo_step")


def phase_checkpoint(work: Path, args) -> dict:
    import torch

    from megatron_dvpo.checkpointing import load_model, save_model
    from megatron_dvpo.config import load_config
    from megatron_dvpo.device import device
    from megatron_dvpo.models import build_chunks, forward

    _in_process_world()
    policy = _models(work)["policy"]
    cfg = load_config(policy / "config.yaml", BF16)
    chunks = build_chunks(cfg, initialize=False)
    load_model(chunks, policy / "model")
    start = time.perf_counter()
    save_model(chunks, work / "roundtrip", overwrite=True)
    saved = time.perf_counter()
    again = build_chunks(cfg, initialize=False)
    load_model(again, work / "roundtrip")
    loaded = time.perf_counter()
    tokens = torch.randint(3, 200, (2, 16), device=device())
    logprobs = [forward.token_logprobs(c, forward.make_microbatches(2, tokens=tokens),
                                       cfg.model.vocab_size) for c in (chunks, again)]
    equal = all(torch.equal(a, b) for a, b in zip(chunks[0].parameters(), again[0].parameters()))
    return {"save_s": saved - start, "load_s": loaded - saved,
            "checks": {"weights_equal": equal,
                       "outputs_equal": torch.equal(logprobs[0], logprobs[1])}}


def phase_multi_gpu(work: Path, args) -> dict:
    """NCCL tensor and data parallelism against one device, through the test suite's own
    multi-rank scripts; reported as not run on fewer than two GPUs."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 2:
        return {"ran": f"not run: {gpus} GPU(s) (needs 2)", "checks": {}}
    models = _models(work)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    scripts = REPO / "tests" / "distributed"
    tp = work / "tp2"
    subprocess.run([*launcher, "--nproc-per-node", "2", str(scripts / "equivalence.py"),
                    str(tp / "result.json"), str(tp), "tp2pp1"], cwd=REPO, check=True)
    tp_result = json.loads((tp / "result.json").read_text())["tp2pp1"]
    dp = work / "dp2"  # rl_equivalence.py's layout of inputs
    dp.mkdir()
    for name, target in (("synthetic", models["prompts"].parent), ("policy", models["policy"]),
                         ("gvm", models["value"])):
        (dp / name).symlink_to(target, target_is_directory=True)
    for layout, nproc in (("dp2pp1", 2), ("dp1pp1", 1), ("compare", 1)):
        subprocess.run([*launcher, "--nproc-per-node", str(nproc),
                        str(scripts / "rl_equivalence.py"), str(dp), layout], cwd=REPO,
                       check=True)
    dp_result = json.loads((dp / "diffs.json").read_text())["dp2pp1"]
    tp_keys = [k for k in tp_result if k.endswith("_diff")]
    return {"ran": "tp2pp1 and dp2pp1 on 2 GPUs", "tp2": tp_result, "dp2": dp_result,
            "checks": {"tp2_equals_one_device": all(0 <= tp_result[k] <= 1e-5 for k in tp_keys),
                       "dp2_equals_dp1": all(0 <= v <= 1e-5 for k, v in dp_result.items()
                                             if not k.endswith("max_abs"))}}


# -- the driver --------------------------------------------------------------------------------

def run_limited(command: list[str], limit: float, **kwargs) -> subprocess.CompletedProcess:
    """``command`` in a process group of its own; past ``limit`` seconds the whole group is
    killed (a phase's torchrun and its workers, which would otherwise keep the GPU) and
    ``subprocess.TimeoutExpired`` raised."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_phase(name: str, work: Path, args, limit: float) -> dict:
    """``name`` in a child process group under ``limit`` seconds; its JSON, or why there is
    none."""
    out = work / f"phase-{name}.json"
    command = [sys.executable, __file__, "--phase", name, "--workdir", str(work), "--out", str(out)]
    command += ["--dry-run"] if args.dry_run else []
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    print(f"== {name} (limit {limit:.0f}s)", flush=True)
    try:
        proc = run_limited(command, limit, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "limit_s": limit}
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        return {"status": "failed", "seconds": seconds, "returncode": proc.returncode,
                "output_tail": (proc.stdout + proc.stderr)[-2000:]}
    return {"status": "ok", "seconds": seconds, **json.loads(out.read_text())}


def failed_checks(report: dict) -> list[str]:
    """Every phase that did not finish, and every check that did not pass, by name."""
    failed = []
    for name, phase in report["phases"].items():
        if phase["status"] not in ("ok", "skipped"):
            failed.append(f"{name}: {phase['status']}")
        failed += [f"{name}.{check}" for check, ok in phase.get("checks", {}).items() if not ok]
    return failed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, any machine")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    if args.phase:  # a child: one phase
        result = globals()[f"phase_{args.phase}"](Path(args.workdir), args)
        Path(args.out).write_text(json.dumps(result))
        return
    report = {"dry_run": args.dry_run, "phases": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for name, limit in PHASES.items():
            needs_models = name not in ("env", "nccl", "models")
            if needs_models and report["phases"]["models"]["status"] != "ok":
                report["phases"][name] = {"status": "skipped", "reason": "no models"}
                continue
            report["phases"][name] = run_phase(name, Path(tmp), args,
                                               limit * (3 if args.dry_run else 1))
            print(json.dumps(report["phases"][name])[:400], flush=True)
    report["total_s"] = time.perf_counter() - started
    report["failed"] = failed_checks(report)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v['status']}"
                                            for k, v in report["phases"].items()))
    if report["failed"]:
        raise SystemExit(f"failed: {', '.join(report['failed'])}")


if __name__ == "__main__":
    main()
