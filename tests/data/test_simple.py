import json
import os

import numpy as np
import pytest
import torch

from data.simple import (Loader, TokenFile, ValLoader, check_tokenizer, check_vocab, main, prepare, read_meta,
                         token_dtype, write_token_dir)
from data.tokenizer import ByteTokenizer
from tests.data.test_tokenizer import train_tiny_bpe

BYTE = ByteTokenizer()
SEQ = 8


def make_corpus(root):
    """Three text documents plus files prepare must skip (binary, empty, invalid UTF-8, hidden)."""
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("first document\n")
    (root / "sub" / "b.py").write_text("def f():\n    return 'ü'\n")
    (root / "c.md").write_text("# third 世界\n")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return ["first document\n", "# third 世界\n", "def f():\n    return 'ü'\n"]  # sorted walk order: a, c, sub/b


def encoded(text):
    return BYTE.encode(text) + [BYTE.eos_id]


def test_prepare_small_corpus(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    meta = prepare([str(tmp_path / "corpus")], str(tmp_path / "out"), val_fraction=0.5, quiet=True)
    # val_fraction 0.5 puts every 2nd document (index 1) in val.
    assert meta["documents"] == 3
    assert meta["files_skipped"] == {"unreadable": 0, "binary": 2, "empty": 1}
    assert meta["tokenizer"] == BYTE.identity and meta["dtype"] == "uint16"
    assert meta["command"].startswith("python -m data.simple --input")
    train, val = TokenFile(str(tmp_path / "out"), "train"), TokenFile(str(tmp_path / "out"), "val")
    assert train.tokens.tolist() == encoded(docs[0]) + encoded(docs[2])
    assert val.tokens.tolist() == encoded(docs[1])
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (2, 1)
    assert meta == read_meta(str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.bin", "val.bin"]  # no temp files left


def test_val_split_rule(tmp_path):
    for i in range(10):
        (tmp_path / f"d{i}.txt").write_text(f"doc {i}\n")
    files = [str(tmp_path / f"d{i}.txt") for i in range(10)]
    meta = prepare(files, str(tmp_path / "a"), val_fraction=0.2, quiet=True)
    assert TokenFile(str(tmp_path / "a"), "val").tokens.tolist() == encoded("doc 4\n") + encoded("doc 9\n")
    # Too few documents for the rule to pick one: the last document becomes val.
    meta = prepare(files[:3], str(tmp_path / "b"), val_fraction=0.01, quiet=True)
    assert TokenFile(str(tmp_path / "b"), "val").tokens.tolist() == encoded("doc 2\n")
    meta = prepare(files[:3], str(tmp_path / "c"), val_fraction=0, quiet=True)
    assert meta["splits"]["val"]["tokens"] == 0 and len(TokenFile(str(tmp_path / "c"), "val")) == 0


def test_prepare_stdlib_and_determinism(tmp_path):
    a = prepare(["stdlib"], str(tmp_path / "a"), max_bytes=200_000, quiet=True)
    b = prepare(["stdlib"], str(tmp_path / "b"), max_bytes=200_000, quiet=True)
    assert a["documents"] > 1 and a["splits"]["val"]["documents"] >= 1
    assert 200_000 <= a["bytes"] < 200_000 + 2_000_000  # the cap keeps the last document whole
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (tmp_path / "b" / f"{split}.bin").read_bytes()
    assert {k: v for k, v in a.items() if k != "command"} == {k: v for k, v in b.items() if k != "command"}
    tokens = TokenFile(str(tmp_path / "a")).tokens
    assert len(tokens) == a["splits"]["train"]["tokens"] and tokens.max() == BYTE.eos_id
    assert "import" in BYTE.decode(tokens[:5000].tolist())


def test_prepare_with_hf_tokenizer(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    tok_path = train_tiny_bpe(tmp_path / "tokenizer.json")
    meta = prepare([str(tmp_path / "corpus")], str(tmp_path / "out"), tok_path, val_fraction=0, quiet=True)
    assert meta["tokenizer"]["kind"] == "hf" and meta["dtype"] == "uint16"
    check_tokenizer(str(tmp_path / "out"), tok_path)
    with pytest.raises(ValueError, match="data.tokenizer"):
        check_tokenizer(str(tmp_path / "out"), "byte")
    assert meta["splits"]["train"]["documents"] == len(docs)


class WideTokenizer:
    """Ids above 65535, to force uint32 files."""
    name, vocab_size, eos_id = "wide", 70_000, 69_999
    identity = {"kind": "wide", "vocab_size": 70_000, "eos_id": 69_999}

    def encode(self, text):
        return [65_536 + b for b in text.encode()]


def test_dtype_choice(tmp_path):
    assert (token_dtype(257), token_dtype(2**16), token_dtype(2**16 + 1)) == ("uint16", "uint16", "uint32")
    (tmp_path / "x.txt").write_text("abc")
    meta = prepare([str(tmp_path / "x.txt")], str(tmp_path / "out"), WideTokenizer(), val_fraction=0, quiet=True)
    assert meta["dtype"] == "uint32"
    assert os.path.getsize(tmp_path / "out" / "train.bin") == 4 * 4
    assert TokenFile(str(tmp_path / "out")).tokens.tolist() == [65_536 + 97, 65_536 + 98, 65_536 + 99, 69_999]


def test_corrupt_directories_are_detected(tmp_path):
    make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    prepare([str(tmp_path / "corpus")], str(out), quiet=True)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(out / "train.bin") - 2)
    with pytest.raises(ValueError, match="train.bin is .* bytes but meta.json records .* truncated"):
        TokenFile(str(out))
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "dtype": "float32"}))
    with pytest.raises(ValueError, match="unknown dtype 'float32'"):
        TokenFile(str(out))
    with pytest.raises(ValueError, match="no split 'test'"):
        TokenFile(str(out), "test")
    os.remove(out / "meta.json")
    with pytest.raises(FileNotFoundError, match="meta.json not found.*python -m data.simple"):
        TokenFile(str(out))


