"""Checkpoints: bitwise resume, RNG, keep_last, atomic publish under SIGKILL, checksums, corrupt and unsafe
checkpoints, a full disk, fresh starts beside old checkpoints. Asynchronous saves: test_async_checkpoint.py."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from pretrain import checkpoint as checkpoint_module
from pretrain.checkpoint import CheckpointError, Checkpointer, UnsafeCheckpointError, read_dcp_metadata
from tests.dist import run_distributed

REPO = Path(__file__).resolve().parents[2]
RUN_CONFIG = {"model": {"arch": "tiny", "d_model": 8, "n_layers": 2, "dims": (8, 16)},
              "train": {"steps": 10}, "checkpoint": {"interval": 1}}


@dataclass
class Cfg:
    interval: int = 1
    keep_last: int = 0
    resume: str = "auto"
    async_save: bool = False


def make(seed: int = 0):
    """A tiny model with dropout (so resume depends on the RNG) and a decaying AdamW."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 16))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model, optimizer, steps: int) -> list[float]:
    """Draws data from torch, numpy and python RNGs so each of them must be restored for equal losses."""
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 16, (4, 6))
        scale = float(np.random.rand()) + random.random()
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(1, 1).flatten()) * scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def save_steps(run_dir, steps, cfg=None, model_and_optimizer=None):
    """Train one step before each save; return the checkpointer and the params saved at each step."""
    ck = Checkpointer(cfg or Cfg(), run_dir, run_config=RUN_CONFIG)
    model, opt = model_and_optimizer or make()
    saved = {}
    for step in steps:
        train(model, opt, 1)
        ck.save(step, model=model, optimizer=opt, state={"tokens": 24 * step})
        saved[step] = params(model)
    ck.wait()  # old checkpoints are pruned in the background
    return ck, saved


def test_due():
    ck = Checkpointer(Cfg(interval=5), "unused", run_config=RUN_CONFIG)
    assert [s for s in range(12) if ck.due(s)] == [5, 10]
    assert not any(Checkpointer(Cfg(interval=0), "unused", run_config=RUN_CONFIG).due(s) for s in range(12))


def test_round_trip_is_bitwise(tmp_path):
    model, opt = make()
    train(model, opt, 3)
    ck = Checkpointer(Cfg(), tmp_path, run_config=RUN_CONFIG)
    state = {"scheduler": {"last_epoch": 3, "_last_lr": [0.01]}, "data": {"shard": 2, "offset": 17}}
    path = ck.save(3, model=model, optimizer=opt, state=state)
    ref_losses, ref_params = train(model, opt, 4), params(model)
    ref_opt = opt.state_dict()

    model, opt = make(seed=1)  # different weights, empty optimizer state
    result = ck.load(model=model, optimizer=opt)
    assert result == {"step": 3, "state": state, "path": str(path)}
    assert train(model, opt, 4) == ref_losses
    assert_same(params(model), ref_params)
    for k, v in ref_opt["state"].items():
        assert all(torch.equal(v[n], opt.state_dict()["state"][k][n]) for n in ("step", "exp_avg", "exp_avg_sq"))


def test_rng_states_restored(tmp_path):
    model, opt = make()
    ck = Checkpointer(Cfg(), tmp_path, run_config=RUN_CONFIG)
    ck.save(1, model=model, optimizer=opt, state={})
    draws = torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)]
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    ck.load(model=model, optimizer=opt)
    again = torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)]
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]
    # inside the DCP payload, not a JSON file (and an fsync) per rank
    ckpt = tmp_path / "checkpoints/step_00000001"
    assert "rng.rank_0" in read_dcp_metadata(ckpt).state_dict_metadata
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "meta.json"]


@pytest.mark.gpu
def test_cuda_model_and_rng_round_trip(tmp_path):
    model, _ = make()
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 16, (2, 3), device="cuda")).sum().backward()
    opt.step()
    ck = Checkpointer(Cfg(), tmp_path, run_config=RUN_CONFIG)
    ck.save(1, model=model, optimizer=opt, state={})
    saved, draw = params(model), torch.rand(5, device="cuda")
    model2, _ = make(seed=1)
    model2.cuda()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    ck.load(model=model2, optimizer=opt2)
    assert torch.equal(torch.rand(5, device="cuda"), draw)
    assert_same(params(model2), saved)


