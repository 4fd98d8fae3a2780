"""Prompt datasets for RL rollouts: JSONL rows with ``prompt``, ``question`` or chat ``messages``.

Preference and scored rows work too (their prompt field is used, the rest ignored), so the data
a GVM was trained on can also drive the policy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_dvpo.data.preference import DataError, is_message_list, with_bos
from megatron_dvpo.data.tokenizer import Tokenizer

PROMPT_KEYS = ("prompt", "question", "value_question")


@dataclass(frozen=True)
class Prompt:
    """A prompt's rendered text and token ids, with the row it came from and its position
    among the file's usable rows (so that outputs can keep the row's other fields and order)."""

    text: str
    ids: list[int]
    row: dict = field(default_factory=dict, compare=False)
    index: int = 0


def _prompt_text(row, tokenizer: Tokenizer) -> str:
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    if "messages" in row:
        messages = row["messages"]
        if not is_message_list(messages):
            raise ValueError("'messages' must be a non-empty list of {role: str, content: str} "
                             "objects")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a finished conversation: prompt with what precedes
            if not messages:
                raise ValueError("'messages' holds only an assistant turn: there is no prompt")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    for key in PROMPT_KEYS:
        if key in row:
            if not isinstance(row[key], str) or not row[key].strip():
                raise ValueError(f"'{key}' must be a non-empty string")
            return row[key]
    raise ValueError(f"no prompt: expected one of {list(PROMPT_KEYS) + ['messages']}")


def load_prompts(path: str | Path, tokenizer: Tokenizer, max_prompt_length: int,
                 skip_bad_rows: bool = False) -> tuple[list[Prompt], dict]:
    """Prompts of ``path`` (one BOS first when the tokenizer has one), and counts of what was
    skipped: bad rows (only with ``skip_bad_rows``) and prompts over ``max_prompt_length``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file does not exist")
    prompts, counts = [], {"bad_rows": 0, "too_long": 0}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = _prompt_text(row, tokenizer)
            except (ValueError, TypeError, AttributeError) as e:
                if not skip_bad_rows:
                    raise DataError(f"{path}:{number}: {e} (set data.skip_bad_rows=true to skip "
                                    "and count such rows)") from None
                counts["bad_rows"] += 1
                continue
            # exactly as a GVM sample's prompt is encoded (a BOS the template rendered is kept)
            ids = with_bos(tokenizer.encode(text), tokenizer)
            if len(ids) > max_prompt_length:
                counts["too_long"] += 1
                continue
            prompts.append(Prompt(text, ids, row, len(prompts)))
    if not prompts:
        raise DataError(f"{path}: no usable prompts ({counts})")
    return prompts, counts
