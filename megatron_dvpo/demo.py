"""``make demo``: the main job on the built-in tiny default.

Builds a tiny Llama-shaped policy and its Global Value Model on megatron-core at the layout of
``examples/tiny.yaml`` (TP=2 by default), runs both through the pipeline schedule, and prints
per-token log-probs, per-token values and parameter counts.

    torchrun --nproc-per-node 2 -m megatron_dvpo.demo [--config FILE] [key=value ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from megatron_dvpo import distributed
from megatron_dvpo.config import load_config, validate
from megatron_dvpo.models import forward
from megatron_dvpo.models.gpt import build_model_chunks, count_parameters
from megatron_dvpo.models.gvm import build_gvm_chunks

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. parallel.tensor_model_parallel_size=1")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    env = distributed.launch_env()
    validate(cfg, env.world_size)
    start = time.perf_counter()
    distributed.init_distributed(cfg.parallel, cfg.seed)
    from megatron.core import parallel_state

    policy = build_model_chunks(cfg)
    gvm = build_gvm_chunks(cfg)
    vocab = cfg.model.vocab_size
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, vocab, (cfg.data.micro_batch_size * 2, 12), generator=generator)
    microbatches = forward.make_microbatches(cfg.data.micro_batch_size, tokens=tokens)
    logprobs = forward.token_logprobs(policy, microbatches, vocab)
    values = forward.token_values(gvm, microbatches)

    (policy_local, policy_total), (gvm_local, gvm_total) = (count_parameters(policy),
                                                            count_parameters(gvm))
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    is_reporter = (parallel_state.is_pipeline_last_stage()
                   and parallel_state.get_tensor_model_parallel_rank() == 0
                   and parallel_state.get_data_parallel_rank() == 0)
    if is_reporter:
        print(f"megatron_dvpo demo: world={env.world_size} TP={tp} PP={pp} "
              f"DP={parallel_state.get_data_parallel_world_size()} "
              f"backend={torch.distributed.get_backend()}", flush=True)
        print(f"policy GPTModel: {policy_total:,} parameters ({policy_local:,} on this rank)")
        print(f"GVM (value head): {gvm_total:,} parameters ({gvm_local:,} on this rank)")
        print("per-token log p(next token), sequence 0:",
              " ".join(f"{x:.3f}" for x in logprobs[0].tolist()))
        print(f"mean log-prob {logprobs.mean().item():.3f} (uniform over the vocabulary: "
              f"{-torch.log(torch.tensor(float(vocab))).item():.3f})")
        print("per-token GVM values, sequence 0:",
              " ".join(f"{x:.3f}" for x in values[0].tolist()),
              "(the value head is zero-initialised, SPEC.md section 2)")
        print(f"done in {time.perf_counter() - start:.1f}s", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
