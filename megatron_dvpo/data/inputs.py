"""The inputs of the jobs that train on the value dataset (GVM pretraining, reward models,
SFT), checked before any process group exists: the starting checkpoint, the data (tokenized
into the cache once, here) and the tokenizer against the model."""

from __future__ import annotations

from pathlib import Path

from megatron_dvpo.checkpointing import resolve_checkpoint_dir
from megatron_dvpo.config import ConfigError, RunConfig, model_from_checkpoint
from megatron_dvpo.data.dataset import ValueDataset
from megatron_dvpo.data.preference import DataError, ReadOptions
from megatron_dvpo.data.preprocess import open_dataset
from megatron_dvpo.data.tokenizer import check_vocab, load_tokenizer


def open_data(cfg: RunConfig, path: str, allow_unscored: bool = False) -> ValueDataset:
    """The dataset at ``path`` (a .jsonl is tokenized on first use), checked against the
    tokenizer and the model's vocabulary; ``allow_unscored`` takes ``{prompt, response}`` rows
    (SFT)."""
    data = cfg.data
    options = ReadOptions(max_length=data.max_length or data.seq_length,
                          length_mode=data.length_mode, chosen_reward=data.chosen_reward,
                          rejected_reward=data.rejected_reward, skip_bad_rows=data.skip_bad_rows,
                          allow_unscored=allow_unscored)
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
    init, heads = cfg.checkpoint.init_from, cfg.model.value_heads
    if init:
        init = cfg.checkpoint.init_from = str(resolve_checkpoint_dir(init, "checkpoint.init_from"))
        model_from_checkpoint(cfg, init, "checkpoint.init_from", overrides,
                              ignore=("value_head", "tie_embeddings", "value_heads")
                              if value_model else ())
        if value_model:  # the heads this run trains, whatever the starting point had
            cfg.model.value_heads = heads
    if heads > 1 and value_model and cfg.gvm.value_head_init_std <= 0:
        raise ConfigError(f"model.value_heads={heads} needs gvm.value_head_init_std > 0: "
                          "heads that start equal stay equal, and their spread says nothing")
    if cfg.model.value_head and not value_model:
        raise ConfigError(f"{f'checkpoint.init_from={init}' if init else 'model.value_head'}: "
                          "a value model; SFT trains a policy")
    if value_model:  # the model the trainer builds (models.gvm.gvm_config), as it saves it
        cfg.model.value_head, cfg.model.tie_embeddings = True, False
    if not cfg.data.train_path:
        raise ConfigError("data.train_path is required")
    if cfg.data.trajectory_context_k and not cfg.data.tokenizer:
        raise ConfigError("data.trajectory_context_k needs data.tokenizer")
    pairs = value_model and cfg.gvm.objective in ("td_pairwise", "bradley_terry")
    if pairs and cfg.data.micro_batch_size % 2:
        raise ConfigError(f"gvm.objective={cfg.gvm.objective} needs an even "
                          "data.micro_batch_size (whole pairs per microbatch)")
    for path in (cfg.data.train_path, cfg.data.eval_path):
        if path:
            dataset = open_data(cfg, path, allow_unscored=not value_model)
            if pairs and path == cfg.data.train_path and not len(dataset.pairs()):
                raise ConfigError(f"gvm.objective={cfg.gvm.objective} learns from preference "
                                  f"pairs, and {path} has none")
