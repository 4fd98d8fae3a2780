"""Run under torchrun: one GVM, DVPO and PPO step at a layout, on data that differs per
data-parallel rank, recorded so that another layout (DP=1 over the concatenated batch) can be
compared with it.

Usage: torchrun --nproc-per-node N rl_equivalence.py WORKDIR LAYOUT [LAYOUT ...]
LAYOUT is dp<D>pp<P>[ep<E>][tok] (D x P = N; ``ep``: expert parallelism inside the D
data-parallel ranks, for mixtures of experts; ``tok``: token-budget microbatches of varying
shapes), or ``compare``. The global batches are fixed: the GVM trainer's sampler hands each DP
rank a contiguous share of one global batch; the RL jobs are given a fixed rollout of 8 rows, rank r
of D holding rows [8r/D, 8(r+1)/D) (sampling itself is checked elsewhere). Each job runs one
step, in fp32 and again in bf16; the per-token advantages (gathered over DP), the logged
losses, and the gradients and stepped weights (as dist checkpoints, which reload at any layout)
are written to WORKDIR/<LAYOUT>/ and WORKDIR/<LAYOUT>-bf16/. ``compare`` (one rank, after
dp1pp1) loads every recorded layout back and writes its differences to dp1pp1 of the same
precision to WORKDIR/diffs.json.
"""

import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import load_model, save_model
from megatron_dvpo.config import ParallelConfig, load_config, save_config
from megatron_dvpo.device import device
from megatron_dvpo.models.generation import Rollout
from megatron_dvpo.models.gvm import build_gvm_chunks
from megatron_dvpo.rl import step as step_module

ROWS, WIDTH, STEPS = 8, 5, 6
# Adam's first step is about lr x sign(g): a gradient element near 0 (an expert that saw one
# token) would turn fp32 rounding noise into a full step; a larger eps keeps it proportional
ADAM_EPS = "optimizer.adam_eps=1e-4"


DTYPES = {"": "fp32", "-bf16": "bf16"}  # a recording's suffix -> precision.params_dtype


def parse(layout: str) -> ParallelConfig:
    _, pp, ep, _ = re.fullmatch(r"dp(\d+)pp(\d+)(?:ep(\d+))?(tok)?", layout).groups()
    return ParallelConfig(pipeline_model_parallel_size=int(pp),
                          expert_model_parallel_size=int(ep or 1))


def microbatching(layout: str, budget: int) -> list[str]:
    """Token-budget microbatches for a ``tok`` layout, fixed-size ones otherwise."""
    return [f"data.micro_batch_tokens={budget}"] if layout.endswith("tok") else []


def random_head_gvm(work: Path) -> Path:
    """The converted zero-head GVM with a random value head, so that values are not all 0."""
    out = work / "gvm_random"
    if not (out / "config.yaml").is_file():
        cfg = load_config(work / "gvm" / "config.yaml")
        distributed.seed_everything(7)
        chunks = build_gvm_chunks(cfg, value_head_init_std=0.5)
        save_model(chunks, out / "model", overwrite=True)
        if distributed.is_rank0():
            save_config(cfg, out / "config.yaml")
        torch.distributed.barrier()
    return out


