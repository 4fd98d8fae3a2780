"""DVPO policy training: rollout -> frozen colocated GVM -> advantages -> clipped PPO update.

    torchrun --nproc-per-node N -m megatron_dvpo.rl.dvpo --config examples/dvpo_tiny.yaml

Each step (docs/algorithm.md §2): sample one response per prompt from the policy; score it with
one forward pass of the frozen Global Value Model, which lives on the same ranks, never trains
and has no optimizer or DDP wrapper; optionally add a KL penalty against a frozen reference
(loaded only when ``rl.kl_coef > 0``); turn values into advantages (``dvpo.estimator``); and
run ``rl.ppo_epochs`` passes of the clipped policy loss. No critic is trained and no reward
model is run. ``dvpo.refresh_interval`` (off by default) makes it semi-online: the GVM continues
its training on on-policy pairs ranked by the user's scorer (``rl/refresh.py``).
"""

from __future__ import annotations

from megatron_dvpo.config import ConfigError, RunConfig
from megatron_dvpo.models.guided import GuideConfig, ValueGuide
from megatron_dvpo.rl.refresh import GVMRefresh
from megatron_dvpo.rl.scorers import GVMScorer
from megatron_dvpo.rl.trainer import RLAlgorithm, RLTrainer
from megatron_dvpo.training.cli import run_trainer


def _refresh(trainer: RLTrainer) -> GVMRefresh | None:
    """The GVM refresh of a trainer whose scorer is a trained ``GVMScorer``, ranking pairs with
    dvpo.refresh_scorer, else rl.true_reward."""
    cfg, scorer = trainer.cfg, trainer.scorer
    if not cfg.dvpo.refresh_interval:
        return None
    return GVMRefresh(cfg, scorer.gvm_cfg, scorer.model,
                      lambda rollout: scorer.score(rollout).final_value,
                      trainer.tokenizer.pad_id, trainer.sample, trainer.refresh_scores)


def _check(cfg: RunConfig) -> None:
    if cfg.rollout.guide_beta > 0 and (cfg.dvpo.refresh_interval or cfg.dvpo.gvm_offload
                                       or cfg.parallel.pipeline_model_parallel_size > 1):
        raise ConfigError("rollout.guide_beta: GVM-guided decoding needs a frozen GVM on the "
                          "device (dvpo.refresh_interval=0, dvpo.gvm_offload=false) and "
                          "parallel.pipeline_model_parallel_size=1")


def _guide(trainer: RLTrainer) -> ValueGuide:
    """The frozen GVM's values steer sampling (docs/algorithm.md, GVM-guided decoding)."""
    rollout = trainer.cfg.rollout
    return ValueGuide(trainer.scorer.gvm, GuideConfig(rollout.guide_beta, rollout.guide_top_k))


DVPO = RLAlgorithm(
    name="DVPO",
    value_keys=lambda cfg: ("dvpo.gvm",),
    scorer=lambda cfg: GVMScorer,
    make_scorer=lambda cfg, value_cfgs, total: GVMScorer(cfg, value_cfgs["dvpo.gvm"]),
    estimator=lambda cfg: cfg.dvpo.estimator,
    needs_reference=lambda cfg: cfg.rl.kl_coef > 0,
    whiten_state_values=lambda cfg: cfg.dvpo.value_whitening == "per_sequence_states",
    check=_check,
    make_refresh=_refresh,
    guide=_guide,
)


def main(argv=None) -> None:
    run_trainer(DVPO, __doc__.splitlines()[0], argv, DVPO.check_inputs)


if __name__ == "__main__":
    main()
