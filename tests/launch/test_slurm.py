"""End to end on a real SLURM (slurm/local-cluster): the rendered template, preemption, requeue and resume.

Losses are compared bitwise (tolerance 0) with an uninterrupted torchrun run: on CPU the same 2-rank layout
computes the same floating-point operations in the same order under every launcher.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.env import first_host_of, scontrol_hostnames, slurm_port
from tests.launch.conftest import CKPT_INTERVAL, STEPS, clean_env, losses

pytestmark = pytest.mark.slurm

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT = 150


def launch(*args: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=clean_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def submit(config: Path, run_dir: Path, *, nodes: int = 1) -> str:
    """`python -m launch submit` of `config` as 2 processes on `nodes` nodes; returns the job id."""
    out = launch("submit", "--config", str(config), "--nodes", str(nodes), "--tasks-per-node", str(2 // nodes),
                 "--time", "00:10:00", f"--train.run_dir={run_dir}", cwd=run_dir.parent)
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    assert f"log: {run_dir}/slurm/slurm-{job_id}.out" in out
    return job_id


def job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                         timeout=30).stdout
    m = re.search(rf"\b{name}=(\S*)", out)
    return m.group(1) if m else ""


def log_of(run_dir: Path, job_id: str) -> str:
    path = run_dir / "slurm" / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else "(no log yet)"


def wait_until(predicate, what: str, run_dir: Path, job_id: str, timeout: float = JOB_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; job {job_id} is "
                f"{job_field(job_id, 'JobState')}. Log:\n{log_of(run_dir, job_id)[-4000:]}")


def wait_for_end(job_id: str, run_dir: Path) -> str:
    """The job's final state. A requeued job first waits out SLURM's requeue delay as a pending job with reason
    BeginTime; slurm/local-cluster shortens that delay to about 10 s (AuthInfo cred_expire)."""
    def ended():
        state = job_field(job_id, "JobState")
        return state if state in FINAL_STATES else None
    return wait_until(ended, "the job to end", run_dir, job_id)


def metrics_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_usr2_checkpoints_requeues_resumes_and_matches_uninterrupted(slurm_cluster, config, reference, tmp_path):
    run_dir = tmp_path / "preempted"
    job_id = submit(config, run_dir)
    wait_until(lambda: metrics_rows(run_dir) >= 5, "5 logged steps", run_dir, job_id)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    assert wait_for_end(job_id, run_dir) == "COMPLETED", log_of(run_dir, job_id)
    log = log_of(run_dir, job_id)
    # the ranks agree on a stop every train.sync_every steps, whichever of them the signal reached first
    m = re.search(r"stopping after step (\d+) \(SIGUSR2 received\)", log)
    assert m, log
    stopped = int(m.group(1))
    assert stopped < STEPS, "the signal arrived after training had finished; nothing was preempted"
    assert f"saved checkpoint {run_dir}/checkpoints/step_{stopped:08d}" in log
    assert f"requeued SLURM job {job_id}" in log
    assert "SLURM_RESTART_COUNT=1" in log and job_field(job_id, "Restarts") == "1"
    assert f"resumed from checkpoint {run_dir}/checkpoints/step_{stopped:08d}" in log
    assert losses(run_dir) == reference  # bitwise: tolerance 0


def _rank_pid(run_dir: Path, rank: int) -> int | None:
    """The process of SLURM task `rank` training into `run_dir`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"pretrain.train" in cmdline and f"--train.run_dir={run_dir}".encode() in cmdline
                and f"SLURM_PROCID={rank}".encode() in environ):
            return int(pid)
    return None


def test_rank_killed_during_checkpoint_write_resumes_from_previous(slurm_cluster, config, reference, tmp_path):
    run_dir = tmp_path / "killed"
    ckpts = run_dir / "checkpoints"
    job_id = submit(config, run_dir)
    victim = wait_until(lambda: _rank_pid(run_dir, 1), "rank 1 to start", run_dir, job_id)
    target = f".tmp-step_{2 * CKPT_INTERVAL:08d}-"  # the second save; the first one stays complete

    def writing():
        return ckpts.is_dir() and any(p.name.startswith(target) for p in ckpts.iterdir())
    deadline = time.monotonic() + JOB_TIMEOUT
    while not writing():  # a save lasts ~100 ms: poll tightly
        assert time.monotonic() < deadline and job_field(job_id, "JobState") in ("RUNNING", "PENDING", ""), \
            log_of(run_dir, job_id)
        time.sleep(0.001)
    os.kill(victim, signal.SIGKILL)
    assert wait_for_end(job_id, run_dir) == "FAILED"  # srun --kill-on-bad-exit ends rank 0; no requeue
    assert not (ckpts / f"step_{2 * CKPT_INTERVAL:08d}").exists(), "the save finished before the kill"
    assert (ckpts / "latest").read_text().strip() == f"step_{CKPT_INTERVAL:08d}"

    out = launch("resume", str(run_dir), cwd=tmp_path)
    rerun = re.search(r"submitted job (\d+)", out).group(1)
    assert wait_for_end(rerun, run_dir) == "COMPLETED", log_of(run_dir, rerun)
    assert f"resumed from checkpoint {ckpts}/step_{CKPT_INTERVAL:08d}" in log_of(run_dir, rerun)
    assert losses(run_dir) == reference  # bitwise: tolerance 0
    status = launch("status", str(run_dir), cwd=tmp_path)
    assert f"checkpoint step_{STEPS:08d}" in status and f"job {job_id}: FAILED" in status
    assert f"job {rerun}: COMPLETED" in status


@pytest.mark.parametrize("nodelist", ["vm", "node[001-003,010],gpu-a[7-8]", "a[1-2]-b[3-4],c", "x12,x[1-2]"])
def test_first_host_matches_scontrol(slurm_cluster, nodelist):
    assert first_host_of(nodelist) == scontrol_hostnames(nodelist)[0]


def test_two_nodes_rendezvous_and_match_one_node(slurm_two_nodes, config, reference, tmp_path):
    run_dir = tmp_path / "two-nodes"
    job_id = submit(config, run_dir, nodes=2)
    assert wait_for_end(job_id, run_dir) == "COMPLETED", log_of(run_dir, job_id)
    log = log_of(run_dir, job_id)
    assert "2 node(s) [node[1-2]], 2 task(s)" in log
    assert f"rendezvous at node1:{slurm_port(int(job_id))}" in log  # the first host, a port from the job id
    assert losses(run_dir) == reference  # bitwise: tolerance 0
