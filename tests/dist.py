"""Run a function on N gloo processes: the harness of every multi-process CPU test.

    results = run_distributed(fn, 2, arg1, arg2)   # fn(*args) runs on each rank; results[rank] = its return

`fn` must be importable (defined at module level). Inside it `torch.distributed` is initialised with gloo
and RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are set as torchrun would set them.

The N processes are kept between calls (one pool per world size): starting a process and importing torch and
the packages costs 4 s for 2 processes and 9 s for 4 on a 2-core machine, more than most tests run. Each call
gets what a freshly started process would have: a new process group on a new port, the caller's environment,
working directory and stdout/stderr (passed as file descriptors, so pytest's capture sees the output), torch's
defaults (dtype, grad mode, one thread, a fresh random seed) and the signal handlers the process started with.
DTensor's sharding caches are emptied after each call: they are keyed by meshes, and a DeviceMesh compares equal
to one of an earlier call whose process groups are gone. Process groups get names no earlier call used, so a
mesh that survived anyway fails loudly instead of finding another call's group of the same name.
Warning filters and the root logger come back as they were; the warnings already shown are forgotten. A call
that leaves Python threads running, more than MAX_NATIVE_THREADS threads in all, or replaces a function or class
of torch.distributed, torch.Tensor or our packages (a test's patch) ends its pool after it. So does a call where a rank fails, dies or times out (the other
ranks may be stuck in a collective). The next call starts a new pool. A call whose pooled process died without a
Python error (a native crash) runs once more in new processes, with a warning, and the new outcome counts. Not undone: data a test changes in module
globals, modules imported (a fresh process imports them again) and atexit handlers (they run when the pool
ends). A test that needs more passes `fresh=True` and gets new processes; `TESTS_DIST_FRESH=1` makes every call
start new processes. `TESTS_DIST_DEBUG=1` prints why a pooled process is replaced (to the call's stderr).
"""

from __future__ import annotations

import atexit
import functools
import gc
import itertools
import logging
import os
import signal
import socket
import sys
import time
import threading
import traceback
import warnings
from multiprocessing import connection, reduction

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.multiprocessing as mp

