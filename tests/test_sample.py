"""The user's own scorer wherever one is used, and the sampling tool's rows (K samples per
prompt, input fields and order kept) that SFT and the GVM read back."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, launch
from megatron_dvpo.config import ConfigError
from megatron_dvpo.rl.rewards import load_scorer
from megatron_dvpo.data.prompts import Prompt
from megatron_dvpo.sample import length_balance, output_rows, pick_pair


def test_scorer_specs(tmp_path, monkeypatch):
    from megatron_dvpo.data.synthetic import BigramRule, SyntheticRule

    assert load_scorer("synthetic:3")("a b", "apple") == SyntheticRule(seed=3).score("a b", "apple")
    assert load_scorer("bigram:1")("a", "x y") == BigramRule(seed=1).score("a", "x y")
    (tmp_path / "my_scores.py").write_text(
        "def length(prompt, response):\n    return float(len(response.split()))\n"
        "def broken(prompt, response):\n    raise RuntimeError('no model loaded')\n"
        "def text(prompt, response):\n    return 'high'\n")
    monkeypatch.chdir(tmp_path)
    assert load_scorer("my_scores:length")("p", "one two") == 2.0  # module:function
    assert load_scorer(f"{tmp_path}/my_scores.py:length")("p", "x") == 1.0  # file.py:function
    helpers = tmp_path / "elsewhere"
    helpers.mkdir()
    (helpers / "word_list.py").write_text("GOOD = {'apple', 'sun'}\n")
    (helpers / "verifier.py").write_text(
        "from word_list import GOOD\n"
        "def score(prompt, response):\n"
        "    return float(sum(w in GOOD for w in response.split()))\n")
    # a file's scorer imports the modules beside it, as `python verifier.py` would
    assert load_scorer(f"{helpers}/verifier.py:score")("p", "apple sun x") == 2.0
    for spec, message in (("heldout:0", r"cannot import module 'heldout'"),
                          ("my_scores:missing", r"my_scores has no function 'missing'"),
                          ("my_scores:broken", r"calling broken\(prompt, response\) failed: "
                                               r"RuntimeError: no model loaded"),
                          ("my_scores:text", r"calling text.* failed: ValueError"),
                          ("nothing", r"expected 'synthetic:<seed>'"),
                          ("/no/such.py:f", r"no file /no/such.py")):
        with pytest.raises(ConfigError, match=rf"rl.true_reward={spec!r}: {message}"):
            load_scorer(spec)


def test_length_balanced_pairs():
    """Where the scorer penalises length, the first two samples' pairs nearly all let the
    shorter response win; balanced pairs let the longer win half of the time."""
    texts = ["a", "a b c", "a b", "x y z w"]
    scores = [0.0, 0.5, 0.2, -1.0]  # the 3-word text names more; the 4-word one is too long
    assert pick_pair(texts, scores, "first", longer_wins=True) == ("a b c", "a")
    assert pick_pair(texts, scores, "length_balanced", longer_wins=True) == ("a b c", "a")
    assert pick_pair(texts, scores, "length_balanced", longer_wins=False) == ("a", "x y z w")
    # no pair of the wanted kind: one of equal length, then any that ranks
    assert pick_pair(["a b", "c d", "e f g"], [1.0, 0.0, 0.0], "length_balanced",
                     longer_wins=True) == ("a b", "c d")
    assert pick_pair(["a", "b c"], [1.0, 0.0], "length_balanced", longer_wins=True) == ("a", "b c")
    assert pick_pair(["a", "b", " "], [1.0, 1.0, 2.0], "length_balanced", True) is None

    import random

    from megatron_dvpo.data.synthetic import WORDS, EchoRule, generate_prompts
    rule, rng = EchoRule(), random.Random(0)
    prompts = [Prompt(p, [], {}, i) for i, p in enumerate(generate_prompts(400))]
    samples = [(i, k, " ".join(rng.choices(WORDS, k=rng.randint(1, 12))))
               for i in range(len(prompts)) for k in range(8)]
    first, balanced = (output_rows(prompts, samples, rule.score, choice)
                       for choice in ("first", "length_balanced"))
    shorter = lambda rows: float(length_balance(rows).split("shorter in ")[1].split("%")[0])
    assert shorter(first) > 80 and 40 <= shorter(balanced) <= 52, (
        length_balance(first), length_balance(balanced))
    assert len(balanced) > len(first) and all(r["chosen"] for r in balanced)


@pytest.fixture(scope="module")
def work(models, tmp_path_factory):
    return models.linked(tmp_path_factory.mktemp("sample"))


def sample(work, out, *args):
    proc = subprocess.run([sys.executable, "-m", "megatron_dvpo.sample", "--policy",
                           f"{work}/policy", "--out", str(out), "--max-new-tokens", "6", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    return proc


def test_k_samples_keep_fields_and_order_and_feed_sft(work, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": w, "chosen": "x",
                                           "rejected": "y"}) + "\n"
                               for i, w in enumerate(["apple dog", "sun tree", "red gold"])))
    (tmp_path / "scores.py").write_text("def n(prompt, response):\n    return len(response)\n")
    out = tmp_path / "samples.jsonl"
    proc = sample(work, out, "--prompts", str(prompts), "--n", "3", "--scorer",
                  f"{tmp_path}/scores.py:n", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [(f"q{i}", k) for i in range(3)
                                                      for k in range(3)]
    assert all(r["score"] == len(r["response"]) for r in rows)
    assert all("chosen" not in r for r in rows)  # the input's data keys do not leak
    pairs = tmp_path / "pairs.jsonl"
    proc = sample(work, pairs, "--prompts", str(prompts), "--pairs", "--samples-per-prompt",
                  "3", "--pair-choice", "length_balanced", "--scorer",
                  f"{tmp_path}/scores.py:n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pairs: the chosen response is the longer in" in proc.stdout
    for row in map(json.loads, pairs.read_text().splitlines()):
        assert len(row["chosen"]) > len(row["rejected"]) and row["id"].startswith("q"), row
    proc = sample(work, pairs, "--prompts", str(prompts), "--pair-choice", "length_balanced")
    assert proc.returncode == 2 and "--pair-choice needs --pairs" in proc.stderr
    # SFT reads {prompt, response} rows (without the score too)
    plain = tmp_path / "demos.jsonl"
    plain.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"] or
                                         "apple"}) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "megatron_dvpo.sft", "--config",
                           "examples/sft_tiny.yaml", f"data.train_path={plain}",
                           f"checkpoint.init_from={work}/policy", f"logging.run_dir={tmp_path}/sft",
                           "checkpoint.save_dir=null", "train_steps=2",
                           "data.global_batch_size=8", "data.micro_batch_size=8",
                           f"data.tokenizer={work}/synthetic/tokenizer.model"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_bad_scorer_fails_at_start_up(work, tmp_path):
    proc = sample(work, tmp_path / "x.jsonl", "--prompts", f"{work}/synthetic/eval.jsonl",
                  "--pairs", "--scorer", "heldout:0")
    assert proc.returncode == 2 and "error: --scorer='heldout:0': cannot import" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.jsonl").exists()


@pytest.mark.multirank
def test_samples_per_prompt_and_gvm_guidance_under_launch(work, tmp_path):
    """torchrun's own parser takes every option it can: ``--samples-per-prompt`` (not the
    ambiguous ``--n``) reaches the sampler; ``--guide-gvm`` steers it, and refuses a policy."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in ["apple", "sun tree"]))
    out = tmp_path / "guided.jsonl"
    launch(["-m", "megatron_dvpo.sample", "--policy", f"{work}/policy", "--prompts",
            str(prompts), "--out", str(out), "--max-new-tokens", "4",
            "--samples-per-prompt", "2", "--guide-gvm", f"{work}/gvm", "--guide-beta", "2",
            "--guide-top-k", "3"], nproc=1)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("apple", 0), ("apple", 1),
                                                          ("sun tree", 0), ("sun tree", 1)]
    proc = sample(work, tmp_path / "x.jsonl", "--prompts", str(prompts), "--guide-gvm",
                  f"{work}/policy")
    assert proc.returncode == 2 and "not a value model" in proc.stderr, proc.stderr[-2000:]