def test_keep_last_and_latest(tmp_path):
    save_steps(tmp_path, [1, 2, 3, 4], Cfg(keep_last=2))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    meta = json.loads((ckpts / "step_00000004/meta.json").read_text())
    assert meta["step"] == 4 and meta["complete"] and meta["config"]["model"]["d_model"] == 8


def test_resume_none_and_nothing_to_resume(tmp_path):
    model, opt = make()
    assert Checkpointer(Cfg(), tmp_path, run_config=RUN_CONFIG).load(model=model, optimizer=opt) is None
    save_steps(tmp_path, [1])
    assert Checkpointer(Cfg(resume="none"), tmp_path, run_config=RUN_CONFIG).load(model=model, optimizer=opt) is None


def _delete_payload(d: Path):
    next(d.glob("*.distcp")).unlink()


def _truncate_payload(d: Path):
    f = next(d.glob("*.distcp"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _scramble_payload(d: Path):
    _scramble_payload_of(d, "__0_0.distcp")


def _scramble_payload_of(d: Path, name: str):  # same size, so only reading the tensors finds it
    f = d / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [
    _delete_payload, _truncate_payload, _scramble_payload,
    lambda d: (d / "meta.json").unlink(),
    lambda d: (d / ".metadata").write_bytes(b"\x80\x04garbage"),
], ids=["deleted-distcp", "truncated-distcp", "scrambled-distcp", "no-meta.json", "garbage-metadata"])
def test_broken_newest_checkpoint_is_skipped(tmp_path, caplog, corrupt):
    ck, saved = save_steps(tmp_path, [1, 2])
    corrupt(tmp_path / "checkpoints/step_00000002")
    unfinished = tmp_path / "checkpoints/.tmp-step_00000003-0123abcd"
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"partial")

    model, opt = make(seed=1)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        result = ck.load(model=model, optimizer=opt)
    assert result["step"] == 1
    assert_same(params(model), saved[1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step_00000002" in w for w in warnings), warnings
    assert any(unfinished.name in w for w in warnings), warnings


def test_latest_pointing_nowhere_falls_back_to_newest(tmp_path, caplog):
    ck, saved = save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints/latest").write_text("step_00000009\n")
    model, opt = make(seed=1)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert ck.load(model=model, optimizer=opt)["step"] == 2
    assert "step_00000009" in caplog.text
    assert_same(params(model), saved[2])


def test_explicit_resume_path(tmp_path):
    _, saved = save_steps(tmp_path, [1, 2])
    model, opt = make(seed=1)
    for resume in (str(tmp_path / "checkpoints/step_00000001"), "step_00000001"):
        ck = Checkpointer(Cfg(resume=resume), tmp_path, run_config=RUN_CONFIG)
        assert ck.load(model=model, optimizer=opt)["step"] == 1
        assert_same(params(model), saved[1])
    (tmp_path / "checkpoints/step_00000002/meta.json").unlink()
    ck = Checkpointer(Cfg(resume="step_00000002"), tmp_path, run_config=RUN_CONFIG)
    with pytest.raises(CheckpointError, match="step_00000002 cannot be used: no meta.json"):
        ck.load(model=model, optimizer=opt)


def test_other_model_config_is_refused(tmp_path):
    save_steps(tmp_path, [1])
    other = {**RUN_CONFIG, "model": {**RUN_CONFIG["model"], "d_model": 16, "n_layers": 3}}
    ck = Checkpointer(Cfg(), tmp_path, run_config=other)
    model, opt = make()
    with pytest.raises(CheckpointError) as err:
        ck.load(model=model, optimizer=opt)
    msg = str(err.value)
    assert "step_00000001" in msg and "--checkpoint.resume=none" in msg
    assert "model.d_model=8 in the checkpoint, 16 in this run" in msg
    assert "model.n_layers=2 in the checkpoint, 3 in this run" in msg
    assert "dims" not in msg  # a tuple in the config equals the list JSON gives back


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_metadata_is_refused(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    marker = tmp_path / "pwned"
    bad = tmp_path / "checkpoints/step_00000002"
    (bad / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))

    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle (posix|os)\.system"):
        read_dcp_metadata(bad)
    model, opt = make()
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        Checkpointer(Cfg(resume=str(bad)), tmp_path, run_config=RUN_CONFIG).load(model=model, optimizer=opt)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        result = Checkpointer(Cfg(), tmp_path, run_config=RUN_CONFIG).load(model=model, optimizer=opt)
    assert result["step"] == 1 and "step_00000002" in caplog.text
    assert not marker.exists()


def test_malicious_non_tensor_item_is_refused(tmp_path):
    """DCP stores optimizer hyper-parameters as pickled bytes; they too must not run code on load."""
    marker = tmp_path / "pwned"
    model, opt = make()
    opt.param_groups[0]["evil"] = _Exploit(marker)
    train(model, opt, 1)
    ck = Checkpointer(Cfg(resume="step_00000001"), tmp_path, run_config=RUN_CONFIG)
    ck.save(1, model=model, optimizer=opt, state={})
    model, opt = make()
    opt.param_groups[0]["evil"] = 0  # so that the load asks for the item
    with pytest.raises(CheckpointError, match="(?i)unsupported global (posix|os).system"):
        ck.load(model=model, optimizer=opt)
    assert not marker.exists()


def _save_then_die(run_dir: str) -> None:
    """Child of the SIGKILL test: save step 1, then hang inside the DCP write of step 2 until killed."""
    from torch.distributed.checkpoint import FileSystemWriter

    ck = Checkpointer(Cfg(), run_dir, run_config=RUN_CONFIG)
    model, opt = make()
    train(model, opt, 1)
    ck.save(1, model=model, optimizer=opt, state={"tokens": 24})
    torch.save(model.state_dict(), Path(run_dir) / "step1.pt")
    train(model, opt, 1)

    def hang(self, *args, **kwargs):  # the payload is written, .metadata and meta.json are not
        print("WRITING", flush=True)
        signal.pause()

    FileSystemWriter.finish = hang
    ck.save(2, model=model, optimizer=opt, state={"tokens": 48})


def test_save_killed_midway_keeps_previous_checkpoint(tmp_path, caplog):
    code = f"from tests.pretrain.test_checkpoint import _save_then_die; _save_then_die({str(tmp_path)!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(tmp_path / "child.err", "w") as err:  # a file, not a pipe nobody drains while the child runs
        child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=err)
        try:
            assert "WRITING" in child.stdout.readline(), (tmp_path / "child.err").read_text()
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    ckpts = tmp_path / "checkpoints"
    (unfinished,) = ckpts.glob(".tmp-step_00000002-*")
    assert list(unfinished.glob("*.distcp"))
    assert (ckpts / "latest").read_text().strip() == "step_00000001"

    ck = Checkpointer(Cfg(), tmp_path, run_config=RUN_CONFIG)
    model, opt = make(seed=1)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        result = ck.load(model=model, optimizer=opt)
    assert result["step"] == 1 and result["state"] == {"tokens": 24}
    assert unfinished.name in caplog.text
    ref = torch.load(tmp_path / "step1.pt", weights_only=True)
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())

    train(model, opt, 1)  # training continues; the next save clears the dead one's leftovers
    ck.save(2, model=model, optimizer=opt, state={"tokens": 48})
    assert not unfinished.exists()
    assert (ckpts / "latest").read_text().strip() == "step_00000002"


