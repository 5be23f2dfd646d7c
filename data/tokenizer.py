"""Tokenizers for the minimal data path: bytes by default, or a local Hugging Face `tokenizer.json`.

    tok = load_tokenizer("byte")                      # or load_tokenizer("path/to/tokenizer.json")
    ids = tok.encode("héllo") + [tok.eos_id]
    tok.identity                                      # JSON-able; recorded in meta.json, compared at train time

Nothing is ever downloaded: a tokenizer is either built in or a file on disk.
"""

from __future__ import annotations

import hashlib
import os

DEFAULT_EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS = 256: no file, no vocabulary mismatch, works on any text."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        # EOS (and anything a model samples past 255) is not a byte; invalid UTF-8 from sampling is replaced.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    @property
    def identity(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A local `tokenizer.json` read with the `tokenizers` library; EOS is `eos_token` or the first common one found."""

    def __init__(self, path: str, eos_token: str | None = None):
        from tokenizers import Tokenizer

        self.path = str(path)
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises plain Exception for malformed JSON
            raise ValueError(f"could not load tokenizer {self.path!r}: {e}; expected a Hugging Face tokenizer.json") from e
        with open(self.path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        candidates = (eos_token,) if eos_token else DEFAULT_EOS_TOKENS
        found = [(t, self._tok.token_to_id(t)) for t in candidates if self._tok.token_to_id(t) is not None]
        if not found:
            hint = f"token {eos_token!r} is not in it" if eos_token else f"none of {list(DEFAULT_EOS_TOKENS)} is in it"
            raise ValueError(f"tokenizer {self.path!r}: {hint}; name its end-of-document token with --eos-token")
        self.eos_token, self.eos_id = found[0]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.name = f"hf:{os.path.basename(self.path)}"

    def encode(self, text: str) -> list[int]:
        # No post-processor specials (BOS/CLS): documents are delimited only by the EOS the caller appends.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def identity(self) -> dict:
        # The path is left out on purpose: the same file copied elsewhere is the same tokenizer.
        return {"kind": "hf", "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "eos_token": self.eos_token, "sha256": self.sha256}


def load_tokenizer(spec: str, eos_token: str | None = None):
    """`"byte"`, a path to a `tokenizer.json`, or a directory holding one."""
    if spec == "byte":
        if eos_token:
            raise ValueError("--eos-token applies only to a tokenizer.json; the byte tokenizer's EOS is always 256")
        return ByteTokenizer()
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file {path!r} not found; give 'byte' or the path of a local Hugging Face tokenizer.json "
            "(nothing is downloaded)")
    return HFTokenizer(path, eos_token)
