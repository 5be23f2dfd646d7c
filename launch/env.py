"""Where this process sits in the job: rank, world size, local rank and the rendezvous address.

Each launcher's discovery is a pure function of an environment mapping (plus, for MPI, of values the ranks
exchanged), so it is unit-tested from recorded environments. `discover()` picks the launcher:

1. torchrun (RANK and WORLD_SIZE set), also when torchrun itself runs under srun or mpirun;
2. Open MPI's mpirun (OMPI_COMM_WORLD_SIZE), also inside a SLURM allocation;
3. a SLURM task started by srun (SLURM_PROCID and SLURM_STEP_NUM_TASKS; a batch script itself is not a task);
4. another MPI launcher (PMI_SIZE, PMIX_RANK: MPICH/Intel MPI mpirun outside SLURM);
5. otherwise one process.

PRETRAIN_LAUNCHER=torchrun|mpi|slurm|single forces a choice where this order guesses wrong (e.g. MPICH's
mpirun inside a SLURM allocation, whose ranks also see SLURM step variables). MASTER_ADDR / MASTER_PORT, when
set, override the SLURM-derived rendezvous address.

`process_defaults` gives the environment a training process sets for itself before CUDA and the process groups
start (flight recorder, CUDA allocator), where the user has not.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

LAUNCHERS = ("torchrun", "mpi", "slurm", "single")
FLIGHT_RECORDER_ENTRIES = "2000"  # collectives each rank remembers: torch 2.13's default; older torch records none
# SLURM rendezvous ports come from the job id in [PORT_BASE, PORT_BASE + 16000): below Linux's ephemeral range
# (32768+), so an outgoing connection never holds the port a job derives.
PORT_BASE = 15000


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"
    """single | torchrun | slurm | mpi."""


def _ints(environ: Mapping[str, str], launcher: str, **names: str) -> dict[str, int]:
    try:
        return {key: int(environ[name]) for key, name in names.items()}
    except ValueError as e:
        raise RuntimeError(f"malformed {launcher} environment ({', '.join(names.values())}): {e}") from None


def from_torchrun(environ: Mapping[str, str]) -> DistEnv | None:
    """torchrun (and `tests/dist.py`) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    v = _ints({"LOCAL_RANK": "0", "MASTER_PORT": "29500", **environ}, "torchrun", rank="RANK",
              world_size="WORLD_SIZE", local_rank="LOCAL_RANK", master_port="MASTER_PORT")
    return DistEnv(**v, master_addr=environ.get("MASTER_ADDR", "127.0.0.1"), launcher="torchrun")


# ------------------------------------------------------------------------------------------------ SLURM

def first_host_of(nodelist: str) -> str:
    """The first host of a SLURM node list, without scontrol: 'gpu[07-09,12],cpu1' → 'gpu07'.

    Brackets hold comma-separated numbers or zero-padded ranges; several bracket groups may appear in one
    name ('a[1-2]-b[3-4]' → 'a1-b3'). Used where scontrol is not installed (e.g. inside a container).
    """
    name = re.split(r",(?![^\[]*\])", nodelist.strip(), maxsplit=1)[0]
    return re.sub(r"\[([^\],\-]+)[^\]]*\]", r"\1", name)