def test_model_parts(tmp_path):
    """Pipeline stages held by one rank: one optimizer per part, keys by parameter name."""
    def parts(seed):
        model, _ = make(seed)
        stages = [model[:2], model[2:]]
        return model, stages, [torch.optim.AdamW(s.parameters(), lr=1e-2) for s in stages]

    model, stages, opts = parts(0)
    ck = Checkpointer(Cfg(), tmp_path, run_config=RUN_CONFIG)
    model(torch.randint(0, 16, (2, 3))).sum().backward()
    for o in opts:
        o.step()
    ck.save(1, model=stages, optimizer=opts, state={})
    model2, stages2, opts2 = parts(1)
    ck.load(model=stages2, optimizer=opts2)
    assert_same(params(model2), params(model))
    for o, o2 in zip(opts, opts2):
        for s, s2 in zip(o.state_dict()["state"].values(), o2.state_dict()["state"].values()):
            assert all(torch.equal(s[k], s2[k]) for k in s)


def _ddp_case(run_dir: str) -> dict:
    rank = dist.get_rank()
    model, opt = make()
    model = nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(100 + rank)  # each rank its own data and dropout masks: per-rank RNG states matter
    train(model, opt, 2)
    ck = Checkpointer(Cfg(), run_dir, run_config=RUN_CONFIG)
    ck.save(2, model=model, optimizer=opt, state={"tokens": 96})
    saved = [p.tolist() for p in params(model)]
    ref_losses, ref_params = train(model, opt, 2), params(model)

    model2, opt2 = make(seed=7)
    model2 = nn.parallel.DistributedDataParallel(model2)
    result = ck.load(model=model2, optimizer=opt2)
    losses = train(model2, opt2, 2)
    same_params = all(torch.equal(a, b) for a, b in zip(params(model2), ref_params))

    # a payload that fails only while reading tensors: all ranks agree to fall back to step 2
    ck.save(3, model=model2, optimizer=opt2, state={})
    if rank == 0:
        _scramble_payload_of(Path(run_dir) / "checkpoints/step_00000003", "__1_0.distcp")
    dist.barrier()
    fallback = ck.load(model=model2, optimizer=opt2)["step"]
    return {"result": result, "ref": ref_losses, "got": losses, "saved": saved, "same_params": same_params,
            "fallback": fallback}


