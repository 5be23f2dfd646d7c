"""`python -m launch`: help, the rendered sbatch script, and errors caught before anything is submitted."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.launch.conftest import REPO, clean_env


def launch(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("command,options", [
    ("run", ["--config", "--nproc"]),
    ("submit", ["--config", "--nodes", "--tasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time",
                "--partition", "--account", "--job-name", "--signal-before", "--torchrun", "--sbatch", "--dry-run"]),
    ("status", ["run_dir"]),
    ("resume", ["run_dir", "--time", "--partition", "--account"]),
])
def test_help_explains_every_option(command, options):
    out = launch(command, "--help")
    assert out.returncode == 0, out.stderr
    for option in options:
        assert option in out.stdout, option
    top = launch("--help").stdout
    assert command in top


def test_submit_renders_the_template(config, tmp_path):
    out = launch("submit", "--config", str(config), "--nodes", "2", "--tasks-per-node", "4", "--gpus-per-node", "4",
                 "--time", "01:30:00", "--partition", "gpu", "--account", "proj1", "--signal-before", "120",
                 "--sbatch=--qos=high", "--dry-run", "--train.run_dir=runs/x", "--optim.lr", "1e-3",
                 "--train.global_batch=32", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / "x"
    script = (run_dir / "slurm" / "train.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, re.M))
    assert directives == {
        "job-name": "x", "nodes": "2", "ntasks-per-node": "4", "gpus-per-node": "4", "time": "01:30:00",
        "partition": "gpu", "account": "proj1", "signal": "USR2@120", "requeue": "", "open-mode": "append",
        "output": f"{run_dir}/slurm/slurm-%j.out", "chdir": str(tmp_path), "qos": "high"}
    assert f"\nPYTHON={sys.executable}\n" in script  # the job runs the interpreter that submitted it
    assert f"\nREPO={REPO}\n" in script and "\nLAUNCHER=srun\n" in script
    args = shlex.split(re.search(r"^TRAIN_ARGS=\((.*)\)$", script, re.M).group(1))
    assert args == ["--config", str(config), "--optim.lr", "1e-3", "--train.global_batch=32",
                    f"--train.run_dir={run_dir}"]
    assert subprocess.run(["bash", "-n", str(run_dir / "slurm" / "train.sbatch")]).returncode == 0


def test_submit_checks_the_config_and_the_layout_first(config, tmp_path):
    bad = launch("submit", "--config", str(config), "--optim.lrr=1", "--dry-run", cwd=tmp_path)
    assert bad.returncode != 0 and "Did you mean 'lr'" in bad.stderr
    # global_batch 8 = micro_batch 4 x dp: 3 processes cannot split it
    layout = launch("submit", "--config", str(config), "--tasks-per-node", "3", "--dry-run", cwd=tmp_path)
    assert layout.returncode != 0 and "3 task(s)" in layout.stderr and "global_batch" in layout.stderr
    typo = launch("submit", "--config", str(config), "--node", "2", "--dry-run", cwd=tmp_path)
    assert typo.returncode != 0 and "unrecognized arguments: --node" in typo.stderr
    assert not (tmp_path / "runs").exists()


def test_resume_needs_a_submitted_run_directory(tmp_path):
    out = launch("resume", str(tmp_path))
    assert out.returncode != 0 and "train.sbatch not found" in out.stderr
