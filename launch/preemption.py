"""Preemption and time limits: every rank stops at the same step boundary, saves, exits cleanly; the job requeues.

SLURM sends SIGUSR2 ahead of the time limit (`#SBATCH --signal=USR2@300`; by hand `scancel --signal=USR2 JOB`;
USR2 because NCCL may use USR1) and SIGTERM when it ends a job. Inside `stop_on_signals()` (train.py's main)
both only set a flag. Signals reach ranks at different moments, so `JobControl.should_stop` gathers the flags
at every step boundary: when any rank has one, all ranks save the same checkpoint and leave the loop together.
The wall-time budget (train.exit_after_minutes) stops the same way, for launchers that send no signal.

`JobControl.close` then requeues the SLURM batch job (`scontrol requeue $SLURM_JOB_ID`, from rank 0) after a
USR2 or budget stop, or a SIGTERM at the time limit; not after a SIGTERM from `scancel` (the user wants it
gone) or from preemption (SLURM requeues preempted jobs itself). The requeued job runs the same script, resumes
from the newest complete checkpoint (checkpoint.resume=auto) and logs its SLURM_RESTART_COUNT.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from launch.env import DistEnv
from launch.monitor import StepMonitor

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
# torch 2.13 renamed all_gather_into_tensor (deprecated there); older supported versions only have the old name.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_received: set[int] = set()  # signal numbers seen inside stop_on_signals(); handlers are process-wide


@contextmanager
def stop_on_signals(signals=STOP_SIGNALS):
    """Within the block, `signals` set a stop flag (read by JobControl.should_stop) instead of ending the process."""
    def handler(signum, frame):
        _received.add(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()


def slurm_job_reason(job_id: str) -> str:
    """SLURM's reason for a job's state: 'TimeLimit' while it is being ended at its time limit (its state is
    COMPLETING then, as after a scancel, whose reason is 'None'); '' if SLURM cannot be asked."""
    try:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
    return fields.get("Reason", "")


def requeue(job_id: str) -> None:
    """`scontrol requeue JOB`: back to pending; SLURM starts it again after its requeue delay."""
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    # scontrol runs inside the job, so the requeue it asked for may kill it before it exits: that is success.
    if out.returncode > 0:
        log.warning("could not requeue SLURM job %s: %s", job_id, out.stderr.strip() or out.stdout.strip())
    else:
        log.info("requeued SLURM job %s; it resumes from the newest checkpoint when it starts again", job_id)


class JobControl:
    """The training loop's link to its job: agreed stops, requeue, per-rank step times, stall reports.

    Reads cfg.train.{run_dir, exit_after_minutes, requeue, collective_timeout_minutes} and cfg.log.interval.
    Create it after resuming, call `should_stop(step)` after every step (all ranks) and `close()` at the end.
    """

    def __init__(self, cfg, env: DistEnv, *, device: torch.device, started: float, step: int = 0):
        self.env, self.device, self.started = env, device, started
        self.budget_s = cfg.train.exit_after_minutes * 60
        self.requeue_enabled = cfg.train.requeue
        self.job_id = os.environ.get("SLURM_JOB_ID", "")
        self.stop_signals: set[int] = set()
        self.over_budget = False
        timeout_minutes = cfg.train.collective_timeout_minutes
        # Half the collective timeout: the stall report must come before the timeout ends the job.
        self.monitor = StepMonitor(Path(cfg.train.run_dir), rank=env.rank, world_size=env.world_size,
                                   stall_seconds=timeout_minutes * 30, log_interval=cfg.log.interval,
                                   start_step=step)
        self._clock = (time.monotonic(), time.process_time())
        if env.rank == 0 and self.job_id:
            log.info("SLURM job %s, SLURM_RESTART_COUNT=%s, %d task(s) on %s", self.job_id,
                     os.environ.get("SLURM_RESTART_COUNT", "0"), env.world_size,
                     os.environ.get("SLURM_JOB_NODELIST", "?"))

    def should_stop(self, step: int) -> bool:
        """Collective, once per step on every rank: True on all ranks when a stop signal reached any rank or
        the wall-time budget is spent. Also hands every rank's step time to the monitor."""
        wall, cpu = time.monotonic() - self._clock[0], time.process_time() - self._clock[1]
        over = self.budget_s > 0 and time.monotonic() - self.started >= self.budget_s
        # One float per received stop signal: its number, so rank 0 can say which signal arrived where.
        flags = [float(s in _received) * s for s in STOP_SIGNALS]
        mine = torch.tensor([[*flags, float(over), wall, cpu]], dtype=torch.float64, device=self.device)
        if self.env.world_size > 1:
            everyone = torch.empty(self.env.world_size, mine.shape[1], dtype=mine.dtype, device=self.device)
            _all_gather(everyone, mine)
        else:
            everyone = mine
        everyone = everyone.cpu()
        self._clock = (time.monotonic(), time.process_time())
        self.monitor.record(step, everyone[:, -2:])
        n = len(STOP_SIGNALS)
        self.stop_signals = {int(s) for s in everyone[:, :n].flatten().tolist() if s}
        self.over_budget = bool(everyone[:, n].any())
        stop = bool(self.stop_signals) or self.over_budget
        if stop and self.env.rank == 0:
            ranks = [r for r in range(self.env.world_size) if everyone[r, :n].any()]
            why = (f"{'/'.join(signal.Signals(s).name for s in sorted(self.stop_signals))} on rank(s) {ranks}"
                   if self.stop_signals else f"wall-time budget of {self.budget_s / 60:g} min spent")
            log.warning("stopping after step %d (%s): saving a checkpoint and exiting", step, why)
        return stop

    def close(self, *, finished: bool) -> None:
        """End of training: stop the watchdog; requeue the SLURM job if a signal or the budget cut it short."""
        self.monitor.close()
        if finished or not self.job_id or self.env.rank != 0 or not self.requeue_enabled:
            return
        if signal.SIGUSR2 in self.stop_signals or self.over_budget:
            requeue(self.job_id)
        elif signal.SIGTERM in self.stop_signals:
            reason = slurm_job_reason(self.job_id)
            if reason == "TimeLimit":
                requeue(self.job_id)
            else:
                log.info("SIGTERM, SLURM job %s ending with reason %s: not requeueing it (SLURM requeues preempted "
                         "jobs itself; a cancelled job stays cancelled)", self.job_id, reason or "unknown")
