"""HF tokenizer directories, built offline from a trained SentencePiece model, and the chat-form
preference rows that need their chat template."""

import json

import pytest

from megatron_dvpo.data.preference import DataError, ReadOptions, load_jsonl
from megatron_dvpo.data.synthetic import WORDS, train_tokenizer
from megatron_dvpo.data.tokenizer import (HFTokenizer, TokenizerError, export_hf_tokenizer,
                                          load_tokenizer)

# Renders the BOS itself, as real chat templates (Llama 3, ...) do.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} "
            "{% endfor %}{% if add_generation_prompt %}assistant{% endif %}")
# Refuses a system turn, as some real templates do.
STRICT = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}"
          "{% endif %}" + TEMPLATE)
TEXTS = ["apple dog", "gold red blue green zebra", "xyz applebanana", "a b c"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    sp_path = train_tokenizer(root / "sp")
    return {"sp": load_tokenizer(sp_path),
            "chat": load_tokenizer(export_hf_tokenizer(sp_path, root / "chat", TEMPLATE)),
            "plain": load_tokenizer(export_hf_tokenizer(sp_path, root / "plain")),
            "strict": load_tokenizer(export_hf_tokenizer(sp_path, root / "strict", STRICT))}


def test_hf_directory_matches_sentencepiece(tokenizers):
    sp, hf = tokenizers["sp"], tokenizers["chat"]
    assert isinstance(hf, HFTokenizer)
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (2, 3, 0, 256)
    for text in TEXTS + list(WORDS):
        assert hf.encode(text) == sp.encode(text)
        assert hf.decode(hf.encode(text)) == text
    assert hf.decode([2, *hf.encode("apple"), 3, 0]) == "apple"


def test_hf_directory_errors(tmp_path):
    with pytest.raises(TokenizerError, match=rf"directory {tmp_path} holds none of "
                                             rf"tokenizer.json, .*SentencePiece model file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=rf"cannot load an HF tokenizer from directory "
                                             rf"{tmp_path}: .*; expected a SentencePiece"):
        load_tokenizer(tmp_path)


def test_chat_rows_use_the_template(tokenizers, tmp_path):
    tok = tokenizers["chat"]
    prefix = [{"role": "system", "content": "gold"}, {"role": "user", "content": "apple dog"}]
    row = {"chosen": prefix + [{"role": "assistant", "content": "egg fig"}],
           "rejected": prefix + [{"role": "assistant", "content": "zebra"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row) + "\n")
    data = load_jsonl([path], tok)
    chosen, rejected = data.samples
    rendered = tok.apply_chat_template(prefix, add_generation_prompt=True)
    assert rendered == "<s>system gold user apple dog assistant"
    # The template's BOS is kept and not doubled; the prompt is the shared prefix only.
    assert chosen.prompt_ids == tok.encode(rendered) == rejected.prompt_ids
    assert chosen.prompt_ids[0] == 2 and chosen.prompt_ids.count(2) == 1
    assert tok.decode(chosen.prompt_ids) == "system gold user apple dog assistant"
    assert chosen.response_ids == tok.encode("egg fig") + [3]
    assert rejected.response_ids == tok.encode("zebra") + [3]
    assert (chosen.reward, rejected.reward, data.pairs) == (1.0, -1.0, [(0, 1)])


def test_chat_rows_without_a_template_fail_clearly(tokenizers, tmp_path):
    messages = [{"role": "user", "content": "apple"}]
    for name in ("plain", "sp"):
        with pytest.raises(TokenizerError, match="has no chat template; chat-form rows need"):
            tokenizers[name].apply_chat_template(messages)
    row = {"chosen": messages + [{"role": "assistant", "content": "dog"}],
           "rejected": messages + [{"role": "assistant", "content": "egg"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(TokenizerError, match="plain has no chat template"):
        load_jsonl([path], tokenizers["plain"])


def test_rows_the_template_refuses_are_bad_rows(tokenizers, tmp_path):
    def row(first_role):
        prefix = [{"role": first_role, "content": "gold"}]
        return {"chosen": prefix + [{"role": "assistant", "content": "egg"}],
                "rejected": prefix + [{"role": "assistant", "content": "fig"}]}

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row("user")) + "\n" + json.dumps(row("system")) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: the chat template of .*strict rejected the "
                                        "messages: no system turns"):
        load_jsonl([path], tokenizers["strict"])
    data = load_jsonl([path], tokenizers["strict"], ReadOptions(skip_bad_rows=True))
    assert data.stats.bad_rows == {"bad_chat": 1} and data.stats.pairs == 1


def test_rollout_prompts_tokenize_like_gvm_inputs(tokenizers, tmp_path):
    """A chat prompt the rollout samples from is the same token sequence the GVM was trained
    on: one BOS (the template's), whether the row is a prompt row or a preference row."""
    from megatron_dvpo.data.prompts import load_prompts

    tok = tokenizers["chat"]
    prefix = [{"role": "user", "content": "apple dog"}]
    pref = tmp_path / "pairs.jsonl"
    pref.write_text(json.dumps({"chosen": prefix + [{"role": "assistant", "content": "egg"}],
                                "rejected": prefix + [{"role": "assistant", "content": "fig"}]})
                    + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": prefix}) + "\n"
                       + json.dumps({"messages": prefix + [{"role": "assistant",
                                                            "content": "egg"}]}) + "\n")
    gvm_prompt = load_jsonl([pref], tok).samples[0].prompt_ids
    rollout = [p.ids for p in load_prompts(prompts, tok, 64)[0]]
    assert rollout == [gvm_prompt, gvm_prompt]
    assert gvm_prompt.count(tok.bos_id) == 1
    # a plain-text prompt gets the BOS the data layer adds, once
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "apple dog"}) + "\n")
    assert load_prompts(plain, tok, 64)[0][0].ids == [tok.bos_id, *tok.encode("apple dog")]


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "user"}], "must be a non-empty list of {role: str, content: str}"),
    (["hello"], "must be a non-empty list of {role: str, content: str}"),
    ([{"role": "user", "content": 3}], "must be a non-empty list of {role: str, content: str}"),
    ([], "must be a non-empty list"),
    ([{"role": "assistant", "content": "hi"}], "only an assistant turn"),
])
def test_bad_messages_rows_are_named(tokenizers, tmp_path, messages, problem):
    from megatron_dvpo.data.prompts import load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"messages": messages})
                    + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: .*{problem}".replace("{", r"\{")
                       .replace("}", r"\}")):
        load_prompts(path, tokenizers["chat"], 64)
