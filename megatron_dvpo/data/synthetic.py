"""A synthetic preference task with a hidden scorer, for demos and tests.

The true score depends on which words a response uses *and where*, so a value model must do
token-level credit assignment to rank responses, and a policy's improvement can be measured
exactly (``eval/true_reward_mean``). Everything is deterministic given a seed.

Run ``python -m megatron_dvpo.data.synthetic OUT_DIR`` to write a tokenizer and JSONL files.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

WORDS = ("apple", "banana", "cherry", "dog", "egg", "fig", "grape", "house", "ice", "jam", "kite",
         "lemon", "mango", "nut", "orange", "pear", "queen", "rose", "sun", "tree", "umbrella",
         "violet", "water", "xray", "yak", "zebra", "blue", "red", "green", "gold")
PROMPT_WORDS = (3, 6)
RESPONSE_WORDS = (1, 12)


@dataclass(frozen=True)
class SyntheticRule:
    """The hidden scoring rule; ``seed`` picks which words are good and which are bad.

    Raw score: +1 per good word among the first ``good_window`` response words, -1 per bad word
    anywhere, +1 when the response's first word repeats the prompt's last word. The score is the
    raw score divided by ``good_window + 1``: at most 1, and about -0.2 for random responses.
    """

    seed: int = 0
    num_good: int = 5
    num_bad: int = 5
    good_window: int = 3
    good: frozenset = field(init=False)
    bad: frozenset = field(init=False)

    def __post_init__(self):
        if self.num_good + self.num_bad > len(WORDS):
            raise ValueError(f"num_good + num_bad = {self.num_good + self.num_bad} exceeds the "
                             f"{len(WORDS)} task words")
        picked = random.Random(self.seed).sample(WORDS, self.num_good + self.num_bad)
        object.__setattr__(self, "good", frozenset(picked[:self.num_good]))
        object.__setattr__(self, "bad", frozenset(picked[self.num_good:]))

    def score(self, prompt: str, response: str) -> float:
        """True score of any text (e.g. a decoded policy sample); unknown words count 0."""
        words, prompt_words = response.split(), prompt.split()
        raw = sum(1 for w in words[:self.good_window] if w in self.good)
        raw -= sum(1 for w in words if w in self.bad)
        if words and prompt_words and words[0] == prompt_words[-1] and words[0] in WORDS:
            raw += 1
        return raw / (self.good_window + 1)

    def best(self, prompt: str) -> float:
        """The highest score any response to ``prompt`` reaches: good words filling the
        window, the first of them the prompt's last word when that one is good."""
        return 1.0 if prompt.split()[-1:] and prompt.split()[-1] in self.good else (
            self.good_window / (self.good_window + 1))


@dataclass(frozen=True)
class BigramRule:
    """A compositional hidden rule: a word's worth depends on the word before it.

    ``seed`` deals the words into ``groups`` hidden groups. Among the first ``window`` response
    words, a word is good after a word of the group before its own (cyclically: group 0 -> 1 ->
    2 -> 0) and bad after a word of its own group; the prompt's last word counts as the word
    before the first. The score is (good words - bad words) / 4. No word is good or bad on its
    own, so a value model must read pairs of tokens to rank responses.
    """

    seed: int = 0
    groups: int = 3
    window: int = 3
    group: dict = field(init=False, hash=False, compare=False)

    def __post_init__(self):
        if not 2 <= self.groups <= len(WORDS):
            raise ValueError(f"groups={self.groups}: need 2 .. {len(WORDS)}")
        words = list(WORDS)
        random.Random(f"bigram-{self.seed}").shuffle(words)
        object.__setattr__(self, "group", {w: i % self.groups for i, w in enumerate(words)})

    def worth(self, before: str, word: str) -> int:
        if before not in self.group or word not in self.group:
            return 0
        step = (self.group[word] - self.group[before]) % self.groups
        return 1 if step == 1 else -1 if step == 0 else 0

    def score(self, prompt: str, response: str) -> float:
        words = prompt.split()[-1:] + response.split()[:self.window]
        return sum(self.worth(a, b) for a, b in zip(words, words[1:])) / 4

    def best(self, prompt: str) -> float:
        """Every word of the window after one of the group before its own."""
        return self.window / 4