_task_ids = itertools.count()
MAX_NATIVE_THREADS = 128  # a pooled process with more threads after a call is replaced


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_environment(env: dict, rank: int, world_size: int, port: int) -> dict:
    return {**env, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _run_on_rank(rank: int, world_size: int, fn, args) -> tuple[str, object]:
    torch.set_num_threads(1)  # as torchrun does: N processes on a few cores must not oversubscribe them
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        return "ok", fn(*args)
    except BaseException:  # report every failure, including assertion errors, to the parent
        return "error", traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _fresh_worker(rank, world_size, port, fn, args, queue):
    os.environ.update(_rank_environment({}, rank, world_size, port))
    status, value = _run_on_rank(rank, world_size, fn, args)
    queue.put((rank, status, value))


def _forget_caches() -> None:
    """Empty DTensor's sharding-propagation caches and every functools cache of torch.distributed and our
    packages, as a new process would have them."""
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    with warnings.catch_warnings():  # looking at torch.distributed.reduce_op warns that it is deprecated
        warnings.simplefilter("ignore")
        _clear_lru_caches()


def _is_ours_or_distributed(module_name: str) -> bool:
    return any(module_name == p or module_name.startswith(p + ".")
               for p in ("torch.distributed", "pretrain", "parallel", "launch", "data", "tests"))


def _clear_lru_caches() -> None:
    for name, module in list(sys.modules.items()):
        if module is None or not _is_ours_or_distributed(name):
            continue
        for value in list(vars(module).values()):
            members = list(vars(value).values()) if isinstance(value, type) else []
            for obj in (value, *members):
                if isinstance(obj, (staticmethod, classmethod)):
                    obj = obj.__func__
                if isinstance(obj, functools._lru_cache_wrapper):
                    obj.cache_clear()


def _module_state() -> dict[tuple[str, str], int]:
    """What a call could patch that a later call would see: the functions and classes of our packages' modules and
    of torch.distributed, and torch.Tensor's attributes (by identity)."""
    state = {("torch.Tensor", name): id(value) for name, value in vars(torch.Tensor).items()}
    with warnings.catch_warnings():  # looking at torch.distributed.reduce_op warns that it is deprecated
        warnings.simplefilter("ignore")
        for name, module in list(sys.modules.items()):
            if module is not None and _is_ours_or_distributed(name):
                # functions and classes only: counters and other data change legitimately
                state.update(((name, attr), id(value)) for attr, value in list(vars(module).items())
                             if callable(value))
    return state


def _os_threads() -> int:
    """Threads of this process, native ones included (gloo's, of process groups that something still holds)."""
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else threading.active_count()


def _changed_by_the_call(threads_before: set, state_before: dict) -> str | None:
    """Why the process is no longer as new (Python threads left running, a module attribute replaced, too many
    native threads), or None."""
    threads = [t.name for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    if threads:
        return f"threads left running: {threads}"
    # Calls leave native threads behind (20-50 after a tp/pp layout, of process groups torch keeps): they piled up
    # to hundreds per process over a run and loaded the machine, so a process past the bound is replaced.
    for _ in range(20):  # threads of destroyed process groups may take a moment to end
        if _os_threads() <= MAX_NATIVE_THREADS:
            break
        time.sleep(0.01)
    else:
        return f"{_os_threads()} native threads (more than {MAX_NATIVE_THREADS})"
    state = _module_state()
    patched = [f"{module}.{attr}" for (module, attr), ident in state_before.items()
               if state.get((module, attr), ident) != ident]
    return f"attributes replaced: {patched[:5]}" if patched else None


def _pool_worker(rank: int, world_size: int, conn) -> None:
    """Run tasks sent by the parent until it sends None, each as if in a freshly started process."""
    handlers = {}
    for s in signal.valid_signals():
        try:  # the handlers Python can set again (not SIGKILL's, not those installed outside Python)
            handler = signal.getsignal(s)
            if handler is not None:
                signal.signal(s, handler)
                handlers[s] = handler
        except (OSError, ValueError):
            pass
    warning_filters, root_logger = warnings.filters[:], logging.getLogger()
    log_level, log_handlers = root_logger.level, root_logger.handlers[:]
    while (task := conn.recv()) is not None:
        task_id, port, fn, args, env, cwd, path = task
        stdout_fd, stderr_fd = reduction.recv_handle(conn), reduction.recv_handle(conn)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(stdout_fd, 1), os.dup2(stderr_fd, 2)  # the caller's stdout/stderr, as a spawned child inherits
        os.close(stdout_fd), os.close(stderr_fd)
        os.environ.clear()
        os.environ.update(_rank_environment(env, rank, world_size, port))
        os.chdir(cwd)
        sys.path[:] = path
        torch.seed()
        c10d._world.group_count = 1_000_000 * (task_id + 1)  # the same on every rank: names agree across ranks
        threads_before, state_before = set(threading.enumerate()), _module_state()
        status, value = _run_on_rank(rank, world_size, fn, args)
        del task, fn, args
        signal.setitimer(signal.ITIMER_REAL, 0)  # before the handlers: a pending alarm must not reach the test's
        for s, handler in handlers.items():
            signal.signal(s, handler)
        _forget_caches()
        warnings.filters[:] = warning_filters
        warnings._filters_mutated()  # forget which warnings were shown: a fresh process shows them again
        root_logger.setLevel(log_level)
        root_logger.handlers[:] = log_handlers
        torch.set_default_dtype(torch.float32)
        torch.set_grad_enabled(True)
        sys.stdout.flush(), sys.stderr.flush()
        gc.collect()  # what the call left in reference cycles (process groups among them) goes now
        changed = _changed_by_the_call(threads_before, state_before)
        if os.environ.get("TESTS_DIST_DEBUG") and changed:
            print(f"dist pool rank {rank}: {changed}", file=sys.stderr, flush=True)
        try:
            conn.send((task_id, rank, status, value, changed))
        except Exception:  # an unpicklable result
            conn.send((task_id, rank, "error", traceback.format_exc(), changed))
        del value


class _Pool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe(duplex=True)  # a Unix socket pair: it can carry file descriptors
            proc = ctx.Process(target=_pool_worker, args=(rank, world_size, child_end), name=f"dist-pool-{rank}")
            proc.start()
            child_end.close()
            self.conns.append(parent_end)
            self.procs.append(proc)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def submit(self, task_id: int, fn, args) -> None:
        port, env, cwd = free_port(), dict(os.environ), os.getcwd()
        sys.stdout.flush(), sys.stderr.flush()
        for conn, proc in zip(self.conns, self.procs):
            conn.send((task_id, port, fn, args, env, cwd, sys.path))
            reduction.send_handle(conn, 1, proc.pid)
            reduction.send_handle(conn, 2, proc.pid)

    def close(self, *, kill: bool) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if not kill:
                try:
                    conn.send(None)
                except OSError:
                    pass
            proc.join(timeout=0 if kill else 5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
            conn.close()


_pools: dict[int, _Pool] = {}


@atexit.register  # before multiprocessing's own exit handler, which would wait for the workers forever
def _close_pools() -> None:
    while _pools:
        _pools.popitem()[1].close(kill=False)


def _collect_from_pool(pool: _Pool, task_id: int, world_size: int, timeout: float) -> tuple[dict, list, list]:
    """Results by rank, errors, and why a rank's process is no longer as new (then the pool must end)."""
    results: dict[int, object] = {}
    errors: list[str] = []
    changed: list[str] = []
    deadline = time.monotonic() + timeout
    waiting = dict(enumerate(pool.conns))
    while waiting and not errors:
        for conn in connection.wait(list(waiting.values()), timeout=1.0):
            rank = next(r for r, c in waiting.items() if c is conn)
            try:
                got_id, _, status, value, why_changed = conn.recv()
            except EOFError:
                errors.append(f"rank {rank} exited without a result (exit code {pool.procs[rank].exitcode})")
                break
            if got_id != task_id:
                errors.append(f"rank {rank} answered call {got_id}, not {task_id} (a harness bug)")
                break
            del waiting[rank]
            if why_changed:
                changed.append(f"rank {rank}: {why_changed}")
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")  # the others may be stuck in a collective
                break
        else:
            dead = [r for r in waiting if not pool.procs[r].is_alive() and not pool.conns[r].poll()]
            if dead:
                errors.append(f"rank(s) {dead} exited without a result (exit codes "
                              f"{[pool.procs[r].exitcode for r in dead]})")
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout:.0f} s; finished ranks: {sorted(results)}")
    return results, errors, changed


def _collect_from_fresh(fn, args, world_size: int, timeout: float) -> tuple[dict, list]:
    import queue as queue_lib

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_fresh_worker, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
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
            errors.append(f"rank {rank} failed:\n{value}")
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    return results, errors


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0, fresh: bool = False) -> list:
    """fn(*args) on `world_size` gloo ranks; their return values by rank. `fresh`: new processes for this call
    (for a test that changes module globals or process state a later test would see)."""
    if fresh or os.environ.get("TESTS_DIST_FRESH") == "1":
        results, errors = _collect_from_fresh(fn, args, world_size, timeout)
    else:
        pool = _pools.get(world_size)
        if pool is None or not pool.alive():
            if pool is not None:
                pool.close(kill=True)
            pool = _pools[world_size] = _Pool(world_size)
        task_id = next(_task_ids)
        try:
            pool.submit(task_id, fn, args)
            results, errors, changed = _collect_from_pool(pool, task_id, world_size, timeout)
        except BaseException:  # e.g. pytest-timeout or Ctrl-C: the ranks may still be running this call
            del _pools[world_size]
            pool.close(kill=True)
            raise
        if errors or changed:  # a rank may be stuck in a collective, or its process is no longer as new
            del _pools[world_size]
            pool.close(kill=bool(errors))
        if any("exited without a result" in e for e in errors):
            # A pooled process died (a native crash: seen once in 950 tests, "double free or corruption" in a
            # zero-bubble pipeline call, not reproduced): the call runs again in new processes, and counts.
            warnings.warn(f"run_distributed({fn!r}): {'; '.join(errors)}; running it again in new processes")
            results, errors = _collect_from_fresh(fn, args, world_size, timeout)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