def test_failed_prepare_keeps_previous_data(tmp_path):
    make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    before = prepare([str(tmp_path / "corpus")], str(out), quiet=True)

    class Failing(ByteTokenizer):
        calls = 0

        def encode(self, text):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("killed mid-prepare")
            return super().encode(text)

    with pytest.raises(RuntimeError):
        prepare([str(tmp_path / "corpus")], str(out), Failing(), quiet=True)
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    assert read_meta(str(out)) == before and len(TokenFile(str(out))) == before["splits"]["train"]["tokens"]


def test_check_vocab(tmp_path):
    make_corpus(tmp_path / "corpus")
    prepare([str(tmp_path / "corpus")], str(tmp_path / "out"), quiet=True)
    assert check_vocab(str(tmp_path / "out"), 257) == 257
    assert check_vocab(read_meta(str(tmp_path / "out")), 512) == 257
    with pytest.raises(ValueError, match="model.vocab_size to at least 257"):
        check_vocab(str(tmp_path / "out"), 256)


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--input", "--output", "--tokenizer", "--eos-token", "--val-fraction", "--max-bytes", "stdlib"):
        assert option in out
    make_corpus(tmp_path / "corpus")
    main(["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "out"), "--max-bytes", "1K"])
    err = capsys.readouterr().err
    assert "prepare: 6 files" in err and "3 documents" in err
    assert read_meta(str(tmp_path / "out"))["max_bytes"] == 1000
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out2")])


# ---------------------------------------------------------------------------------------------------- loaders


def arange_dir(tmp_path, windows, val_windows=4):
    """Token i = i, so the window of a batch row is inputs[row, 0] // SEQ and labels = inputs + 1."""
    ident = {"kind": "test", "vocab_size": 2**20, "eos_id": 2**20 - 1}
    path = str(tmp_path / f"arange{windows}")
    write_token_dir(path, {"train": np.arange(windows * SEQ + 1), "val": np.arange(val_windows * SEQ + 1)}, ident)
    return path


def windows_of(inputs):
    return (inputs[:, 0] // SEQ).tolist()


def test_batch_shapes_and_label_shift(tmp_path):
    prepare(["stdlib"], str(tmp_path / "out"), max_bytes=50_000, quiet=True)
    inputs, labels = next(Loader(str(tmp_path / "out"), seq_len=SEQ, micro_batch=3))
    assert inputs.shape == labels.shape == (3, SEQ) and inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    inputs, labels = next(Loader(arange_dir(tmp_path, 10), seq_len=SEQ, micro_batch=3))
    assert torch.equal(labels, inputs + 1) and all(w * SEQ == x for w, x in zip(windows_of(inputs), inputs[:, 0]))


@pytest.mark.parametrize("dp_size", [1, 2, 3])
@pytest.mark.parametrize("windows", [12, 13])
def test_epoch_coverage(tmp_path, dp_size, windows):
    path, mb = arange_dir(tmp_path, windows), 2
    loaders = [Loader(path, seq_len=SEQ, micro_batch=mb, dp_rank=r, dp_size=dp_size, seed=3) for r in range(dp_size)]
    steps = windows // (dp_size * mb)  # global batches that fit in one epoch
    seen = [w for _ in range(steps) for ld in loaders for w in windows_of(next(ld)[0])]
    assert len(seen) == len(set(seen)) == steps * dp_size * mb and set(seen) <= set(range(windows))
    if windows % (dp_size * mb) == 0:
        assert sorted(seen) == list(range(windows))
    assert seen != sorted(seen)  # shuffled
    assert all(ld.consumed == steps * dp_size * mb for ld in loaders)


def test_exact_resume(tmp_path):
    path = arange_dir(tmp_path, 13)
    loader = Loader(path, seq_len=SEQ, micro_batch=3, dp_rank=1, dp_size=2, seed=7)
    for _ in range(5):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [next(loader) for _ in range(4)]
    resumed = Loader(path, seq_len=SEQ, micro_batch=3, dp_rank=1, dp_size=2, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch == 2 and resumed.consumed == 30
    for (x, y), (x2, y2) in zip(expected, (next(resumed) for _ in range(4))):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_resume_errors(tmp_path):
    path = arange_dir(tmp_path, 13)
    state = Loader(path, seq_len=SEQ, micro_batch=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1.*train.seed"):
        Loader(path, seq_len=SEQ, micro_batch=2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len=8.*model.seq_len"):
        Loader(path, seq_len=4, micro_batch=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="different data"):
        Loader(arange_dir(tmp_path, 14), seq_len=SEQ, micro_batch=2, seed=1).load_state_dict(state)


def test_dp_split_is_the_same_global_stream(tmp_path):
    path = arange_dir(tmp_path, 13)
    one = Loader(path, seq_len=SEQ, micro_batch=4, seed=5)
    two = [Loader(path, seq_len=SEQ, micro_batch=2, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    for step in range(10):  # crosses three epoch boundaries
        if step == 6:  # and resuming dp=1 state onto a dp=4 layout keeps the stream
            two = [Loader(path, seq_len=SEQ, micro_batch=1, dp_rank=r, dp_size=4, seed=5) for r in range(4)]
            for ld in two:
                ld.load_state_dict(one.state_dict())
        x, y = next(one)
        parts = [next(ld) for ld in two]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_epoch_crossing(tmp_path):
    path = arange_dir(tmp_path, 13)
    loader = Loader(path, seq_len=SEQ, micro_batch=4, seed=0)
    seen = []
    for _ in range(3):
        seen += windows_of(next(loader)[0])
    assert loader.epoch == 0 and seen == loader.permutation(0)[:12].tolist()
    crossing = windows_of(next(loader)[0])  # global samples 12..15: last of epoch 0, first three of epoch 1
    assert loader.epoch == 1
    assert crossing == [loader.permutation(0)[12]] + loader.permutation(1)[:3].tolist()
    assert loader.permutation(0).tolist() != loader.permutation(1).tolist()
    seen += crossing
    for _ in range(100):  # ~30 more epochs: every window equally often over whole epochs
        seen += windows_of(next(loader)[0])
    counts = np.bincount(seen[: 13 * 30], minlength=13)
    assert (counts == 30).all()
    other_seed = Loader(path, seq_len=SEQ, micro_batch=4, seed=1)
    assert other_seed.permutation(0).tolist() != loader.permutation(0).tolist()


def test_val_batches(tmp_path):
    path = arange_dir(tmp_path, 13, val_windows=9)
    val = ValLoader(path, seq_len=SEQ, micro_batch=2)
    first = [windows_of(x) for x, _ in val.batches(3)]
    assert first == [[0, 1], [2, 3], [4, 5]] and first == [windows_of(x) for x, _ in val.batches(3)]
    assert val.num_batches == 4 and len(list(val.batches(100))) == 4
    ranks = [ValLoader(path, seq_len=SEQ, micro_batch=1, dp_rank=r, dp_size=2) for r in range(2)]
    split = [torch.cat(xs) for xs in zip(*[[x for x, _ in ld.batches(3)] for ld in ranks])]
    assert all(torch.equal(a, b) for a, b in zip(split, [x for x, _ in val.batches(3)]))
    with pytest.raises(ValueError, match="fewer than one global batch.*--val-fraction"):
        ValLoader(path, seq_len=SEQ, micro_batch=5, dp_size=2)


def test_loader_errors(tmp_path):
    path = arange_dir(tmp_path, 2)
    with pytest.raises(ValueError, match=r"fewer than seq_len\+1 = 33.*--max-bytes"):
        Loader(path, seq_len=32, micro_batch=1)
    with pytest.raises(ValueError, match="dp_rank"):
        Loader(path, seq_len=SEQ, micro_batch=1, dp_rank=2, dp_size=2)