def scontrol_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames NODELIST`: SLURM's own expansion of a node list."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         timeout=30, check=True)
    return out.stdout.split()


def _hostnames(nodelist: str) -> list[str]:
    """scontrol's expansion where scontrol works; else (no scontrol or no SLURM config, as in some containers)
    just the first host, parsed here."""
    if shutil.which("scontrol"):
        try:
            return scontrol_hostnames(nodelist)
        except (OSError, subprocess.SubprocessError):
            pass
    return [first_host_of(nodelist)]


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """A rendezvous port every task of a job step derives alike; concurrent steps of a job differ."""
    return PORT_BASE + (job_id * 16 + step_id) % 16000


def from_slurm(environ: Mapping[str, str], *,
               hostnames: Callable[[str], Sequence[str]] | None = None) -> DistEnv | None:
    """A task started by `srun` (one task per GPU, or per CPU process): SLURM_PROCID, SLURM_STEP_NUM_TASKS,
    SLURM_LOCALID; rank 0 runs on the first host of the step's node list; the port comes from the job id.

    `hostnames` expands a node list (default `scontrol show hostnames`, or `first_host_of` where scontrol
    is missing or fails).
    """
    if "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return None  # not under srun: a batch script or salloc shell is one process, not a task of a step
    v = _ints({"SLURM_LOCALID": "0", "SLURM_STEP_ID": "0", **environ}, "SLURM", rank="SLURM_PROCID",
              world_size="SLURM_STEP_NUM_TASKS", local_rank="SLURM_LOCALID", job_id="SLURM_JOB_ID",
              step_id="SLURM_STEP_ID")
    if "MASTER_ADDR" in environ:
        addr = environ["MASTER_ADDR"]
    else:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]
        addr = (hostnames or _hostnames)(nodelist)[0]
    port = int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else slurm_port(v["job_id"], v["step_id"])
    return DistEnv(rank=v["rank"], world_size=v["world_size"], local_rank=v["local_rank"], master_addr=addr,
                   master_port=port, launcher="slurm")


# ------------------------------------------------------------------------------------------------ MPI

def is_mpi(environ: Mapping[str, str]) -> bool:
    return any(k in environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


def local_rank_from_names(processor_names: Sequence[str], rank: int) -> int:
    """Ranks sharing a processor (host) name are numbered 0, 1, ... in rank order: the local rank."""
    return sum(1 for name in processor_names[:rank] if name == processor_names[rank])


def mpi_env(rank: int, processor_names: Sequence[str], master_addr: str, master_port: int) -> DistEnv:
    """The environment from what MPI ranks exchanged: every rank's processor name, rank 0's address/port."""
    return DistEnv(rank=rank, world_size=len(processor_names),
                   local_rank=local_rank_from_names(processor_names, rank),
                   master_addr=master_addr, master_port=master_port, launcher="mpi")


def from_mpi() -> DistEnv:
    """Ranks and host names through mpi4py (MPI_Init happens here); rank 0 broadcasts a free port on its host."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("started by an MPI launcher but mpi4py is not installed: pip install -e '.[mpi]' "
                           "(or set PRETRAIN_LAUNCHER to the launcher you meant)") from None
    comm = MPI.COMM_WORLD
    names = comm.allgather(MPI.Get_processor_name())
    master = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            master = (socket.gethostname(), s.getsockname()[1])
    addr, port = comm.bcast(master, root=0)
    return mpi_env(comm.Get_rank(), names, addr, port)


# ------------------------------------------------------------------------------------------------ choice

def launcher_of(environ: Mapping[str, str]) -> str:
    """Which launcher started this process (see the module docstring for the order)."""
    forced = environ.get("PRETRAIN_LAUNCHER", "")
    if forced:
        if forced not in LAUNCHERS:
            raise RuntimeError(f"PRETRAIN_LAUNCHER={forced!r}; use one of {', '.join(LAUNCHERS)}")
        return forced
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return "torchrun"
    if "OMPI_COMM_WORLD_SIZE" in environ:
        return "mpi"
    if "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        return "slurm"
    return "mpi" if is_mpi(environ) else "single"


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The environment of the launcher that started this process, else a single process."""
    environ = os.environ if environ is None else environ
    launcher = launcher_of(environ)
    if launcher == "mpi":
        return from_mpi()
    found = {"torchrun": from_torchrun, "slurm": from_slurm}.get(launcher, lambda _: None)(environ)
    if found is None and launcher != "single":
        raise RuntimeError(f"PRETRAIN_LAUNCHER={launcher} but this process has no {launcher} variables")
    return found or DistEnv()


# ------------------------------------------------------------------------------------------------ defaults

def process_defaults(environ: Mapping[str, str], *, device_type: str, run_dir: str | Path) -> dict[str, str]:
    """Variables to set in this process before CUDA and the process groups start, where the user has set neither
    them nor their older names (see README, Launching on clusters):

    - torch's flight recorder keeps each rank's last collectives (TORCH_FR_BUFFER_SIZE, formerly
      TORCH_NCCL_TRACE_BUFFER_SIZE), NCCL writes them when a collective times out (TORCH_NCCL_DUMP_ON_TIMEOUT), into
      `<run_dir>/flight_recorder/rank_<N>` (TORCH_FR_DUMP_TEMP_FILE, formerly TORCH_NCCL_DEBUG_INFO_TEMP_FILE),
      where launch.monitor's stall report also writes them;
    - on CUDA, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (PYTORCH_ALLOC_CONF in newer torch): the caching
      allocator grows segments instead of fragmenting memory between differently sized activations.
    """
    defaults = {}
    if not {"TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"} & environ.keys():
        defaults["TORCH_FR_BUFFER_SIZE"] = FLIGHT_RECORDER_ENTRIES
    if "TORCH_NCCL_DUMP_ON_TIMEOUT" not in environ:
        defaults["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "1"
    if not {"TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"} & environ.keys():
        defaults["TORCH_FR_DUMP_TEMP_FILE"] = str(Path(run_dir).resolve() / "flight_recorder" / "rank_")
    if device_type == "cuda" and not {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & environ.keys():
        defaults["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return defaults