def _fsdp_case(run_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))

    def sharded(seed):
        model, _ = make(seed)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    model, opt = sharded(0)
    torch.manual_seed(100 + dist.get_rank())
    train(model, opt, 2)
    ck = Checkpointer(Cfg(), run_dir, run_config=RUN_CONFIG)
    ck.save(2, model=model, optimizer=opt, state={})
    full = {k: v.full_tensor().tolist() for k, v in model.state_dict().items()}
    ref = train(model, opt, 2)
    model2, opt2 = sharded(7)
    ck.load(model=model2, optimizer=opt2)
    return {"ref": ref, "got": train(model2, opt2, 2), "full": full}


def _two_rank_worker(run_dir: str) -> dict:
    # one set of processes for every two-rank case: starting them costs more than the cases themselves
    from tests.pretrain.test_async_checkpoint import fsdp_async_case
    from tests.pretrain.test_run_lock import acquire_twice

    return {"ddp": _ddp_case(f"{run_dir}/ddp"), "fsdp": _fsdp_case(f"{run_dir}/fsdp"),
            "fsdp_async": fsdp_async_case(f"{run_dir}/fsdp-async"), "lock": acquire_twice(f"{run_dir}/lock")}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("two_ranks")
    return run_dir, run_distributed(_two_rank_worker, 2, str(run_dir))


def test_two_ranks_ddp_and_fsdp2(two_ranks):
    tmp_path, results = two_ranks

    ddp = [r["ddp"] for r in results]
    for r in ddp:
        assert r["result"]["step"] == 2 and r["result"]["state"] == {"tokens": 96}
        assert r["got"] == r["ref"] and r["same_params"] and r["fallback"] == 2
    assert ddp[0]["ref"] != ddp[1]["ref"]  # the ranks really had different data
    ckpt = tmp_path / "ddp/checkpoints/step_00000002"
    assert {"rng.rank_0", "rng.rank_1"} <= set(read_dcp_metadata(ckpt).state_dict_metadata)
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    # DDP's "module." prefix is not in the checkpoint: a plain single-process model loads it
    model, opt = make(seed=1)
    Checkpointer(Cfg(), tmp_path / "ddp", run_config=RUN_CONFIG).load(model=model, optimizer=opt)
    assert all(p.tolist() == s for p, s in zip(model.parameters(), ddp[0]["saved"]))

    fsdp = [r["fsdp"] for r in results]
    assert all(r["got"] == r["ref"] for r in fsdp)
    # the DTensor shards of 2 ranks load into one unsharded model
    model, opt = make(seed=1)
    Checkpointer(Cfg(), tmp_path / "fsdp", run_config=RUN_CONFIG).load(model=model, optimizer=opt)
    assert {k: v.tolist() for k, v in model.state_dict().items()} == fsdp[0]["full"]


