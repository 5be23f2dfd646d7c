import functools
import http.server
import logging
import os
import shutil
import threading

import numpy as np
import pytest
import torch

from data.shards import MANIFEST, ShardError, write_shards
from data.stream import Loader, ValLoader, check_tokenizer, check_vocab, cu_seqlens, open_manifests
from tests.data.synthetic import EOS, global_stream, make_dataset

SEQ, MICRO, WINDOWS = 8, 2, 48  # 48 windows: whole steps for dp 1, 2, 3, 4 and whole shuffle blocks of 4
TOKENS = WINDOWS * SEQ + 1  # one epoch is exactly 48 windows: every token is an input exactly once


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    docs = make_dataset(path, TOKENS, val_tokens=200)
    return str(path), docs


def loader(path, **kw):
    args = dict(seq_len=SEQ, micro_batch=MICRO, seed=3, shuffle_window=4)
    return Loader(path, **{**args, **kw})


def run_ranks(path, dp, steps, *, state=None, **kw):
    """[rank][step] micro-batches of `steps` steps on every rank of dp, optionally resumed from `state`."""
    out = []
    for r in range(dp):
        ld = loader(path, dp_rank=r, dp_size=dp, **kw)
        if state is not None:
            ld.load_state_dict(state)
        out.append([next(ld) for _ in range(steps)])
    return out


def non_eos(t: torch.Tensor) -> np.ndarray:
    flat = t.reshape(-1).numpy()
    return np.sort(flat[flat != EOS])


