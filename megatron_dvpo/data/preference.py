"""JSONL preference and scored rows -> tokenized GVM training samples (docs/algorithm.md §1).

Accepted rows, one JSON object per line (blank lines are ignored):
  preference  {prompt, chosen, rejected}
              {question, response_j, response_k}        (official DVPO data; response_j is chosen)
              {chosen: [messages], rejected: [messages]} (chat; shared prefix, final assistant turn)
  scored      {prompt, response, score}
              {value_question, value_response, rewards} (rewards: a number or a 1-element list)
  response    {prompt, response}                        (demonstrations: SFT only)

A preference row becomes two independent samples (chosen with ``chosen_reward``, rejected with
``rejected_reward``) that share a ``pair_id``; a scored row becomes one sample. Prompt and
response are encoded separately, so the boundary between them is exact:
``prompt_ids = [bos] + encode(prompt)`` and ``response_ids = encode(response) + [eos]``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional, Sequence

import numpy as np

from megatron_dvpo.data.tokenizer import ChatTemplateError, Tokenizer
from megatron_dvpo.errors import InputError

ACCEPTED_ROWS = ("{prompt, chosen, rejected}, {question, response_j, response_k}, "
                 "{chosen: [messages], rejected: [messages]}, {prompt, response, score} or "
                 "{value_question, value_response, rewards}")

# Every key an accepted row form (or a prompt row) reads: a tool copying a row's other fields
# (an id, metadata) leaves these out, so that the copy cannot read as another row form.
DATA_KEYS = frozenset({"prompt", "chosen", "rejected", "question", "response_j", "response_k",
                       "response", "score", "value_question", "value_response", "rewards",
                       "messages"})

# Trajectory conditioning (docs/algorithm.md §1, paper v2): a fixed template for K example
# (prompt, response) pairs from the policy being judged, placed before the main prompt.
CONTEXT_HEADER = "Examples of responses from the policy being judged:\n\n"
CONTEXT_EXAMPLE = "Prompt: {prompt}\nResponse: {response}\n\n"
CONTEXT_FOOTER = "Now judge this response.\n\n"


class DataError(InputError):
    """Unusable input data; the message names the file, the 1-based line and the problem."""


class _BadRow(Exception):
    """One row's problem; ``reason`` is the key it is counted under when bad rows are skipped."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason, self.problem = reason, problem


@dataclass(frozen=True)
class Sample:
    """One GVM training sample: the reward is given at the last response token.

    ``pair_id`` links the chosen and rejected samples of one preference row (-1: scored row).
    ``context_len`` counts trajectory-conditioning tokens at the start of ``prompt_ids``.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    pair_id: int = -1
    chosen: bool = False
    truncated: bool = False
    context_len: int = 0

    @property
    def response_start(self) -> int:
        """Position of the first response token in ``prompt_ids + response_ids``."""
        return len(self.prompt_ids)


@dataclass
class ReadOptions:
    """How rows become samples. ``max_length`` bounds prompt + response tokens (None: no bound);
    ``filter`` drops a row with a sample over it, ``truncate`` cuts the prompt from the left
    (keeping its first token, the BOS) and then, if needed, the response from the right."""

    max_length: Optional[int] = None
    length_mode: Literal["filter", "truncate"] = "filter"
    chosen_reward: float = 1.0
    rejected_reward: float = -1.0
    skip_bad_rows: bool = False
    allow_unscored: bool = False  # {prompt, response} rows (demonstrations, for SFT)

    def __post_init__(self):
        if self.length_mode not in ("filter", "truncate"):
            raise ValueError(f"length_mode must be 'filter' or 'truncate', got "
                             f"{self.length_mode!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one prompt and one response token), "
                             f"got {self.max_length}")


@dataclass
class DataStats:
    """Counts for the trainer's log: rows kept, dropped for length, truncated, and bad."""

    rows: int = 0  # non-blank lines read
    pairs: int = 0  # preference rows kept (two samples each)
    scored: int = 0  # scored rows kept (one sample each)
    filtered_rows: int = 0  # dropped by length_mode="filter"
    truncated_samples: int = 0  # cut by length_mode="truncate"
    bad_rows: Counter = field(default_factory=Counter)  # skipped rows, per reason

    @property
    def samples(self) -> int:
        return 2 * self.pairs + self.scored

    def as_dict(self) -> dict:
        return {"rows": self.rows, "pairs": self.pairs, "scored": self.scored,
                "samples": self.samples, "filtered_rows": self.filtered_rows,
                "truncated_samples": self.truncated_samples, "bad_rows": dict(self.bad_rows)}


@dataclass
class ParsedData:
    samples: list[Sample]
    pairs: list[tuple[int, int]]  # (chosen index, rejected index) into samples
    stats: DataStats


