"""launch.bootstrap.report_error: a known error is printed once for the job, by rank 0 when every rank has it,
by the rank itself when rank 0 did not speak for it; also before the process group exists."""

from __future__ import annotations

import json
import os
import time

import torch.distributed as dist

from launch import bootstrap
from tests.dist import run_distributed


WAIT_S = 1.0  # ERROR_WAIT_S in the ranks: only the rank without rank 0's word sits out (3×) that long


def _attempt(number: int) -> None:
    # Each scenario is its own torchrun "attempt", so its keys in the store are separate from the others'.
    os.environ["TORCHELASTIC_RESTART_COUNT"] = str(number)


def _scenarios() -> float:
    bootstrap.ERROR_WAIT_S = WAIT_S
    rank = dist.get_rank()
    _attempt(1)  # every rank fails alike
    bootstrap.report_error("config", "same everywhere")
    dist.barrier()
    _attempt(2)  # the ranks fail differently
    bootstrap.report_error("data", f"only rank {rank} sees this")
    dist.barrier()
    _attempt(3)  # only rank 1 fails; rank 0 is busy elsewhere (as in a collective) and says nothing
    started = time.monotonic()
    if rank == 1:
        bootstrap.report_error("data", "rank 1 alone")
    else:
        time.sleep(4 * WAIT_S)
    waited = time.monotonic() - started
    dist.barrier()
    _attempt(4)  # before the process group exists: the ranks meet through a rendezvous store of their own
    dist.destroy_process_group()
    bootstrap.report_error("config", "before the group")
    return waited


def test_each_error_is_printed_once_naming_ranks_only_where_they_differ(capfd):
    waited = run_distributed(_scenarios, 2, fresh=True)  # it changes bootstrap.ERROR_WAIT_S
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if " error" in line]
    assert lines.count("config error: same everywhere") == 1, err
    assert lines.count("data error on rank 0: only rank 0 sees this") == 1, err
    assert lines.count("data error on rank 1: only rank 1 sees this") == 1, err
    assert lines.count("data error on rank 1: rank 1 alone") == 1, err
    assert lines.count("config error: before the group") == 1, err
    assert len(lines) == 5, err
    # rank 1 printed its lone error itself once it had waited out rank 0's word, and not much later
    assert 3 * WAIT_S <= waited[1] < 3 * WAIT_S + 10, waited


def test_single_process_prints_the_line_and_tells_torchrun(tmp_path, monkeypatch, capfd):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    for name in ("RANK", "WORLD_SIZE", "PRETRAIN_LAUNCHER", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    bootstrap.report_error("checkpoint", "no space left on /x")
    assert capfd.readouterr().err == "checkpoint error: no space left on /x\n"
    assert json.loads(error_file.read_text())["message"]["message"] == "checkpoint error: no space left on /x"


def test_a_sweep_names_the_one_line_error_as_the_reason_a_point_failed():
    from launch.sweep import failure
    log = ("INFO launch.bootstrap: torchrun: 2 processes\n"
           "data error on rank 1: /data/train-000003.tar at byte 512: truncated\n"
           "E1201 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1)\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
           "  traceback : data error: /data/train-000003.tar at byte 512: truncated\n=====\n")
    assert failure(log, 1) == ("failed", "data error on rank 1: /data/train-000003.tar at byte 512: truncated")
