"""Global Value Model pretraining: preference data -> token-level values by TD(lambda).

    torchrun --nproc-per-node N -m megatron_dvpo.gvm.train --config examples/gvm_tiny.yaml [k=v ...]

Each preference row becomes two scored samples (chosen +1, rejected -1); the GVM fits the
semi-gradient TD(lambda) targets of docs/algorithm.md §1 on the Q-view of its outputs. Any TP/PP/DP
layout; checkpoints hold everything needed to continue exactly, and a restarted run resumes from
the latest one by itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import resolve_checkpoint_dir
from megatron_dvpo.config import ConfigError, RunConfig, load_config, model_from_checkpoint
from megatron_dvpo.data.dataset import ValueDataset, collate
from megatron_dvpo.data.preference import ReadOptions, add_trajectory_context
from megatron_dvpo.data.preprocess import open_dataset
from megatron_dvpo.data.preference import DataError
from megatron_dvpo.data.tokenizer import check_vocab, load_tokenizer
from megatron_dvpo.gvm.evaluate import evaluate_pairs
from megatron_dvpo.dvpo.losses import bradley_terry_loss
from megatron_dvpo.gvm.td import gvm_loss, loss_token_count
from megatron_dvpo.models import forward
from megatron_dvpo.models.gvm import build_gvm_chunks, gvm_config
from megatron_dvpo.training import Trainer, run_trainer

STEP_SUMS = ["sq_err_sum", "tokens", "response_sq_err_sum", "value_sum", "response_tokens",
             "final_value_sum", "rows"]


def open_data(cfg: RunConfig, path: str) -> ValueDataset:
    """The dataset at ``path`` (a .jsonl is tokenized on first use), checked against the
    tokenizer and the model's vocabulary."""
    data = cfg.data
    options = ReadOptions(max_length=data.max_length or data.seq_length,
                          length_mode=data.length_mode, chosen_reward=data.chosen_reward,
                          rejected_reward=data.rejected_reward, skip_bad_rows=data.skip_bad_rows)
    dataset = open_dataset(path, data.tokenizer, Path(cfg.logging.run_dir) / "data", options)
    if data.tokenizer:
        tokenizer = load_tokenizer(data.tokenizer)
        dataset.check_tokenizer(tokenizer)
        check_vocab(tokenizer, cfg.model.vocab_size, "the model")
    elif dataset.metadata["vocab_size"] > cfg.model.vocab_size:
        raise DataError(f"{path} was tokenized with {dataset.metadata['vocab_size']} tokens but "
                        f"the model has model.vocab_size={cfg.model.vocab_size}")
    return dataset


def check_training_inputs(cfg: RunConfig, overrides: list[str], value_model: bool) -> None:
    """What GVM pretraining and SFT check before any process group: the starting checkpoint
    (a save directory means its latest iteration; the model section comes from it), the data
    (tokenized here, once) and the tokenizer against the model."""
    init = cfg.checkpoint.init_from
    if init:
        init = cfg.checkpoint.init_from = str(resolve_checkpoint_dir(init, "checkpoint.init_from"))
        model_from_checkpoint(cfg, init, "checkpoint.init_from", overrides,
                              ignore=("value_head", "tie_embeddings") if value_model else ())
    if cfg.model.value_head and not value_model:
        raise ConfigError(f"{f'checkpoint.init_from={init}' if init else 'model.value_head'}: "
                          "a value model; SFT trains a policy")
    if not cfg.data.train_path:
        raise ConfigError("data.train_path is required")
    if cfg.data.trajectory_context_k and not cfg.data.tokenizer:
        raise ConfigError("data.trajectory_context_k needs data.tokenizer")
    if value_model and cfg.gvm.objective == "bradley_terry" and cfg.data.micro_batch_size % 2:
        raise ConfigError("gvm.objective=bradley_terry needs an even data.micro_batch_size "
                          "(whole pairs per microbatch)")
    for path in (cfg.data.train_path, cfg.data.eval_path):
        if path:
            open_data(cfg, path)


