"""The synthetic task: a hidden rule that needs token positions, consistent preference rows and
a tokenizer that keeps every task word whole."""

import json
from collections import Counter

import pytest

from megatron_dvpo.data import synthetic
from megatron_dvpo.data.synthetic import (WORDS, SyntheticRule, generate_preference_rows,
                                          generate_prompts, generate_scored_rows,
                                          train_tokenizer)
from megatron_dvpo.data.tokenizer import load_tokenizer

RULE = SyntheticRule(seed=0)
GOOD, BAD = sorted(RULE.good), sorted(RULE.bad)
NEUTRAL = sorted(set(WORDS) - RULE.good - RULE.bad)


def test_rule_is_seeded():
    assert len(GOOD) == 5 and len(BAD) == 5 and not RULE.good & RULE.bad
    assert SyntheticRule(seed=0) == RULE
    assert SyntheticRule(seed=1).good != RULE.good
    with pytest.raises(ValueError, match="exceeds the 30 task words"):
        SyntheticRule(num_good=20, num_bad=11)


def test_score_values():
    n = NEUTRAL
    prompt = f"{n[0]} {n[1]} {n[2]}"
    assert RULE.score(prompt, f"{GOOD[0]} {n[3]}") == 1 / 4
    assert RULE.score(prompt, f"{GOOD[0]} {GOOD[1]} {GOOD[2]} {GOOD[3]}") == 3 / 4  # window 3
    assert RULE.score(prompt, f"{n[3]} " * 9 + BAD[0]) == -1 / 4  # bad words count anywhere
    assert RULE.score(prompt, f"{n[2]} {GOOD[0]}") == 2 / 4  # echoes the prompt's last word
    assert RULE.score(prompt, f"{n[3]} {n[2]}") == 0.0  # ... only as the first word
    assert RULE.score(f"{n[0]} {GOOD[1]}", f"{GOOD[1]} {GOOD[0]} {GOOD[2]}") == 1.0  # the max
    # Any text is accepted; unknown words count 0.
    assert RULE.score(prompt, "") == 0.0 and RULE.score("", "hello world !!") == 0.0
    assert RULE.score("hello", "hello") == 0.0


def test_score_needs_token_positions():
    """Same multiset of words, different order, different score: length and bag-of-words
    features cannot express the rule."""
    n = NEUTRAL
    early, late = f"{GOOD[0]} {n[0]} {n[1]} {n[2]}", f"{n[0]} {n[1]} {n[2]} {GOOD[0]}"
    assert Counter(early.split()) == Counter(late.split())
    assert RULE.score("x", early) == 1 / 4 and RULE.score("x", late) == 0.0
    assert RULE.score(f"x {n[1]}", f"{n[1]} {n[0]}") > RULE.score(f"x {n[1]}", f"{n[0]} {n[1]}")


def test_prompts_are_deterministic_task_words():
    prompts = generate_prompts(200, seed=3)
    assert prompts == generate_prompts(200, seed=3) != generate_prompts(200, seed=4)
    assert all(3 <= len(p.split()) <= 6 and set(p.split()) <= set(WORDS) for p in prompts)


def test_preference_rows_prefer_the_higher_true_score():
    rows = generate_preference_rows(RULE, 300, seed=5)
    assert len(rows) == 300 and rows == generate_preference_rows(RULE, 300, seed=5)
    for row in rows:
        assert RULE.score(row["prompt"], row["chosen"]) > RULE.score(row["prompt"], row["rejected"])
        assert all(1 <= len(row[k].split()) <= 12 for k in ("chosen", "rejected"))
    assert generate_preference_rows(SyntheticRule(seed=1), 300, seed=5) != rows


def test_scored_rows_carry_the_true_score():
    rows = generate_scored_rows(RULE, 100, seed=2)
    assert all(r["score"] == RULE.score(r["prompt"], r["response"]) for r in rows)
    scores = [r["score"] for r in rows]
    assert max(scores) <= 1.0 and len(set(scores)) > 4


def test_tokenizer_keeps_every_task_word_whole(tmp_path):
    path = train_tokenizer(tmp_path / "a")
    tok = load_tokenizer(path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 256)
    ids = [tok.encode(w) for w in WORDS]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(WORDS)
    assert tok.decode(tok.encode("zebra xyz qq")) == "zebra xyz qq"  # any lowercase text
    assert train_tokenizer(tmp_path / "b").read_bytes() == path.read_bytes()
    with pytest.raises(ValueError, match="vocab_size=64 is too small"):
        train_tokenizer(tmp_path / "c", vocab_size=64)


def test_cli_writes_a_task(tmp_path, capsys):
    synthetic.main([str(tmp_path), "--train-rows", "40", "--eval-rows", "10"])
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 40 and len(evals) == 10 and not set(map(str, train)) & set(map(str, evals))
    assert (tmp_path / "tokenizer.model").is_file()
    assert "train.jsonl (40 rows)" in capsys.readouterr().out


def test_bigram_rule_scores_each_word_by_the_one_before_it():
    from megatron_dvpo.data.synthetic import WORDS, BigramRule

    rule = BigramRule(seed=0)
    by_group = [[w for w in WORDS if rule.group[w] == g] for g in range(3)]
    assert sorted(len(g) for g in by_group) == [10, 10, 10]
    a, b, c = (g[0] for g in by_group)
    assert rule.score(f"x {a}", f"{b} {c} {a}") == 3 / 4  # each word after the group before
    assert rule.score(f"x {a}", f"{b} {c} {a} {by_group[0][1]}") == 3 / 4  # past the window
    assert rule.score(f"x {a}", f"{by_group[0][1]}") == -1 / 4  # after its own group
    assert rule.score(f"x {a}", f"{c}") == 0.0  # after the group after: neutral
    assert rule.score("x", "unknown words") == 0.0
    for word in WORDS:  # no word is good or bad on its own
        assert {rule.worth(before, word) for before in WORDS} == {-1, 0, 1}
    assert BigramRule(seed=1).group != rule.group


def test_echo_rule_scores_prompt_words_named_briefly():
    from megatron_dvpo.data.synthetic import EchoRule

    rule = EchoRule()
    assert rule.score("dog egg fig", "egg dog") == 1.0 == rule.best("dog egg fig")
    assert rule.score("dog egg fig", "egg egg") == 0.5  # distinct words count
    assert rule.score("dog egg fig", "sun sun sun egg") == -0.125  # past the window: a cost
    assert rule.score("dog egg fig", "egg dog fig sun sun") == 1.0 - 2 * 0.125
    assert rule.best("dog dog") == 0.5  # one distinct prompt word


@pytest.mark.parametrize("name", ["synthetic", "bigram", "echo"])
def test_each_rules_best_is_reached_and_never_beaten(name):
    """``best(prompt)`` is the maximum over every response of up to three task words (the
    window of each rule; more words add nothing but cost), checked exhaustively."""
    import itertools
    import random

    from megatron_dvpo.data.synthetic import RULES, WORDS, generate_prompts

    rule = RULES[name](seed=0)
    responses = [" ".join(words) for n in (1, 2, 3) for words in
                 itertools.product(WORDS, repeat=n)]
    for prompt in random.Random(0).sample(generate_prompts(200), 4):
        assert max(rule.score(prompt, r) for r in responses) == rule.best(prompt), prompt
