import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data.prepare as prep
from data.prepare import ValRule, prepare
from data.shards import Manifest, Shard
from data.stream import Loader
from data.tokenizer import load_tokenizer
from tests.data.test_tokenizer import train_tiny_bpe

REPO = Path(__file__).resolve().parents[2]


def make_corpus(root: Path) -> list[str]:
    """Every input kind plus files prepare must skip; returns the documents in prepare order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root.mkdir(parents=True)
    lines = [{"text": f"json line {i} " + "é" * (i % 5), "id": i} for i in range(30)]
    (root / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:10]))
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines[10:20])
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(x) + "\n" for x in lines[20:]).encode()))
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(12)]}), root / "d.parquet")
    (root / "e.txt").write_text("a plain text document\n" * 20)
    (root / "f.bin").write_bytes(b"\x00\x01binary")
    (root / "g.txt").write_text("")
    (root / "sub").mkdir()
    (root / "sub" / "h.md").write_text("# nested 世界\n")
    return ([x["text"] for x in lines] + [f"parquet row {i}" for i in range(12)]
            + ["a plain text document\n" * 20, "# nested 世界\n"])


def read_split(out: str, split: str) -> list[list[int]]:
    m = Manifest(out)
    docs = []
    for entry in m.shards(split):
        shard = Shard(m, entry)
        docs += [shard.tokens(d, 0, n).tolist() for d, n in enumerate(shard.lengths)]
    return docs


def byte_ids(text: str) -> list[int]:
    return list(text.encode()) + [256]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "c"
    return root, make_corpus(root)


def without_command(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "command"}


def test_byte_identical_for_any_worker_count(corpus, tmp_path, monkeypatch):
    root, texts = corpus
    monkeypatch.setattr(prep, "BATCH_BYTES", 64)  # many small tasks in flight: they finish out of order
    one = prepare([str(root)], tmp_path / "one", shard_size=3000, val_fraction=0.1, workers=1, quiet=True)
    three = prepare([str(root)], tmp_path / "three", shard_size=3000, val_fraction=0.1, workers=3, quiet=True)
    assert without_command(one) == without_command(three)
    names = sorted(n for n in os.listdir(tmp_path / "one") if n.endswith(".tar"))
    assert len(names) > 4 and names == sorted(n for n in os.listdir(tmp_path / "three") if n.endswith(".tar"))
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "three" / n).read_bytes(), n
    # Content: documents in input order, EOS after each, val = documents 0, 10, 20, … (F = 0.1).
    val = [i for i in range(len(texts)) if ValRule(0.1)(i)]
    assert val == list(range(0, len(texts), 10))
    assert read_split(str(tmp_path / "one"), "val") == [byte_ids(texts[i]) for i in val]
    assert read_split(str(tmp_path / "one"), "train") == [byte_ids(t) for i, t in enumerate(texts) if i not in val]
    assert one["skipped"] == {"unreadable": 0, "binary": 1, "empty": 1, "not_regular": 0}
    assert one["documents"] == len(texts) and one["dtype"] == "uint16" and one["tokenizer"]["kind"] == "byte"
    entry = one["splits"]["train"]["shards"][0]
    assert set(entry) == {"name", "samples", "tokens", "bytes", "sha256"}
    assert one["command"].startswith("python -m data.prepare --input")


def test_shards_read_by_tar_and_webdataset(corpus, tmp_path):
    root, texts = corpus
    prepare([str(root)], tmp_path, shard_size=3000, val_fraction=0, quiet=True)
    shard = str(tmp_path / "train-000000.tar")
    listing = subprocess.run(["tar", "tf", shard], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:2] == ["0000000000.tokens.u16", "0000000001.tokens.u16"]
    raw = subprocess.run(["tar", "xOf", shard, listing[1]], capture_output=True, check=True).stdout
    assert np.frombuffer(raw, "<u2").tolist() == byte_ids(texts[1])
    import webdataset as wds

    samples = list(wds.WebDataset(shard, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [n.split(".")[0] for n in listing]
    assert [np.frombuffer(s["tokens.u16"], "<u2").tolist() for s in samples] == [byte_ids(t) for t in
                                                                                 texts[:len(samples)]]


def test_killed_prepare_resumes_and_keeps_complete_shards(corpus, tmp_path, monkeypatch):
    root, texts = corpus
    out = tmp_path / "out"
    full = prepare([str(root)], out, shard_size=2000, val_fraction=0.1, quiet=True)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    before = {n: (out / n).read_bytes() for n in shards}
    first_inode = (out / shards[0]).stat().st_ino
    # As if killed: no manifest, the last train shard never written, one shard half-written, a temp file left.
    os.remove(out / "manifest.json")
    train = [n for n in shards if n.startswith("train")]
    os.remove(out / train[-1])
    with open(out / train[3], "r+b") as f:
        f.truncate(1000)
    (out / f".{train[-1]}.123.tmp").write_bytes(b"partial")
    with open(out / prep.JOURNAL, "a") as f:
        f.write('{"split": "train", "na')  # a journal line cut short

    tokenized = []
    real = prep.Encoder.__call__
    monkeypatch.setattr(prep.Encoder, "__call__", lambda self, docs: tokenized.extend(docs) or real(self, docs))
    again = prepare([str(root)], out, shard_size=2000, val_fraction=0.1, quiet=True)
    assert again == full
    assert sorted(n for n in os.listdir(out) if not n.startswith(".prepare")) == sorted(shards + ["manifest.json"])
    assert all((out / n).read_bytes() == b for n, b in before.items())
    assert (out / shards[0]).stat().st_ino == first_inode  # kept, not rewritten
    assert 0 < len(tokenized) < len(texts)  # documents of kept shards were not tokenized again

    tokenized.clear()
    assert prepare([str(root)], out, shard_size=2000, val_fraction=0.1, quiet=True) == full
    assert tokenized == []  # complete and intact: nothing to do
    changed = prepare([str(root)], out, shard_size=5000, val_fraction=0.1, quiet=True, overwrite=True)
    assert changed["splits"]["train"]["tokens"] == full["splits"]["train"]["tokens"]
    assert len(changed["splits"]["train"]["shards"]) < len(full["splits"]["train"]["shards"])
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == sorted(
        s["name"] for sp in changed["splits"].values() for s in sp["shards"])  # stale shards removed


def test_hf_and_tiktoken_tokenizers(corpus, tmp_path):
    root, texts = corpus
    for spec in (train_tiny_bpe(tmp_path / "tokenizer.json"), write_tiktoken(tmp_path / "tiny.tiktoken")):
        out = tmp_path / Path(spec).suffix[1:]
        m = prepare([str(root)], out, spec, val_fraction=0, workers=2, quiet=True)
        tok = load_tokenizer(spec)
        assert m["tokenizer"] == tok.identity
        docs = read_split(str(out), "train")
        assert [tok.decode(d[:-1]) for d in docs] == texts and all(d[-1] == tok.eos_id for d in docs)
        assert sum(map(len, docs)) < sum(len(t.encode()) + 1 for t in texts)  # merges were used


def write_tiktoken(path: Path) -> str:
    """A .tiktoken file: the 256 bytes plus a few merges (base64 token, rank per line)."""
    import base64

    merges = [b"  ", b"in", b"on", b"te", b"pa", b"json", b"ar", b"et", b"row", b"parquet"]
    tokens = [bytes([i]) for i in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return str(path)


def test_tiktoken_identity(tmp_path):
    tok = load_tokenizer(write_tiktoken(tmp_path / "t.tiktoken"))
    assert (tok.eos_token, tok.eos_id, tok.vocab_size) == ("<|endoftext|>", 266, 267)
    assert tok.decode(tok.encode("json parquet <|endoftext|>")) == "json parquet <|endoftext|>"
    assert tok.encode("<|endoftext|>") != [tok.eos_id]  # special text inside a document stays text
    assert tok.identity["kind"] == "tiktoken" and len(tok.identity["sha256"]) == 64


def test_stdlib_and_max_bytes(tmp_path):
    m = prepare(["stdlib"], tmp_path, max_bytes=300_000, val_fraction=0.05, quiet=True)
    assert 300_000 <= m["input_bytes"] < 300_000 + 2_000_000
    assert m["splits"]["val"]["documents"] >= 1
    inputs, labels = next(Loader(str(tmp_path), seq_len=64, micro_batch=2))
    assert inputs.shape == (2, 64) and int(inputs.max()) <= 256


def test_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare([str(tmp_path / "nope")], tmp_path / "o", quiet=True)
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: no field 'text'.*--text-key"):
        prepare([str(tmp_path / "x.jsonl")], tmp_path / "o", quiet=True)
    (tmp_path / "y.jsonl").write_text('{"body": "one"}\n\n{"body": ""}\n{"body": "two"}\n')
    m = prepare([str(tmp_path / "y.jsonl")], tmp_path / "o2", text_key="body", val_fraction=0, quiet=True)
    assert m["skipped"]["empty"] == 2 and m["documents"] == 2
    (tmp_path / "z.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"z\.jsonl:2: not valid JSON"):
        prepare([str(tmp_path / "z.jsonl")], tmp_path / "o3", quiet=True)


def test_cli(corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "data.prepare", "--help"], capture_output=True, text=True, env=env)
    for option in ("--input", "--output", "--tokenizer", "--eos-token", "--workers", "--shard-size", "--val-fraction",
                   "--text-key", "--max-bytes", "--quiet", "--overwrite"):
        assert option in out.stdout, option
    root, _ = corpus
    done = subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(root / "a.jsonl"), "--output",
                           str(tmp_path), "--workers", "2", "--shard-size", "2K"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "prepare: 10 documents" in done.stderr and "wrote" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(tmp_path / "nope"), "--output",
                          str(tmp_path)], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "data.prepare: error:" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------------------- issue 16


def test_refuses_an_output_it_did_not_make(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("train-000000.tar", "train-000003.tar", "notes.txt"):
        (out / name).write_bytes(b"the user's own " + name.encode())
    with pytest.raises(FileExistsError, match=r"(?s)mine.*did not write.*notes\.txt.*--overwrite"):
        prepare([str(root)], out, shard_size=2000, quiet=True)
    assert sorted(os.listdir(out)) == ["notes.txt", "train-000000.tar", "train-000003.tar"]  # nothing touched
    assert (out / "train-000003.tar").read_bytes() == b"the user's own train-000003.tar"
    m = prepare([str(root)], out, shard_size=2000, quiet=True, overwrite=True)
    assert read_split(str(out), "train")  # a readable dataset took the shard names
    assert (out / "notes.txt").read_bytes() == b"the user's own notes.txt"  # not a shard name: left alone
    # Prepare's own complete output made with other options is kept unless --overwrite says otherwise.
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match=r"(?s)other options.*shard_size 2000 → 5000.*--overwrite"):
        prepare([str(root)], out, shard_size=5000, quiet=True)
    assert (out / "manifest.json").read_bytes() == before and read_split(str(out), "train")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):  # fails before a shard changes: the old dataset stays
        prepare([str(tmp_path / "bad.jsonl"), str(root)], out, shard_size=5000, quiet=True, overwrite=True)
    assert (out / "manifest.json").read_bytes() == before and read_split(str(out), "train")
    assert prepare([str(root)], out, shard_size=2000, quiet=True) == m  # the same options: nothing to do


def test_output_inside_input_is_not_read_and_survives_a_second_run(corpus, tmp_path):
    import shutil

    root = tmp_path / "corpus"
    shutil.copytree(corpus[0], root)
    first = prepare([str(root)], root / "out", shard_size=2000, quiet=True)
    assert first["documents"] == len(corpus[1])
    assert prepare([str(root)], root / "out", shard_size=2000, quiet=True) == first
    assert Manifest(str(root / "out")).data == first
    with pytest.raises(ValueError, match=r"train-000000\.tar.*inside --output"):
        prepare([str(root / "out" / "train-000000.tar")], root / "out", quiet=True)
    assert Manifest(str(root / "out")).data == first


def _limited_cli(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`python -m data.prepare ARGS` with 2 GiB of address space: a runaway read fails instead of taking the machine."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "data.prepare", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, preexec_fn=limit)


def test_fifos_and_devices_are_skipped_and_reported(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a regular document\n")
    os.mkfifo(src / "b.fifo")  # reading it would wait forever for a writer
    os.symlink("/dev/zero", src / "c.zero")  # reading it would never end
    (src / "d.txt").symlink_to(src / "a.txt")  # a link to a regular file is read
    done = _limited_cli(["--input", str(src), "--output", str(tmp_path / "out"), "--workers", "1",
                         "--val-fraction", "0"], timeout=60)
    assert done.returncode == 0, done.stderr
    assert "skipped 2 input path(s) that are not regular files" in done.stderr and "b.fifo" in done.stderr and "c.zero" in done.stderr
    m = Manifest(str(tmp_path / "out")).data
    assert m["documents"] == 2 and m["skipped"]["not_regular"] == 2
    named = _limited_cli(["--input", str(src / "b.fifo"), "--output", str(tmp_path / "o2")], timeout=60)
    assert named.returncode != 0 and "b.fifo" in named.stderr and "not a regular file" in named.stderr


def test_broken_input_files_are_named(tmp_path):
    (tmp_path / "ok.txt").write_text("fine\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid UTF-8"):
        prepare([str(tmp_path / "ok.txt"), str(tmp_path / "bad.jsonl")], tmp_path / "o1", quiet=True)
    (tmp_path / "plain.jsonl.gz").write_text('{"text": "not compressed"}\n')
    with pytest.raises(ValueError, match=r"plain\.jsonl\.gz: not a valid \.gz file"):
        prepare([str(tmp_path / "plain.jsonl.gz")], tmp_path / "o2", quiet=True)
    with gzip.open(tmp_path / "cut.jsonl.gz", "wb") as f:
        f.write(b'{"text": "line"}\n' * 2000)
    raw = (tmp_path / "cut.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz: not a valid \.gz file.*after line \d+"):
        prepare([str(tmp_path / "cut.jsonl.gz")], tmp_path / "o3", quiet=True)
    (tmp_path / "fake.parquet").write_text("text\nnot a parquet file\n")
    with pytest.raises(ValueError, match=r"fake\.parquet: not a readable Parquet file"):
        prepare([str(tmp_path / "fake.parquet")], tmp_path / "o4", quiet=True)
    for out in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / out / "manifest.json").exists()


def test_data_prepared_with_eos_token_trains(corpus, tmp_path):
    from data.stream import check_tokenizer, open_manifests
    from pretrain.config import build_config
    from pretrain.train import build_loaders

    root, _ = corpus
    for specials, eos in ((("<|endoftext|>", "<sep>"), "<sep>"), (("<doc>",), "<doc>")):
        spec = train_tiny_bpe(tmp_path / f"{eos[1:-1]}.json", special_tokens=specials)
        out = tmp_path / eos[1:-1]
        m = prepare([str(root / "a.jsonl")], out, spec, eos_token=eos, val_fraction=0, quiet=True)
        assert m["tokenizer"]["eos_token"] == eos
        check_tokenizer(open_manifests(str(out)), spec)  # the manifest says which EOS: data.tokenizer alone identifies it
        cfg = build_config({}, {"model": {"vocab_size": m["tokenizer"]["vocab_size"], "seq_len": 8},
                                "data": {"path": str(out), "tokenizer": spec},
                                "train": {"micro_batch": 2, "global_batch": 2, "eval_interval": 0}})
        loader, _ = build_loaders(cfg, dp_rank=0, dp_size=1)
        tokens, labels = next(loader)
        assert tokens.shape == (2, 8) and int(tokens.max()) < m["tokenizer"]["vocab_size"]
    other = train_tiny_bpe(tmp_path / "other.json", special_tokens=("<doc>", "<x>"))
    with pytest.raises(ValueError, match="data.tokenizer"):
        check_tokenizer(open_manifests(str(tmp_path / "doc")), other)  # still a different tokenizer file
