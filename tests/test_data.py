"""Tokenizer loading and JSONL parsing: exact BOS/EOS boundaries, every row form, bad rows,
length handling and trajectory conditioning (docs/algorithm.md §1)."""

import json
from collections import Counter

import pytest
import sentencepiece

from megatron_dvpo.data.preference import (DataError, ReadOptions, Sample,
                                           add_trajectory_context, encode_pair, fit_length,
                                           load_jsonl)
from megatron_dvpo.data.synthetic import WORDS, train_tokenizer
from megatron_dvpo.data.tokenizer import TokenizerError, load_tokenizer

BOS, EOS, PAD = 2, 3, 0


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_tokenizer(tmp_path_factory.mktemp("tok")))


def write_rows(path, rows):
    """Rows are dicts (dumped as JSON), or text or bytes (written as they are)."""
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
             for r in rows]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_sentencepiece_tokenizer(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (BOS, EOS, PAD, 256)
    ids = tok.encode("apple dog zebra")
    assert len(ids) == 3 and BOS not in ids and EOS not in ids
    assert tok.decode(ids) == "apple dog zebra"
    assert tok.decode([BOS, *ids, EOS, PAD]) == "apple dog zebra"  # specials dropped
    with pytest.raises(TokenizerError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_load_tokenizer_errors(tmp_path):
    forms = r"SentencePiece model file \(\*\.model\) or an HF tokenizer directory"
    with pytest.raises(TokenizerError, match=rf"{tmp_path}/nope.model does not exist.*{forms}"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(TokenizerError, match=rf"vocab.txt is not a \.model file.*{forms}"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"cannot read SentencePiece model .*broken.model"):
        load_tokenizer(tmp_path / "broken.model")


def train_sentencepiece(path, **special_ids):
    """A tiny SentencePiece model with chosen special ids (-1 disables one)."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(WORDS)] * 20), model_prefix=str(path / "sp"),
        model_type="char", minloglevel=2, **special_ids)
    return path / "sp.model"


def test_tokenizer_without_bos_or_pad(tmp_path):
    """Qwen-style: no BOS, so prompts start with text (and truncation keeps that first token);
    no pad, so padding uses EOS."""
    tok = load_tokenizer(train_sentencepiece(tmp_path, bos_id=-1, pad_id=-1, eos_id=2, unk_id=0))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 2, 2)
    prompt_ids, response_ids = encode_pair(tok, "dog", "egg")
    assert prompt_ids == tok.encode("dog") and response_ids == tok.encode("egg") + [2]
    assert fit_length(prompt_ids, response_ids, 3) == (prompt_ids[:1], response_ids[:2], True)


def test_tokenizer_without_eos_is_refused(tmp_path):
    with pytest.raises(TokenizerError, match=r"sp.model has no EOS token"):
        load_tokenizer(train_sentencepiece(tmp_path, eos_id=-1))


@pytest.mark.parametrize("prompt,response", [
    ("apple dog", "zebra"), ("gold red blue green", "egg fig grape house ice jam"),
    ("xyz unknown letters", "applebanana mixed up"), ("a", "b c")])
def test_encode_pair_boundary_is_exact(tok, prompt, response):
    prompt_ids, response_ids = encode_pair(tok, prompt, response)
    assert prompt_ids[0] == BOS and BOS not in prompt_ids[1:]
    assert response_ids[-1] == EOS and EOS not in response_ids[:-1]
    # No token dropped or merged across the boundary; both halves decode back exactly.
    assert prompt_ids[1:] + response_ids[:-1] == tok.encode(prompt) + tok.encode(response)
    assert tok.decode(prompt_ids) == prompt and tok.decode(response_ids) == response
    assert len(prompt_ids) + len(response_ids) == len(tok.encode(prompt)) + len(
        tok.encode(response)) + 2


def test_every_row_form(tok, tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [
        {"prompt": "apple dog", "chosen": "egg", "rejected": "fig gold"},
        "",
        {"question": "red sun", "response_j": "tree", "response_k": "water yak"},
        {"prompt": "kite", "response": "lemon mango", "score": 0.25},
        "   ",
        {"value_question": "nut", "value_response": "pear", "rewards": [-0.5]},
        {"value_question": "rose", "value_response": "blue", "rewards": 2},
    ])
    data = load_jsonl([path], tok)
    ids = {w: tok.encode(w)[0] for w in WORDS}
    got = [(s.prompt_ids, s.response_ids, s.reward, s.pair_id, s.chosen) for s in data.samples]
    assert got == [
        ([BOS, ids["apple"], ids["dog"]], [ids["egg"], EOS], 1.0, 0, True),
        ([BOS, ids["apple"], ids["dog"]], [ids["fig"], ids["gold"], EOS], -1.0, 0, False),
        ([BOS, ids["red"], ids["sun"]], [ids["tree"], EOS], 1.0, 1, True),
        ([BOS, ids["red"], ids["sun"]], [ids["water"], ids["yak"], EOS], -1.0, 1, False),
        ([BOS, ids["kite"]], [ids["lemon"], ids["mango"], EOS], 0.25, -1, False),
        ([BOS, ids["nut"]], [ids["pear"], EOS], -0.5, -1, False),
        ([BOS, ids["rose"]], [ids["blue"], EOS], 2.0, -1, False),
    ]
    assert data.pairs == [(0, 1), (2, 3)]
    assert data.stats.as_dict() == {"rows": 5, "pairs": 2, "scored": 3, "samples": 7,
                                    "filtered_rows": 0, "truncated_samples": 0, "bad_rows": {}}


def test_configurable_pair_rewards(tok, tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    data = load_jsonl([path], tok, ReadOptions(chosen_reward=0.5, rejected_reward=0.0))
    assert [s.reward for s in data.samples] == [0.5, 0.0]


GOOD = {"prompt": "apple", "chosen": "dog", "rejected": "egg"}
CHAT_USER = [{"role": "user", "content": "apple"}]
BAD_ROWS = {
    "invalid_json": ('{"prompt": "apple", "chosen": ', r"invalid JSON"),
    "bad_utf8": (b'{"prompt": "\xff"}', r"invalid JSON: 'utf-8' codec can't decode"),
    "not_object": ('["apple", "dog"]', r"expected a JSON object, got list"),
    "missing_keys": ({"prompt": "apple", "chosen": "dog"},
                     r"keys \['chosen', 'prompt'\] match no accepted row form.*question"),
    "wrong_type": ({"prompt": 3, "chosen": "dog", "rejected": "egg"},
                   r"'prompt' must be a string, got int"),
    "empty": ({"question": "apple", "response_j": "  ", "response_k": "egg"},
              r"'response_j' is empty"),
    "bad_score": ({"prompt": "apple", "response": "dog", "score": True},
                  r"'score' must be a finite number"),
    "bad_rewards": ({"value_question": "a", "value_response": "b", "rewards": [1, 2]},
                    r"'rewards' must be a finite number or a one-element list"),
    "chat_text_without_prompt": ({"chosen": "dog", "rejected": "egg"},
                                 r"'chosen' is text, so the row needs a 'prompt' key"),
    "chat_prefix": ({"chosen": CHAT_USER + [{"role": "assistant", "content": "dog"}],
                     "rejected": [{"role": "user", "content": "fig"},
                                  {"role": "assistant", "content": "egg"}]},
                    r"'chosen' and 'rejected' must share a non-empty message prefix"),
    "chat_role": ({"chosen": CHAT_USER + [{"role": "user", "content": "dog"}],
                   "rejected": CHAT_USER + [{"role": "user", "content": "egg"}]},
                  r"the final 'chosen' message must have role 'assistant', got 'user'"),
    "chat_messages": ({"chosen": [{"role": "user"}], "rejected": CHAT_USER},
                      r"'chosen' must be a non-empty list of \{role: str, content: str\}"),
}
REASONS = {"invalid_json": "invalid_json", "bad_utf8": "invalid_json", "not_object": "not_object",
           "missing_keys": "missing_keys", "wrong_type": "wrong_type", "empty": "empty",
           "bad_score": "wrong_type", "bad_rewards": "wrong_type",
           "chat_text_without_prompt": "missing_keys", "chat_prefix": "bad_chat",
           "chat_role": "bad_chat", "chat_messages": "wrong_type"}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_names_file_and_line(tok, tmp_path, kind):
    row, message = BAD_ROWS[kind]
    path = write_rows(tmp_path / "rows.jsonl", [GOOD, "", row, GOOD])  # the bad row is line 3
    with pytest.raises(DataError, match=rf"^{path}:3: {message}.*skip_bad_rows"):
        load_jsonl([path], tok)


def test_bad_rows_skipped_and_counted(tok, tmp_path):
    path = write_rows(tmp_path / "rows.jsonl",
                      [GOOD] + [row for row, _ in BAD_ROWS.values()] + [GOOD])
    data = load_jsonl([path], tok, ReadOptions(skip_bad_rows=True))
    assert data.stats.bad_rows == Counter(REASONS.values())
    assert data.stats.rows == len(BAD_ROWS) + 2
    assert data.stats.pairs == 2 and data.pairs == [(0, 1), (2, 3)]


def test_missing_input_file(tok, tmp_path):
    with pytest.raises(DataError, match=rf"input file {tmp_path}/none.jsonl does not exist"):
        load_jsonl([tmp_path / "none.jsonl"], tok)


def test_length_filter_drops_whole_rows(tok, tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [
        {"prompt": "apple dog", "chosen": "egg", "rejected": "fig"},  # 3 + 2 tokens each
        {"prompt": "apple dog", "chosen": "egg", "rejected": "fig gold"},  # rejected: 3 + 3
        {"prompt": "apple dog egg", "response": "fig", "score": 1.0},  # 4 + 2
    ])
    data = load_jsonl([path], tok, ReadOptions(max_length=5))
    assert data.stats.filtered_rows == 2 and data.stats.truncated_samples == 0
    assert len(data.samples) == 2 and data.pairs == [(0, 1)]
    assert all(len(s.prompt_ids) + len(s.response_ids) <= 5 for s in data.samples)


def test_length_truncate_cuts_prompt_left_then_response_right(tok, tmp_path):
    prompt = tok.encode("apple dog egg fig")
    response = tok.encode("gold red blue")
    path = write_rows(tmp_path / "rows.jsonl", [
        {"prompt": "apple dog egg fig", "chosen": "gold red blue", "rejected": "sun"},
        {"prompt": "apple", "response": "gold red blue", "score": 0.5},
    ])
    data = load_jsonl([path], tok, ReadOptions(max_length=6, length_mode="truncate"))
    chosen, rejected, scored = data.samples
    # chosen: 5 + 4 tokens; the three oldest prompt words go, BOS and the response stay.
    assert chosen.prompt_ids == [BOS, prompt[-1]] and chosen.response_ids == response + [EOS]
    assert chosen.truncated and chosen.response_ids[-1] == EOS
    # rejected: 5 + 2 tokens; only the oldest prompt word goes.
    assert rejected.prompt_ids == [BOS] + prompt[1:] and rejected.truncated
    assert rejected.response_ids == tok.encode("sun") + [EOS]
    # scored: 2 + 4 tokens fit.
    assert scored.prompt_ids == [BOS, tok.encode("apple")[0]] and not scored.truncated
    assert data.stats.truncated_samples == 2

    data = load_jsonl([path], tok, ReadOptions(max_length=3, length_mode="truncate"))
    chosen, rejected, scored = data.samples
    # Even the BOS-only prompt is too long: the response loses its end, EOS included.
    assert chosen.prompt_ids == [BOS] and chosen.response_ids == response[:2]
    assert rejected.prompt_ids == [BOS] and rejected.response_ids == tok.encode("sun") + [EOS]
    assert scored.prompt_ids == [BOS] and scored.response_ids == response[:2]
    assert [s.truncated for s in data.samples] == [True, True, True]
    assert data.stats.truncated_samples == 3 and data.stats.filtered_rows == 0


def test_fit_length_without_limit():
    assert fit_length([BOS, 7], [8, EOS], None) == ([BOS, 7], [8, EOS], False)


def test_read_options_validation():
    with pytest.raises(ValueError, match="length_mode must be 'filter' or 'truncate'"):
        ReadOptions(length_mode="cut")
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        ReadOptions(max_length=1)


def test_trajectory_context(tok):
    prompt_ids, response_ids = encode_pair(tok, "apple dog", "egg fig")
    sample = Sample(prompt_ids, response_ids, reward=1.0)
    examples = [("kite", "lemon"), ("nut", "pear rose")]
    conditioned = add_trajectory_context(sample, examples, tok)
    context = conditioned.prompt_ids[:conditioned.context_len]
    assert context[0] == BOS and conditioned.prompt_ids.count(BOS) == 1
    assert conditioned.prompt_ids[conditioned.context_len:] == prompt_ids[1:]
    assert conditioned.response_ids == response_ids
    assert conditioned.response_start == len(conditioned.prompt_ids)
    assert all(w in tok.decode(context) for w in ("kite", "lemon", "nut", "pear rose"))
    assert add_trajectory_context(sample, [], tok) is sample


def test_demonstration_rows_are_for_sft_only(tok, tmp_path):
    from megatron_dvpo.data.preference import load_jsonl

    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps({"prompt": "apple", "response": "egg fig"}) + "\n")
    with pytest.raises(DataError, match=r"demos.jsonl:1: a \{prompt, response\} row has no "
                                        r"'score'"):
        load_jsonl([path], tok)
    (sample,) = load_jsonl([path], tok, ReadOptions(allow_unscored=True)).samples
    assert sample.response_ids == tok.encode("egg fig") + [tok.eos_id]