def data_metrics(dataset: ValueDataset) -> dict[str, float]:
    """What preprocessing kept, filtered, truncated and skipped, for TensorBoard."""
    stats = dataset.metadata["stats"]
    return {"data/samples": float(len(dataset)),
            "data/filtered_rows": float(stats["filtered_rows"]),
            "data/truncated_samples": float(stats["truncated_samples"]),
            "data/bad_rows": float(sum(stats["bad_rows"].values()))}


class GVMTrainer(Trainer):
    summary_tags = ("gvm/loss", "gvm/value_mean", "gvm/pair_acc_last", "perf/train_tokens_per_s")

    def __init__(self, cfg: RunConfig):
        init = cfg.checkpoint.init_from
        # a GVM may start from a policy: its trunk, with the value head zero-initialised
        self.init_skip = (("output_layer.",) if init and not load_config(
            Path(init) / "config.yaml").model.value_head else ())
        cfg = gvm_config(cfg)
        super().__init__(cfg, build_gvm_chunks(cfg, cfg.gvm.value_head_init_std))
        self.train_data = open_data(cfg, cfg.data.train_path)
        self.eval_data = open_data(cfg, cfg.data.eval_path) if cfg.data.eval_path else None
        self.data_metrics = data_metrics(self.train_data)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
        if cfg.gvm.objective == "bradley_terry":
            self.train_pairs = self.train_data.pairs()
            self.summary_tags = ("rm/loss", "rm/train_accuracy", "gvm/pair_acc_last")
        distributed.print_rank0(f"train data: {len(self.train_data)} samples from "
                                f"{cfg.data.train_path}; {self.train_data.metadata['stats']}")

    def start(self, resumed: bool) -> None:
        self.logger.log(self.step, self.data_metrics)

    def with_context(self, index: int, sample):
        """Trajectory conditioning: K other (prompt, response) pairs of the data before the
        sample, chosen by a generator seeded with the sample's index (the same every epoch)."""
        k = self.cfg.data.trajectory_context_k
        if not k:
            return sample
        rng = np.random.default_rng([self.cfg.seed, index])
        special = {self.tokenizer.bos_id, self.tokenizer.eos_id}
        text = lambda ids: self.tokenizer.decode([t for t in ids if t not in special])  # noqa: E731
        examples = []
        for other in rng.choice(len(self.train_data), size=k, replace=False):
            example = self.train_data[int(other)]
            examples.append((text(example.prompt_ids), text(example.response_ids)))
        return add_trajectory_context(sample, examples, self.tokenizer)

    def _next_batch(self) -> dict:
        if self.cfg.gvm.objective == "bradley_terry":  # whole pairs: chosen, rejected, ...
            pairs = self.train_pairs
            indices = [int(i) for p in self.next_indices(len(pairs)) for i in pairs[p]]
        else:
            indices = self.next_indices(len(self.train_data))
        return collate([self.with_context(i, self.train_data[i]) for i in indices],
                       self.cfg.data.seq_length, self.train_data.pad_id)

    def train_step(self) -> dict[str, float]:
        if self.cfg.gvm.objective == "bradley_terry":
            return self._reward_model_step()
        start = time.perf_counter()
        gvm = self.cfg.gvm
        batch = self._next_batch()
        # Normalise by the loss tokens of the whole global batch, so the gradient is that of the
        # token mean however the batch is split over microbatches and replicas.
        prompt_value = gvm.train_prompt_value and gvm.alignment == "qview"
        tokens = distributed.all_reduce_data_parallel(
            loss_token_count(batch["response_lengths"], prompt_value))
        dp = parallel_state.get_data_parallel_world_size()

        def loss_fn(outputs, mb):
            loss, stats = gvm_loss(outputs["values"], mb["prompt_lengths"],
                                   mb["response_lengths"], mb["rewards"], gvm.gamma, gvm.lam,
                                   prompt_value, normalizer=tokens, alignment=gvm.alignment)
            # megatron DDP averages gradients over replicas; scale back to the global sum.
            return loss * dp, {k: stats[k] for k in STEP_SUMS}

        microbatches = forward.make_microbatches(self.cfg.data.micro_batch_size, **batch)
        outputs, grad_norm, _ = self.train_batch(microbatches, forward.gvm_values_head, loss_fn)
        local = ({k: sum(o[k].item() for o in outputs) for k in STEP_SUMS}
                 if outputs else None)
        sums = distributed.sum_over_replicas(STEP_SUMS, local)
        seq_tokens = distributed.all_reduce_data_parallel(
            float((batch["prompt_lengths"] + batch["response_lengths"]).sum()))
        metrics = {
            # docs/algorithm.md: half the mean squared TD error over response tokens; the
            # objective adds the prompt-value terms (gvm.train_prompt_value)
            "gvm/loss": 0.5 * sums["response_sq_err_sum"] / sums["response_tokens"],
            "gvm/objective": 0.5 * sums["sq_err_sum"] / sums["tokens"],
            "gvm/value_mean": sums["value_sum"] / sums["response_tokens"],
            "gvm/final_value_mean": sums["final_value_sum"] / sums["rows"],
            "gvm/grad_norm": float(grad_norm),
            "gvm/lr": self.optimizer.param_groups[0]["lr"],
            "perf/train_tokens_per_s": seq_tokens / (time.perf_counter() - start),
        }
        interval = gvm.eval_interval
        if self.eval_data is not None and interval and (self.step + 1) % interval == 0:
            metrics.update(self.evaluate())
        return metrics

    def _reward_model_step(self) -> dict[str, float]:
        """Bradley-Terry on the last-token values of whole (chosen, rejected) pairs."""
        start = time.perf_counter()
        batch = self._next_batch()
        pairs = distributed.all_reduce_data_parallel(batch["tokens"].shape[0] / 2)
        dp = parallel_state.get_data_parallel_world_size()

        def loss_fn(outputs, mb):
            last = (mb["prompt_lengths"] + mb["response_lengths"] - 1)[:, None]
            reward = outputs["values"].gather(1, last).squeeze(1)
            loss, stats = bradley_terry_loss(reward[0::2], reward[1::2])
            n = reward.shape[0] / 2
            return loss * n / pairs * dp, {"loss_sum": loss.detach() * n,
                                           "correct": stats["accuracy"] * n}

        microbatches = forward.make_microbatches(self.cfg.data.micro_batch_size, **batch)
        outputs, grad_norm, _ = self.train_batch(microbatches, forward.gvm_values_head, loss_fn)
        keys = ["loss_sum", "correct"]
        local = {k: sum(float(o[k]) for o in outputs) for k in keys} if outputs else None
        sums = distributed.sum_over_replicas(keys, local)
        metrics = {"rm/loss": sums["loss_sum"] / pairs, "rm/train_accuracy": sums["correct"] / pairs,
                   "rm/grad_norm": float(grad_norm),
                   "perf/train_tokens_per_s": distributed.all_reduce_data_parallel(float(
                       (batch["prompt_lengths"] + batch["response_lengths"]).sum()))
                   / (time.perf_counter() - start)}
        interval = self.cfg.gvm.eval_interval
        if self.eval_data is not None and interval and (self.step + 1) % interval == 0:
            metrics.update(self.evaluate())
        return metrics

    def evaluate(self) -> dict[str, float]:
        pairs = self.eval_data.pairs()
        if self.cfg.gvm.eval_max_pairs:
            pairs = pairs[:self.cfg.gvm.eval_max_pairs]
        accuracy = evaluate_pairs(self.ddp, self.eval_data, pairs, self.cfg.data.seq_length,
                                  self.cfg.data.micro_batch_size,
                                  self.with_context if self.cfg.data.trajectory_context_k else None,
                                  self.cfg.gvm.alignment)
        return {f"gvm/pair_acc_{name}": value for name, value in accuracy.items()}

    def finish(self) -> None:
        if self.eval_data is None:
            return
        accuracy = self.evaluate()
        self.logger.log(self.step, accuracy, ("gvm/pair_acc_last", "gvm/pair_acc_mean"))
        self.final_accuracy = accuracy


def main(argv=None) -> None:
    run_trainer(GVMTrainer, __doc__.splitlines()[0], argv,
                lambda cfg, overrides: check_training_inputs(cfg, overrides, value_model=True))

if __name__ == "__main__":
    main()
