import hashlib

import pytest

from data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TEXT = "héllo wörld — 世界 🙂\nprint('ok')\n"


def train_tiny_bpe(path, special_tokens=("<|endoftext|>",), vocab_size=300):
    """A byte-level BPE trained here, so no tokenizer is ever downloaded; saved as a tokenizer.json at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 20, "def f(x):\n    return x + 1\n" * 50], trainer)
    tok.save(str(path))
    return str(path)


def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids + [tok.eos_id]) == TEXT  # EOS is not a byte: dropped on decode
    assert (tok.name, tok.vocab_size, tok.eos_id) == ("byte", 257, 256)
    assert tok.identity == {"kind": "byte", "vocab_size": 257, "eos_id": 256}


def test_hf_tokenizer_round_trip_and_identity(tmp_path):
    path = train_tiny_bpe(tmp_path / "tokenizer.json")
    tok = HFTokenizer(path)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())  # merges were learned
    assert tok.eos_token == "<|endoftext|>" and tok.eos_id == tok._tok.token_to_id("<|endoftext|>")
    assert all(0 <= i < tok.vocab_size for i in ids)
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert tok.identity == {"kind": "hf", "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                            "eos_token": "<|endoftext|>", "sha256": sha}


def test_hf_eos_choice(tmp_path):
    path = train_tiny_bpe(tmp_path / "tokenizer.json", special_tokens=("</s>", "<pad>"))
    assert HFTokenizer(path).eos_token == "</s>"  # found among the common names
    assert HFTokenizer(path, eos_token="<pad>").eos_token == "<pad>"
    with pytest.raises(ValueError, match="--eos-token"):
        HFTokenizer(path, eos_token="<nope>")
    bare = train_tiny_bpe(tmp_path / "bare.json", special_tokens=())
    with pytest.raises(ValueError, match="--eos-token"):
        HFTokenizer(bare)


def test_load_tokenizer(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    path = train_tiny_bpe(tmp_path / "tokenizer.json")
    assert load_tokenizer(path).identity == load_tokenizer(str(tmp_path)).identity  # a directory works too
    with pytest.raises(FileNotFoundError, match="missing.json.*nothing is downloaded"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="byte tokenizer"):
        load_tokenizer("byte", eos_token="</s>")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_tokenizer(str(tmp_path / "broken.json"))
