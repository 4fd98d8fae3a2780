"""Preprocessing round trip, the memory-mapped dataset, collation and the resumable sampler."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_dvpo.data.dataset import ValueDataset, collate, write_dataset
from megatron_dvpo.data.preference import (DataError, ReadOptions, Sample,
                                           add_trajectory_context, encode_pair, load_jsonl)
from megatron_dvpo.data.preprocess import main as preprocess_main
from megatron_dvpo.data.preprocess import preprocess
from megatron_dvpo.data.sampler import DistributedBatchSampler
from megatron_dvpo.data.synthetic import (SyntheticRule, generate_preference_rows,
                                          generate_scored_rows, train_tokenizer, write_jsonl)
from megatron_dvpo.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
RULE = SyntheticRule(seed=0)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tokenizer, a preference file (60 rows) and a scored file (20 rows)."""
    root = tmp_path_factory.mktemp("task")
    return {"tokenizer": train_tokenizer(root),
            "pairs": write_jsonl(generate_preference_rows(RULE, 60), root / "pairs.jsonl"),
            "scored": write_jsonl(generate_scored_rows(RULE, 20), root / "scored.jsonl")}


def test_round_trip(task, tmp_path):
    inputs = [task["pairs"], task["scored"]]
    stats = preprocess(inputs, task["tokenizer"], tmp_path / "ds", ReadOptions())
    tok = load_tokenizer(task["tokenizer"])
    expected = load_jsonl(inputs, tok)
    ds = ValueDataset(tmp_path / "ds")
    assert len(ds) == 140 and stats.samples == 140 and stats.pairs == 60 and stats.scored == 20
    assert ds.metadata["num_pairs"] == 60 and ds.metadata["stats"] == stats.as_dict()
    assert ds.metadata["vocab_size"] == 256 and ds.metadata["tokenizer"] == str(task["tokenizer"])
    assert [ds[i] for i in range(len(ds))] == expected.samples
    assert ds.pairs().tolist() == [list(p) for p in expected.pairs]

    batch = collate([ds[i] for i in range(len(ds))], seq_length=24, pad_id=ds.pad_id)
    assert batch["tokens"].shape == (140, 24) and batch["tokens"].dtype == torch.int64
    assert batch["response_mask"].dtype == torch.bool and batch["rewards"].dtype == torch.float32
    for b, s in enumerate(expected.samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        assert batch["tokens"][b, :p + r].tolist() == s.prompt_ids + s.response_ids
        assert (batch["tokens"][b, p + r:] == 0).all()
        assert batch["response_mask"][b].nonzero().flatten().tolist() == list(range(p, p + r))
        assert (batch["prompt_lengths"][b], batch["response_lengths"][b]) == (p, r)
        assert batch["rewards"][b] == pytest.approx(s.reward)
    rows = [json.loads(line) for line in task["scored"].read_text().splitlines()]
    assert batch["rewards"][120:].tolist() == pytest.approx([r["score"] for r in rows])
    assert batch["rewards"][:120].tolist() == [1.0, -1.0] * 60


def test_cli_options_and_tool_script(task, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(task["pairs"].read_text() + "not json\n")
    stats = preprocess_main(["--input", str(bad), "--input", str(task["scored"]),
                             "--tokenizer", str(task["tokenizer"]), "--output",
                             str(tmp_path / "ds"), "--max-length", "10", "--length-mode",
                             "truncate", "--skip-bad-rows", "--chosen-reward", "2",
                             "--rejected-reward", "-3"])
    ds = ValueDataset(tmp_path / "ds")
    assert stats.bad_rows == {"invalid_json": 1} and stats.truncated_samples > 0
    truncated = [ds[i].truncated for i in range(len(ds))]
    assert sum(truncated) == stats.truncated_samples
    assert max(len(ds[i].prompt_ids) + len(ds[i].response_ids) for i in range(len(ds))) == 10
    assert ds[0].reward == 2.0 and ds[1].reward == -3.0
    assert ds.metadata["options"]["length_mode"] == "truncate"

    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input",
                           str(task["scored"]), "--tokenizer", str(task["tokenizer"]),
                           "--output", str(tmp_path / "tool")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["samples"] == 20 and len(ValueDataset(tmp_path / "tool")) == 20


def test_preprocess_errors_leave_no_files(task, tmp_path):
    with pytest.raises(DataError, match="every row was filtered or skipped"):
        preprocess([task["pairs"]], task["tokenizer"], tmp_path / "ds", ReadOptions(max_length=2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(task["pairs"].read_text() + "[1]\n")
    with pytest.raises(DataError, match=rf"{bad}:61: expected a JSON object"):
        preprocess([bad], task["tokenizer"], tmp_path / "ds", ReadOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_dataset_errors(task, tmp_path):
    with pytest.raises(DataError, match=r"ds.json does not exist.*tools/preprocess_data.py"):
        ValueDataset(tmp_path / "ds")
    preprocess([task["scored"]], task["tokenizer"], tmp_path / "ds", ReadOptions())
    meta = tmp_path / "ds.json"
    meta.write_text(meta.read_text().replace('"version": 1', '"version": 0'))
    with pytest.raises(DataError, match="version 0, expected .* version 1; preprocess"):
        ValueDataset(tmp_path / "ds")
    meta.write_text(meta.read_text().replace('"version": 0', '"version": 1'))
    with open(tmp_path / "ds.bin", "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(DataError, match=r"tokens on disk, but the metadata says"):
        ValueDataset(tmp_path / "ds")


def test_check_tokenizer(task, tmp_path):
    preprocess([task["scored"]], task["tokenizer"], tmp_path / "ds", ReadOptions())
    ds = ValueDataset(tmp_path / "ds")
    ds.check_tokenizer(load_tokenizer(task["tokenizer"]))
    other = load_tokenizer(train_tokenizer(tmp_path / "other", vocab_size=200))
    with pytest.raises(DataError, match=r"does not match tokenizer .*other.*vocab_size 256 vs 200"):
        ds.check_tokenizer(other)


def test_collate_rejects_overlong_samples(task):
    sample = load_jsonl([task["pairs"]], load_tokenizer(task["tokenizer"])).samples[0]
    total = len(sample.prompt_ids) + len(sample.response_ids)
    with pytest.raises(DataError, match=rf"sample 0 of the batch has {total} tokens.*"
                                        rf"> seq_length {total - 1}"):
        collate([sample], seq_length=total - 1, pad_id=0)


def test_collate_masks_only_the_main_response_after_context(task):
    tok = load_tokenizer(task["tokenizer"])
    prompt_ids, response_ids = encode_pair(tok, "apple dog", "egg fig")
    sample = Sample(prompt_ids, response_ids, reward=1.0)
    conditioned = add_trajectory_context(sample, [("kite", "lemon"), ("nut", "pear")], tok)
    batch = collate([sample, conditioned], seq_length=128, pad_id=tok.pad_id)
    # The context adds to the prompt only: same response length, same masked tokens.
    assert batch["response_lengths"].tolist() == [3, 3]
    assert batch["prompt_lengths"].tolist() == [3, conditioned.response_start]
    start = conditioned.response_start
    assert batch["response_mask"][1].nonzero().flatten().tolist() == [start, start + 1, start + 2]
    assert batch["tokens"][1, start:start + 3].tolist() == response_ids


def take(sampler, steps):
    return list(itertools.islice(iter(sampler), steps))


def test_sampler_partitions_global_batches():
    ranks = [DistributedBatchSampler(50, 12, r, 3, seed=7) for r in range(3)]
    steps = [take(s, 8) for s in ranks]  # 4 steps per epoch (2 samples dropped), 2 epochs
    assert all(len(batch) == 4 for rank in steps for batch in rank)
    global_batches = [sum((steps[r][k] for r in range(3)), []) for k in range(8)]
    epoch0, epoch1 = sum(global_batches[:4], []), sum(global_batches[4:], [])
    assert len(set(epoch0)) == len(set(epoch1)) == 48  # no repeats within an epoch
    assert epoch0 != epoch1  # a fresh permutation per epoch
    assert ranks[0].consumed_samples == 96
    assert take(DistributedBatchSampler(50, 12, 0, 3, seed=7), 8) == steps[0]
    assert take(DistributedBatchSampler(50, 12, 0, 3, seed=8), 8) != steps[0]


@pytest.mark.parametrize("stop", [1, 3, 4, 9])
def test_sampler_resume_reproduces_uninterrupted_run(stop):
    for rank in range(2):
        full = take(DistributedBatchSampler(30, 8, rank, 2, seed=1), 12)
        first = DistributedBatchSampler(30, 8, rank, 2, seed=1)
        head = take(first, stop)
        resumed = DistributedBatchSampler(30, 8, rank, 2, seed=1,
                                          consumed_samples=first.consumed_samples)
        assert head + take(resumed, 12 - stop) == full


def test_sampler_errors():
    with pytest.raises(ValueError, match="global_batch_size=10 must be a positive multiple of "
                                         "the data-parallel size 4"):
        DistributedBatchSampler(100, 10, 0, 4, seed=0)
    with pytest.raises(ValueError, match="3 samples, fewer than one global batch"):
        DistributedBatchSampler(3, 4, 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"dp_rank=2 is outside \[0, 2\)"):
        DistributedBatchSampler(10, 4, 2, 2, seed=0)
    with pytest.raises(ValueError, match="consumed_samples=6 must be a non-negative multiple"):
        DistributedBatchSampler(10, 4, 0, 2, seed=0, consumed_samples=6)


def test_pairs_are_matched_by_id(task, tmp_path):
    """pairs() relies on pair ids, not on chosen and rejected samples being adjacent."""
    tok = load_tokenizer(task["tokenizer"])
    samples = load_jsonl([task["pairs"], task["scored"]], tok).samples
    shuffled = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
    write_dataset(tmp_path / "ds", shuffled, tok, dict)
    ds = ValueDataset(tmp_path / "ds")
    pairs = ds.pairs()
    assert pairs.shape == (60, 2)
    assert [ds[c].pair_id for c, _ in pairs] == list(range(60))
    for c, r in pairs:
        assert ds[c].chosen and not ds[r].chosen and ds[c].pair_id == ds[r].pair_id
        assert ds[c].prompt_ids == ds[r].prompt_ids and ds[c].reward > ds[r].reward


def test_token_cache_is_keyed_by_path_content_options_and_tokenizer(task, tmp_path):
    """Two files named x.jsonl in different folders, an edited file and other options each get
    their own cache entry; an unchanged file reuses its entry."""
    from megatron_dvpo.data.preprocess import open_dataset

    cache = tmp_path / "cache"
    (tmp_path / "train").mkdir()
    (tmp_path / "eval").mkdir()
    train = write_jsonl(generate_preference_rows(RULE, 48, seed=1), tmp_path / "train/x.jsonl")
    held_out = write_jsonl(generate_preference_rows(RULE, 4, seed=2), tmp_path / "eval/x.jsonl")
    options = ReadOptions()
    assert len(open_dataset(train, task["tokenizer"], cache, options).pairs()) == 48
    assert len(open_dataset(held_out, task["tokenizer"], cache, options).pairs()) == 4
    entries = sorted(p.name for p in cache.glob("*.json"))
    assert len(entries) == 2
    again = open_dataset(train, task["tokenizer"], cache, options)
    assert again.prefix.endswith(entries[0][:-5]) or again.prefix.endswith(entries[1][:-5])
    assert len(list(cache.glob("*.json"))) == 2  # reused, not rebuilt
    write_jsonl(generate_preference_rows(RULE, 6, seed=3), train)  # edited in place
    assert len(open_dataset(train, task["tokenizer"], cache, options).pairs()) == 6
    short = open_dataset(train, task["tokenizer"], cache, ReadOptions(max_length=12))
    assert short.metadata["options"]["max_length"] == 12
    assert len(list(cache.glob("*.json"))) == 4
    assert not list(cache.glob("*.lock")) and not list(cache.glob("*.error"))


def test_token_cache_is_built_by_one_process(task, tmp_path):
    """Three processes open the same uncached file at once: one tokenizes, all see it; a bad
    row is reported by every process, from the one that tokenized."""
    script = ("import sys; from megatron_dvpo.data.preprocess import open_dataset; "
              "from megatron_dvpo.data.preference import ReadOptions, DataError\n"
              "try:\n"
              "    d = open_dataset(sys.argv[1], sys.argv[2], sys.argv[3], ReadOptions())\n"
              "    print(len(d))\n"
              "except DataError as e:\n"
              "    print('error:', e)\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(task["pairs"].read_text() + "{not json\n")
    for data, expected in ((task["pairs"], "120"), (bad, "error: ")):
        procs = [subprocess.Popen([sys.executable, "-c", script, str(data), str(task["tokenizer"]),
                                   str(tmp_path / "cache")], stdout=subprocess.PIPE, text=True)
                 for _ in range(3)]
        outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
        assert all(o.startswith(expected) for o in outputs), outputs
    assert all(f"{bad}:61: invalid JSON" in o for o in outputs), outputs
    assert not list((tmp_path / "cache").glob("*.lock"))
