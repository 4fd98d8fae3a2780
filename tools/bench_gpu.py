#!/usr/bin/env python
"""GPU performance of the policy path, bf16 against FP8: training, generation, DVPO and PPO steps.

    python tools/bench_gpu.py --out bench_gpu.json [--shape llama3.2-1b] [--recipes tensorwise]
    python tools/bench_gpu.py --out bench_gpu.json --quick      # tiny model, runs on a CPU too

For a random model of the given shape (Llama-3.2-1B by default: 16 layers, hidden 2048, GQA 32/8,
FFN 8192, 128,256-token tied vocabulary), one GPU:

- ``training``: policy forward-backward + optimizer steps on random tokens, per precision:
  tokens/s, model TFLOP/s and MFU (6·N·tokens plus attention, see
  ``models.gpt.training_flops_per_token``) against the GPU's dense bf16 peak, peak memory;
- ``generation``: our KV-cache sampler (bf16, as rollouts run) against HF ``generate`` on the
  same weights, prompts and lengths (sampling, no early stop): new tokens/s each;
- ``dvpo_step`` / ``ppo_step``: full steps through the real command lines (rollout, frozen GVM
  or reward model + critic, clipped update), per precision: time split into generation,
  scoring and training, and peak memory with the frozen models colocated;
- ``targets``: FP8 training MFU >= 50% of the dense bf16 peak, FP8 DVPO step <= 0.75x bf16,
  generation >= 3x HF.

A precision the machine cannot run (FP8 on a CPU or pre-Hopper GPU) is reported as skipped with
the reason from the precision check, never measured as something else.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import torch  # noqa: E402

from bench_dvpo_vs_ppo import build_models, run_method  # noqa: E402
from megatron_dvpo.perf import dense_bf16_peak_tflops  # noqa: E402

SHAPES = {
    "llama3.2-1b": ["--layers", "16", "--hidden", "2048", "--heads", "32", "--kv-heads", "8",
                    "--ffn", "8192", "--vocab", "128256", "--tie", "--max-positions", "4096"],
    "tiny": ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2"],
}


def precision_variants(recipes: list[str], on_gpu: bool) -> dict[str, list[str]]:
    base = "bf16" if on_gpu else "fp32"
    variants = {base: [f"precision.params_dtype={base}"]}
    for recipe in recipes:
        variants[f"fp8-{recipe}"] = ["precision.params_dtype=bf16", "precision.fp8=hybrid",
                                     f"precision.fp8_recipe={recipe}"]
    return variants


def skip_reason(policy_dir: Path, overrides: list[str]) -> str | None:
    from megatron_dvpo.config import ConfigError, load_config
    from megatron_dvpo.models.precision import Hardware, plan_precision

    cfg = load_config(policy_dir / "config.yaml", overrides)
    try:
        plan_precision(cfg.precision, cfg.parallel, cfg.model, Hardware.detect())
    except ConfigError as err:
        return str(err)
    return None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_training(policy_dir: Path, overrides: list[str], args, peak_tflops) -> dict:
    """Policy training steps on random tokens: the update half of a DVPO step, isolated."""
    from megatron_dvpo.config import load_config
    from megatron_dvpo.logging import peak_memory_gib
    from megatron_dvpo.models import forward
    from megatron_dvpo.models.gpt import build_model_chunks, training_flops_per_token
    from megatron_dvpo.training.trained_model import build_optimizer, wrap_ddp

    cfg = load_config(policy_dir / "config.yaml", overrides)
    chunks = build_model_chunks(cfg)
    ddp = wrap_ddp(chunks, cfg.parallel)
    optimizer = build_optimizer(ddp, cfg.optimizer, cfg.parallel, cfg.precision)
    device = next(chunks[0].parameters()).device
    vocab = cfg.model.vocab_size
    rows = args.train_micro_batch * args.train_micro_batches
    tokens = torch.randint(0, vocab, (rows, args.train_seq), device=device)
    batches = forward.make_microbatches(args.train_micro_batch, tokens=tokens)
    head = forward.policy_logprobs_head(vocab)

    def loss(outputs, batch):
        return -outputs["logprobs"].mean(), {}

    def step() -> torch.Tensor:
        for chunk in ddp:
            chunk.train()
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = forward.run_microbatches(ddp, batches, head, loss)
        optimizer.step()
        return torch.stack([o["loss"].detach() for o in outputs]).sum()

    losses = [step() for _ in range(args.warmup)]
    _sync()
    start = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    _sync()
    seconds = (time.perf_counter() - start) / args.steps
    step_tokens = rows * args.train_seq
    tflops = training_flops_per_token(cfg.model, args.train_seq) * step_tokens / seconds / 1e12
    result = {"step_time_s": seconds, "tokens_per_s": step_tokens / seconds,
              "model_tflops_per_s": tflops,
              "mfu": tflops / peak_tflops if peak_tflops else None,
              "peak_mem_gib": peak_memory_gib(), "tokens_per_step": step_tokens,
              "losses": [float(v) for v in losses]}  # read after timing: no host waits inside
    chunks = ddp = optimizer = step = None  # freed before the caches are emptied
    _release()
    return result


def _prompts(args, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (args.gen_batch, args.gen_prompt_len),
                         generator=generator).tolist()


def bench_generation(policy_dir: Path, overrides: list[str], args, tokenizer_vocab: int) -> dict:
    """Our sampler, every row running the full length (no EOS), bf16 as rollouts run."""
    from megatron_dvpo.config import load_config
    from megatron_dvpo.models.generation import SamplingConfig, generate
    from megatron_dvpo.models.gpt import build_model_chunks

    cfg = load_config(policy_dir / "config.yaml", overrides)
    chunks = build_model_chunks(cfg)
    prompts = _prompts(args, tokenizer_vocab)
    sampling = SamplingConfig(max_new_tokens=args.gen_new_tokens)
    generate(chunks, prompts, SamplingConfig(max_new_tokens=4), -1, 0, cfg.model.vocab_size, 0)
    _sync()
    start = time.perf_counter()
    rollout = generate(chunks, prompts, sampling, -1, 0, cfg.model.vocab_size, 1)
    _sync()
    seconds = time.perf_counter() - start
    new_tokens = int(rollout.response_lengths.sum())
    del chunks
    _release()
    return {"seconds": seconds, "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds}


def bench_hf_generate(hf_dir: Path, args, tokenizer_vocab: int, dtype: torch.dtype) -> dict:
    """HF ``generate`` on the same weights, prompts and lengths (sampling, KV cache)."""
    import transformers as tf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    prompts = torch.tensor(_prompts(args, tokenizer_vocab), device=device)

    def run(new_tokens):
        with torch.no_grad():
            return model.generate(prompts, attention_mask=torch.ones_like(prompts),
                                  do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=0)

    run(4)
    _sync()
    start = time.perf_counter()
    out = run(args.gen_new_tokens)
    _sync()
    seconds = time.perf_counter() - start
    new_tokens = (out.shape[1] - prompts.shape[1]) * out.shape[0]
    model = run = None  # freed before the caches are emptied
    _release()
    return {"seconds": seconds, "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds}


def _ratio(a, b):
    return a / b if a is not None and b else None


def targets(result: dict, base: str) -> dict:
    fp8 = [name for name, r in result["training"].items()
           if name.startswith("fp8") and "skipped" not in r]
    best = max(fp8, key=lambda n: result["training"][n]["tokens_per_s"]) if fp8 else None
    step = result["dvpo_step"]
    fp8_step = next((n for n in step if n.startswith("fp8") and "skipped" not in step[n]), None)
    gen_ratio = _ratio(result["generation"]["ours"]["tokens_per_s"],
                       result["generation"]["hf_generate"]["tokens_per_s"])
    mfu = result["training"][best]["mfu"] if best else None
    step_ratio = (_ratio(step[fp8_step]["step_time_s"], step[base]["step_time_s"])
                  if fp8_step else None)
    return {
        "fp8_training_mfu": {"value": mfu, "recipe": best, "target": ">= 0.50",
                             "met": None if mfu is None else mfu >= 0.5},
        "fp8_over_bf16_dvpo_step_time": {"value": step_ratio, "recipe": fp8_step,
                                         "target": "<= 0.75",
                                         "met": None if step_ratio is None else step_ratio <= 0.75},
        "generation_over_hf_generate": {"value": gen_ratio, "target": ">= 3.0",
                                        "met": None if gen_ratio is None else gen_ratio >= 3.0},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and batches, 2 steps (tests; runs on a CPU)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3.2-1b")
    parser.add_argument("--recipes", default="tensorwise,delayed,blockwise",
                        help="FP8 recipes for the training benchmark")
    parser.add_argument("--step-recipe", default="tensorwise",
                        help="the FP8 recipe of the full DVPO/PPO steps ('' for none)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU (default: from the GPU's name)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--train-seq", type=int, default=2048)
    parser.add_argument("--train-micro-batch", type=int, default=4)
    parser.add_argument("--train-micro-batches", type=int, default=4)
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--gen-prompt-len", type=int, default=128)
    parser.add_argument("--gen-new-tokens", type=int, default=256)
    parser.add_argument("--dvpo-steps", type=int, default=4)
    parser.add_argument("--dvpo-batch", type=int, default=64)
    parser.add_argument("--dvpo-micro-batch", type=int, default=8)
    parser.add_argument("--dvpo-new-tokens", type=int, default=256)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.steps, args.warmup = "tiny", 2, 1
        args.train_seq, args.train_micro_batch, args.train_micro_batches = 32, 2, 2
        args.gen_batch, args.gen_prompt_len, args.gen_new_tokens = 4, 8, 8
        args.dvpo_steps, args.dvpo_batch, args.dvpo_micro_batch, args.dvpo_new_tokens = 2, 8, 4, 8
    on_gpu = torch.cuda.is_available()
    base = "bf16" if on_gpu else "fp32"
    recipes = [r for r in args.recipes.split(",") if r]
    variants = precision_variants(recipes, on_gpu)
    peak = args.peak_tflops or dense_bf16_peak_tflops()
    shape = SHAPES[args.shape] + ["--dtype", base]
    result = {"config": {"shape": args.shape, "device": torch.cuda.get_device_name() if on_gpu
                         else "cpu", "dense_bf16_peak_tflops": peak, "torch": torch.__version__,
                         **{k: v for k, v in vars(args).items() if k != "out"}},
              "training": {}, "generation": {}, "dvpo_step": {}, "ppo_step": {}}

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        models = build_models(work, shape)
        from megatron_dvpo.data.tokenizer import load_tokenizer

        tokenizer_vocab = load_tokenizer(str(models["hf"])).vocab_size
        skipped = {name: skip_reason(models["policy"], o) for name, o in variants.items()}
        # Full steps first, each in its own process, while this one holds no GPU memory.
        step_variants = precision_variants([args.step_recipe] if args.step_recipe else [],
                                           on_gpu)
        step_args = SimpleNamespace(steps=args.dvpo_steps, batch=args.dvpo_batch,
                                    micro_batch=args.dvpo_micro_batch,
                                    max_new_tokens=args.dvpo_new_tokens, nproc=1,
                                    overrides=[f"data.seq_length={32 + args.dvpo_new_tokens}"])
        for name, overrides in step_variants.items():
            reason = skip_reason(models["policy"], overrides)
            for method, module, extra in (
                    ("dvpo_step", "megatron_dvpo.rl.dvpo",
                     [f"dvpo.gvm={models['value']}", "rl.kl_coef=0"]),
                    ("ppo_step", "megatron_dvpo.rl.ppo",
                     [f"ppo.reward_model={models['value']}", "rl.kl_coef=0.05"])):
                result[method][name] = ({"skipped": reason} if reason else run_method(
                    f"{method}-{name}", module, work, models, step_args, extra + overrides))

        from megatron_dvpo.config import ParallelConfig
        from megatron_dvpo.distributed import init_distributed, shutdown

        init_distributed(ParallelConfig(), seed=1234)
        for name, overrides in variants.items():
            print(f"\n== training benchmark: {name}", flush=True)
            result["training"][name] = ({"skipped": skipped[name]} if skipped[name]
                                        else bench_training(models["policy"], overrides, args,
                                                            peak))
        print("\n== generation benchmark", flush=True)
        result["generation"]["ours"] = bench_generation(models["policy"], variants[base], args,
                                                        tokenizer_vocab)
        dtype = torch.bfloat16 if on_gpu else torch.float32
        result["generation"]["hf_generate"] = bench_hf_generate(models["hf"], args,
                                                                tokenizer_vocab, dtype)
        shutdown()
    result["targets"] = targets(result, base)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["targets"], indent=2))


if __name__ == "__main__":
    main()
