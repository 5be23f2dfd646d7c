"""Tokenizers: bytes by default, a local Hugging Face `tokenizer.json`, or a local `.tiktoken` BPE file.

    tok = load_tokenizer("byte")                      # or "path/to/tokenizer.json", "path/to/cl100k_base.tiktoken"
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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def identity(self) -> dict:
        # The path is left out on purpose: the same file copied elsewhere is the same tokenizer.
        return {"kind": "hf", "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "eos_token": self.eos_token, "sha256": self.sha256}


# Split patterns and special tokens of OpenAI's published .tiktoken files, keyed by the files' sha256 (the hashes
# tiktoken_ext.openai_public checks its downloads against). A .tiktoken file stores only the merge ranks.
_R50K = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
           r"""\s+(?!\S)|\s""")
_O200K = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
])
KNOWN_TIKTOKEN = {
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930": ("r50k_base", _R50K, {"<|endoftext|>": 50256}),
    "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069": ("p50k_base", _R50K, {"<|endoftext|>": 50256}),
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7": (
        "cl100k_base", _CL100K, {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                                 "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d": (
        "o200k_base", _O200K, {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
}


class TiktokenTokenizer:
    """A local `.tiktoken` BPE file (base64 token, rank per line) encoded with the `tiktoken` library.

    OpenAI's published files (r50k, p50k, cl100k, o200k; recognised by sha256) get their own split pattern and
    special tokens. Any other file gets the cl100k split pattern and one special token, `eos_token` (default
    <|endoftext|>), with the first id after the ranks.
    """

    def __init__(self, path: str, eos_token: str | None = None):
        import base64

        import tiktoken

        self.path = str(path)
        with open(self.path, "rb") as f:
            raw = f.read()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        ranks = {}
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError as e:
                    raise ValueError(f"{self.path}:{n}: not a .tiktoken line (base64 token, space, rank): "
                                     f"{line[:80]!r}") from e
        if not ranks:
            raise ValueError(f"{self.path} has no merge ranks; expected a .tiktoken BPE file")
        self.eos_token = eos_token or "<|endoftext|>"
        name, pattern, specials = KNOWN_TIKTOKEN.get(
            self.sha256, (os.path.basename(self.path), _CL100K, {self.eos_token: max(ranks.values()) + 1}))
        if self.eos_token not in specials:
            raise ValueError(f"tokenizer {self.path!r} ({name}) has no special token {self.eos_token!r}; "
                             f"its special tokens are {sorted(specials)}")
        self._enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        self.eos_id = specials[self.eos_token]
        self.vocab_size = self._enc.n_vocab
        self.name = f"tiktoken:{name}"

    def encode(self, text: str) -> list[int]:
        # Special-token text inside a document is ordinary text: only the appended EOS delimits documents.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids) -> str:
        return self._enc.decode(list(ids), errors="replace")

    @property
    def identity(self) -> dict:
        return {"kind": "tiktoken", "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "eos_token": self.eos_token, "sha256": self.sha256}


def load_tokenizer(spec: str, eos_token: str | None = None):
    """`"byte"`, a path to a `tokenizer.json` (or a directory holding one), or a path to a `.tiktoken` file."""
    if spec == "byte":
        if eos_token:
            raise ValueError("--eos-token applies only to a tokenizer.json; the byte tokenizer's EOS is always 256")
        return ByteTokenizer()
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file {path!r} not found; give 'byte', the path of a local Hugging Face tokenizer.json or of "
            "a local .tiktoken file (nothing is downloaded)")
    if path.endswith(".tiktoken"):
        return TiktokenTokenizer(path, eos_token)
    return HFTokenizer(path, eos_token)
