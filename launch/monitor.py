"""Stragglers and hangs: per-rank step times, and a report naming the rank and step that stalled.

Synchronous training hides a slow rank: every rank's wall time per step is the slowest one's, because the
others wait for it in the gradient all-reduce. Process CPU time does not count that wait (gloo blocks, it does
not spin), so each rank's CPU seconds per step show who is slow; both go to `<run_dir>/step_times.jsonl`.

A hang never finishes a step. When no step has finished for `stall_seconds` (set below the collective timeout,
so the report comes before the timeout kills the job), every rank publishes its last finished step and where
its main thread is (through the process group's TCP store, which works while collectives are stuck) and dumps
its Python stacks; rank 0 prints one table. Ranks waiting in a collective or in backward (the gradient
all-reduce) are victims; a rank anywhere else is the one that stalled.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STRAGGLER_RATIO = 1.25  # warn when a rank's mean CPU time per step exceeds the median of all ranks by this
STRAGGLER_WINDOW = 50  # ... over this many steps (short windows flag noise, e.g. rank 0's logging)
REPORT_WAIT_S = 10.0  # how long rank 0 waits for the other ranks' stall reports


def where(frame) -> tuple[str, str]:
    """(state, location) of a thread from its innermost Python frame: the location is that frame's file:line
    and function; the state is collective | backward | elsewhere, from the frames on the whole stack."""
    if frame is None:
        return "elsewhere", "?"
    path = frame.f_code.co_filename
    location = f"{'/'.join(path.split('/')[-2:])}:{frame.f_lineno} {frame.f_code.co_name}"
    state = "elsewhere"
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/torch/distributed/" in path:
            state = "collective"
        elif "/torch/autograd/" in path and state == "elsewhere":
            state = "backward"
        frame = frame.f_back
    return state, location


class StepMonitor:
    """Collects per-rank step times (rank 0 writes them) and watches for stalls in a daemon thread."""

    def __init__(self, run_dir: Path, *, rank: int, world_size: int, stall_seconds: float, log_interval: int,
                 start_step: int = 0, straggler_window: int = STRAGGLER_WINDOW):
        self.rank, self.world_size = rank, world_size
        self.stall_seconds, self.log_interval = stall_seconds, log_interval
        self.straggler_window = straggler_window
        self.step, self.last_beat = start_step, time.monotonic()
        self.host = socket.gethostname()
        self.hosts = [self.host]
        self.path = Path(run_dir) / "step_times.jsonl"
        if rank == 0 and self.path.exists():  # resumed: drop rows of steps that will run again, as metrics do
            rows = [r for r in self.path.read_text().splitlines() if r.strip()]
            self.path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= start_step))
        self.window: list[torch.Tensor] = []  # per-step times since the last row written
        self.long_window: list[torch.Tensor] = []  # ... since the last straggler check
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        if world_size > 1:
            self.hosts = [None] * world_size
            dist.all_gather_object(self.hosts, self.host)
            self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
            self._thread.start()

    # ---- step times

    def record(self, step: int, times: torch.Tensor) -> None:
        """After `step` finished: `times` [world, 2] = every rank's (wall, CPU) seconds for it."""
        self.step, self.last_beat = step, time.monotonic()
        if self.rank != 0:
            return
        self.window.append(times)
        self.long_window.append(times)
        if step % self.log_interval == 0:
            self._write(step, torch.stack(self.window).mean(0))
            self.window = []
        if len(self.long_window) >= self.straggler_window:
            self._check_stragglers(step, torch.stack(self.long_window).mean(0))
            self.long_window = []

    def _write(self, step: int, mean: torch.Tensor) -> None:
        wall, cpu = mean[:, 0].tolist(), mean[:, 1].tolist()
        slowest = max(range(self.world_size), key=lambda r: cpu[r])
        row = {"step": step, "steps": len(self.window), "wall_s": wall, "cpu_s": cpu, "slowest_rank": slowest,
               "slowest_host": self.hosts[slowest]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _check_stragglers(self, step: int, mean: torch.Tensor) -> None:
        cpu = mean[:, 1].tolist()
        slowest = max(range(self.world_size), key=lambda r: cpu[r])
        median = sorted(cpu)[(len(cpu) - 1) // 2]  # the lower median: with two ranks, the faster one
        if self.world_size > 1 and cpu[slowest] > STRAGGLER_RATIO * median:
            log.warning("straggler: rank %d (%s) used %.3f s CPU per step over steps %d-%d, median %.3f s "
                        "(wall %.3f s); see %s", slowest, self.hosts[slowest], cpu[slowest],
                        step - len(self.long_window) + 1, step, median, mean[slowest, 0].item(), self.path)

    # ---- stalls

    def _watch(self) -> None:
        reported_at = None
        while not self._stop.wait(min(5.0, self.stall_seconds / 4)):
            if not dist.is_initialized():
                return  # the process group is gone (the run ended through an exception)
            step, idle = self.step, time.monotonic() - self.last_beat
            if idle < self.stall_seconds or reported_at == step:
                continue
            reported_at = step
            try:
                self.report_stall(step, idle)
            except Exception as e:  # the store lives in rank 0's process; it may be dead
                log.error("rank %d: no step finished for %.0f s after step %d; could not gather the other "
                          "ranks' state: %s", self.rank, idle, step, e)

    def report_stall(self, step: int, idle: float) -> str | None:
        """Publish this rank's state; on rank 0 gather everyone's and return (and log) the table."""
        state, location = where(sys._current_frames().get(self._main))
        mine = {"step": step, "state": state, "where": location, "host": self.host}
        # Fetched here, not kept: a reference held past destroy_process_group would outlive c10d's teardown.
        store = dist.PrefixStore("pretrain/stall/", dist.distributed_c10d._get_default_store())
        episode = f"{step}/"
        store.set(episode + str(self.rank), json.dumps(mine))
        log.error("rank %d (%s): no step finished for %.0f s after step %d; main thread %s in %s. "
                  "Python stacks of this rank follow.", self.rank, self.host, idle, step, state, location)
        faulthandler.dump_traceback(all_threads=True)
        if self.rank != 0:
            return None
        keys = [episode + str(r) for r in range(self.world_size)]
        deadline = time.monotonic() + REPORT_WAIT_S
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.2)
        lines, suspects = [], []
        for r, key in enumerate(keys):
            if not store.check([key]):
                lines.append(f"  rank {r:>5} ({self.hosts[r]}): no report (dead, or hung holding the GIL)")
                suspects.append(r)
                continue
            info = json.loads(store.get(key))
            lines.append(f"  rank {r:>5} ({info['host']}): last finished step {info['step']}, "
                         f"{info['state']} in {info['where']}")
            if info["state"] == "elsewhere" or info["step"] < step:
                suspects.append(r)
        table = (f"stall: no step finished for {idle:.0f} s after step {step}; step {step + 1} is stuck. "
                 f"Stalled rank(s) (not waiting in a collective): {suspects or 'none found'}\n" + "\n".join(lines))
        log.error("%s", table)
        return table

    def close(self) -> None:
        self._stop.set()
        if self.world_size > 1:
            self._thread.join(timeout=10)
