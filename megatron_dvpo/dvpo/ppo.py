"""The PPO baseline in the same codebase: reward model + online critic + reference + GAE.

    torchrun --nproc-per-node N -m megatron_dvpo.dvpo.ppo --config FILE ppo.reward_model=DIR

For side-by-side comparison with DVPO only (docs/algorithm.md §3). It is the DVPO trainer with a
different scorer: a frozen Bradley-Terry reward model gives the reward at the last token, a
critic (initialised from the reward model and trained online with the clipped value loss) gives
the values, and GAE runs over rewards = per-token KL penalty + the final reward. Rollout, policy
update, logging and checkpoints are DVPO's own code.

The critic's weights and optimizer are not checkpointed: a run with an existing checkpoint in
``checkpoint.save_dir`` refuses to start rather than resume with a fresh critic.
"""

from __future__ import annotations


import numpy as np
import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import find_latest_checkpoint, load_model
from megatron_dvpo.config import ConfigError, RunConfig
from megatron_dvpo.dvpo.advantages import gae
from megatron_dvpo.dvpo.losses import value_loss_clipped
from megatron_dvpo.dvpo.scoring import rollout_q_view
from megatron_dvpo.dvpo.train import DVPOTrainer, frozen_model
from megatron_dvpo.models import build_chunks, forward
from megatron_dvpo.models.generation import Rollout
from megatron_dvpo.training import build_optimizer, build_scheduler, run_trainer, wrap_ddp


class PPOTrainer(DVPOTrainer):
    value_keys = ("ppo.reward_model", "ppo.critic")

    @classmethod
    def check_inputs(cls, cfg: RunConfig, overrides: list[str] | tuple = ()):
        cfg.ppo.critic = cfg.ppo.critic or cfg.ppo.reward_model
        return super().check_inputs(cfg, overrides)

    @staticmethod
    def needs_reference(cfg: RunConfig) -> bool:
        return True  # docs/algorithm.md §3: PPO always has its reference policy

    def build_scorers(self, cfg: RunConfig, value_cfgs: dict[str, RunConfig]) -> None:
        self.reward_model = frozen_model(cfg, value_cfgs["ppo.reward_model"].model,
                                         cfg.ppo.reward_model)
        critic_cfg = RunConfig(model=value_cfgs["ppo.critic"].model, parallel=cfg.parallel,
                               precision=cfg.precision, optimizer=cfg.optimizer, seed=cfg.seed)
        self.critic = build_chunks(critic_cfg, initialize=False)
        load_model(self.critic, f"{cfg.ppo.critic}/model")
        self.critic_ddp = wrap_ddp(self.critic, cfg.parallel)
        self.critic_optimizer = build_optimizer(self.critic_ddp, cfg.optimizer, cfg.parallel,
                                                cfg.precision)
        self.critic_scheduler = build_scheduler(
            self.critic_optimizer, cfg.optimizer,
            cfg.train_steps * cfg.dvpo.ppo_epochs * cfg.dvpo.minibatches)

    def resume(self) -> bool:
        ckpt = self.cfg.checkpoint
        if ckpt.save_dir and find_latest_checkpoint(ckpt.load_dir or ckpt.save_dir):
            raise ConfigError("the PPO baseline does not checkpoint its critic, so it cannot "
                              "resume: use a fresh checkpoint.save_dir")
        return super().resume()

    def _score(self, rollout: Rollout) -> dict:
        mbs, width = self.cfg.data.micro_batch_size, rollout.prompt_width
        rewards = forward.rollout_values(self.reward_model, rollout, mbs)
        critic = forward.rollout_values(self.critic, rollout, mbs)
        scores = {"logp_ref": self._reference_logprobs(rollout)}
        if rewards is not None:
            lengths = rollout.response_lengths
            q_rm, _ = rollout_q_view(rewards, width, lengths)
            scores["reward"] = q_rm.gather(1, (lengths - 1)[:, None]).squeeze(1)
            # V(s_t) is the critic's output before token t: the prompt's, then y_0, y_1, ...
            v, v_prompt = rollout_q_view(critic, width, lengths)
            scores["values"] = torch.cat([v_prompt[:, None], v[:, :-1]], 1) * rollout.response_mask
        return scores

    def _advantages(self, rollout: Rollout, scores: dict, logp_old):
        dvpo, mask = self.cfg.dvpo, rollout.response_mask
        rewards = torch.zeros_like(logp_old)
        if scores["logp_ref"] is not None and self.kl.beta > 0:
            rewards = -self.kl.beta * (logp_old - scores["logp_ref"]) * mask
        last = (rollout.response_lengths - 1)[:, None]
        rewards = rewards.scatter_add(1, last, scores["reward"][:, None])
        advantages, returns = gae(scores["values"], rewards, mask, dvpo.gamma, dvpo.lam)
        scores["returns"] = returns
        return advantages, scores["reward"]

    def _after_update(self, rollout: Rollout, scores: dict, step_seed: int) -> dict:
        """``ppo_epochs`` passes of the clipped value loss over the rollout's minibatches."""
        dvpo, mbs = self.cfg.dvpo, self.cfg.data.micro_batch_size
        mask = rollout.response_mask
        zeros = torch.zeros(mask.shape)
        old_values, returns = scores.get("values", zeros), scores.get("returns", zeros)
        width, steps = rollout.prompt_width, mask.shape[1]
        attention = rollout.attention_mask().expand(-1, -1, rollout.tokens.shape[1], -1)
        generator = np.random.default_rng([self.cfg.seed, step_seed, 1])
        dp = parallel_state.get_data_parallel_world_size()
        keys = ["loss_sum", "tokens", "clipfrac_sum"]
        totals = dict.fromkeys(keys, 0.0)
        for _ in range(dvpo.ppo_epochs):
            for rows in np.array_split(generator.permutation(mask.shape[0]), dvpo.minibatches):
                index = torch.as_tensor(rows)
                tokens = distributed.all_reduce_data_parallel(float(mask[index].sum()))

                def loss_fn(outputs, batch):
                    values = outputs["values"][:, width - 1:width - 1 + steps]
                    loss, stats = value_loss_clipped(values, batch["old_values"],
                                                     batch["returns"], batch["mask"],
                                                     self.cfg.ppo.value_clip_eps, tokens)
                    return loss * dp, {"loss_sum": loss.detach() * tokens,
                                       "tokens": stats["tokens"],
                                       "clipfrac_sum": stats["clipfrac_sum"]}

                for chunk in self.critic_ddp:
                    chunk.train()
                    chunk.zero_grad_buffer()
                self.critic_optimizer.zero_grad()
                outputs = forward.run_microbatches(self.critic_ddp, forward.make_microbatches(
                    mbs, tokens=rollout.tokens[index], attention_mask=attention[index],
                    old_values=old_values[index], returns=returns[index], mask=mask[index]),
                    forward.gvm_values_head, loss_fn)
                if self.critic_optimizer.step()[0]:
                    self.critic_scheduler.step(increment=1)
                local = {k: sum(float(o[k]) for o in outputs) for k in keys} if outputs else None
                for k, v in distributed.sum_over_replicas(keys, local).items():
                    totals[k] += v
        n = max(totals["tokens"], 1.0)
        return {"critic/loss": totals["loss_sum"] / n, "critic/clipfrac": totals["clipfrac_sum"] / n}


def main(argv=None) -> None:
    run_trainer(PPOTrainer, __doc__.splitlines()[0], argv, PPOTrainer.check_inputs)


if __name__ == "__main__":
    main()
