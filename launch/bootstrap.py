"""Start torch.distributed for this process from the discovered environment; report a known error once per job;
tear down in a fixed order and end the process without the interpreter's own teardown."""

from __future__ import annotations

import atexit
import datetime
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from launch.env import DistEnv, discover, process_defaults

log = logging.getLogger(__name__)


ERROR_WAIT_S = 10.0  # how long rank 0 waits for the other ranks to report the error it hit
_defaults_set: dict[str, str] = {}  # the variables init_distributed set in this process, and their values


def _export(env: DistEnv) -> None:
    """Set the rank variables torchrun would set, so torch's env:// rendezvous and libraries see our discovery."""
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))


def init_distributed(device_type: str, *, timeout_minutes: float = 10.0, run_dir: str | Path = ".") -> DistEnv:
    """Initialise the default process group (NCCL on GPUs, gloo on CPU) when more than one process runs.

    First, where the user has not set them, the flight recorder's and CUDA allocator's variables
    (`launch.env.process_defaults`; flight-recorder traces go under `run_dir`): before CUDA initialises here. The
    collective timeout is explicit so a hung rank fails the job instead of idling until the wall time
    (`launch.monitor` names the stalled rank and step before it fires). The discovered rank variables are
    exported as torchrun would set them, so libraries that read RANK / LOCAL_RANK agree with us. On CUDA each
    process takes device local_rank modulo the devices it sees (with `srun --gpus-per-task=1` it sees one), and
    NCCL's communicator forms at once on it (`device_id`), so sub-groups of the mesh split from it.
    """
    # A value this function set for an earlier run in this process (tests, scripts calling main() twice) is a
    # default again, not the user's choice: the flight recorder of this run writes under this run's directory.
    users = {k: v for k, v in os.environ.items() if _defaults_set.get(k) != v}
    defaults = process_defaults(users, device_type=device_type, run_dir=run_dir)
    os.environ.update(defaults)
    _defaults_set.update(defaults)
    env = discover()
    if env.world_size == 1 or dist.is_initialized():
        return env
    _export(env)
    device = None
    if device_type == "cuda":
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        if "TORCH_FR_DUMP_TEMP_FILE" in defaults:  # NCCL writes its traces there on a timeout, into a directory
            Path(defaults["TORCH_FR_DUMP_TEMP_FILE"]).parent.mkdir(parents=True, exist_ok=True)
    if env.rank == 0:
        log.info("%s: %d processes, rendezvous at %s:%d, collective timeout %.1f min", env.launcher,
                 env.world_size, env.master_addr, env.master_port, timeout_minutes)
    dist.init_process_group(
        backend="nccl" if device_type == "cuda" else "gloo", init_method="env://", rank=env.rank,
        world_size=env.world_size, timeout=datetime.timedelta(minutes=timeout_minutes), device_id=device,
    )
    return env


EXIT_WAIT_S = 60.0  # how long rank 0 waits for the other ranks to leave at the end of a finished run


def shutdown(*, finished: bool = False) -> None:
    """Destroy the process groups. After a finished run (every rank calls this) the order is fixed: a barrier,
    so no rank closes its connections while another is still in a collective; then each rank destroys its
    groups, and rank 0 (which hosts the rendezvous store under srun and mpirun) goes last. After an error,
    other ranks may be stuck in a collective, so there is no barrier."""
    if not dist.is_initialized():
        return
    if not finished or dist.get_world_size() == 1:
        dist.destroy_process_group()
        return
    rank, world_size = dist.get_rank(), dist.get_world_size()
    store = _attempt_store("exit", dist.distributed_c10d._get_default_store())  # outlives the group
    dist.barrier()
    dist.destroy_process_group()
    store.set(str(rank), "")
    if rank == 0:
        deadline = time.monotonic() + EXIT_WAIT_S
        while not store.check([str(r) for r in range(world_size)]) and time.monotonic() < deadline:
            time.sleep(0.05)


