"""What an RL job (DVPO, the PPO baseline) checks before any process group or model exists.

Checkpoint paths may be save directories (their latest iteration is used, and written back into
the config so that every rank and the saved config.yaml agree); the policy's model section comes
from its checkpoint; every model must share the policy's tokenizer and fit its vocabulary and
context; the prompt files must parse. Each problem is one ``InputError`` naming the key.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_dvpo.checkpointing import resolve_checkpoint_dir
from megatron_dvpo.config import ConfigError, RunConfig, load_config, model_from_checkpoint
from megatron_dvpo.data.prompts import load_prompts
from megatron_dvpo.data.tokenizer import check_vocab, load_tokenizer
from megatron_dvpo.rl.rewards import TrueReward, load_scorer


@dataclass(frozen=True)
class RLInputs:
    """The checked inputs: each scoring model's config by its config key, the tokenizer, and
    the probed text scorers (``rl.true_reward``, ``dvpo.refresh_scorer``; None where unset)."""

    value_models: dict[str, RunConfig]
    tokenizer: Path
    true_reward: Optional[TrueReward] = None
    refresh_scorer: Optional[TrueReward] = None


def checkpoint_tokenizer(directory: Path) -> Path | None:
    """The tokenizer a checkpoint was made with: its own copy, or the one its config names."""
    if (directory / "tokenizer").is_dir():
        return directory / "tokenizer"
    path = load_config(directory / "config.yaml").data.tokenizer
    return Path(path) if path else None


@functools.cache  # one launch checks its inputs before the process group and in the trainer
def tokenizer_fingerprint(path: Path) -> str:
    """What makes two tokenizers interchangeable: vocabulary size, special ids and the text of
    every ordinary token. A SentencePiece file and the HF directory made from it compare equal
    (they differ only in how the unknown token prints, so special and unknown tokens, which
    decode to nothing or to a placeholder, are left out)."""
    tok = load_tokenizer(str(path))
    digest = hashlib.sha256(repr((tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)).encode())
    for i in range(tok.vocab_size):
        text = tok.decode([i])
        if text.strip() not in ("", "\u2047"):  # special tokens; SentencePiece's unknown mark
            digest.update(f"{i}:{text}".encode("utf-8", "replace"))
    return digest.hexdigest()


def _get(cfg: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg: RunConfig, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def _check_value_model(key: str, path: str, value_cfg: RunConfig, policy: RunConfig,
                       cfg: RunConfig) -> None:
    if not value_cfg.model.value_head:
        raise ConfigError(f"{key}={path} holds a policy, not a value model")
    if policy.model.vocab_size != value_cfg.model.vocab_size:
        raise ConfigError(f"the policy's vocabulary ({policy.model.vocab_size} tokens) "
                          f"differs from {key}'s ({value_cfg.model.vocab_size}): they "
                          "must share one tokenizer")
    heads = value_cfg.model.value_heads
    if key == "ppo.critic" and heads > 1:
        raise ConfigError(f"ppo.critic={path} has model.value_heads={heads}: PPO's critic is "
                          "trained as one value; start it from a one-head model")
    if key == "dvpo.gvm" and cfg.dvpo.head_pessimism > 0 and heads == 1:
        raise ConfigError(f"dvpo.head_pessimism={cfg.dvpo.head_pessimism} reads the spread of "
                          f"a K-head GVM, and {key}={path} has one head (train it with "
                          "model.value_heads > 1)")
    if key == "dvpo.gvm":
        check_gvm_accuracy(path, cfg.dvpo.min_gvm_accuracy)
    reads_prompt_value = key == "dvpo.gvm" and cfg.dvpo.estimator in ("td", "gae")
    gvm = value_cfg.gvm
    if reads_prompt_value and gvm.alignment == "qview" and not gvm.train_prompt_value:
        raise ConfigError(f"dvpo.estimator={cfg.dvpo.estimator} reads q_-1 = V(s_0), which "
                          f"{key}={path} never trained (gvm.train_prompt_value=false): train "
                          "the GVM with gvm.train_prompt_value=true or gvm.alignment=released, "
                          "or use dvpo.estimator=q")
    context = value_cfg.data.trajectory_context_k
    if context:
        raise ConfigError(f"{key}={path} was trained with data.trajectory_context_k={context} "
                          "(trajectory conditioning), but rollouts are scored on the bare "
                          "prompt and response: its values would be off-distribution. Use a "
                          "value model trained without trajectory context")


def check_gvm_accuracy(path: str, least: float) -> None:
    """A GVM trained here records its held-out pair accuracy; one near chance is refused."""
    state = Path(path) / "train_state.json"
    found = json.loads(state.read_text()).get("held_out_accuracy") if state.is_file() else None
    if found is not None and found < least:
        raise ConfigError(f"dvpo.gvm={path} ranks its held-out pairs at {found:.1%}, under "
                          f"dvpo.min_gvm_accuracy={least:g}: near chance, its values would steer "
                          "the policy by noise. Train it further or on more pairs, use PPO or "
                          "GRPO, or set dvpo.min_gvm_accuracy=0 to run it anyway")


def _check_lengths(cfg: RunConfig, models: dict[str, RunConfig]) -> None:
    rollout = cfg.rollout
    if rollout.min_new_tokens >= rollout.max_new_tokens:
        raise ConfigError(f"rollout.min_new_tokens={rollout.min_new_tokens} must be below "
                          f"rollout.max_new_tokens={rollout.max_new_tokens}: no response could "
                          "end with EOS")
    total = rollout.max_prompt_length + rollout.max_new_tokens
    for key, model_cfg in models.items():
        limit = model_cfg.model.max_position_embeddings
        if total > limit:
            raise ConfigError(f"rollout.max_prompt_length={rollout.max_prompt_length} + "
                              f"rollout.max_new_tokens={rollout.max_new_tokens} = {total} "
                              f"exceeds model.max_position_embeddings={limit} of "
                              f"{key}={_get(cfg, key)}")


def _check_refresh(cfg: RunConfig) -> Optional[TrueReward]:
    """The refresh's own scorer (dvpo.refresh_scorer), probed; None when it ranks with
    rl.true_reward or is off."""
    dvpo = cfg.dvpo
    if not dvpo.refresh_interval:
        return None
    if not (dvpo.refresh_scorer or cfg.rl.true_reward):
        raise ConfigError(f"dvpo.refresh_interval={dvpo.refresh_interval} ranks on-policy pairs "
                          "with a scorer: set dvpo.refresh_scorer (or rl.true_reward)")
    if dvpo.gvm_offload:
        raise ConfigError("dvpo.gvm_offload=true with dvpo.refresh_interval: a refreshed GVM "
                          "trains on the GPU; turn one of them off")
    return load_scorer(dvpo.refresh_scorer, "dvpo.refresh_scorer")


def check_rl_inputs(cfg: RunConfig, overrides: list[str] | tuple = (),
                    value_keys: tuple[str, ...] = ("dvpo.gvm",),
                    needs_reference: bool | None = None) -> RLInputs:
    """Check (and resolve into ``cfg``) the inputs of an RL job; ``value_keys`` are the config
    keys of its scoring models (DVPO: the GVM). The reference is checked when it will be
    loaded: ``rl.kl_coef > 0`` unless ``needs_reference`` says otherwise."""
    rl = cfg.rl
    reference = rl.kl_coef > 0 if needs_reference is None else needs_reference
    keys = ["rl.policy", *value_keys] + (["rl.reference"] if reference and rl.reference else [])
    for key in keys:
        value = _get(cfg, key)
        if not value:
            raise ConfigError(f"{key} is required")
        _set(cfg, key, str(resolve_checkpoint_dir(value, key)))
    policy = load_config(Path(rl.policy) / "config.yaml")
    if policy.model.value_head:
        raise ConfigError(f"rl.policy={rl.policy} holds a value model, not a policy")
    model_from_checkpoint(cfg, rl.policy, "rl.policy", overrides)
    value_cfgs = {key: load_config(Path(_get(cfg, key)) / "config.yaml") for key in value_keys}
    for key, value_cfg in value_cfgs.items():
        _check_value_model(key, _get(cfg, key), value_cfg, policy, cfg)
    _check_lengths(cfg, {"rl.policy": policy, **value_cfgs})
    tokenizers = {"data.tokenizer": Path(cfg.data.tokenizer) if cfg.data.tokenizer else None,
                  "rl.policy": checkpoint_tokenizer(Path(rl.policy)),
                  **{key: checkpoint_tokenizer(Path(_get(cfg, key))) for key in value_keys}}
    known = {k: v for k, v in tokenizers.items() if v is not None}
    if not known:
        raise ConfigError("no tokenizer: set data.tokenizer")
    prints = {k: tokenizer_fingerprint(v) for k, v in known.items()}
    if len(set(prints.values())) > 1:
        raise ConfigError("the tokenizers differ: "
                          f"{', '.join(f'{k}={v}' for k, v in known.items())}")
    tokenizer_path = next(iter(known.values()))
    tokenizer = load_tokenizer(str(tokenizer_path))
    check_vocab(tokenizer, policy.model.vocab_size, f"rl.policy={rl.policy}")
    true_reward = load_scorer(rl.true_reward)  # imported and probed now: fails at once
    refresh_scorer = _check_refresh(cfg) if "dvpo.gvm" in value_keys else None
    if not cfg.data.train_path:
        raise ConfigError("data.train_path (the prompts) is required")
    for path in (cfg.data.train_path, cfg.data.eval_path):
        if path:
            load_prompts(path, tokenizer, cfg.rollout.max_prompt_length, cfg.data.skip_bad_rows)
    return RLInputs(value_cfgs, tokenizer_path, true_reward, refresh_scorer)