# --------------------------------------------------------------------------- checksums, unloadable run dirs

def _shift_tensor_bytes(ckpt: Path, tensor: torch.Tensor) -> str:
    """Change a saved tensor's values in place (same file size, intact zip structure): only a checksum finds it.
    Returns the name of the file changed."""
    raw = tensor.numpy().tobytes()
    for f in ckpt.glob("*.distcp"):
        data = f.read_bytes()
        if data.count(raw) == 1:
            f.write_bytes(data.replace(raw, (tensor + 1.0).numpy().tobytes()))
            return f.name
    raise AssertionError("tensor bytes not found in any .distcp")


def test_changed_tensor_bytes_fail_the_checksum(tmp_path, caplog):
    """The issue's case: bytes changed inside a tensor's data used to load silently (wrong weights)."""
    model, opt = make()
    _, saved = save_steps(tmp_path, [1, 2], model_and_optimizer=(model, opt))
    name = _shift_tensor_bytes(tmp_path / "checkpoints/step_00000002", model[4].weight.detach())

    fresh, fresh_opt = make(seed=1)
    explicit = Checkpointer(Cfg(resume="step_00000002"), tmp_path, run_config=RUN_CONFIG)
    with pytest.raises(CheckpointError, match=rf"step_00000002 cannot be used: checksum mismatch in {name}"):
        explicit.load(model=fresh, optimizer=fresh_opt)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        result = Checkpointer(Cfg(), tmp_path, run_config=RUN_CONFIG).load(model=fresh, optimizer=fresh_opt)
    assert result["step"] == 1
    assert_same(params(fresh), saved[1])
    assert f"skipping checkpoint {tmp_path}/checkpoints/step_00000002: checksum mismatch in {name}" in caplog.text


def test_checksums_are_those_of_the_files(tmp_path):
    save_steps(tmp_path, [1])
    ckpt = tmp_path / "checkpoints/step_00000001"
    files = json.loads((ckpt / "meta.json").read_text())["files"]
    assert sorted(files) == [".metadata", "__0_0.distcp"]
    for name, recorded in files.items():
        assert recorded == {"bytes": (ckpt / name).stat().st_size, "crc32c": checkpoint_module.file_crc32c(ckpt / name)}


def test_no_loadable_checkpoint_is_an_error_listing_each(tmp_path):
    """Every checkpoint broken: an error naming each and why, not a silent fresh start (which would then prune
    the old checkpoints away)."""
    save_steps(tmp_path, [1, 2])
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_00000002/meta.json").unlink()
    _truncate_payload(ckpts / "step_00000001")
    model, opt = make()
    with pytest.raises(CheckpointError) as err:
        Checkpointer(Cfg(), tmp_path, run_config=RUN_CONFIG).load(model=model, optimizer=opt)
    msg = str(err.value)
    assert "none of the 2 checkpoints" in msg and "--checkpoint.resume=none" in msg
    assert "step_00000002: no meta.json" in msg
    assert "step_00000001: data file __0_0.distcp has" in msg
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000001", "step_00000002"]  # nothing removed


