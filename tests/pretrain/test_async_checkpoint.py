"""Asynchronous checkpoints (checkpoint.async_save): training goes on while the files are written, the save is a
snapshot of the moment it was asked for, the next save waits for the previous, `latest` never names a checkpoint
that is not complete on every rank (SIGKILL at several moments of the background write), bitwise resume.
Two ranks: test_checkpoint.test_two_ranks_fsdp_async (it shares that file's two-rank processes)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pretrain import checkpoint as checkpoint_module
from pretrain.checkpoint import Checkpointer
from pretrain.config import build_config
from pretrain.train import train as train_run
from tests.pretrain.test_checkpoint import RUN_CONFIG, REPO, Cfg, assert_same, make, params, train

ASYNC = Cfg(async_save=True)


def block_data_writes(monkeypatch) -> threading.Event:
    """Hold every .distcp write until the returned event is set."""
    release = threading.Event()
    real_write = checkpoint_module._ChecksummingStream.write

    def write(self, data):
        if self.path.suffix == ".distcp":
            release.wait(timeout=60)
        return real_write(self, data)

    monkeypatch.setattr(checkpoint_module._ChecksummingStream, "write", write)
    return release


def test_training_goes_on_while_the_files_are_written(tmp_path, monkeypatch):
    release = block_data_writes(monkeypatch)
    ck = Checkpointer(ASYNC, tmp_path, run_config=RUN_CONFIG)
    model, opt = make()
    train(model, opt, 1)
    ck.save(1, model=model, optimizer=opt, state={"tokens": 24})  # returns with its files not written
    at_save_1 = params(model)
    train(model, opt, 2)  # changes the weights the background is writing: they must not reach the checkpoint
    assert not (tmp_path / "checkpoints/latest").exists() and not list(tmp_path.glob("checkpoints/step_*"))

    second = threading.Thread(target=ck.save, args=(2,), kwargs={"model": model, "optimizer": opt, "state": {}})
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive()  # the next save waits for the previous one
    at_save_2 = params(model)
    release.set()
    second.join(timeout=60)
    ck.close()
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000002"

    for step, expected in ((1, at_save_1), (2, at_save_2)):
        model2, opt2 = make(seed=9)
        resumed = Checkpointer(Cfg(resume=f"step_{step:08d}"), tmp_path,
                               run_config=RUN_CONFIG).load(model=model2, optimizer=opt2)
        assert resumed["step"] == step
        assert_same(params(model2), expected)


def test_async_round_trip_is_bitwise(tmp_path):
    model, opt = make()
    train(model, opt, 2)
    ck = Checkpointer(ASYNC, tmp_path, run_config=RUN_CONFIG)
    ck.save(2, model=model, optimizer=opt, state={"data": {"offset": 7}})
    ref = train(model, opt, 3)  # draws from every RNG after the save; the checkpoint must hold the states before
    ck.close()
    model2, opt2 = make(seed=1)
    assert Checkpointer(Cfg(), tmp_path, run_config=RUN_CONFIG).load(model=model2, optimizer=opt2)["state"] == {
        "data": {"offset": 7}}
    assert train(model2, opt2, 3) == ref


@pytest.mark.gpu
def test_cuda_async_save_is_a_snapshot(tmp_path):
    """On CUDA the state is staged into pinned host memory; the optimizer steps after save() must not leak in."""
    model, _ = make()
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 16, (2, 3), device="cuda")).sum().backward()
    opt.step()
    ck = Checkpointer(ASYNC, tmp_path, run_config=RUN_CONFIG)
    ck.save(1, model=model, optimizer=opt, state={})
    saved = params(model)
    for _ in range(3):
        model(torch.randint(0, 16, (2, 3), device="cuda")).sum().backward()
        opt.step()
    ck.close()
    model2, _ = make(seed=1)
    model2.cuda()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    Checkpointer(Cfg(), tmp_path, run_config=RUN_CONFIG).load(model=model2, optimizer=opt2)
    assert_same(params(model2), saved)


# --------------------------------------------------------------------------- SIGKILL during the background write

def _say(line: str) -> None:
    """One line in one write: the background writer thread and the training thread both report, and print's separate
    writes of the text and its newline could interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _hang(moment: str):
    _say(f"HUNG {moment}")
    threading.Event().wait()


