"""GVM-guided decoding (value-augmented sampling): a frozen value model steers each step.

At every step the policy's ``top_k`` most likely next tokens are appended, each in its own row,
in one batched step of the GVM with its own KV cache (``top_k`` rows per sequence); each
candidate's tempered logit is shifted by ``beta * (value - mean of the candidates' values)``
and the token is drawn among the candidates. The GVM's cache then keeps the chosen candidate
in every row of its sequence (megatron's ``swap_key_value_dict``), so each step costs the GVM
one token per candidate, not a forward pass over the sequence. ``beta = 0`` samples the
policy's top-k distribution. Recorded log-probs stay the policy's own: guided samples are not
the policy's distribution, and an RL update treats them as if they were (as value-augmented
sampling does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_dvpo.config import ConfigError
from megatron_dvpo.gvm.heads import mean_value
from megatron_dvpo.models.forward import logit_temperature, tempered
from megatron_dvpo.models.generation import categorical_draw, step_mask
from megatron_dvpo.models.precision import sequence_parallel_disabled


@dataclass(frozen=True)
class GuideConfig:
    beta: float = 1.0
    top_k: int = 8


class ValueGuide:
    """The GVM's side of guided decoding for one ``generate`` call (one pipeline stage)."""

    def __init__(self, gvm_chunks: list[torch.nn.Module], cfg: GuideConfig):
        if len(gvm_chunks) != 1:
            raise ValueError("GVM-guided decoding needs the GVM in one pipeline stage")
        self.gvm, self.cfg = gvm_chunks[0], cfg
        self.context: Optional[StaticInferenceContext] = None

    def _forward(self, tokens, positions, mask) -> torch.Tensor:
        with sequence_parallel_disabled([self.gvm]):
            values = self.gvm(tokens, positions, mask, inference_context=self.context,
                              runtime_gather_output=True)
        return mean_value(values)[:, -1].float()  # a K-head GVM's heads' mean

    def start(self, prompt_tokens: torch.Tensor, key_pad: Optional[torch.Tensor],
              total: int) -> None:
        """Prefill the GVM's cache with the prompts, then copy each into its candidates' rows."""
        self.gvm.eval()
        rows, width = prompt_tokens.shape
        k = self.cfg.top_k
        self.context = StaticInferenceContext(max_batch_size=rows * k, max_sequence_length=total)
        self.key_pad = None if key_pad is None else key_pad.repeat_interleave(k, 0)
        mask = step_mask(key_pad, 0, width)
        positions = torch.arange(width, device=prompt_tokens.device).expand(rows, -1)
        self._forward(prompt_tokens, positions, mask)
        self.context.sequence_len_offset = width
        self.context.swap_key_value_dict(
            torch.arange(rows, device=prompt_tokens.device).repeat_interleave(k))

    def choose(self, logits: torch.Tensor, temperature: float,
               generator: torch.Generator) -> torch.Tensor:
        """One token per row from the policy's [B, V] logits for the next position."""
        rows, k = logits.shape[0], self.cfg.top_k
        candidate_logits, candidates = tempered(logits.float(),
                                                logit_temperature(temperature)).topk(k, dim=-1)
        position = self.context.sequence_len_offset
        mask = step_mask(self.key_pad, position, position + 1)
        values = self._forward(candidates.reshape(rows * k, 1),
                               torch.full((rows * k, 1), position, device=logits.device),
                               mask).view(rows, k)
        self.context.sequence_len_offset += 1
        shifted = candidate_logits + self.cfg.beta * (values - values.mean(1, keepdim=True))
        pick = shifted.argmax(-1) if temperature == 0 else categorical_draw(shifted, generator)
        keep = torch.arange(rows, device=logits.device) * k + pick
        self.context.swap_key_value_dict(keep.repeat_interleave(k))
        return candidates.gather(1, pick[:, None]).squeeze(1)


def check_guide(gvm_cfg, policy_cfg, where: str) -> None:
    """A guide is a value model over the policy's vocabulary, in one pipeline stage."""
    if not gvm_cfg.model.value_head:
        raise ConfigError(f"{where}: not a value model (model.value_head is false)")
    if gvm_cfg.model.vocab_size != policy_cfg.model.vocab_size:
        raise ConfigError(f"{where}: vocabulary of {gvm_cfg.model.vocab_size} rows, the "
                          f"policy's has {policy_cfg.model.vocab_size}")
    if policy_cfg.parallel.pipeline_model_parallel_size != 1:
        raise ConfigError("GVM-guided decoding runs at parallel.pipeline_model_parallel_size=1")