def end_process(status: int) -> NoReturn:
    """Exit with `status`, skipping the interpreter's teardown, after doing what it would do that matters.

    torch's DTensor caches keep the DeviceMeshes of an FSDP/TP run, and with them the process groups, alive
    after destroy_process_group, so their gloo/NCCL threads still run while the interpreter tears itself
    down. A C++ thread that needs the GIL then (to release a tensor Python had handed over) is ended by
    Python in the middle of C++ code: `terminate called without an active exception`, SIGABRT, and a job
    that SLURM marks failed although every checkpoint was written (pytorch/pytorch#190489). A group with unfinished work (a rank
    failed while others were in a collective) can also block that teardown forever. So: collect garbage
    (DataLoader workers stop, files close), run the atexit handlers (logging, multiprocessing children,
    temporary directories), finalize MPI, flush, and leave with os._exit.
    """
    gc.collect()
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun; mpi4py would call MPI_Finalize in the teardown
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def report_error(kind: str, message: str) -> None:
    """Print `<kind> error: <message>` once for the whole job; every rank that failed calls this, then exits.

    Each failed rank publishes its error in the process group's store (a store of its own before the group
    exists). Rank 0, when it failed too, waits up to ERROR_WAIT_S for the others, prints each distinct error
    once (naming the ranks unless every rank had it) and publishes which ranks it spoke for; those stay
    silent. A rank it did not speak for (rank 0 did not fail, or this rank came too late) prints its own line.
    No rank returns before its error is printed: torchrun kills every rank once one exits non-zero, so a rank
    leaving early would silence rank 0's report. Rank 0 returns last, as it may host the store.
    """
    env = None if dist.is_initialized() else discover()
    rank, world_size = (env.rank, env.world_size) if env else (dist.get_rank(), dist.get_world_size())
    if world_size == 1:
        print(f"{kind} error: {message}", file=sys.stderr, flush=True)
    else:
        try:
            store = _error_store(env)
            store.set(f"error/{rank}", json.dumps([kind, message]))
            if rank == 0:
                _print_for_everyone(store, world_size)
            elif rank not in _wait_for_rank0(store):
                print(f"{kind} error on rank {rank}: {message}", file=sys.stderr, flush=True)
            store.set(f"left/{rank}", "")
        except Exception as e:  # no store (rank 0 gone, rendezvous failed): this rank speaks for itself
            print(f"{kind} error on rank {rank}: {message}", file=sys.stderr, flush=True)
            log.debug("could not share the error with the other ranks: %s", e)
    _tell_torchrun(f"{kind} error: {message}")


def _tell_torchrun(line: str) -> None:
    """torchrun's failure summary shows the error file's message instead of "To enable traceback see: ..."."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return
    try:
        with open(error_file, "w") as f:  # the format of torch.distributed.elastic's ErrorHandler, minus a traceback
            json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    except OSError as e:
        log.warning("could not write torchrun's error file %s: %s", error_file, e)


def _attempt_store(name: str, base: dist.Store) -> dist.Store:
    # torchrun --max-restarts keeps its store across attempts; an earlier attempt's keys must not count
    return dist.PrefixStore(f"pretrain/{name}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", base)


def _error_store(env: DistEnv | None) -> dist.Store:
    """The process group's store; before the group exists (env given), the one its rendezvous would make."""
    if env is None:
        base = dist.distributed_c10d._get_default_store()
    else:
        _export(env)
        base, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size,
                                          timeout=datetime.timedelta(seconds=6 * ERROR_WAIT_S)))
    return _attempt_store("error", base)


def _print_for_everyone(store: dist.Store, world_size: int) -> None:
    """Rank 0: print each rank's error that arrives within ERROR_WAIT_S, once per distinct error."""
    keys = [f"error/{r}" for r in range(world_size)]
    deadline = time.monotonic() + ERROR_WAIT_S
    while not store.check(keys) and time.monotonic() < deadline:
        time.sleep(0.05)
    by_error: dict[tuple[str, str], list[int]] = {}
    for r, key in enumerate(keys):
        if store.check([key]):
            by_error.setdefault(tuple(json.loads(store.get(key))), []).append(r)
    for (kind, message), ranks in by_error.items():
        where = "" if len(ranks) == world_size else f" on rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}"
        print(f"{kind} error{where}: {message}", file=sys.stderr, flush=True)
    spoken_for = sorted(r for ranks in by_error.values() for r in ranks)
    store.set("printed", json.dumps(spoken_for))
    # Stay until those ranks have read that (rank 0 may host the store they read it from).
    deadline = time.monotonic() + ERROR_WAIT_S
    while not store.check([f"left/{r}" for r in spoken_for if r]) and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_for_rank0(store: dist.Store) -> list[int]:
    """Another rank: the ranks rank 0 printed errors for, or [] when rank 0 printed nothing in time."""
    deadline = time.monotonic() + 3 * ERROR_WAIT_S  # rank 0 may fail later than this rank, then waits itself
    while not store.check(["printed"]):
        if time.monotonic() > deadline:
            return []
        time.sleep(0.05)
    return json.loads(store.get("printed"))
