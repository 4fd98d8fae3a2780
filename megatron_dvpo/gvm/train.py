"""Global Value Model pretraining: preference data -> token-level values by TD(lambda).

    torchrun --nproc-per-node N -m megatron_dvpo.gvm.train --config examples/gvm_tiny.yaml [k=v ...]

Each preference row becomes two scored samples (chosen +1, rejected -1); the GVM fits the
semi-gradient TD(lambda) targets of docs/algorithm.md §1 on the Q-view of its outputs. With
``gvm.objective=bradley_terry`` the same model learns PPO's reward model instead. Any TP/PP/DP
layout; checkpoints hold everything needed to continue exactly, and a restarted run resumes from
the latest one by itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.config import RunConfig, load_config
from megatron_dvpo.data.dataset import ValueDataset, collate
from megatron_dvpo.data.inputs import check_training_inputs, open_data
from megatron_dvpo.data.preference import TrajectoryContext
from megatron_dvpo.data.sampler import BatchSource
from megatron_dvpo.data.tokenizer import load_tokenizer
from megatron_dvpo.device import to_device
from megatron_dvpo.gvm.evaluate import evaluate_pairs
from megatron_dvpo.gvm.heads import read_heads
from megatron_dvpo.gvm.objectives import OBJECTIVES, train_on_batch
from megatron_dvpo.gvm.td import gather_response_values
from megatron_dvpo.models import forward
from megatron_dvpo.models.gvm import build_gvm_chunks, gvm_config
from megatron_dvpo.training.cli import run_trainer
from megatron_dvpo.training.job import JobDefaults
from megatron_dvpo.training.loop import StepResult
from megatron_dvpo.training.trained_model import TrainedModel


RANGE_SAMPLES = 256  # training samples the saved value range is measured on
RANGE_QUANTILES = (0.005, 0.995)


def data_metrics(dataset: ValueDataset) -> dict[str, float]:
    """What preprocessing kept, filtered, truncated and skipped, for TensorBoard."""
    stats = dataset.metadata["stats"]
    return {"data/samples": float(len(dataset)),
            "data/filtered_rows": float(stats["filtered_rows"]),
            "data/truncated_samples": float(stats["truncated_samples"]),
            "data/bad_rows": float(sum(stats["bad_rows"].values()))}


class GVMTrainer(JobDefaults):
    """A value model trained on the value dataset by one of ``OBJECTIVES``."""

    def __init__(self, cfg: RunConfig):
        init = cfg.checkpoint.init_from
        # a GVM may start from a policy, or from a GVM of another head count: its trunk, with
        # the value head(s) initialised here
        start = load_config(Path(init) / "config.yaml").model if init else None
        self.init_skip = (("output_layer.",) if start and not (
            start.value_head and start.value_heads == cfg.model.value_heads) else ())
        self.cfg = cfg = gvm_config(cfg)
        self.model = TrainedModel(build_gvm_chunks(cfg, cfg.gvm.value_head_init_std),
                                  cfg.optimizer, cfg.parallel, cfg.precision, cfg.train_steps,
                                  cfg.checkpoint.override_scheduler)
        self.units = {"model": self.model}
        self.held_out: dict[str, float] = {}
        self.final: dict[str, float] = {}
        self.objective = OBJECTIVES[cfg.gvm.objective](cfg.gvm)
        self.summary_tags = self.objective.summary_tags
        self.batches = BatchSource(cfg.data.global_batch_size,
                                   parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size(), cfg.seed)
        self.train_data = open_data(cfg, cfg.data.train_path)
        self.eval_data = open_data(cfg, cfg.data.eval_path) if cfg.data.eval_path else None
        self.train_pairs = self.train_data.pairs() if self.objective.whole_pairs else None
        k = cfg.data.trajectory_context_k
        self.context = (TrajectoryContext(self.train_data, load_tokenizer(cfg.data.tokenizer), k,
                                          cfg.seed) if k else None)
        distributed.print_rank0(f"train data: {len(self.train_data)} samples from "
                                f"{cfg.data.train_path}; {self.train_data.metadata['stats']}")

    # -- the loop's job ---------------------------------------------------------------------
    def initialize(self) -> None:
        if self.cfg.checkpoint.init_from:
            self.model.load_weights(self.cfg.checkpoint.init_from, self.init_skip)
            distributed.print_rank0(f"initialised weights from {self.cfg.checkpoint.init_from}")

    def state_dict(self) -> dict:
        """The data position, and the range of the model's values on its own training data,
        which DVPO compares its rollouts' values with (``rollout/gvm_value_ood_rate``); with
        K heads, how far they spread there (``rollout/gvm_head_disagree_rate``); its latest
        held-out pair accuracy and the step it was measured at (DVPO refuses a GVM near
        chance, ``dvpo.min_gvm_accuracy``)."""
        low, high, spread = self.value_range()
        heads = {"head_spread_limit": spread} if self.cfg.model.value_heads > 1 else {}
        return {**self.batches.state_dict(), "value_range": [low, high], **heads,
                **self.held_out}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)
        self.held_out = {k: state[k] for k in ("held_out_accuracy", "held_out_step")
                         if k in state}

    def start(self, resumed: bool) -> dict[str, float]:
        return data_metrics(self.train_data)

    def step(self, step: int) -> StepResult:
        start = time.perf_counter()
        batch = self._next_batch()
        trained = train_on_batch(self.model, self.objective, batch, self.cfg.data.micro_batch_size,
                                 self.cfg.data.micro_batch_tokens)
        seq_tokens = distributed.all_reduce_data_parallel(
            float((batch["prompt_lengths"] + batch["response_lengths"]).sum()))
        prefix = self.summary_tags[0].split("/")[0]
        metrics = {**self.objective.metrics(trained),
                   f"{prefix}/grad_norm": trained.grad_norm or 0.0,
                   f"{prefix}/lr": self.model.lr,
                   "perf/train_tokens_per_s": seq_tokens / (time.perf_counter() - start),
                   "perf/tokens": seq_tokens}
        interval, last = self.cfg.gvm.eval_interval, step + 1 == self.cfg.train_steps
        if self.eval_data is not None and (last or interval and (step + 1) % interval == 0):
            evaluated = self.evaluate()
            self.held_out = {"held_out_accuracy": evaluated["gvm/pair_acc_last"],
                             "held_out_step": step + 1}
            if last:  # the final model's: logged by finish(), whatever logging.log_interval
                self.final = evaluated
            else:
                metrics.update(evaluated)
        return StepResult(metrics, [trained])

    def finish(self) -> dict[str, float]:
        """The final model's held-out accuracy, measured at its step (and saved with it)."""
        return self.final

    # -- pieces -----------------------------------------------------------------------------
    def value_range(self) -> list[float]:
        """The 0.5th and 99.5th percentiles of the Q-view (the heads' mean) over the first
        ``RANGE_SAMPLES`` training samples and the 99.5th of the heads' spread (0 for one
        head), the same on every rank."""
        mbs = self.cfg.data.micro_batch_size
        count = min(RANGE_SAMPLES, len(self.train_data)) // mbs * mbs or mbs
        batch = collate([self._sample(i % len(self.train_data)) for i in range(count)],
                        self.cfg.data.seq_length, self.train_data.pad_id)
        values = forward.token_values(self.model.ddp, forward.make_microbatches(
            mbs, tokens=to_device(batch)["tokens"]))
        found = None
        if values is not None:
            mean, spread = read_heads(values)
            spread = torch.zeros_like(mean) if spread is None else spread
            lengths = (batch["prompt_lengths"], batch["response_lengths"])
            q, mask, _ = gather_response_values(mean, *lengths, self.cfg.gvm.alignment)
            s = gather_response_values(spread, *lengths, self.cfg.gvm.alignment)[0]
            levels = torch.tensor(RANGE_QUANTILES, device=q.device)
            found = torch.cat([torch.quantile(q[mask].float(), levels),
                               torch.quantile(s[mask].float(), levels[1:])])
        return distributed.broadcast_from_last_stage(found, (3,), torch.float32).tolist()

    def _sample(self, index: int):
        sample = self.train_data[index]
        return self.context(index, sample) if self.context else sample

    def _next_batch(self) -> dict:
        if self.train_pairs is not None:  # whole pairs: chosen, rejected, ...
            indices = [int(i) for p in self.batches.next_indices(len(self.train_pairs))
                       for i in self.train_pairs[p]]
        else:
            indices = self.batches.next_indices(len(self.train_data))
        return collate([self._sample(i) for i in indices], self.cfg.data.seq_length,
                       self.train_data.pad_id)

    def evaluate(self) -> dict[str, float]:
        start = time.perf_counter()
        pairs = self.eval_data.pairs()
        if self.cfg.gvm.eval_max_pairs:
            pairs = pairs[:self.cfg.gvm.eval_max_pairs]
        accuracy = evaluate_pairs(self.model.ddp, self.eval_data, pairs, self.cfg.data.seq_length,
                                  self.cfg.data.micro_batch_size, self.context,
                                  self.cfg.gvm.alignment)
        return {**{f"gvm/pair_acc_{name}": value for name, value in accuracy.items()},
                "timing_s/eval": time.perf_counter() - start}


def main(argv=None) -> None:
    run_trainer(GVMTrainer, __doc__.splitlines()[0], argv,
                lambda cfg, overrides: check_training_inputs(cfg, overrides, value_model=True))


if __name__ == "__main__":
    main()
