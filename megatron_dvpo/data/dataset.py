"""The preprocessed, memory-mapped value dataset: tokenize once, read many times, any size.

Files of one dataset ``PREFIX``:
  PREFIX.bin      flat int32 token ids; sample i is ``prompt_ids + response_ids`` at its offset
  PREFIX.idx.npy  one structured row per sample (``INDEX_DTYPE``): offset, prompt_len,
                  response_len, reward, pair_id (-1: scored row), chosen, truncated
  PREFIX.json     metadata: format and version, tokenizer path, vocab size and special ids,
                  counts, read options; written last, so its presence marks a complete dataset
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from megatron_dvpo.data.preference import DataError, Sample
from megatron_dvpo.data.tokenizer import Tokenizer

FORMAT = "megatron_dvpo.value_dataset"
FORMAT_VERSION = 1
TOKEN_DTYPE = np.int32
INDEX_DTYPE = np.dtype([("offset", np.int64), ("prompt_len", np.int32),
                        ("response_len", np.int32), ("reward", np.float32),
                        ("pair_id", np.int64), ("chosen", np.bool_), ("truncated", np.bool_)])


def _paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx.npy"), Path(prefix + ".json")


def write_dataset(prefix: str | Path, samples: Iterable[Sample], tokenizer: Tokenizer,
                  extra_metadata: Callable[[], dict]) -> int:
    """Stream ``samples`` to ``PREFIX.*``; returns the number of samples written.

    ``extra_metadata`` is called once every sample is written, so it can report counts gathered
    while streaming. Files are written under temporary names and renamed, metadata last.
    """
    bin_path, idx_path, meta_path = _paths(prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    offset = 0
    tmp_bin = bin_path.with_name(bin_path.name + ".tmp")
    try:
        with open(tmp_bin, "wb") as f:
            for s in samples:
                tokens = np.asarray(list(s.prompt_ids) + list(s.response_ids), dtype=TOKEN_DTYPE)
                f.write(tokens.tobytes())
                rows.append((offset, len(s.prompt_ids), len(s.response_ids), s.reward,
                             s.pair_id, s.chosen, s.truncated))
                offset += len(tokens)
        if not rows:
            raise DataError(f"no samples to write to {prefix}: every row was filtered or skipped")
    except BaseException:
        tmp_bin.unlink(missing_ok=True)
        raise
    index = np.array(rows, dtype=INDEX_DTYPE)
    tmp_idx = idx_path.with_name(idx_path.name + ".tmp.npy")
    np.save(tmp_idx, index)
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "tokenizer": tokenizer.path,
                "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                "num_samples": len(index), "num_tokens": offset,
                "num_pairs": int(np.count_nonzero(index["chosen"])), **extra_metadata()}
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_idx, idx_path)
    meta_path.write_text(json.dumps(metadata, indent=2) + "\n")
    return len(index)


class ValueDataset:
    """Random access to a preprocessed dataset, memory-mapped (nothing is read up front)."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        bin_path, idx_path, meta_path = _paths(prefix)
        if not meta_path.is_file():
            raise DataError(f"{meta_path} does not exist: {self.prefix} is not a preprocessed "
                            "dataset (run tools/preprocess_data.py --output PREFIX first)")
        self.metadata = json.loads(meta_path.read_text())
        if (self.metadata.get("format"), self.metadata.get("version")) != (FORMAT,
                                                                          FORMAT_VERSION):
            raise DataError(f"{meta_path}: format {self.metadata.get('format')!r} version "
                            f"{self.metadata.get('version')!r}, expected {FORMAT!r} version "
                            f"{FORMAT_VERSION}; preprocess the data again")
        self._index = np.load(idx_path, mmap_mode="r")
        self._tokens = np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r")
        if (len(self._index), len(self._tokens)) != (self.metadata["num_samples"],
                                                     self.metadata["num_tokens"]):
            raise DataError(f"{self.prefix}: {len(self._index)} samples and {len(self._tokens)} "
                            f"tokens on disk, but the metadata says "
                            f"{self.metadata['num_samples']} and {self.metadata['num_tokens']}; "
                            "preprocess the data again")

    @property
    def pad_id(self) -> int:
        return self.metadata["pad_id"]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Sample:
        row = self._index[i]
        start, prompt_len = int(row["offset"]), int(row["prompt_len"])
        end = start + prompt_len + int(row["response_len"])
        tokens = self._tokens[start:end].tolist()
        return Sample(tokens[:prompt_len], tokens[prompt_len:], float(row["reward"]),
                      int(row["pair_id"]), bool(row["chosen"]), bool(row["truncated"]))

    def pairs(self) -> np.ndarray:
        """[P, 2] (chosen index, rejected index) of every preference row, for pairwise
        accuracy."""
        pair_id, chosen = self._index["pair_id"], self._index["chosen"]
        chosen_idx = np.flatnonzero((pair_id >= 0) & chosen)
        rejected_idx = np.flatnonzero((pair_id >= 0) & ~chosen)
        chosen_idx = chosen_idx[np.argsort(pair_id[chosen_idx], kind="stable")]
        rejected_idx = rejected_idx[np.argsort(pair_id[rejected_idx], kind="stable")]
        return np.stack([chosen_idx, rejected_idx], axis=1)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Raise unless ``tokenizer`` matches the one the data was tokenized with."""
        expected = {k: self.metadata[k] for k in ("vocab_size", "bos_id", "eos_id")}
        got = {"vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
               "eos_id": tokenizer.eos_id}
        if expected != got:
            diffs = ", ".join(f"{k} {expected[k]} vs {got[k]}" for k in expected
                              if expected[k] != got[k])
            raise DataError(f"dataset {self.prefix} was tokenized with "
                            f"{self.metadata['tokenizer']}, which does not match tokenizer "
                            f"{tokenizer.path} ({diffs}); preprocess the data with the "
                            "trainer's tokenizer")


def collate(samples: Sequence[Sample], seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples to ``seq_length``. ``response_mask`` is True where response tokens sit:
    the GVM output there is q_t; the output at ``prompt_lengths - 1`` is q_{-1}."""
    batch = len(samples)
    tokens = torch.full((batch, seq_length), pad_id, dtype=torch.int64)
    response_mask = torch.zeros((batch, seq_length), dtype=torch.bool)
    for b, s in enumerate(samples):
        prompt_len, total = len(s.prompt_ids), len(s.prompt_ids) + len(s.response_ids)
        if total > seq_length:
            raise DataError(f"sample {b} of the batch has {total} tokens (prompt {prompt_len} + "
                            f"response {len(s.response_ids)}) > seq_length {seq_length}; "
                            "preprocess with --max-length <= seq_length, minus the length of "
                            "any trajectory context")
        tokens[b, :total] = torch.as_tensor(list(s.prompt_ids) + list(s.response_ids))
        response_mask[b, prompt_len:total] = True
    return {"tokens": tokens, "response_mask": response_mask,
            "prompt_lengths": torch.tensor([len(s.prompt_ids) for s in samples]),
            "response_lengths": torch.tensor([len(s.response_ids) for s in samples]),
            "rewards": torch.tensor([s.reward for s in samples], dtype=torch.float32)}
