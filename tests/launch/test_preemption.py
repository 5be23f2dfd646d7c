"""Stops agreed across ranks, the wall-time budget, per-rank step times and the stall report, on real gloo
process groups (tests/dist.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import torch
import torch.distributed as dist

from launch.env import discover
from launch.monitor import StepMonitor
from launch.preemption import JobControl, stop_on_signals
from pretrain.config import build_config
from tests.dist import run_distributed


def _cfg(run_dir, *, budget_minutes=0.0, log_interval=2):
    return build_config({}, {"train": {"run_dir": str(run_dir), "exit_after_minutes": budget_minutes},
                             "log": {"interval": log_interval}})


def _signal_one_rank(run_dir):
    """Rank 1 alone gets SIGUSR2 during step 4 (after rank 0 may have finished it): both stop after step 4."""
    env = discover()
    with stop_on_signals():
        job = JobControl(_cfg(run_dir), env, device=torch.device("cpu"), started=time.monotonic())
        for step in range(1, 20):
            if step == 4 and env.rank == 1:
                os.kill(os.getpid(), signal.SIGUSR2)
            if job.should_stop(step):
                job.close(finished=False)
                return step, sorted(job.stop_signals)
    return None


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    assert run_distributed(_signal_one_rank, 2, tmp_path) == [(4, [signal.SIGUSR2])] * 2
    rows = [json.loads(line) for line in (tmp_path / "step_times.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # every log.interval steps, rank 0 only
    assert all(len(r["wall_s"]) == len(r["cpu_s"]) == 2 and r["slowest_rank"] in (0, 1) for r in rows)


def test_signals_only_set_a_flag_inside_the_block_and_handlers_come_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals():
        job = JobControl(_cfg(tmp_path), discover({}), device=torch.device("cpu"), started=time.monotonic())
        assert not job.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest outside the block
        assert job.should_stop(2) and job.stop_signals == {signal.SIGTERM}
        job.close(finished=False)
    assert signal.getsignal(signal.SIGTERM) is before


def test_wall_time_budget_stops(tmp_path):
    job = JobControl(_cfg(tmp_path, budget_minutes=0.001), discover({}), device=torch.device("cpu"),
                     started=time.monotonic())
    assert not job.should_stop(1)
    time.sleep(0.1)
    assert job.should_stop(2) and job.over_budget and not job.stop_signals
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
    monitor = StepMonitor(run_dir, rank=rank, world_size=2, stall_seconds=1.0, log_interval=1,
                          straggler_window=2)
    for step in (1, 2):
        times = torch.empty(2, 2, dtype=torch.float64)
        dist.all_gather_into_tensor(times, torch.tensor([[0.1, 0.1 * (rank + 1)]], dtype=torch.float64))
        monitor.record(step, times)
    if rank == 1:
        time.sleep(4.0)
    dist.all_reduce(torch.ones(1))
    monitor.close()
    return records.messages


def test_stall_report_names_the_stalled_rank_and_step(tmp_path):
    rank0, rank1 = run_distributed(_stall, 2, tmp_path)
    table = next(m for m in rank0 if m.startswith("stall:"))
    assert "after step 2; step 3 is stuck" in table
    assert "Stalled rank(s) (not waiting in a collective): [1]" in table
    assert "rank     0 " in table and "collective in" in table
    assert "test_preemption.py" in table and "_stall" in table  # where rank 1 is stuck
    assert any("rank 1 " in m and "after step 2" in m for m in rank1)
    # rank 1 used twice the CPU time per step: the straggler warning names it
    assert any(m.startswith("straggler: rank 1") for m in rank0)