def fixed_rollout(device) -> Rollout:
    """8 left-padded prompts of the synthetic vocabulary with responses of 1-6 tokens."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(4, 200, (ROWS, WIDTH + STEPS), generator=g)
    pads = torch.tensor([0, 2, 1, 0, 3, 0, 1, 2])
    lengths = torch.tensor([6, 3, 1, 5, 6, 2, 4, 6])
    tokens[:, 0] = 2
    for row in range(ROWS):
        tokens[row, :pads[row]] = 0
        tokens[row, pads[row]] = 2  # BOS
        tokens[row, WIDTH + lengths[row]:] = 0
    mask = torch.arange(STEPS)[None, :] < lengths[:, None]
    dp, rank = (parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_rank())
    mine = slice(rank * ROWS // dp, (rank + 1) * ROWS // dp)
    return Rollout(tokens=tokens[mine].to(device), prompt_pad=pads[mine].to(device),
                   prompt_width=WIDTH, response_mask=mask[mine].to(device),
                   logprobs=torch.zeros(ROWS, STEPS)[mine].to(device))


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(parallel_state.get_data_parallel_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous(),
                                 group=parallel_state.get_data_parallel_group())
    return torch.cat(parts)


def save_stepped_and_grads(unit, out: Path) -> None:
    """The weights after the step, then the gradients of the step in place of the weights."""
    save_model(unit.chunks, out / "stepped", overwrite=True)
    with torch.no_grad():
        for chunk in unit.ddp:
            for param in chunk.module.parameters():
                param.copy_(param.main_grad)
    save_model(unit.chunks, out / "grads", overwrite=True)


def rl_job(algorithm, work: Path, layout: str, suffix: str, extra: list[str]):
    cfg = load_config(Path("examples/dvpo_tiny.yaml"), [
        f"data.train_path={work}/synthetic/train.jsonl", "data.eval_path=null",
        f"rl.policy={work}/policy", "rl.kl_coef=0.1", "rl.kl_adaptive=false",
        "rl.ppo_epochs=1", "rl.minibatches=1", "rl.true_reward=null", "rl.eval_interval=0",
        "data.global_batch_size=8", "data.micro_batch_size=2", "checkpoint.save_dir=null",
        f"logging.run_dir={work}/{layout}{suffix}/run", "rollout.max_new_tokens=6",
        f"precision.params_dtype={DTYPES[suffix]}", ADAM_EPS,
        # rows of 6-11 tokens: microbatches of 1-3 rows, 7-11 columns
        *microbatching(layout, 22), *extra])
    cfg.parallel = parse(layout)
    job = algorithm(cfg)
    job.initialize()

    class FixedRollout:  # the rollout backend: the same rollout on every layout
        generate = staticmethod(lambda prompts, seed: fixed_rollout(device()))
        sync_weights = staticmethod(lambda: None)

    job.parts = dataclasses.replace(job.parts, backend=FixedRollout())
    recorded = {}
    update = step_module.update_policy

    def recording(policy, rollout, logp_old, advantages, *args):
        recorded["advantages"] = gather_rows(advantages)
        return update(policy, rollout, logp_old, advantages, *args)

    step_module.update_policy = recording
    try:
        metrics = job.step(0).metrics
    finally:
        step_module.update_policy = update
    return job, metrics, recorded["advantages"]


def record(work: Path, layout: str, suffix: str) -> None:
    from megatron_dvpo.data.inputs import check_training_inputs
    from megatron_dvpo.gvm.train import GVMTrainer
    from megatron_dvpo.rl.dvpo import DVPO
    from megatron_dvpo.rl.ppo import PPO

    out = work / f"{layout}{suffix}"
    distributed.set_parallel_layout(parse(layout))
    gvm = random_head_gvm(work)
    results = {}
    # the GVM: one TD(lambda) step on the sampler's global batch
    cfg = load_config(Path("examples/gvm_tiny.yaml"), [
        f"data.train_path={work}/synthetic/train.jsonl", "data.eval_path=null",
        f"data.tokenizer={work}/synthetic/tokenizer.model", f"checkpoint.init_from={gvm}",
        "checkpoint.save_dir=null", f"logging.run_dir={out}/gvm_run",
        "data.global_batch_size=16", "data.micro_batch_size=4", "train_steps=1",
        f"precision.params_dtype={DTYPES[suffix]}", ADAM_EPS, *microbatching(layout, 64)])
    cfg.parallel = parse(layout)
    check_training_inputs(cfg, [], value_model=True)
    trainer = GVMTrainer(cfg)
    trainer.initialize()
    results["gvm_loss"] = trainer.step(0).metrics["gvm/loss"]
    save_stepped_and_grads(trainer.model, out / "gvm")
    # DVPO and PPO: one step each on the fixed rollout
    job, metrics, advantages = rl_job(DVPO, work, layout, suffix,
                                      [f"dvpo.gvm={gvm}", "dvpo.estimator=td"])
    results["dvpo"] = {"policy_loss": metrics["policy/loss"], "advantages": advantages.tolist(),
                       "adv_std": metrics["rollout/adv_std"]}
    save_stepped_and_grads(job.policy, out / "dvpo_policy")
    job, metrics, advantages = rl_job(PPO, work, layout, suffix, [f"ppo.reward_model={gvm}"])
    results["ppo"] = {"policy_loss": metrics["policy/loss"], "critic_loss": metrics["critic/loss"],
                      "advantages": advantages.tolist()}
    save_stepped_and_grads(job.policy, out / "ppo_policy")
    save_stepped_and_grads(job.scorer.critic, out / "ppo_critic")
    if distributed.is_rank0():
        (out / "result.json").write_text(json.dumps(results))


def compare(work: Path) -> None:
    """Every recorded layout against dp1pp1, loaded back at one rank."""
    from megatron_dvpo.models import build_chunks

    diffs = {}
    models = {"gvm": work / "gvm_random", "dvpo_policy": work / "policy",
              "ppo_policy": work / "policy", "ppo_critic": work / "gvm_random"}
    for layout_dir in sorted(p for p in work.glob("dp*pp*") if not p.name.startswith("dp1pp1")):
        suffix = "-bf16" if layout_dir.name.endswith("-bf16") else ""
        reference_dir = work / f"dp1pp1{suffix}"
        reference = json.loads((reference_dir / "result.json").read_text())
        got = json.loads((layout_dir / "result.json").read_text())
        d = {"gvm_loss": abs(got["gvm_loss"] - reference["gvm_loss"])}
        for algo in ("dvpo", "ppo"):
            a = torch.tensor(got[algo]["advantages"])
            b = torch.tensor(reference[algo]["advantages"])
            d[f"{algo}_advantages"] = (a - b).abs().max().item()
            d[f"{algo}_advantage_max_abs"] = b.abs().max().item()
            d[f"{algo}_policy_loss"] = abs(got[algo]["policy_loss"]
                                           - reference[algo]["policy_loss"])
        d["ppo_critic_loss"] = abs(got["ppo"]["critic_loss"] - reference["ppo"]["critic_loss"])
        for name, source in models.items():
            cfg = load_config(source / "config.yaml")
            for what in ("stepped", "grads"):
                ref_chunks, chunks = build_chunks(cfg), build_chunks(cfg)
                load_model(ref_chunks, reference_dir / name / what)
                load_model(chunks, layout_dir / name / what)
                ref = dict(ref_chunks[0].named_parameters())
                d[f"{name}_{what}"] = max((p - ref[n]).abs().max().item()
                                          for n, p in chunks[0].named_parameters())
                d[f"{name}_{what}_max_abs"] = max(p.abs().max().item() for p in ref.values())
        diffs[layout_dir.name] = d
    (work / "diffs.json").write_text(json.dumps(diffs, indent=2))


def main():
    work = Path(sys.argv[1])
    distributed.init_distributed(ParallelConfig(), seed=1234)
    for layout in sys.argv[2:]:
        if layout == "compare":
            compare(work)
            continue
        for suffix in DTYPES:
            record(work, layout, suffix)
    distributed.shutdown()


if __name__ == "__main__":
    main()
