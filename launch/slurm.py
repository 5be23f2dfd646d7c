"""SLURM side of `python -m launch`: render the sbatch template for a run, submit it, and ask about its jobs.

A submitted run keeps everything about its jobs in `<run_dir>/slurm/`: `train.sbatch` (the rendered script,
which `resume` submits again), `jobs.jsonl` (one line per submission) and `slurm-<jobid>.out` (each job's log;
a requeued job appends to its own).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "slurm" / "train.sbatch"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}


class SlurmError(RuntimeError):
    """A SLURM command failed; the message carries its output."""


def _run(cmd: list[str], *, timeout: float = 60) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: run this on a SLURM login node (or start one with "
                         f"`slurm/local-cluster start`)") from None
    if out.returncode:
        raise SlurmError(f"{shlex.join(cmd)} failed ({out.returncode}): {(out.stderr or out.stdout).strip()}")
    return out.stdout


def render(template: str, *, directives: dict[str, str | None], variables: dict[str, str],
           train_args: list[str], extra: list[str] = ()) -> str:
    """The template with `#SBATCH --key=value` lines set from `directives` (None: leave the template's line,
    or add none), `extra` sbatch options added verbatim, and `NAME=...` variable lines set to literal values,
    TRAIN_ARGS to `train_args`."""
    lines = template.splitlines()
    seen = set()
    for i, line in enumerate(lines):
        m = re.match(r"#SBATCH --([\w-]+)", line)
        if m and directives.get(m.group(1)) is not None:
            lines[i] = f"#SBATCH --{m.group(1)}={directives[m.group(1)]}"
            seen.add(m.group(1))
        m = re.match(r"([A-Z_]+)=", line)
        if m and m.group(1) in variables:
            lines[i] = f"{m.group(1)}={shlex.quote(variables[m.group(1)])}"
        elif m and m.group(1) == "TRAIN_ARGS":
            lines[i] = f"TRAIN_ARGS=({shlex.join(train_args)})"
    missing = [f"#SBATCH --{k}={v}" for k, v in directives.items() if v is not None and k not in seen]
    missing += [f"#SBATCH {option}" for option in extra]
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    return "\n".join(lines[:last + 1] + missing + lines[last + 1:]) + "\n"


def sbatch(script: Path, extra: list[str] = ()) -> str:
    """Submit `script`; returns the job id."""
    out = _run(["sbatch", "--parsable", *extra, str(script)])
    return out.strip().split(";")[0]


def record_job(run_dir: Path, job_id: str, command: list[str]) -> None:
    with (run_dir / "slurm" / "jobs.jsonl").open("a") as f:
        f.write(json.dumps({"job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "command": command}) + "\n")


def jobs_of(run_dir: Path) -> list[str]:
    path = run_dir / "slurm" / "jobs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["job_id"] for line in path.read_text().splitlines() if line.strip()]


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, RunTime, Restarts, Reason, ...); {} once SLURM forgot the job."""
    try:
        out = _run(["scontrol", "show", "job", "--oneliner", job_id])
    except SlurmError:
        return {}
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def log_path(run_dir: Path, job_id: str) -> Path:
    return run_dir / "slurm" / f"slurm-{job_id}.out"