def test_fresh_start_sets_old_checkpoints_aside(tmp_path, caplog):
    """resume=none where checkpoints exist: they are moved aside, so keep_last of the new run never deletes them
    and a later auto-resume never mixes the two runs."""
    save_steps(tmp_path, [3, 4])
    old = {p.name: (p / "__0_0.distcp").read_bytes() for p in (tmp_path / "checkpoints").glob("step_*")}
    model, opt = make(seed=5)
    ck = Checkpointer(Cfg(resume="none", keep_last=1), tmp_path, run_config=RUN_CONFIG)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert ck.load(model=model, optimizer=opt) is None
    (aside,) = tmp_path.glob("checkpoints.superseded-*")
    assert str(aside) in caplog.text and "nothing deleted" in caplog.text
    for step in (1, 2, 3, 4, 5):  # passes the old steps: overwrites and prunes only its own
        train(model, opt, 1)
        ck.save(step, model=model, optimizer=opt, state={})
    ck.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000005"]
    assert {p.name: (p / "__0_0.distcp").read_bytes() for p in aside.glob("step_*")} == old
    model2, opt2 = make()
    assert Checkpointer(Cfg(resume=str(aside / "step_00000004")), tmp_path,
                        run_config=RUN_CONFIG).load(model=model2, optimizer=opt2)["step"] == 4


def test_pruning_does_not_hold_up_the_save(tmp_path, monkeypatch):
    """keep_last deletes old checkpoints in the background: save() returns while a deletion is still going on."""
    release, deleted = threading.Event(), []
    real_rmtree = checkpoint_module.shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):
        if Path(path).name.startswith("step_"):
            release.wait(timeout=20)
            deleted.append(Path(path).name)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", slow_rmtree)
    ck = Checkpointer(Cfg(keep_last=1), tmp_path, run_config=RUN_CONFIG)
    model, opt = make()
    for step in (1, 2):
        ck.save(step, model=model, optimizer=opt, state={})
    assert deleted == [] and (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000002"
    release.set()
    ck.close()
    assert deleted == ["step_00000001"]


# --------------------------------------------------------------------------- a full disk

class _FillsUp(io.RawIOBase):
    """A file that takes `room` bytes (shared by all files of a test), then fails as a full disk does."""

    def __init__(self, raw, room: list[int]):
        self.raw, self.room = raw, room

    def writable(self):
        return True

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if n > self.room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room[0] -= n
        return self.raw.write(data)

    def tell(self):
        return self.raw.tell()

    def fileno(self):
        return self.raw.fileno()

    def flush(self):
        self.raw.flush()


def _check_no_space_error(err, run_dir: Path, saved: dict, *, model, optimizer):
    msg = str(err.value)
    assert msg.startswith("no space left on device while saving checkpoint step_00000002"), msg
    tensors = [*model.parameters(), *(t for s in optimizer.state.values() for t in s.values())]
    size = sum(t.numel() * t.element_size() for t in tensors)
    assert f"in {run_dir / 'checkpoints'}: it needs about {size / 1024:.1f} KiB and " in msg, msg
    assert "the newest complete checkpoint (step_00000001) is untouched" in msg
    ckpts = run_dir / "checkpoints"
    assert not list(ckpts.glob(".tmp-*"))  # the partial save is gone, so the space is back
    assert (ckpts / "latest").read_text().strip() == "step_00000001"
    model, opt = make(seed=3)
    assert Checkpointer(Cfg(), run_dir, run_config=RUN_CONFIG).load(model=model, optimizer=opt)["step"] == 1
    assert_same(params(model), saved[1])


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_disk_full_is_named_and_loses_nothing(tmp_path, monkeypatch, async_save):
    ck, saved = save_steps(tmp_path, [1], Cfg(async_save=async_save))
    room = [4096]
    real_create_stream = checkpoint_module.FileSystem.create_stream

    @contextmanager
    def filling_stream(self, path, mode):
        with real_create_stream(self, path, mode) as raw:
            yield _FillsUp(raw, room)

    monkeypatch.setattr(checkpoint_module.FileSystem, "create_stream", filling_stream)
    model, opt = make()
    train(model, opt, 1)  # AdamW's moments exist: the size named counts them
    with pytest.raises(CheckpointError) as err:
        ck.save(2, model=model, optimizer=opt, state={})
        ck.close()  # an asynchronous save reports at the next save or at close
    monkeypatch.undo()  # the disk has room again
    _check_no_space_error(err, tmp_path, saved, model=model, optimizer=opt)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only): a real full disk."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_real_full_disk(small_tmpfs):
    """torch's zip writer reports a full disk as '[enforce fail at inline_container.cc] unexpected pos'."""
    def wide(seed):  # ~0.56 MB with AdamW's state: one checkpoint fits, two do not
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Embedding(16, 200), nn.Linear(200, 200), nn.Linear(200, 16))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, opt = wide(0)
    ck, saved = save_steps(small_tmpfs, [1], model_and_optimizer=(model, opt))
    with pytest.raises(CheckpointError) as err:
        ck.save(2, model=model, optimizer=opt, state={})
    msg = str(err.value)
    assert msg.startswith("no space left on device while saving checkpoint step_00000002"), msg
    assert not list((small_tmpfs / "checkpoints").glob(".tmp-*"))
    model2, opt2 = wide(1)
    assert Checkpointer(Cfg(), small_tmpfs, run_config=RUN_CONFIG).load(model=model2, optimizer=opt2)["step"] == 1
    assert_same(params(model2), saved[1])


