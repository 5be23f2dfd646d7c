"""Stragglers and hangs: per-rank step times, and a report naming the rank and step that stalled.

Synchronous training hides a slow rank: every rank's wall time per step is the slowest one's, because the others
wait for it in collectives. What differs is what each rank does with that time:
- on CPU (gloo), process CPU time: gloo blocks, it does not spin, so a rank that waits uses little CPU;
- on CUDA the host spins in its syncs and NCCL's proxy threads poll, so CPU time equals wall time on every rank.
  There, CUDA events around each step give each GPU's time per step and how long it sat idle between steps waiting
  for its host (data loading, Python, a contended CPU). A rank whose GPU waits for its host holds up the others,
  whose GPUs meanwhile sit in collectives (busy, not idle). A GPU that is itself slow (throttled) is not singled out
  so: the collectives inside every step align all ranks' GPU step times; nvidia-smi or DCGM show its clocks.
Each rank keeps its own times (`StepTimer`: two event records per step, read on logged steps) and hands them over on
logged steps only, in one all-gather; rank 0 writes them to `<run_dir>/step_times.jsonl` and warns of stragglers.

A hang never finishes a step. When no step has finished for `stall_seconds` (set below the collective timeout, so
the report comes before the timeout kills the job), every rank publishes its last finished step, where its main
thread is and, from torch's flight recorder, the last collective it entered in each process group (through the
process group's TCP store, which works while collectives are stuck), writes its flight-recorder trace under
`<run_dir>/flight_recorder/` and dumps its Python stacks; rank 0 prints one table. A rank that has not entered a
collective the others of its group have entered is the one that stalled. Without a flight recorder, ranks waiting
in a collective or in backward are victims and a rank anywhere else stalled: that works on gloo, but NCCL's calls
return at once, so there every rank waits in the project's own frames and only the flight recorder tells them apart.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STRAGGLER_RATIO = 1.25  # warn when a rank's own time per step exceeds the median rank's by this factor of a step
STRAGGLER_WINDOW = 50  # ... over at least this many steps (short windows flag noise, e.g. rank 0's logging)
REPORT_WAIT_S = 10.0  # how long rank 0 waits for the other ranks' stall reports
HOST_COLUMNS = ("wall_s", "cpu_s")
CUDA_COLUMNS = (*HOST_COLUMNS, "gpu_s", "gpu_wait_s")


class StepTimer:
    """This rank's seconds per step since the last `read()`: host wall and CPU time and, on CUDA, the GPU's time per
    step and its idle time between steps. The CUDA events are read only in `read()` (on a logged step, after the
    step's own sync), so timing never makes the host wait for the device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.columns = CUDA_COLUMNS if self.cuda else HOST_COLUMNS
        self.steps = 0
        self._since = (time.monotonic(), time.process_time())
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def step(self):
        """Times the block as one step."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            yield
        self.steps += 1

    def read(self) -> list[float]:
        """Per-step means of `columns` since the last read, which starts the next window."""
        n = max(self.steps, 1)
        times = [(time.monotonic() - self._since[0]) / n, (time.process_time() - self._since[1]) / n]
        if self.cuda:
            busy, idle = [0.0], [0.0]
            if self._events:
                self._events[-1][1].synchronize()
                busy = [start.elapsed_time(end) / 1e3 for start, end in self._events]
                # Gaps inside the window only: the one across a logged step holds logging and evaluation. The median,
                # so that a checkpoint save in the window does not count as waiting.
                idle = [end.elapsed_time(start) / 1e3 for (_, end), (start, _) in zip(self._events, self._events[1:])]
            times += [sum(busy) / len(busy), statistics.median(idle or [0.0])]
        self.steps, self._events = 0, []
        self._since = (time.monotonic(), time.process_time())
        return times


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


# torch keeps two flight recorders: NCCL's (CUDA builds only) and the one of every other backend (gloo).
_RECORDERS = ("_dump_nccl_trace", "_dump_fr_trace")


def _flight_records() -> list[tuple[str, dict]]:
    """(name, trace) of each of this process's flight recorders that holds entries."""
    c10d, records = torch._C._distributed_c10d, []
    for name in _RECORDERS:
        try:
            trace = json.loads(getattr(c10d, name + "_json")(includeCollectives=True, onlyActive=False))
        except (AttributeError, RuntimeError, ValueError):  # not in this build, or unreadable: the report goes on
            continue
        if trace.get("entries"):
            records.append((name, trace))
    return records


def entered_collectives() -> dict[str, list]:
    """From torch's flight recorders: per process group ('name (description)', and its ranks where the recorder
    knows them: NCCL's does), [sequence number, op] of the last collective this process entered (enqueued); {}
    where no recorder is on. Point-to-point ops (pipeline sends) are left out: they are numbered per pair of ranks,
    not per group."""
    entered: dict[str, list] = {}
    for _, trace in _flight_records():
        labels, ops = {}, {}
        for entry in trace["entries"]:
            if not entry["is_p2p"]:
                pg, (name, description) = str(entry["pg_id"]), entry["process_group"]
                # Sub-groups of a mesh may share a name across ranks; their ranks tell them apart.
                ranks = _group_ranks(trace, name)
                labels[pg] = f"{name} ({description})" + (f" ranks {_ranks(ranks)}" if ranks else "")
                ops[pg, int(entry["collective_seq_id"])] = entry["profiling_name"]
        for pg, status in (trace.get("pg_status") or {}).items():
            if pg in labels:  # a group with no entry left in the ring buffer cannot be named; skip it
                seq = int(status["last_enqueued_collective"])
                entered[labels[pg]] = [seq, ops.get((pg, seq), "?")]
    return entered


def _group_ranks(trace: dict, group: str) -> list[int]:
    """The global ranks of process group `group` from a flight-recorder trace ([] where it does not say: gloo's)."""
    try:
        return json.loads((trace.get("pg_config") or {}).get(group, {}).get("ranks") or "[]")
    except ValueError:
        return []


def write_flight_record(path: Path) -> str:
    """Write this process's flight-recorder trace at `path`, pickled as NCCL dumps it on a timeout (NCCL's recorder
    where it has entries); return the recorder's backend, 'nccl' or 'gloo', or '' when no recorder holds any."""
    records = _flight_records()
    if not records:
        return ""
    dump = getattr(torch._C._distributed_c10d, records[0][0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dump(includeCollectives=True, includeStackTraces=True, onlyActive=False))
    return "nccl" if records[0][0] == "_dump_nccl_trace" else "gloo"


def flight_record_prefix(run_dir: Path) -> str:
    """Where flight-recorder traces go: TORCH_FR_DUMP_TEMP_FILE (launch.bootstrap sets it under the run directory
    unless the user did) followed by the rank."""
    return (os.environ.get("TORCH_FR_DUMP_TEMP_FILE") or os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
            or str(Path(run_dir) / "flight_recorder" / "rank_"))


def _lagging(reports: dict[int, dict]) -> tuple[list[str], list[int]]:
    """Per process group, the ranks that have not entered the last collective that others of the group entered:
    lines that name them, and all of them."""
    lines, lagging = [], set()
    for group in sorted({group for info in reports.values() for group in info["entered"]}):
        entered = {r: info["entered"][group] for r, info in reports.items() if group in info["entered"]}
        latest, op = max(entered.values())
        behind = sorted(r for r, (seq, _) in entered.items() if seq < latest)
        if behind:
            lines.append(f"  group {group}: rank(s) {_ranks(behind)} have not entered collective #{latest} ({op}) "
                         f"that rank(s) {_ranks(sorted(set(entered) - set(behind)))} entered")
            lagging.update(behind)
    return lines, sorted(lagging)


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5': a thousand ranks on one line."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def own_time(mean: torch.Tensor, columns: tuple[str, ...]) -> list[float]:
    """Per rank, the part of its seconds per step that is its own rather than waiting for others: CPU seconds on
    CPU, its GPU's idle time waiting for its host on CUDA (see the module docstring). `mean` is [world, columns]."""
    return mean[:, columns.index("gpu_wait_s" if "gpu_wait_s" in columns else "cpu_s")].tolist()


def straggler(mean: torch.Tensor, columns: tuple[str, ...]) -> int | None:
    """The rank that holds the others up, if one does: its own time per step exceeds the median rank's by
    STRAGGLER_RATIO − 1 of a step (CPU: of the median's CPU time; CUDA: of the median step's wall time)."""
    own = own_time(mean, columns)
    if len(own) < 2:
        return None
    slowest = max(range(len(own)), key=lambda r: own[r])
    median = _lower_median(own)
    allowed = (STRAGGLER_RATIO - 1) * (_lower_median(mean[:, 0].tolist()) if "gpu_wait_s" in columns else median)
    return slowest if own[slowest] - median > allowed else None


def _lower_median(values: list[float]) -> float:
    return sorted(values)[(len(values) - 1) // 2]  # with two ranks, the faster one


class StepMonitor:
    """Collects per-rank step times (rank 0 writes them) and watches for stalls in a daemon thread."""

    def __init__(self, run_dir: Path, *, rank: int, world_size: int, stall_seconds: float, start_step: int = 0,
                 straggler_window: int = STRAGGLER_WINDOW, columns: tuple[str, ...] = HOST_COLUMNS):
        self.rank, self.world_size = rank, world_size
        self.stall_seconds, self.straggler_window, self.columns = stall_seconds, straggler_window, columns
        self.step, self.last_beat = start_step, time.monotonic()
        self.host = socket.gethostname()
        self.hosts = [self.host]
        self.trace_prefix = flight_record_prefix(run_dir)
        self.path = Path(run_dir) / "step_times.jsonl"
        if rank == 0 and self.path.exists():  # resumed: drop rows of steps that will run again, as metrics do
            rows = [r for r in self.path.read_text().splitlines() if r.strip()]
            self.path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= start_step))
        self.pending: list[tuple[torch.Tensor, int]] = []  # (times, steps) since the last straggler check
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        if world_size > 1:
            self.hosts = [None] * world_size
            dist.all_gather_object(self.hosts, self.host)
            self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
            self._thread.start()

    # ---- step times

    def beat(self, step: int) -> None:
        """`step` finished on this rank (host time only: no sync)."""
        self.step, self.last_beat = step, time.monotonic()

    def record(self, step: int, times: torch.Tensor, *, steps: int = 1) -> None:
        """After logged step `step`: `times` [world, columns] = every rank's mean seconds per step over the `steps`
        steps since the last record."""
        self.beat(step)
        if self.rank != 0:
            return
        self._write(step, times, steps)
        self.pending.append((times, steps))
        counted = sum(n for _, n in self.pending)
        if counted >= self.straggler_window:
            self._check_stragglers(step, sum(t * n for t, n in self.pending) / counted, counted)
            self.pending = []

    def _write(self, step: int, mean: torch.Tensor, steps: int) -> None:
        own = own_time(mean, self.columns)
        slowest = max(range(self.world_size), key=lambda r: own[r])
        row = {"step": step, "steps": steps, **dict(zip(self.columns, mean.T.tolist())), "slowest_rank": slowest,
               "slowest_host": self.hosts[slowest]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _check_stragglers(self, step: int, mean: torch.Tensor, steps: int) -> None:
        slowest = straggler(mean, self.columns)
        if slowest is None:
            return
        own = own_time(mean, self.columns)
        median = _lower_median(own)
        first, wall = step - steps + 1, mean[slowest, 0].item()
        if "gpu_wait_s" in self.columns:
            log.warning("straggler: rank %d (%s) kept its GPU idle %.3f s per step waiting for its host (data "
                        "loading, Python, a busy CPU) over steps %d-%d, median rank %.3f s, step %.3f s; see %s",
                        slowest, self.hosts[slowest], own[slowest], first, step, median, wall, self.path)
        else:
            log.warning("straggler: rank %d (%s) used %.3f s CPU per step over steps %d-%d, median %.3f s "
                        "(wall %.3f s); see %s", slowest, self.hosts[slowest], own[slowest], first, step, median,
                        wall, self.path)

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
        mine = {"step": step, "state": state, "where": location, "host": self.host,
                "entered": entered_collectives()}
        traced = write_flight_record(Path(self.trace_prefix + str(self.rank)))
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
        lines, reports, silent, stuck_elsewhere = [], {}, [], []
        for r, key in enumerate(keys):
            if not store.check([key]):
                lines.append(f"  rank {r:>5} ({self.hosts[r]}): no report (dead, or hung holding the GIL)")
                silent.append(r)
                continue
            info = reports[r] = json.loads(store.get(key))
            lines.append(f"  rank {r:>5} ({info['host']}): last finished step {info['step']}, "
                         f"{info['state']} in {info['where']}")
            if info["state"] == "elsewhere" or info["step"] < step:
                stuck_elsewhere.append(r)
        lagging, behind = _lagging(reports)
        if behind:  # the flight recorder knows: ranks that have not entered a collective the others wait in
            verdict = f"Stalled rank(s) (not entered a collective the others entered): {sorted(set(behind + silent))}"
        else:
            stalled = sorted(silent + stuck_elsewhere) or "none found"
            verdict = f"Stalled rank(s) (not waiting in a collective): {stalled}"
        traces = f"Flight-recorder traces: {self.trace_prefix}<rank>"
        if traced == "nccl":  # torch's analyser needs the process-group table only NCCL's recorder keeps
            traces += (f"; NCCL writes them again when the timeout fires; analyse them with python -m "
                       f"torch.distributed.flight_recorder.fr_trace {Path(self.trace_prefix).parent}")
        elif not traced:
            traces = "No flight-recorder trace (the recorder is off: TORCH_FR_BUFFER_SIZE=0)."
        table = (f"stall: no step finished for {idle:.0f} s after step {step}; step {step + 1} is stuck. {verdict}\n"
                 + "\n".join(lagging + lines) + "\n" + traces)
        log.error("%s", table)
        return table

    def close(self) -> None:
        self._stop.set()
        if self.world_size > 1:
            self._thread.join(timeout=10)
