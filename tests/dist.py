"""Run a function on N gloo processes: the harness of every multi-process CPU test.

    results = run_distributed(fn, 2, arg1, arg2)   # fn(*args) runs on each rank; results[rank] = its return

`fn` must be importable (defined at module level). Inside it `torch.distributed` is initialised with gloo
and RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are set as torchrun would set them.
"""

from __future__ import annotations

import os
import queue as queue_lib
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # as torchrun does: N processes on a few cores must not oversubscribe them
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(*args)
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        try:
            rank, status, value = queue.get(timeout=1.0)
        except queue_lib.Empty:
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
            if dead and queue.empty():
                time.sleep(1.0)  # a rank that just finished may still be flushing its result
                if queue.empty():
                    errors.append(f"rank(s) {dead} exited without a result (exit codes "
                                  f"{[procs[r].exitcode for r in dead]})")
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout:.0f} s; finished ranks: {sorted(results)}")
            continue
        if status == "ok":
            results[rank] = value
        else:
            # the other ranks may be stuck in a collective; do not wait for them
            errors.append(f"rank {rank} failed:\n{value}")
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
