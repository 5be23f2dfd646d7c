"""The test harness itself (tests/dist.py): pooled processes behave as fresh ones, and a call that leaves a
process changed or broken ends its pool."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from tests.dist import run_distributed


def _process() -> tuple[int, str | None, int, torch.dtype]:
    return os.getpid(), os.environ.get("DIST_PROBE"), dist.get_world_size(), torch.get_default_dtype()


def _change_defaults_and_print() -> None:
    torch.set_default_dtype(torch.float64)  # undone after the call
    print(f"hello from rank {dist.get_rank()}", flush=True)


def _patch_a_collective() -> None:
    dist.barrier = lambda *args, **kwargs: None  # a test's patch: the pool must not hand it to the next call


def _rank1_fails() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank 1 broke")
    dist.barrier()  # rank 0 waits for rank 1 in vain: the pool must end, not serve the next call


def _sharded_sum() -> tuple[float, str]:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    x = distribute_tensor(torch.arange(8.0).view(4, 2), mesh, [Shard(0)])  # (4, 2), two rows per rank
    return (x * 2).full_tensor().sum().item(), mesh.get_group("dp").group_name


def test_calls_reuse_processes_with_the_callers_environment_and_output(monkeypatch, capfd):
    monkeypatch.setenv("DIST_PROBE", "first")
    first = run_distributed(_process, 2)
    run_distributed(_change_defaults_and_print, 2)
    monkeypatch.setenv("DIST_PROBE", "second")
    second = run_distributed(_process, 2)
    assert [pid for pid, *_ in first] == [pid for pid, *_ in second], "the processes were not kept"
    assert [rest for _, *rest in first] == [["first", 2, torch.float32]] * 2
    assert [rest for _, *rest in second] == [["second", 2, torch.float32]] * 2
    out = capfd.readouterr().out
    assert "hello from rank 0" in out and "hello from rank 1" in out, out


def test_a_patch_or_a_failure_ends_the_pool():
    before = {pid for pid, *_ in run_distributed(_process, 2)}
    run_distributed(_patch_a_collective, 2)
    after_patch = {pid for pid, *_ in run_distributed(_process, 2)}
    assert not before & after_patch
    with pytest.raises(AssertionError, match="rank [01] failed"):  # rank 0 may see rank 1 leave first
        run_distributed(_rank1_fails, 2)
    after_failure = {pid for pid, *_ in run_distributed(_process, 2)}
    assert not after_patch & after_failure


def test_each_call_gets_its_own_process_groups():
    (total, group), _ = run_distributed(_sharded_sum, 2)
    (again, other_group), _ = run_distributed(_sharded_sum, 2)
    assert total == again == 2 * sum(range(8))
    assert group != other_group


def _crash_on_a_pooled_rank_1() -> int:
    if dist.get_rank() == 1 and multiprocessing.current_process().name.startswith("dist-pool"):
        os.abort()  # as a native crash would
    return dist.get_rank()


def test_a_native_crash_in_a_pooled_process_runs_the_call_again_in_new_processes():
    run_distributed(_process, 2)  # a pool exists
    with pytest.warns(UserWarning, match="rank 1 exited without a result.*running it again in new processes"):
        assert run_distributed(_crash_on_a_pooled_rank_1, 2) == [0, 1]
