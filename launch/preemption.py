"""Preemption and time limits: every rank stops at the same step boundary, saves, exits cleanly; the job requeues.

SLURM sends SIGUSR2 ahead of the time limit (`#SBATCH --signal=USR2@300`; by hand `scancel --signal=USR2 JOB`;
USR2 because NCCL may use USR1) and SIGTERM when it ends a job. Inside `stop_on_signals()` (train.py's main)
both only set a flag. Signals reach ranks at different moments, so `JobControl.should_stop` agrees on the flags every
`train.sync_every` steps and on logged steps, with one all-reduce(MAX) of three numbers: when any rank has one, all
ranks save the same checkpoint and leave the loop together. Other steps make no collective and read nothing from
the device, so the host runs ahead of the GPU; a stop then waits up to `sync_every` steps. The wall-time budget
(train.exit_after_minutes) stops the same way, for launchers that send no signal.

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
from launch.monitor import StepMonitor, StepTimer

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

    Reads cfg.train.{run_dir, exit_after_minutes, requeue, collective_timeout_minutes, sync_every}. Create it after
    resuming; time each step in `with job.timed(step):`, call `should_stop(step, logged=...)` after every step (all
    ranks) and `close()` at the end.
    """

    def __init__(self, cfg, env: DistEnv, *, device: torch.device, started: float, step: int = 0):
        self.env, self.device, self.started = env, device, started
        self.budget_s = cfg.train.exit_after_minutes * 60
        self.sync_every = cfg.train.sync_every
        self.requeue_enabled = cfg.train.requeue
        self.job_id = os.environ.get("SLURM_JOB_ID", "")
        self.stop_signals: set[int] = set()
        self.over_budget = False
        self.timer = StepTimer(device)
        # Half the collective timeout: the stall report must come before the timeout ends the job.
        self.monitor = StepMonitor(Path(cfg.train.run_dir), rank=env.rank, world_size=env.world_size,
                                   stall_seconds=cfg.train.collective_timeout_minutes * 30, start_step=step,
                                   columns=self.timer.columns)
        if env.rank == 0 and self.job_id:
            log.info("SLURM job %s, SLURM_RESTART_COUNT=%s, %d task(s) on %s", self.job_id,
                     os.environ.get("SLURM_RESTART_COUNT", "0"), env.world_size,
                     os.environ.get("SLURM_JOB_NODELIST", "?"))

    @contextmanager
    def timed(self, step: int):
        """Times training step `step` (host clocks; CUDA events on GPUs) and tells the stall watch it finished."""
        with self.timer.step():
            yield
        self.monitor.beat(step)

    def should_stop(self, step: int, *, logged: bool) -> bool:
        """Collective on every rank after each step: True on all ranks when a stop signal reached any rank or the
        wall-time budget is spent. Agreed on logged steps and every train.sync_every steps; on other steps it
        returns False at once. On logged steps, also hands every rank's step times to the monitor."""
        if logged:
            self._report_times(step)
        if not logged and step % self.sync_every:
            return False
        over = self.budget_s > 0 and time.monotonic() - self.started >= self.budget_s
        flags = torch.tensor([s in _received for s in STOP_SIGNALS] + [over], dtype=torch.int32, device=self.device)
        if self.env.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        *received, over = flags.tolist()
        self.stop_signals = {s for s, flag in zip(STOP_SIGNALS, received) if flag}
        self.over_budget = bool(over)
        stop = bool(self.stop_signals) or self.over_budget
        if stop and self.env.rank == 0:
            why = (f"{'/'.join(signal.Signals(s).name for s in sorted(self.stop_signals))} received"
                   if self.stop_signals else f"wall-time budget of {self.budget_s / 60:g} min spent")
            log.warning("stopping after step %d (%s): saving a checkpoint and exiting", step, why)
        return stop

    def _report_times(self, step: int) -> None:
        """Every rank's seconds per step since the last logged step, to rank 0's monitor (one all-gather)."""
        steps = self.timer.steps
        mine = torch.tensor([self.timer.read()], dtype=torch.float64, device=self.device)
        if self.env.world_size > 1:
            everyone = torch.empty(self.env.world_size, mine.shape[1], dtype=mine.dtype, device=self.device)
            _all_gather(everyone, mine)
        else:
            everyone = mine
        self.monitor.record(step, everyone.cpu(), steps=steps)

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