@dataclass(frozen=True)
class _Row:
    prompt: str
    responses: tuple[str, ...]  # (chosen, rejected) or (response,)
    rewards: tuple[float, ...]

    @property
    def is_pair(self) -> bool:
        return len(self.responses) == 2


# ---------------------------------------------------------------------------------------------
# Row parsing: JSON object -> prompt text, response texts, rewards.


def _text(obj: dict, key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _BadRow("wrong_type", f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadRow("empty", f"{key!r} is empty")
    return value


def _number(obj: dict, key: str) -> float:
    value = obj[key]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _BadRow("wrong_type", f"{key!r} must be a finite number or a one-element list of "
                                    f"one, got {obj[key]!r}")
    return float(value)


def is_message_list(value) -> bool:
    """A non-empty list of ``{role: str, content: str}`` chat messages."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)


def _messages(obj: dict, key: str) -> list[dict]:
    value = obj[key]
    if isinstance(value, str):
        raise _BadRow("missing_keys", f"{key!r} is text, so the row needs a 'prompt' key")
    if not is_message_list(value):
        raise _BadRow("wrong_type", f"{key!r} must be a non-empty list of "
                                    "{role: str, content: str} messages")
    return value


def _chat_row(obj: dict, tokenizer: Tokenizer, options: ReadOptions) -> _Row:
    chosen, rejected = _messages(obj, "chosen"), _messages(obj, "rejected")
    prefix = chosen[:-1]
    if not prefix or prefix != rejected[:-1]:
        raise _BadRow("bad_chat", "'chosen' and 'rejected' must share a non-empty message prefix "
                                  "and differ only in the final message")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise _BadRow("bad_chat", f"the final {name!r} message must have role 'assistant', "
                                      f"got {messages[-1]['role']!r}")
        _text(messages[-1], "content")
    try:
        prompt = tokenizer.apply_chat_template(prefix, add_generation_prompt=True)
    except ChatTemplateError as e:
        raise _BadRow("bad_chat", str(e)) from None
    return _Row(prompt, (chosen[-1]["content"], rejected[-1]["content"]),
                (options.chosen_reward, options.rejected_reward))


def _parse_row(obj, tokenizer: Tokenizer, options: ReadOptions) -> _Row:
    if not isinstance(obj, dict):
        raise _BadRow("not_object", f"expected a JSON object, got {type(obj).__name__}")
    keys = obj.keys()
    pair_rewards = (options.chosen_reward, options.rejected_reward)
    if {"prompt", "chosen", "rejected"} <= keys:
        return _Row(_text(obj, "prompt"), (_text(obj, "chosen"), _text(obj, "rejected")),
                    pair_rewards)
    if {"chosen", "rejected"} <= keys:
        return _chat_row(obj, tokenizer, options)
    if {"question", "response_j", "response_k"} <= keys:
        return _Row(_text(obj, "question"), (_text(obj, "response_j"), _text(obj, "response_k")),
                    pair_rewards)
    if {"prompt", "response", "score"} <= keys:
        return _Row(_text(obj, "prompt"), (_text(obj, "response"),), (_number(obj, "score"),))
    if {"prompt", "response"} <= keys:  # a demonstration (``sample`` writes these)
        if not options.allow_unscored:
            raise _BadRow("missing_keys", "a {prompt, response} row has no 'score': a value "
                                          "model needs one (SFT reads such rows as they are)")
        return _Row(_text(obj, "prompt"), (_text(obj, "response"),), (0.0,))
    if {"value_question", "value_response", "rewards"} <= keys:
        return _Row(_text(obj, "value_question"), (_text(obj, "value_response"),),
                    (_number(obj, "rewards"),))
    raise _BadRow("missing_keys", f"keys {sorted(keys)} match no accepted row form; expected "
                                  f"{ACCEPTED_ROWS}")


# ---------------------------------------------------------------------------------------------
# Tokenization and length handling.


def with_bos(ids: list[int], tokenizer: Tokenizer) -> list[int]:
    """Prepend BOS unless the text already rendered one (chat templates often do)."""
    bos = tokenizer.bos_id
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def encode_pair(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """``([bos] + encode(prompt), encode(response) + [eos])``, encoded separately."""
    return with_bos(tokenizer.encode(prompt), tokenizer), tokenizer.encode(response) + [
        tokenizer.eos_id]


def fit_length(prompt_ids: list[int], response_ids: list[int], max_length: Optional[int]
               ) -> tuple[list[int], list[int], bool]:
    """Cut ``prompt + response`` to ``max_length`` tokens (None: no limit): prompt tokens after
    the first (the BOS) go first, oldest first, then response tokens from the end. Returns
    (prompt, response, truncated)."""
    excess = 0 if max_length is None else len(prompt_ids) + len(response_ids) - max_length
    if excess <= 0:
        return prompt_ids, response_ids, False
    cut = min(excess, len(prompt_ids) - 1)
    prompt_ids = prompt_ids[:1] + prompt_ids[1 + cut:]
    excess -= cut
    return prompt_ids, response_ids[:len(response_ids) - excess], True


# ---------------------------------------------------------------------------------------------
# Files -> samples.


def _load_json(line: bytes):
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadRow("invalid_json", f"invalid JSON: {e}") from None


def _row_samples(row: _Row, tokenizer: Tokenizer, options: ReadOptions,
                 stats: DataStats) -> list[Sample]:
    encoded = [encode_pair(tokenizer, row.prompt, response) for response in row.responses]
    limit = options.max_length
    if (options.length_mode == "filter" and limit is not None
            and any(len(p) + len(r) > limit for p, r in encoded)):
        stats.filtered_rows += 1
        return []
    fitted = [fit_length(p, r, limit) for p, r in encoded]
    pair_id = stats.pairs if row.is_pair else -1
    stats.pairs += row.is_pair
    stats.scored += not row.is_pair
    samples = []
    for i, ((prompt_ids, response_ids, truncated), reward) in enumerate(zip(fitted, row.rewards)):
        stats.truncated_samples += truncated
        samples.append(Sample(prompt_ids, response_ids, reward, pair_id,
                              chosen=row.is_pair and i == 0, truncated=truncated))
    return samples


def iter_samples(paths: Iterable[str | Path], tokenizer: Tokenizer, options: ReadOptions,
                 stats: DataStats) -> Iterator[Sample]:
    """Samples of every row of every file, in order (a pair yields chosen, then rejected);
    ``stats`` is updated as rows are read."""
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"input file {path} does not exist")
        with open(path, "rb") as f:  # bytes, so that bad UTF-8 is a bad row, not a crash
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                stats.rows += 1
                try:
                    row = _parse_row(_load_json(line), tokenizer, options)
                except _BadRow as bad:
                    if not options.skip_bad_rows:
                        raise DataError(f"{path}:{lineno}: {bad.problem} (set skip_bad_rows to "
                                        "skip and count such rows)") from None
                    stats.bad_rows[bad.reason] += 1
                    continue
                yield from _row_samples(row, tokenizer, options, stats)


def load_jsonl(paths: Iterable[str | Path], tokenizer: Tokenizer,
               options: Optional[ReadOptions] = None) -> ParsedData:
    """All samples of ``paths`` in memory, with (chosen, rejected) index pairs and stats."""
    stats = DataStats()
    samples: list[Sample] = []
    pairs: list[tuple[int, int]] = []
    for sample in iter_samples(paths, tokenizer, options or ReadOptions(), stats):
        if sample.chosen:
            pairs.append((len(samples), len(samples) + 1))
        samples.append(sample)
    return ParsedData(samples, pairs, stats)


def add_trajectory_context(sample: Sample, examples: Sequence[tuple[str, str]],
                           tokenizer: Tokenizer) -> Sample:
    """Prefix ``sample`` with K example (prompt, response) pairs from the judged policy.

    The context takes over the sequence's BOS and the main prompt follows it unchanged, so the
    response (and its loss mask and length) is untouched and starts at ``response_start``.
    """
    if not examples:
        return sample
    text = CONTEXT_HEADER + "".join(CONTEXT_EXAMPLE.format(prompt=p, response=r)
                                    for p, r in examples) + CONTEXT_FOOTER
    context = with_bos(tokenizer.encode(text), tokenizer)
    prompt = list(sample.prompt_ids)
    if tokenizer.bos_id is not None and prompt[:1] == [tokenizer.bos_id]:
        prompt = prompt[1:]
    return replace(sample, prompt_ids=context + prompt, context_len=len(context))


class TrajectoryContext:
    """Trajectory conditioning for a dataset: K other (prompt, response) pairs of the data before
    each sample, chosen by a generator seeded with the sample's index (the same every epoch)."""

    def __init__(self, dataset, tokenizer: Tokenizer, k: int, seed: int):
        self.dataset, self.tokenizer, self.k, self.seed = dataset, tokenizer, k, seed

    def _text(self, ids: Sequence[int]) -> str:
        special = {self.tokenizer.bos_id, self.tokenizer.eos_id}
        return self.tokenizer.decode([t for t in ids if t not in special])

    def __call__(self, index: int, sample: Sample) -> Sample:
        rng = np.random.default_rng([self.seed, index])
        examples = [(self._text(other.prompt_ids), self._text(other.response_ids))
                    for other in (self.dataset[int(i)]
                                  for i in rng.choice(len(self.dataset), size=self.k,
                                                      replace=False))]
        return add_trajectory_context(sample, examples, self.tokenizer)
