"""Scorers of (prompt, response) text: the true reward of a task that has one, or the user's own.

One spec names a scorer everywhere one is used (``rl.true_reward``, ``sample --scorer``, GVM
refresh labelling):

- ``synthetic:<seed>`` / ``bigram:<seed>``: the hidden rules of the built-in synthetic tasks;
- ``package.module:function``: a function importable from the working directory or
  ``PYTHONPATH``;
- ``path/to/file.py:function``: a function in a Python file.

The function takes ``(prompt: str, response: str)`` and returns a number. It is imported and
called once on a probe at start-up, so that a wrong spec fails at once with one line.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable, Optional

from megatron_dvpo.config import ConfigError
from megatron_dvpo.models.generation import Rollout, rollout_responses

TrueReward = Callable[[str, str], float]  # (prompt text, response text) -> reward
FORMS = "'synthetic:<seed>', 'bigram:<seed>', 'module:function' or 'file.py:function'"


def _module(name: str, spec: str, key: str):
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"{key}={spec!r}: no file {path}")
        # as `python file.py` would, let it import the modules beside it
        if str(path.resolve().parent) not in sys.path:
            sys.path.insert(0, str(path.resolve().parent))
        loader = importlib.util.spec_from_file_location(f"_scorer_{path.stem}", path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        return module
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"{key}={spec!r}: cannot import module {name!r} ({e}); expected "
                          f"{FORMS}") from None


def load_scorer(spec: Optional[str], key: str = "rl.true_reward") -> Optional[TrueReward]:
    """The scorer ``spec`` names (None for None), checked by one probe call."""
    if not spec:
        return None
    from megatron_dvpo.data.synthetic import RULES

    name, sep, attr = spec.rpartition(":")
    if not sep or not name or not attr:
        raise ConfigError(f"{key}={spec!r}: expected {FORMS}")
    if name in RULES and attr.isdigit():
        return RULES[name](seed=int(attr)).score
    fn = getattr(_module(name, spec, key), attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}={spec!r}: {name} has no function {attr!r}")
    try:
        probe = float(fn("a probe prompt", "a probe response"))
    except Exception as e:  # the user's code: whatever it raises, say what and where
        raise ConfigError(f"{key}={spec!r}: calling {attr}(prompt, response) failed: "
                          f"{type(e).__name__}: {e}") from None
    if not math.isfinite(probe):
        raise ConfigError(f"{key}={spec!r}: {attr}(prompt, response) returned {probe}, not a "
                          "finite number")
    return fn


def score_texts(scorer: TrueReward, tokenizer, prompts: list[list[int]],
                responses: list[list[int]]) -> list[float]:
    """``scorer`` on each (prompt, response) as text, the response without its EOS."""
    eos = tokenizer.eos_id
    return [float(scorer(tokenizer.decode(prompt),
                         tokenizer.decode([t for t in response if t != eos])))
            for prompt, response in zip(prompts, responses)]


class RolloutTextScores:
    """``scorer`` on a rollout's (prompt, response) texts, called once per rollout: the true
    reward and the GVM refresh's ranking read the same step's rollout (the refresh also scores
    its second sample, so the last two rollouts are remembered), and a user's scorer (a
    verifier, a judge) may be the costliest part of a step."""

    REMEMBERED = 2

    def __init__(self, scorer: TrueReward, tokenizer):
        self.scorer, self.tokenizer = scorer, tokenizer
        self._recent: list[tuple[Rollout, list[float]]] = []

    def __call__(self, prompts: list[list[int]], rollout: Rollout) -> list[float]:
        for seen, scores in self._recent:
            if seen is rollout:
                return scores
        scores = score_texts(self.scorer, self.tokenizer, prompts, rollout_responses(rollout))
        self._recent = [*self._recent[-(self.REMEMBERED - 1):], (rollout, scores)]
        return scores