def test_one_epoch_covers_every_token_exactly_once_then_reshuffles(data):
    path, docs = data
    everything = np.sort(np.concatenate([d[:-1] for d in docs]))
    ld = loader(path)
    epoch0 = torch.cat([next(ld)[0] for _ in range(WINDOWS // MICRO)])
    assert ld.epoch == 0 and ld.consumed == WINDOWS
    epoch1 = torch.cat([next(ld)[0] for _ in range(WINDOWS // MICRO)])
    assert ld.epoch == 1
    assert np.array_equal(non_eos(epoch0), everything)
    # Windows run on across epochs: the second 48 start at the first epoch's last token, so they miss the second
    # epoch's last two tokens (an EOS and at most one other), which open the third.
    seen = non_eos(epoch1)
    assert len(np.unique(seen)) == len(seen) >= len(everything) - 1 and np.isin(seen, everything).all()
    assert not torch.equal(epoch0, epoch1)  # a new shard, document and window order each epoch


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_ranks_and_workers_read_the_same_global_stream(data, workers):
    path, _ = data
    reference = run_ranks(path, 1, WINDOWS // MICRO)
    ref_inputs, ref_labels = global_stream(reference, 0), global_stream(reference, 1)
    assert torch.equal(ref_inputs[:, 1:], ref_labels[:, :-1])
    for dp in (1, 2, 3):
        got = run_ranks(path, dp, WINDOWS // (MICRO * dp), num_workers=workers)
        assert torch.equal(global_stream(got, 0), ref_inputs), (dp, workers)
        assert torch.equal(global_stream(got, 1), ref_labels), (dp, workers)


def test_exact_resume_mid_epoch(data):
    path, _ = data
    straight = loader(path, num_workers=2)
    batches = [next(straight) for _ in range(10)]
    first = loader(path)
    [next(first) for _ in range(4)]
    state = first.state_dict()
    for workers in (0, 2):
        resumed = loader(path, num_workers=workers)
        resumed.load_state_dict(state)
        for want in batches[4:]:
            got = next(resumed)
            assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_resume_on_another_dp_continues_the_global_stream(data):
    path, _ = data
    reference = global_stream(run_ranks(path, 1, 30), 0)  # 60 samples, into the second epoch
    before = loader(path, dp_rank=1, dp_size=2)
    [next(before) for _ in range(3)]
    state = before.state_dict()
    assert state["consumed"] == 12
    for dp, steps in ((1, 24), (4, 6)):
        after = global_stream(run_ranks(path, dp, steps, state=state), 0)
        assert torch.equal(after, reference[12:60]), dp


def test_fewer_shards_than_readers(tmp_path):
    make_dataset(tmp_path, TOKENS, shard_size=1 << 20)
    assert len(os.listdir(tmp_path)) == 2  # one shard + manifest
    reference = global_stream(run_ranks(str(tmp_path), 1, 6), 0)
    got = global_stream(run_ranks(str(tmp_path), 3, 2, num_workers=2), 0)
    assert torch.equal(got, reference)


def test_seed_changes_order_not_content(data):
    path, _ = data
    a = torch.cat([next(loader(path, seed=1))[0] for _ in range(1)])
    b = torch.cat([next(loader(path, seed=2))[0] for _ in range(1)])
    assert not torch.equal(a, b)
    la, lb = loader(path, seed=1), loader(path, seed=2)
    ea = torch.cat([next(la)[0] for _ in range(WINDOWS // MICRO)])
    eb = torch.cat([next(lb)[0] for _ in range(WINDOWS // MICRO)])
    assert np.array_equal(non_eos(ea), non_eos(eb))


def test_document_boundaries(data):
    path, docs = data
    first_of = {int(t): int(d[0]) for d in docs for t in d[:-1]}
    ld = loader(path, return_doc_boundaries=True)
    for _ in range(5):
        inputs, labels, pos = next(ld)
        assert pos.shape == inputs.shape
        for row, p in zip(inputs, pos):
            for i in range(SEQ - 1):
                assert p[i + 1] == (0 if row[i] == EOS else p[i] + 1)
            if row[0] != EOS:
                assert row[0] - p[0] == first_of[int(row[0])]  # the first token continues its document's count
        cu, longest = cu_seqlens(pos)
        assert cu[0] == 0 and cu[-1] == inputs.numel() and cu.dtype == torch.int32
        lengths = cu[1:] - cu[:-1]
        assert int(lengths.min()) > 0 and int(lengths.max()) == longest


def test_state_is_checked(data, tmp_path):
    path, _ = data
    state = loader(path).state_dict()
    with pytest.raises(ValueError, match="train.seed"):
        loader(path, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="model.seq_len"):
        Loader(path, seq_len=4, micro_batch=2, seed=3, shuffle_window=4).load_state_dict(state)
    make_dataset(tmp_path, TOKENS, seed=9)
    with pytest.raises(ValueError, match="different data"):
        loader(str(tmp_path)).load_state_dict(state)


def test_val_loader_is_fixed_and_split_across_ranks(data):
    path, _ = data
    whole = ValLoader(path, seq_len=SEQ, micro_batch=4)
    assert whole.num_batches == (200 - 1) // SEQ // 4
    once, twice = list(whole.batches(3)), list(whole.batches(3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(once, twice))
    halves = [list(ValLoader(path, seq_len=SEQ, micro_batch=2, dp_rank=r, dp_size=2).batches(3)) for r in range(2)]
    assert torch.equal(global_stream(halves, 0), torch.cat([b[0] for b in once]))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_manifest_urls(data):
    path, _ = data
    manifest = os.path.join(os.path.abspath(path), MANIFEST)
    by_dir = next(loader(path))
    handler = functools.partial(_QuietHandler, directory=path)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        urls = ["file://" + manifest, f"pipe:cat {manifest}"]  # shards: 'manifest.json' replaced by their names
        urls += [f"http://127.0.0.1:{server.server_address[1]}/{MANIFEST}"] if shutil.which("curl") else []
        for url in urls:
            assert all(torch.equal(a, b) for a, b in zip(by_dir, next(loader(url)))), url
        server.shutdown()


def test_seeking_far_opens_only_the_shards_it_needs(data):
    path, _ = data
    reference = loader(path)
    [next(reference) for _ in range(500)]
    want = next(reference)
    far = loader(path)
    far.load_state_dict(reference.state_dict() | {"consumed": reference.consumed - 2})
    assert all(torch.equal(a, b) for a, b in zip(next(far), want))
    shards = len([n for n in os.listdir(path) if n.endswith(".tar")])
    assert len(far.stream._index) <= 2 < shards  # two windows of 8 tokens: one or two shards opened, not all


# ---------------------------------------------------------------------------------------------------- bad input


def _copy(data, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(data[0], dst)
    return dst


def _read_epoch(ld):
    return [next(ld) for _ in range(WINDOWS // MICRO)]


def test_truncated_shard_fails_naming_shard_and_offset(data, tmp_path):
    dst = _copy(data, tmp_path)
    shard = dst / "train-000003.tar"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1500)
    with pytest.raises(ShardError, match=rf"train-000003\.tar at byte {size - 1500}.*truncated"):
        loader(str(dst))  # local sizes are checked before training starts
    url = "file://" + str(dst / MANIFEST)  # no size check before reading a URL: the reader catches it
    with pytest.raises(ShardError, match=rf"train-000003\.tar at byte {size - 1500}: .*truncated"):
        _read_epoch(loader(url))
    with open(shard, "r+b") as f:
        f.truncate(1024 + 512 + 20)  # inside the second member's data
    with pytest.raises(ShardError, match=r"train-000003\.tar at byte 1024: truncated: member b'0+\d+\.tokens"):
        _read_epoch(loader(url))


def test_corrupt_shard_fails_naming_shard_and_offset(data, tmp_path):
    dst = _copy(data, tmp_path)
    with open(dst / "train-000002.tar", "r+b") as f:
        f.seek(512 * 2 + 5)  # inside the name field of the second member's header (1 header + 1 data block in)
        f.write(b"X")
    with pytest.raises(ShardError, match=r"train-000002\.tar at byte 1024: corrupt tar header"):
        _read_epoch(loader(str(dst)))
    with open(dst / "train-000002.tar", "r+b") as f:
        f.seek(512 * 2 + 5)
        f.write(b"0")  # undo, then flip a token instead: only the checksum can tell
        f.seek(512 + 2)
        f.write(b"\xff")
    with pytest.raises(ShardError, match=r"train-000002\.tar: sha256 differs"):
        _read_epoch(loader(str(dst)))


def test_skip_bad_shards_and_count_them(data, tmp_path, caplog):
    dst = _copy(data, tmp_path)
    with open(dst / "train-000001.tar", "r+b") as f:
        f.truncate(700)
    with open(dst / "train-000004.tar", "r+b") as f:
        f.seek(512 + 2)
        f.write(b"\xff\xff")
    with caplog.at_level(logging.WARNING, logger="data"):
        ld = loader(str(dst), on_error="skip")
        batches = _read_epoch(ld) + _read_epoch(ld)
    assert sorted(os.path.basename(n) for n in ld.skipped_shards) == ["train-000001.tar", "train-000004.tar"]
    assert "2 skipped so far" in caplog.text
    assert all(b[0].shape == (MICRO, SEQ) for b in batches)


def test_vocab_and_tokenizer_mismatch(data, tmp_path):
    path, _ = data
    manifests = open_manifests(path)
    assert check_vocab(manifests, 1 << 20) == 1 << 20
    with pytest.raises(ValueError, match="vocab_size"):
        check_vocab(manifests, 50_000)
    write_shards(str(tmp_path), {"train": [np.array([104, 105, 256])]}, {"kind": "byte", "vocab_size": 257,
                                                                         "eos_id": 256})
    check_tokenizer(open_manifests(str(tmp_path)), "byte")
    with pytest.raises(ValueError, match="data.tokenizer"):
        check_tokenizer(manifests, "byte")


def test_not_a_shard_directory(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="data.prepare"):
        loader(str(tmp_path))


def test_synthetic_batches_are_the_global_stream_and_resume_exactly():
    from data.stream import SyntheticLoader

    whole = SyntheticLoader(100, seq_len=16, micro_batch=4, seed=3)
    first, second = next(whole), next(whole)  # global samples 0-3, 4-7
    assert first[0].shape == (4, 16) and torch.equal(first[0][:, 1:], first[1][:, :-1])
    ranks = [SyntheticLoader(100, seq_len=16, micro_batch=2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    assert torch.equal(torch.cat([next(r)[0] for r in ranks]), first[0])  # the same samples on any dp_size
    resumed = SyntheticLoader(100, seq_len=16, micro_batch=4, seed=3)
    resumed.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(resumed)[0], second[0])
    with pytest.raises(ValueError, match="seed 4"):
        SyntheticLoader(100, seq_len=16, micro_batch=4, seed=4).load_state_dict(whole.state_dict())


# ---------------------------------------------------------------------------------------------------- issue 16


def test_token_ids_beyond_the_vocabulary_name_shard_id_and_vocab_size(tmp_path):
    docs = [np.array([5, 6, EOS]), np.array([7, 999, EOS]), np.array([8, 1000, EOS]), np.array([9, EOS])]
    identity = {"kind": "test", "vocab_size": 2000, "eos_id": EOS}
    write_shards(str(tmp_path), {"train": docs}, identity, shard_size=1)  # one document per shard
    with pytest.raises(ShardError, match=r"train-000002\.tar at byte 0: document 0 \(member 0000000002\.tokens\.u16\) "
                                         r"holds token id 1000, beyond model\.vocab_size=1000"):
        [next(Loader(str(tmp_path), seq_len=2, micro_batch=2, vocab_size=1000, shuffle_window=1)) for _ in range(4)]
    ld = Loader(str(tmp_path), seq_len=2, micro_batch=2, vocab_size=1001, shuffle_window=1)  # 1000 is the last id
    assert int(torch.cat([next(ld)[0] for _ in range(4)]).max()) == 1000
    skipping = Loader(str(tmp_path), seq_len=2, micro_batch=1, vocab_size=1000, on_error="skip")
    rows = torch.cat([next(skipping)[0] for _ in range(8)])
    assert int(rows.max()) < 1000 and [os.path.basename(n) for n in skipping.skipped_shards] == ["train-000002.tar"]
    # Ids beyond the manifest's own vocabulary: the shard does not match its tokenizer, whatever the model.
    write_shards(str(tmp_path / "m"), {"train": docs}, {"kind": "test", "vocab_size": 1000, "eos_id": EOS})
    for model_vocab in (None, 1000, 5000):
        named = rf" \(model.vocab_size={model_vocab}\)" if model_vocab else ""
        with pytest.raises(ShardError, match=rf"token id 1000, beyond the 1000-token vocabulary of its manifest"
                                             rf"{named}\. The shard does not hold what its manifest says"):
            [next(Loader(str(tmp_path / "m"), seq_len=2, micro_batch=2, vocab_size=model_vocab)) for _ in range(4)]



def test_the_trainer_gives_its_loaders_the_model_vocab_size(tmp_path):
    from pretrain.config import build_config
    from pretrain.train import build_loaders

    byte = {"kind": "byte", "vocab_size": 257, "eos_id": 256}
    write_shards(str(tmp_path), {"train": [np.array([104, 105, 256])] * 8, "val": [np.array([300, 256])] * 8}, byte)
    cfg = build_config({}, {"model": {"vocab_size": 320, "seq_len": 2},
                            "data": {"path": str(tmp_path), "tokenizer": "byte"},
                            "train": {"micro_batch": 2, "global_batch": 2, "eval_interval": 10}})
    train, val = build_loaders(cfg, dp_rank=0, dp_size=1)
    assert int(next(train)[0].max()) == 256
    with pytest.raises(ShardError, match=r"val-000000\.tar.*token id 300, beyond the 257-token vocabulary of its "
                                         r"manifest \(model\.vocab_size=320\)"):
        next(val.batches(1))


def test_the_trainer_reads_each_manifest_once(tmp_path, monkeypatch):
    """The vocabulary and tokenizer checks, the training loader and the validation loader share one reading of each
    manifest (they read it 6 times before: each check, and the loader's stream, unlisted-shard warning, fingerprint
    and the validation loader's stream); a separate data.val_path is read once more."""
    from data import shards
    from pretrain.config import build_config
    from pretrain.train import build_loaders

    byte = {"kind": "byte", "vocab_size": 257, "eos_id": 256}
    for name in ("a", "b"):
        write_shards(str(tmp_path / name), {"train": [np.array([104, 105, 256])] * 8,
                                            "val": [np.array([106, 256])] * 8}, byte)
    read = []
    opening = shards.Manifest.__init__

    def counting(manifest, path):
        read.append(os.path.basename(path))
        opening(manifest, path)

    monkeypatch.setattr(shards.Manifest, "__init__", counting)

    def reads(**data) -> list[str]:
        read.clear()
        cfg = build_config({}, {"model": {"vocab_size": 257, "seq_len": 2}, "data": {"tokenizer": "byte", **data},
                                "train": {"micro_batch": 2, "global_batch": 2, "eval_interval": 10}})
        train, val = build_loaders(cfg, dp_rank=0, dp_size=1)
        next(train), next(val.batches(1))
        return sorted(read)

    assert reads(path=str(tmp_path / "a")) == ["a"]
    assert reads(path=str(tmp_path / "a"), val_path=str(tmp_path / "b")) == ["a", "b"]
    assert reads(blend=f"1:{tmp_path / 'a'},1:{tmp_path / 'b'}") == ["a", "b"]


def test_a_shard_missing_from_the_manifest_is_named(data, tmp_path, caplog):
    dst = _copy(data, tmp_path)
    shutil.copy(dst / "train-000001.tar", dst / "train-000099.tar")  # e.g. added by hand after prepare
    with caplog.at_level(logging.WARNING, logger="data"):
        next(loader(str(dst)))
    assert "train-000099.tar" in caplog.text and "not in its manifest" in caplog.text
    assert "train-000001.tar" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data"):
        next(loader(data[0]))
    assert caplog.text == ""


def test_shards_skipped_in_worker_processes_are_counted(data, tmp_path):
    dst = _copy(data, tmp_path)
    with open(dst / "train-000002.tar", "r+b") as f:  # the size still matches: only reading finds it
        f.seek(512 + 2)
        f.write(b"\xff\xff")
    ld = loader(str(dst), on_error="skip", num_workers=2)
    _read_epoch(ld)
    assert [os.path.basename(n) for n in ld.skipped_shards] == ["train-000002.tar"]
