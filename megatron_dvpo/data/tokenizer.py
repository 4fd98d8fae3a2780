"""One small tokenizer interface over SentencePiece models and HF tokenizer directories.

The data layer adds BOS/EOS itself (so the prompt/response boundary is exact), which is why
``encode`` never adds special tokens. Nothing is ever downloaded: HF directories load with
``local_files_only=True``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from megatron_dvpo.errors import InputError

ACCEPTED_FORMS = ("a SentencePiece model file (*.model) or an HF tokenizer directory "
                  "(tokenizer.json / tokenizer_config.json)")
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class TokenizerError(InputError):
    """A tokenizer that cannot be loaded or cannot do what was asked; names the path."""


class ChatTemplateError(TokenizerError):
    """The chat template refused these messages (e.g. roles that do not alternate): a problem
    of the data row, not of the tokenizer."""


class Tokenizer:
    """The subset of a tokenizer the data layer and the policy need.

    ``bos_id`` is None for tokenizers without a BOS token (e.g. Qwen2), in which case prompts get
    no BOS. ``pad_id`` falls back to ``eos_id``: padding is always masked out, so any id works.
    """

    path: str
    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS added."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens dropped."""
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render chat ``messages`` as text with the tokenizer's own chat template."""
        raise TokenizerError(f"tokenizer {self.path} has no chat template; chat-form rows need an "
                             "HF tokenizer directory whose tokenizer_config.json (or "
                             "chat_template.jinja) defines one")

    def _set_special_ids(self, bos: Optional[int], eos: Optional[int], pad: Optional[int]) -> None:
        if eos is None:
            raise TokenizerError(f"tokenizer {self.path} has no EOS token; responses need one")
        self.bos_id, self.eos_id = bos, eos
        self.pad_id = eos if pad is None else pad


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        import sentencepiece

        self.path = path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot read SentencePiece model {path}: {e}; expected "
                                 f"{ACCEPTED_FORMS}") from e
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        # SentencePiece reports a disabled special token as -1.
        self._set_special_ids(*(i if i >= 0 else None
                                for i in (sp.bos_id(), sp.eos_id(), sp.pad_id())))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.path = path
        if not any((Path(path) / name).is_file() for name in HF_FILES):
            raise TokenizerError(f"directory {path} holds none of {', '.join(HF_FILES)}; "
                                 f"expected {ACCEPTED_FORMS}")
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many types for a bad directory
            reason = " ".join(str(e).split())  # its messages span lines
            raise TokenizerError(f"cannot load an HF tokenizer from directory {path}: {reason}; "
                                 f"expected {ACCEPTED_FORMS}") from e
        tok = self._tok
        self.vocab_size = len(tok)  # includes added tokens, which the embedding must cover
        self._set_special_ids(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        if not self._tok.chat_template:
            return super().apply_chat_template(messages, add_generation_prompt)
        try:
            return self._tok.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template of {self.path} rejected the messages: "
                                    f"{e}") from e


def check_vocab(tokenizer: Tokenizer, model_vocab: int, model: str) -> None:
    """Every token id must have an embedding row: a larger tokenizer would feed out-of-range ids
    (an IndexError at TP=1, silent garbage under TP)."""
    if tokenizer.vocab_size > model_vocab:
        raise TokenizerError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but "
                             f"{model} has model.vocab_size={model_vocab}: they must match")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``path``: a SentencePiece ``.model`` file or an HF tokenizer directory."""
    path = Path(path)
    if path.is_dir():
        return HFTokenizer(str(path))
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(str(path))
    what = "is not a .model file" if path.is_file() else "does not exist"
    raise TokenizerError(f"tokenizer path {path} {what}; expected {ACCEPTED_FORMS}")


def export_hf_tokenizer(sp_model: str | Path, out_dir: str | Path,
                        chat_template: Optional[str] = None) -> Path:
    """Save a SentencePiece model as an HF Llama tokenizer directory (with an optional chat
    template), so that models trained on it can ship a tokenizer HF tools load."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        # LlamaTokenizer(vocab_file=...) silently builds an empty vocabulary in transformers 5;
        # from_pretrained on a directory holding tokenizer.model converts it properly.
        shutil.copy(sp_model, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp)
    pad = SentencePieceTokenizer(str(sp_model)).pad_id
    tok.pad_token = tok.convert_ids_to_tokens(pad)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(str(out_dir))
    return Path(out_dir)
