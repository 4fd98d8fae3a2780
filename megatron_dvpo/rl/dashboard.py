"""An RL run's TensorBoard dashboard: the learning curves first, then health, then speed."""

from __future__ import annotations

import re

from megatron_dvpo.logging import Dashboard


def rl_dashboard(final_value_tag: str, true_reward: bool) -> Dashboard:
    """``final_value_tag``: the scorer's own (the GVM's value, a reward model's score);
    ``true_reward``: whether the run scores its responses with the task's true reward. Six
    pinned cards: two rows at 1920 x 1080, above the fold."""
    rewards = ("eval/true_reward_mean", "rollout/true_reward_mean") if true_reward else ()
    return Dashboard(
        pinned=(*rewards, final_value_tag, "rollout/kl_ref", "policy/entropy",
                "rollout/response_len_mean"),
        charts={
            "1. is it learning": {
                "true reward (held out, rollout)": ["eval/true_reward_mean",
                                                    "rollout/true_reward_mean"],
                "the scorer's value": [re.escape(final_value_tag)],
                "KL to the reference": ["rollout/kl_ref$"],
                "entropy": ["policy/entropy"],
                "response length": ["rollout/response_len_(mean|max|min)",
                                    "eval/response_len_mean"]},
            "2. is it healthy": {
                "gaming signs": ["(rollout|eval)/truncated_rate", "rollout/repeat_rate",
                                 "rollout/gvm_.*_rate"],
                "policy update": ["policy/(clipfrac|approx_kl)"],
                "gradient norm": [".*/grad_norm"]},
            "3. is it fast": {"step time": ["perf/step_time_s"], "phases": ["timing_s/.*"],
                              "throughput": ["perf/throughput"]}})
