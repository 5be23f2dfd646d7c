"""The run lock: one live training run per run_dir; locks of runs that are gone are taken over with a warning.
Under torchrun: test_checkpoint.test_run_lock_under_torchrun (it shares that file's two-rank processes)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.checkpoint import LOCK_FILE, RunLock, RunLockError
from pretrain.config import build_config
from pretrain.train import train


def write_holder(run_dir: Path, **fields) -> dict:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": "", "slurm_restart_count": 0,
              "started": "2030-01-01T00:00:00+0000", **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))
    return holder


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`squeue` on PATH answering from a dict of job id → state ('' = unknown to SLURM); no SLURM job of our own."""
    states: dict[str, str] = {}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    table = tmp_path / "squeue.json"
    script = bin_dir / "squeue"
    script.write_text(f"""#!{sys.executable}
import json, sys
job = sys.argv[sys.argv.index("--jobs") + 1]
state = json.load(open({str(table)!r})).get(job, "")
if not state:
    sys.exit("slurm_load_jobs error: Invalid job id specified")
print(state)
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)

    def set_states(**jobs):
        states.update(jobs)
        table.write_text(json.dumps(states))

    set_states()
    return set_states


def test_second_run_is_refused_naming_the_holder(tmp_path):
    with RunLock.acquire(tmp_path) as first:
        with pytest.raises(RunLockError) as err:
            RunLock.acquire(tmp_path)
        msg = str(err.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg and first.holder["started"] in msg
        assert "another train.run_dir" in msg
        assert json.loads((tmp_path / LOCK_FILE).read_text()) == first.holder  # the holder's record is intact
    assert not (tmp_path / LOCK_FILE).exists()  # released
    RunLock.acquire(tmp_path).release()


def test_live_holder_is_refused_without_flock(tmp_path, monkeypatch):
    """Where the file system has no flock (some cluster file systems), the holder's record decides."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")  # ENOSYS

    write_holder(tmp_path)  # this very process: alive
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(RunLockError, match="that process is running"):
        RunLock.acquire(tmp_path)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    old = write_holder(tmp_path, pid=dead_pid())
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        lock = RunLock.acquire(tmp_path)
    assert f"pid {old['pid']}" in caplog.text and "no longer running" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_reused_pid_does_not_keep_a_lock(tmp_path, caplog):
    """Our own pid, recorded with another start time: an old run whose pid the system has since reused."""
    write_holder(tmp_path, pid_start=1)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        RunLock.acquire(tmp_path).release()
    assert "no longer running" in caplog.text


def test_holder_on_another_host_is_judged_by_slurm(tmp_path, fake_slurm, caplog):
    write_holder(tmp_path, host="gpu-node-17", pid=4242, slurm_job_id="1001", slurm_restart_count=2)
    fake_slurm(**{"1001": "RUNNING"})
    with pytest.raises(RunLockError) as err:
        RunLock.acquire(tmp_path)
    assert "pid 4242 on host gpu-node-17, SLURM job 1001 (restart 2)" in str(err.value)
    assert "SLURM says job 1001 is RUNNING" in str(err.value)

    fake_slurm(**{"1001": "PENDING"})  # requeued, waiting: it will come back to this run_dir
    with pytest.raises(RunLockError, match="is PENDING"):
        RunLock.acquire(tmp_path)

    for state in ("CANCELLED", ""):  # ended, or long gone from SLURM's memory
        fake_slurm(**{"1001": state})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
            RunLock.acquire(tmp_path).release()
        assert "SLURM job 1001 has ended" in caplog.text
        write_holder(tmp_path, host="gpu-node-17", pid=4242, slurm_job_id="1001")


def test_requeued_job_takes_over_its_own_lock(tmp_path, fake_slurm, monkeypatch, caplog):
    write_holder(tmp_path, host="gpu-node-17", pid=4242, slurm_job_id="1001", slurm_restart_count=0)
    fake_slurm(**{"1001": "RUNNING"})  # it is running: it is us, restarted on another node
    monkeypatch.setenv("SLURM_JOB_ID", "1001")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        lock = RunLock.acquire(tmp_path)
    assert "this SLURM job's earlier run; restart 0 → 1" in caplog.text
    assert lock.holder["slurm_job_id"] == "1001" and lock.holder["slurm_restart_count"] == 1
    lock.release()


def test_unknown_holder_on_another_host_is_refused_with_a_way_out(tmp_path, fake_slurm, monkeypatch):
    write_holder(tmp_path, host="workstation-2", pid=4242)  # no SLURM: nothing can tell whether it runs
    with pytest.raises(RunLockError) as err:
        RunLock.acquire(tmp_path)
    assert "cannot be checked from here" in str(err.value) and f"delete {tmp_path / LOCK_FILE}" in str(err.value)

    write_holder(tmp_path, host="gpu-node-17", pid=4242, slurm_job_id="1001")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # SLURM cannot be asked
    with pytest.raises(RunLockError, match="SLURM cannot be asked here whether job 1001 still runs"):
        RunLock.acquire(tmp_path)


def acquire_twice(run_dir: str) -> dict:
    """On every rank of a two-rank run (test_checkpoint.test_run_lock_under_torchrun): take the lock, then try
    again while holding it."""
    lock = RunLock.acquire(run_dir)
    held = json.loads((Path(run_dir) / LOCK_FILE).read_text())
    try:
        RunLock.acquire(run_dir)
        second = None
    except RunLockError as e:
        second = str(e)
    lock.release()
    return {"mine": lock.holder is not None, "holder_pid": held["pid"], "pid": os.getpid(), "second": second}


def test_train_refuses_a_run_dir_in_use(tmp_path):
    tree = {"data": {"path": "synthetic"}, "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 16},
            "optim": {"warmup_steps": 0},
            "train": {"steps": 2, "global_batch": 2, "micro_batch": 2, "run_dir": str(tmp_path), "eval_interval": 0},
            "checkpoint": {"interval": 1}, "log": {"progress": False, "tensorboard": False}}
    with RunLock.acquire(tmp_path):
        with pytest.raises(RunLockError, match="is in use by another training run"):
            train(build_config({}, tree))
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # nothing was started
    train(build_config({}, tree))
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000002"
    assert not (tmp_path / LOCK_FILE).exists()