@dataclass(frozen=True)
class EchoRule:
    """A rule that scores length: name the prompt's words, briefly.

    +1/``echo`` for each distinct prompt word among the response's first ``window`` words (at
    most ``echo`` of them), -``extra_cost`` for each word beyond ``window``: 1.0 at best (two
    prompt words, nothing else), below 0 for most of the demo's 1-12-word responses. ``seed``
    is unused (one rule), kept so that every rule is named ``name:seed``.
    """

    seed: int = 0
    echo: int = 2
    window: int = 3
    extra_cost: float = 0.125

    def score(self, prompt: str, response: str) -> float:
        words, asked = response.split(), set(prompt.split()) & set(WORDS)
        named = len(asked & set(words[:self.window]))
        return min(named, self.echo) / self.echo - self.extra_cost * max(
            len(words) - self.window, 0)

    def best(self, prompt: str) -> float:
        return min(len(set(prompt.split()) & set(WORDS)), self.echo) / self.echo


# the built-in scorers, by name
RULES = {"synthetic": SyntheticRule, "bigram": BigramRule, "echo": EchoRule}


def _words(rng: random.Random, bounds: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*bounds)))


def generate_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"prompts-{seed}")
    return [_words(rng, PROMPT_WORDS) for _ in range(n)]


def generate_preference_rows(rule: SyntheticRule, n: int, seed: int = 0) -> list[dict]:
    """``n`` rows ``{prompt, chosen, rejected}``: two random responses per prompt, the higher true
    score chosen; prompts whose two responses tie are skipped."""
    rng = random.Random(f"preference-{seed}")
    rows = []
    while len(rows) < n:
        prompt = _words(rng, PROMPT_WORDS)
        a, b = _words(rng, RESPONSE_WORDS), _words(rng, RESPONSE_WORDS)
        score_a, score_b = rule.score(prompt, a), rule.score(prompt, b)
        if score_a != score_b:
            chosen, rejected = (a, b) if score_a > score_b else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def generate_scored_rows(rule: SyntheticRule, n: int, seed: int = 0) -> list[dict]:
    """``n`` rows ``{prompt, response, score}`` with random responses and their true scores."""
    rng = random.Random(f"scored-{seed}")
    rows = []
    for _ in range(n):
        prompt, response = _words(rng, PROMPT_WORDS), _words(rng, RESPONSE_WORDS)
        rows.append({"prompt": prompt, "response": response, "score": rule.score(prompt, response)})
    return rows


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_tokenizer(out_dir: str | Path, vocab_size: int = 256, seed: int = 0) -> Path:
    """Train a SentencePiece BPE model on task text; return the path of ``tokenizer.model``.

    Ids: pad 0, unk 1, bos 2, eos 3. BPE (not unigram) because transformers converts
    SentencePiece models to BPE when exporting an HF directory; the alphabet line makes any
    lowercase text encodable. Raises if some task word would need more than one piece.
    """
    import sentencepiece

    rng = random.Random(f"tokenizer-{seed}")
    lines = [_words(rng, RESPONSE_WORDS) for _ in range(3000)]
    lines.append(" ".join("abcdefghijklmnopqrstuvwxyz"))
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1, minloglevel=2)
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    split = [w for w in WORDS if len(processor.encode(w)) > 1]
    if split:
        raise ValueError(f"vocab_size={vocab_size} is too small: {split} encode to several "
                         "pieces; use 256")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return out / "tokenizer.model"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train-rows", type=int, default=8000)
    parser.add_argument("--eval-rows", type=int, default=400)
    parser.add_argument("--rule", choices=sorted(RULES), default="synthetic",
                        help="the hidden rule: word-level (synthetic), word-pair (bigram) or "
                        "prompt words, briefly (echo)")
    parser.add_argument("--rule-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rule = RULES[args.rule](seed=args.rule_seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(args.out_dir, seed=args.seed)
    rows = generate_preference_rows(rule, args.train_rows + args.eval_rows, seed=args.seed)
    write_jsonl(rows[:args.train_rows], args.out_dir / "train.jsonl")
    write_jsonl(rows[args.train_rows:], args.out_dir / "eval.jsonl")
    print(f"wrote tokenizer.model, train.jsonl ({args.train_rows} rows), eval.jsonl "
          f"({args.eval_rows} rows) to {args.out_dir}; hidden rule {args.rule}:{args.rule_seed}")


if __name__ == "__main__":
    main()
