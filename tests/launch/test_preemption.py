"""Stops agreed across ranks, the wall-time budget, per-rank step times and the stall report, on real gloo
process groups (tests/dist.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from launch.env import discover
from launch.monitor import StepMonitor
from launch.preemption import JobControl, stop_on_signals
from pretrain.config import build_config
from tests.dist import run_distributed


def _cfg(run_dir, *, budget_minutes=0.0, sync_every=2):
    return build_config({}, {"train": {"run_dir": str(run_dir), "exit_after_minutes": budget_minutes,
                                       "sync_every": sync_every}})


def _signal_one_rank(run_dir):
    """Rank 1 alone gets SIGUSR2 during step 5 (after rank 0 may have finished it). Steps are logged every 3, and
    stops are agreed every 4 (sync_every) and on logged steps: both stop after step 6, the next step that agrees."""
    env = discover()
    with stop_on_signals():
        job = JobControl(_cfg(run_dir, sync_every=4), env, device=torch.device("cpu"), started=time.monotonic())
        for step in range(1, 20):
            with job.timed(step):
                if step == 5 and env.rank == 1:
                    os.kill(os.getpid(), signal.SIGUSR2)
            if job.should_stop(step, logged=step % 3 == 0):
                job.close(finished=False)
                return step, sorted(job.stop_signals)
    return None


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    assert run_distributed(_signal_one_rank, 2, tmp_path, fresh=True) == [(6, [signal.SIGUSR2])] * 2
    rows = [json.loads(line) for line in (tmp_path / "step_times.jsonl").read_text().splitlines()]
    assert [(r["step"], r["steps"]) for r in rows] == [(3, 3), (6, 3)]  # logged steps only, rank 0 writes
    assert all(len(r["wall_s"]) == len(r["cpu_s"]) == 2 and r["slowest_rank"] in (0, 1) for r in rows)


def test_signals_only_set_a_flag_inside_the_block_and_handlers_come_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals():
        job = JobControl(_cfg(tmp_path), discover({}), device=torch.device("cpu"), started=time.monotonic())
        assert not job.should_stop(1, logged=False)
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest outside the block
        assert not job.should_stop(3, logged=False)  # not a step that agrees on stops (sync_every=2)
        assert job.should_stop(4, logged=False) and job.stop_signals == {signal.SIGTERM}
        job.close(finished=False)
    assert signal.getsignal(signal.SIGTERM) is before


def test_wall_time_budget_stops(tmp_path):
    job = JobControl(_cfg(tmp_path, budget_minutes=0.001), discover({}), device=torch.device("cpu"),
                     started=time.monotonic())
    assert not job.should_stop(1, logged=True)
    time.sleep(0.1)
    assert job.should_stop(3, logged=True) and job.over_budget and not job.stop_signals
    job.close(finished=False)  # no SLURM job here: nothing to requeue


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _stall(run_dir):
    """Rank 1 hangs in step 3 (a stuck data read, say) while rank 0 waits in the step's all-reduce."""
    rank = dist.get_rank()
    records = _Records()
    logging.getLogger("launch.monitor").addHandler(records)
    monitor = StepMonitor(run_dir, rank=rank, world_size=2, stall_seconds=1.0, straggler_window=2)
    for step in (1, 2):
        times = torch.empty(2, 2, dtype=torch.float64)
        dist.all_gather_into_tensor(times, torch.tensor([[0.1, 0.1 * (rank + 1)]], dtype=torch.float64))
        monitor.record(step, times)
    if rank == 1:
        time.sleep(4.0)
    dist.all_reduce(torch.ones(1))
    monitor.close()
    return records.messages


@pytest.mark.parametrize("recorder", ["on", "off"])
def test_stall_report_names_the_stalled_rank_and_step(tmp_path, monkeypatch, recorder):
    for name in ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):  # traces go under the run dir
        monkeypatch.delenv(name, raising=False)
    # as launch.bootstrap sets it, or as a user turns it off; the spawned ranks inherit it
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "2000" if recorder == "on" else "0")
    rank0, rank1 = run_distributed(_stall, 2, tmp_path, fresh=True)
    table = next(m for m in rank0 if m.startswith("stall:"))
    assert "after step 2; step 3 is stuck" in table
    if recorder == "on":  # rank 0 entered the default group's next all-reduce, rank 1 did not
        assert "Stalled rank(s) (not entered a collective the others entered): [1]" in table
        assert "group 0 (default_pg): rank(s) 1 have not entered collective #" in table and "all_reduce" in table
        assert f"Flight-recorder traces: {tmp_path / 'flight_recorder' / 'rank_'}<rank>" in table
        assert {p.name for p in (tmp_path / "flight_recorder").iterdir()} == {"rank_0", "rank_1"}
    else:  # where each rank's main thread is: rank 0 waits in a collective, rank 1 does not
        assert "Stalled rank(s) (not waiting in a collective): [1]" in table
        assert "No flight-recorder trace" in table and not (tmp_path / "flight_recorder").exists()
    assert "rank     0 " in table and "collective in" in table
    assert "test_preemption.py" in table and "_stall" in table  # where rank 1 is stuck
    assert any("rank 1 " in m and "after step 2" in m for m in rank1)
    # rank 1 used twice the CPU time per step: the straggler warning names it
    assert any(m.startswith("straggler: rank 1") for m in rank0)
