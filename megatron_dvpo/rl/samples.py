"""A handful of sampled responses as a markdown table, for TensorBoard's Text tab: reading what
the policy writes is how a user sees gaming that no scalar names."""

from __future__ import annotations

from megatron_dvpo.models.generation import Rollout, rollout_prompts, rollout_responses

SAMPLES = 4  # rows shown at each evaluation


def _cell(text: str) -> str:
    """One table cell: pipes escaped, line breaks as <br>."""
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


def samples_markdown(tokenizer, rollout: Rollout, rewards: list[float],
                     count: int = SAMPLES) -> str:
    """The first ``count`` rows of ``rollout``: prompt, response (its EOS dropped) and true
    reward."""
    eos = tokenizer.eos_id
    lines = ["| prompt | response | true reward |", "|---|---|---|"]
    for prompt, response, reward in list(zip(rollout_prompts(rollout),
                                              rollout_responses(rollout), rewards))[:count]:
        text = tokenizer.decode([t for t in response if t != eos])
        lines.append(f"| {_cell(tokenizer.decode(prompt))} | {_cell(text)} | {reward:.4g} |")
    return "\n".join(lines)