def _async_save_then_die(run_dir: str, moment: str) -> None:
    """Child: save step 1, then step 2 asynchronously with its background write stopped at `moment`; train on,
    report, and wait to be killed."""
    ck = Checkpointer(ASYNC, run_dir, run_config=RUN_CONFIG)
    model, opt = make()
    train(model, opt, 1)
    ck.save(1, model=model, optimizer=opt, state={"tokens": 24})
    ck.wait()
    torch.save(model.state_dict(), Path(run_dir) / "step1.pt")
    train(model, opt, 1)

    m = checkpoint_module
    if moment == "data":  # part of a payload file written
        real_write = m._ChecksummingStream.write

        def write(self, data):
            if self.path.suffix == ".distcp" and self.size > 0:
                _hang(moment)
            return real_write(self, data)
        m._ChecksummingStream.write = write
    elif moment == "metadata":  # every payload file written, DCP's .metadata not
        m._Writer.finish = lambda self, *args, **kwargs: _hang(moment)
    elif moment in ("meta.json", "latest"):  # .metadata written, not meta.json; or renamed, `latest` not moved
        real_write_text = m._write_text
        m._write_text = lambda path, text: _hang(moment) if path.name == moment else real_write_text(path, text)
    elif moment == "rename":  # complete in its temporary directory
        real_rename = m.os.rename
        m.os.rename = lambda a, b: _hang(moment) if Path(a).name.startswith(".tmp-step") else real_rename(a, b)
    ck.save(2, model=model, optimizer=opt, state={"tokens": 48})
    train(model, opt, 2)  # the save above returned before its files were written
    _say("TRAINED")
    threading.Event().wait()


@pytest.mark.parametrize("moment", ["data", "metadata", "meta.json", "rename", "latest"])
def test_kill_during_background_write_keeps_previous_latest(tmp_path, caplog, moment):
    code = (f"from tests.pretrain.test_async_checkpoint import _async_save_then_die; "
            f"_async_save_then_die({str(tmp_path)!r}, {moment!r})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(tmp_path / "child.err", "w") as err:
        child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=err)
        watchdog = threading.Timer(120, child.kill)  # a child that never reports must not hang the suite
        watchdog.start()
        try:
            lines = {child.stdout.readline().strip() for _ in range(2)}
            assert lines == {f"HUNG {moment}", "TRAINED"}, (lines, (tmp_path / "child.err").read_text())
            child.send_signal(signal.SIGKILL)
        finally:
            watchdog.cancel()
            child.kill()
            child.wait()
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000001"
    complete_2 = (ckpts / "step_00000002").exists()
    assert complete_2 == (moment == "latest")  # only a complete checkpoint ever gets its step_ name

    model, opt = make(seed=1)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        result = Checkpointer(Cfg(), tmp_path, run_config=RUN_CONFIG).load(model=model, optimizer=opt)
    assert result["step"] == 1 and result["state"] == {"tokens": 24}
    ref = torch.load(tmp_path / "step1.pt", weights_only=True)
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------ two ranks (run from test_checkpoint), the training loop

def fsdp_async_case(run_dir: str) -> dict:
    """On every rank of a two-rank run (test_checkpoint.test_two_ranks_fsdp_async): FSDP2 shards saved
    asynchronously while training goes on, then resumed into a fresh model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))

    def sharded(seed):
        model, _ = make(seed)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    model, opt = sharded(0)
    torch.manual_seed(100 + dist.get_rank())  # per-rank data and dropout: per-rank RNG states matter
    train(model, opt, 2)
    ck = Checkpointer(ASYNC, run_dir, run_config=RUN_CONFIG)
    ck.save(2, model=model, optimizer=opt, state={"tokens": 96})
    ref = train(model, opt, 2)  # collectives of training while DCP's run on the checkpoint group
    ck.close()
    model2, opt2 = sharded(7)
    resumed = Checkpointer(Cfg(), run_dir, run_config=RUN_CONFIG).load(model=model2, optimizer=opt2)
    return {"ref": ref, "got": train(model2, opt2, 2), "resumed": resumed["step"]}


def tiny_run(run_dir: Path, **train_fields) -> dict:
    return {"data": {"path": "synthetic"}, "optim": {"warmup_steps": 2},
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 16, "dropout": 0.1},
            "train": {"steps": 8, "global_batch": 4, "micro_batch": 2, "run_dir": str(run_dir), "eval_interval": 0,
                      **train_fields},
            "checkpoint": {"interval": 2, "keep_last": 2, "async_save": True},
            "log": {"interval": 1, "progress": False, "tensorboard": False}}


def test_training_with_async_saves_resumes_exactly(tmp_path):
    straight = train_run(build_config({}, tiny_run(tmp_path / "a")))
    first = train_run(build_config({}, tiny_run(tmp_path / "b", exit_after_steps=5)))
    second = train_run(build_config({}, tiny_run(tmp_path / "b")))
    assert first + second == straight  # bitwise
    assert sorted(p.name for p in (tmp_path / "b/checkpoints").glob("step_*")) == ["step_00000006", "step_00000008"]
