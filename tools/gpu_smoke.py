#!/usr/bin/env python
"""One-shot GPU smoke run: does the whole stack work on this GPU, and how fast, in one JSON.

    python tools/gpu_smoke.py --out smoke.json             # one GPU, ~9 minutes at most
    python tools/gpu_smoke.py --out smoke.json --dry-run   # tiny shapes, any machine (tests)

For a bare Python 3.12 + CUDA torch with no package registry: beyond what such an image holds,
it needs only megatron-core (a ~2.4 MB wheel) and this repository on ``PYTHONPATH``. Transformer
Engine is too large to bring, so FP8 is reported as not run, with the precision check's reason.

Each phase runs in its own process under its own time limit (a hang or a crash costs that phase,
not the report), on a Llama-3.2-1B-shaped random model unless ``--dry-run``:

- ``env``: Python, torch, CUDA, the GPU, megatron-core, Transformer Engine, the FP8 verdict;
- ``nccl``: a process group as trainers make it (``cpu:gloo,cuda:nccl``): an all-reduce of a
  device tensor and of a host tensor, and a broadcast;
- ``models``: a random HF policy of the shape, imported as policy and as value model;
- ``training``: bf16 forward-backward + optimizer steps: tokens/s, model TFLOP/s, MFU;
- ``sampler``: our KV-cache sampler against HF ``generate`` on the same weights and lengths;
- ``gvm_scoring``: the value model's forward over rollout-sized batches: tokens/s;
- ``dvpo_step`` / ``ppo_step``: full steps through the command lines with the frozen models
  colocated: generation / scoring / training split, peak memory;
- ``checkpoint``: a dist-checkpoint save and load of the policy, weights equal after.
"""

from __future__ import annotations

import argparse
import json
import os
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
    "env": 45, "nccl": 45, "models": 90, "training": 75, "sampler": 75, "gvm_scoring": 30,
    "dvpo_step": 75, "ppo_step": 75, "checkpoint": 30,
}
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
    result = {"backend": process_group_backend(torch.cuda.is_available()),
              "device_all_reduce_ok": bool(on_device[0] == 1), "host_all_reduce_ok":
              bool(host[0] == 1), "seconds": time.perf_counter() - start}
    shutdown()
    return result


def phase_models(work: Path, args) -> dict:
    from bench_dvpo_vs_ppo import build_models
    from bench_gpu import SHAPES

    import torch

    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    start = time.perf_counter()
    models = build_models(work / "models", SHAPES[sizes(args.dry_run).shape] + ["--dtype", dtype])
    (work / "models.json").write_text(json.dumps({k: str(v) for k, v in models.items()}))
    return {"shape": sizes(args.dry_run).shape, "seconds": time.perf_counter() - start}


def _models(work: Path) -> dict[str, Path]:
    return {k: Path(v) for k, v in json.loads((work / "models.json").read_text()).items()}


def _base_precision() -> list[str]:
    import torch

    return [f"precision.params_dtype={'bf16' if torch.cuda.is_available() else 'fp32'}"]


def _in_process_world():
    from megatron_dvpo.config import ParallelConfig
    from megatron_dvpo.distributed import init_distributed

    init_distributed(ParallelConfig(), seed=1234)


def phase_training(work: Path, args) -> dict:
    from bench_gpu import bench_training

    from megatron_dvpo.perf import dense_bf16_peak_tflops

    _in_process_world()
    return bench_training(_models(work)["policy"], _base_precision(), sizes(args.dry_run),
                          dense_bf16_peak_tflops())


def phase_sampler(work: Path, args) -> dict:
    import torch
    from bench_gpu import bench_generation, bench_hf_generate

    from megatron_dvpo.data.tokenizer import load_tokenizer

    _in_process_world()
    models, size = _models(work), sizes(args.dry_run)
    vocab = load_tokenizer(str(models["hf"])).vocab_size
    ours = bench_generation(models["policy"], _base_precision(), size, vocab)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    hf = bench_hf_generate(models["hf"], size, vocab, dtype)
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
    cfg = load_config(value / "config.yaml", _base_precision())
    gvm = frozen_model(cfg, cfg.model, str(value))
    seq = size.gen_prompt_len + size.gen_new_tokens
    tokens = torch.randint(3, 200, (size.rl_batch, seq), device=device())
    batches = forward.make_microbatches(size.rl_micro_batch, tokens=tokens)
    forward.token_values(gvm, batches)
    start = time.perf_counter()
    for _ in range(size.steps):
        forward.token_values(gvm, batches)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / size.steps
    return {"tokens_per_s": tokens.numel() / seconds, "seconds_per_batch": seconds}


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
                                                    *_base_precision()])
    return run_method(method, module, work, models, step_args, extra)


def phase_dvpo_step(work: Path, args) -> dict:
    return _rl_step(work, args, "dvpo_step")


def phase_ppo_step(work: Path, args) -> dict:
    return _rl_step(work, args, "ppo_step")


def phase_checkpoint(work: Path, args) -> dict:
    import torch

    from megatron_dvpo.checkpointing import load_model, save_model
    from megatron_dvpo.config import load_config
    from megatron_dvpo.models import build_chunks

    _in_process_world()
    policy = _models(work)["policy"]
    cfg = load_config(policy / "config.yaml", _base_precision())
    chunks = build_chunks(cfg, initialize=False)
    load_model(chunks, policy / "model")
    start = time.perf_counter()
    save_model(chunks, work / "roundtrip", overwrite=True)
    saved = time.perf_counter()
    again = build_chunks(cfg, initialize=False)
    load_model(again, work / "roundtrip")
    loaded = time.perf_counter()
    equal = all(torch.equal(a, b) for a, b in zip(chunks[0].parameters(), again[0].parameters()))
    return {"weights_equal": equal, "save_s": saved - start, "load_s": loaded - saved}


# -- the driver --------------------------------------------------------------------------------

def run_phase(name: str, work: Path, args, limit: float) -> dict:
    """``name`` in a child process under ``limit`` seconds; its JSON, or why there is none."""
    out = work / f"phase-{name}.json"
    command = [sys.executable, __file__, "--phase", name, "--workdir", str(work), "--out", str(out)]
    command += ["--dry-run"] if args.dry_run else []
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    print(f"== {name} (limit {limit:.0f}s)", flush=True)
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=limit)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "limit_s": limit}
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        return {"status": "failed", "seconds": seconds, "returncode": proc.returncode,
                "output_tail": (proc.stdout + proc.stderr)[-2000:]}
    return {"status": "ok", "seconds": seconds, **json.loads(out.read_text())}


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
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v['status']}"
                                            for k, v in report["phases"].items()))


if __name__ == "__main__":
    main()
