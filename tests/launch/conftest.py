"""Fixtures of the launcher tests: a small corpus and config, an uninterrupted reference run, a real SLURM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 60
CKPT_INTERVAL = 20
# Variables a test process may have inherited from a launcher; the runs here must discover their own.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "PRETRAIN_LAUNCHER", "TORCHELASTIC_RUN_ID")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment for a training subprocess: the repo importable, one thread per process (as torchrun and
    the sbatch template set it, so every launcher computes bitwise alike), no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) rows of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from data.prepare import prepare

    out = tmp_path_factory.mktemp("corpus")
    prepare(["stdlib"], out, max_bytes=300_000, quiet=True)
    return out


@pytest.fixture(scope="session")
def config(corpus, tmp_path_factory) -> Path:
    """A run of STEPS tiny steps for 2 processes, logging every step, checkpointing every CKPT_INTERVAL."""
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(textwrap.dedent(f"""\
        [model]
        d_model = 64
        n_layers = 2
        n_heads = 4
        seq_len = 64
        [data]
        path = "{corpus}"
        [optim]
        lr = 3e-3
        warmup_steps = 5
        [train]
        steps = {STEPS}
        global_batch = 8
        micro_batch = 4
        eval_interval = 0
        seed = 7
        [checkpoint]
        interval = {CKPT_INTERVAL}
        keep_last = 2
        [log]
        interval = 1
        progress = false
        tensorboard = false
        """))
    return path


def train_args(config: Path, run_dir: Path) -> list[str]:
    """Arguments of `python -m pretrain.train` for `config` into `run_dir`."""
    return ["--config", str(config), f"--train.run_dir={run_dir}"]


@pytest.fixture(scope="session")
def reference(config, tmp_path_factory) -> list[tuple[int, float]]:
    """Losses of an uninterrupted run of `config` by `python -m launch run --nproc 2`, which runs
    `torchrun --standalone --nproc-per-node 2`."""
    run_dir = tmp_path_factory.mktemp("reference")
    cmd = [sys.executable, "-m", "launch", "run", "--nproc", "2", *train_args(config, run_dir)]
    out = subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "-m torch.distributed.run --standalone --nproc-per-node 2 -m pretrain.train" in out.stdout
    rows = losses(run_dir)
    assert [s for s, _ in rows] == list(range(1, STEPS + 1))
    return rows


# ------------------------------------------------------------------------------------------------ SLURM

def slurm_missing() -> str | None:
    """Why the real-SLURM tests cannot run here, or None."""
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install -y slurm-wlm munge; .ci/run does)"
    if os.geteuid() != 0:
        return "slurm/local-cluster must run as root"
    return None


def _cluster(state: Path, *, nodes: int, cpus: int):
    """Start slurm/local-cluster in `state`; yield its slurm.conf; stop it (jobs, daemons, namespaces)."""
    reason = slurm_missing()
    if reason:
        pytest.skip(reason)
    script = str(REPO / "slurm" / "local-cluster")
    out = subprocess.run([script, "start", str(state)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NODES": str(nodes), "CPUS": str(cpus)})
    assert out.returncode == 0, f"local-cluster start failed:\n{out.stdout}\n{out.stderr}"
    try:
        yield state / "slurm.conf"
    finally:
        subprocess.run([script, "stop", str(state)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM for this session, advertising 4 CPUs on a 2-core machine so a 2-task job never
    waits for another; SLURM_CONF points at it."""
    with pytest.MonkeyPatch.context() as mp:
        for conf in _cluster(tmp_path_factory.mktemp("slurm"), nodes=1, cpus=4):
            mp.setenv("SLURM_CONF", str(conf))
            yield conf


@pytest.fixture
def slurm_two_nodes(tmp_path_factory, monkeypatch):
    """A real two-node SLURM (each slurmd in its own network namespace) for one test; SLURM_CONF points at it."""
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode:
        pytest.skip("no network namespaces here (unshare --net fails), so no emulated second node")
    for conf in _cluster(tmp_path_factory.mktemp("slurm2"), nodes=2, cpus=2):
        monkeypatch.setenv("SLURM_CONF", str(conf))
        yield conf