def test_two_ranks_fsdp_async(two_ranks):
    """Asynchronous saves of FSDP shards on two ranks (DCP's collectives on their own group, while training's run)."""
    run_dir, results = two_ranks
    cases = [r["fsdp_async"] for r in results]
    assert all(r["resumed"] == 2 and r["got"] == r["ref"] for r in cases)
    assert cases[0]["ref"] != cases[1]["ref"]  # per-rank RNG states, restored from the DCP payload
    metadata = read_dcp_metadata(run_dir / "fsdp-async/checkpoints/step_00000002")
    assert {"rng.rank_0", "rng.rank_1"} <= set(metadata.state_dict_metadata)


def test_run_lock_under_torchrun(two_ranks):
    """Rank 0 takes the lock; when it is refused, every rank raises the same error instead of going on."""
    run_dir, results = two_ranks
    locks = [r["lock"] for r in results]
    assert [r["mine"] for r in locks] == [True, False]  # only rank 0 holds it
    assert locks[0]["holder_pid"] == locks[1]["holder_pid"] == locks[0]["pid"]
    assert locks[0]["second"] == locks[1]["second"] and f"pid {locks[0]['pid']}" in locks[1]["second"]
    assert not (run_dir / "lock/train.lock").exists()


def _gla_with_per_head_output_norm():
    """A tiny GLA as checkpoints before the shared output norm (9660b06) held it: o_norm.weight of size d."""
    from pretrain.config import build_config
    from pretrain.models import build_model

    cfg = build_config({}, {"model": {"arch": "gla", "d_model": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 64,
                                      "seq_len": 16}})
    old = build_model(cfg.model)
    for block in old.layers.values():
        block.mixer.o_norm.weight = nn.Parameter(block.mixer.o_norm.weight.detach().repeat(2))  # (d,)
    return cfg, old, build_model(cfg.model)


@pytest.mark.parametrize("resume", ["auto", "explicit"])
def test_a_parameter_of_another_shape_is_named_with_both_shapes(tmp_path, resume):
    """An old GLA checkpoint (per-head output norm) is refused naming the parameter, both shapes and the change,
    by Checkpointer.load and load_weights alike, not as a corrupt checkpoint to repair."""
    from pretrain.checkpoint import load_weights

    cfg, old, new = _gla_with_per_head_output_norm()
    run_config = {**RUN_CONFIG, "model": cfg.to_dict()["model"]}
    ck = Checkpointer(Cfg(), tmp_path, run_config=run_config)
    ck.save(1, model=old, optimizer=torch.optim.AdamW(old.parameters()), state={})
    ck.close()
    expected = (r"layers\.0\.mixer\.o_norm\.weight is \(32,\) there, \(16,\) in this model.*"
                r"GLA's output norm became shared across heads.*averaging")
    path = str(tmp_path / "checkpoints" / "step_00000001") if resume == "explicit" else "auto"
    loader = Checkpointer(Cfg(resume=path), tmp_path, run_config=run_config)
    with pytest.raises(CheckpointError, match=expected) as refused:
        loader.load(model=new, optimizer=torch.optim.AdamW(new.parameters()))
    assert "Repair" not in str(refused.value) and "reading it failed" not in str(refused.value)
    with pytest.raises(CheckpointError, match=expected):
        load_weights(tmp_path / "checkpoints" / "step_00000001", new)
