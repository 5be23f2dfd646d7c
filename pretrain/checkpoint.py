"""Checkpoints: DCP sharded save/load, atomic publish, checksums, run lock, keep-last-k, async saves, auto-resume.

Layout of ``<run_dir>/``::

    train.lock                      the run lock: host, pid, SLURM job of the run using this run_dir (RunLock)
    checkpoints/
        step_00000100/              a published checkpoint
            .metadata               DCP metadata (read with a restricted unpickler, see _SafeUnpickler)
            __<rank>_<i>.distcp     model, optimizer and each rank's RNG states (DCP, resharded on load)
            meta.json               step, run config, training state, world size, the size and crc32c of every
                                    other file; written last, so its presence with "complete": true marks the
                                    checkpoint complete
        .tmp-step_00000200-<hex>/   a save in progress; never resumed from, removed by the next save
        latest                      name of the newest published checkpoint, replaced atomically
    checkpoints.superseded-<time>/  checkpoints set aside by a fresh start (checkpoint.resume=none)

Checksums are computed while the files are written (the bytes pass through crc32c on their way to the file)
and verified before loading, each rank reading a share of the files. With ``async_save`` the state is copied
to host memory (pinned on CUDA) while training waits, then DCP writes it from a background thread on a process
group of its own; rank 0 publishes it (meta.json, rename, ``latest``) once DCP has gathered every rank's
write results, so ``latest`` never names a checkpoint with a file missing. Old checkpoints are pruned on rank 0
in the background too. Every save, and the end of training, first waits for the previous save.

Everything that is not a tensor is JSON or goes through ``torch.load(weights_only=True)``, so loading never
unpickles arbitrary objects; DCP's ``.metadata`` goes through an allowlist.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
import subprocess
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import crc32c
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.checkpoint.storage import WriteResult

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: RNG states inside the DCP payload, per-file checksums in meta.json
LOCK_FILE = "train.lock"
_STEP_DIR = re.compile(r"step_(\d+)")
_TMP_PREFIX = ".tmp-"
# Flattened optimizer state ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr") keys everything by parameter
# name, so it reshards and survives pipeline stages holding different parameters (as in torchtitan).
_SD_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_READ_CHUNK = 8 << 20
_NO_SPACE = "no space left on device"
# DCP warns on every save and load without a process group; there, one process is the intent. A filter for the
# whole process, because an asynchronous save runs in DCP's own thread.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(Exception):
    """A checkpoint cannot be written or read, or the run directory cannot be used; the message says why
    and what to do."""


class RunLockError(CheckpointError):
    """Another training run holds the run directory."""


# --------------------------------------------------------------------------- safe reading

# Found empirically: everything the .metadata of model + AdamW state (plain, DDP, FSDP2/DTensor) references.
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name ("torch.strided") back to the layout
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's metadata references something outside the allowlist."""


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, refusing every global outside the allowlist (and torch dtypes)."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"refusing to unpickle {module}.{name}: checkpoint metadata may only contain DCP metadata classes; "
            "the .metadata file is corrupt or was crafted to run code")


def read_dcp_metadata(path: str | os.PathLike) -> Metadata:
    """Read a DCP checkpoint's ``.metadata`` through the allowlist."""
    with open(Path(path) / ".metadata", "rb") as f:
        metadata = _SafeUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}/.metadata holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class _SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata goes through the allowlist (the stock one calls ``pickle.load``)."""

    # No **kwargs on purpose: DCP then never falls back to per-rank metadata files, which we never write.
    def read_metadata(self) -> Metadata:
        metadata = read_dcp_metadata(self.path)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DefaultLoadPlanner, but non-tensor items (optimizer hyper-parameters) load with ``weights_only=True``."""

    def load_bytes(self, read_item, value):
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# --------------------------------------------------------------------------- checksums while writing

class _ChecksummingStream:
    """A file being written: every byte also goes through crc32c, so the checksum costs no extra read."""

    def __init__(self, raw, fs: _ChecksummingFileSystem, path: Path):
        self.raw, self.fs, self.path = raw, fs, path
        self.crc, self.size = 0, 0

    def write(self, data) -> int:
        try:
            written = self.raw.write(data)
        except OSError as e:
            # torch.save would report this as an 'unexpected pos' deep in its zip writer: remember the cause
            if e.errno == errno.ENOSPC:
                self.fs.no_space = str(self.path)
            raise
        self.crc = crc32c.crc32c(data, self.crc)
        self.size += written
        return written

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:  # the file itself is closed by create_stream
        self.raw.flush()


class _ChecksummingFileSystem(FileSystem):
    """DCP's local file system for writing, recording the size and crc32c of every file it writes, by name."""

    def __init__(self):
        super().__init__()
        self.files: dict[str, dict] = {}
        self.no_space: str | None = None  # the file a write failed on for want of space

    @contextmanager
    def create_stream(self, path, mode):
        path = Path(path)
        with super().create_stream(path, mode) as raw:
            stream = _ChecksummingStream(raw, self, path)
            yield stream
        self.files[path.name] = {"bytes": stream.size, "crc32c": f"{stream.crc:08x}"}


_CHECKSUMS_FQN = "__pretrain_file_checksums__"


class _Writer(dcp.FileSystemWriter):
    """FileSystemWriter that checksums every file while writing it; after `finish` (coordinator only),
    `checksums` maps each file name of the checkpoint, ``.metadata`` included, to its size and crc32c."""

    def __init__(self, path: Path):
        super().__init__(path, sync_files=True)
        self.fs = _ChecksummingFileSystem()
        self.checksums: dict[str, dict] = {}

    def write_data(self, plan, planner):
        written = super().write_data(plan, planner).value()
        # Each rank's checksums reach the coordinator with its write results, through DCP's own gather.
        record = WriteResult(index=MetadataIndex(_CHECKSUMS_FQN), size_in_bytes=0, storage_data=dict(self.fs.files))
        done: torch.futures.Future = torch.futures.Future()
        done.set_result([*written, record])
        return done

    def finish(self, metadata, results):
        checksums, real = {}, []
        for rank_results in results:
            real.append([r for r in rank_results if r.index.fqn != _CHECKSUMS_FQN])
            for r in rank_results:
                if r.index.fqn == _CHECKSUMS_FQN:
                    checksums.update(r.storage_data)
        super().finish(metadata, real)
        checksums[".metadata"] = self.fs.files.pop(".metadata.tmp")  # written under a temporary name, renamed
        self.checksums = checksums


def file_crc32c(path: Path) -> str:
    """crc32c of a file as 8 hex digits, read in chunks."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_READ_CHUNK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            crc = crc32c.crc32c(view[:n], crc)
    return f"{crc:08x}"


# --------------------------------------------------------------------------- small helpers

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _from_rank0(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list:
    """Every rank's `obj`, by rank, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _describe(e: BaseException) -> str:
    if isinstance(e, CheckpointException):  # DCP's: one (exception, traceback) per failed rank
        return "; ".join(f"rank {rank}: {_describe(exc)}" for rank, (exc, _) in e.failures.items())
    return f"{type(e).__name__}: {e}"


def _on_rank0(fn, what: str):
    """Collective: run `fn` on rank 0 only and hand its result to every rank; if it fails, every rank raises
    (rank 0 its own exception), so no rank is left waiting in a later collective."""
    result = error = None
    if _rank() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    result, message = _from_rank0((result, None if error is None else _describe(error)))
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(f"{what} failed on rank 0: {message}")
    return result


def _by_message(errors: list[str | None]) -> str:
    by_message: dict[str, list[int]] = {}
    for rank, e in enumerate(errors):
        if e is not None:
            by_message.setdefault(e, []).append(rank)
    if len(errors) == 1:
        return "; ".join(by_message)
    return "; ".join(f"(seen by ranks {ranks}) {e}" for e, ranks in by_message.items())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    """Write durably and atomically: a reader sees the old file, the whole new one, or none."""
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _is_no_space(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    return False


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _rng_state() -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if torch.cuda.is_available() and "cuda" in state:
        for device, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_unb64(s), device)


def _rng_key(rank: int) -> str:
    return f"rank_{rank}"


def _flatten(d: dict, prefix: str) -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_ABSENT = "<absent>"


def _config_diff(saved: dict, current: dict) -> list[str]:
    """'model.d_model=256 in the checkpoint, 512 in this run' for each field that differs."""
    a, b = _flatten(saved, "model."), _flatten(current, "model.")
    return [f"{k}={a.get(k, _ABSENT)!r} in the checkpoint, {b.get(k, _ABSENT)!r} in this run"
            for k in sorted(a.keys() | b.keys()) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _parts(model, optimizer) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
    """Pair model parts with their optimizers: one module, or lists (pipeline stages held by this rank)."""
    if isinstance(model, nn.Module):
        return [(model, optimizer)]
    if len(model) != len(optimizer):
        raise ValueError(f"got {len(model)} model parts but {len(optimizer)} optimizers; pass one per part")
    return list(zip(model, optimizer))


def _state_dict(parts) -> tuple[dict, list[tuple[set, set]]]:
    """This rank's {"model": ..., "optim": ...} (DTensor shards under FSDP/TP) and each part's keys."""
    model_sd, optim_sd, keys = {}, {}, []
    for module, optimizer in parts:
        m, o = get_state_dict(module, optimizer, options=_SD_OPTIONS)
        model_sd.update(m)
        optim_sd.update(o)
        keys.append((set(m), set(o)))
    return {"model": model_sd, "optim": optim_sd}, keys


def _tensor_bytes(sd: dict) -> dict[str, int]:
    """Bytes of every tensor in a state dict, by key, at its global size (a DTensor counts whole)."""
    return {f"{section}.{k}": v.numel() * v.element_size()
            for section in ("model", "optim") for k, v in sd[section].items() if isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------- run lock

_ENDED_SLURM_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                       "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"}


def _process_start(pid: int) -> int | None:
    """When a process started (clock ticks since boot), to tell a live holder from a reused pid; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name before ")" may hold spaces


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return started is None or _process_start(pid) in (None, started)


def slurm_job_state(job_id: str) -> str | None:
    """A SLURM job's state ('RUNNING', 'PENDING', ...; '' once SLURM has forgotten it), or None when SLURM
    cannot be asked (no squeue/scontrol here, or no answer from the controller)."""
    for cmd in (["squeue", "--noheader", "--format=%T", "--jobs", job_id], ["scontrol", "show", "job", job_id]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode != 0:
            if "invalid job id" in (out.stderr + out.stdout).lower():
                return ""
            continue  # e.g. the controller cannot be reached: that says nothing about the job
        if cmd[0] == "squeue":
            return out.stdout.strip().split("\n")[0].strip()
        fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
        return fields.get("JobState", "")
    return None


def _describe_holder(holder: dict) -> str:
    text = f"pid {holder.get('pid')} on host {holder.get('host')}"
    if holder.get("slurm_job_id"):
        text += f", SLURM job {holder['slurm_job_id']} (restart {holder.get('slurm_restart_count', 0)})"
    return text + f", started {holder.get('started', '?')}"


class RunLock:
    """Exclusive use of a run directory by one training run; see `acquire`."""

    def __init__(self, path: Path | None = None, fd: int | None = None, holder: dict | None = None):
        self.path, self._fd, self.holder = path, fd, holder

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> RunLock:
        """Collective. Rank 0 takes ``<run_dir>/train.lock``; every rank raises RunLockError if it could not,
        so no rank starts work in a directory another live run uses. A lock left by a run that is gone (its
        process is dead on this host, its SLURM job has ended, or it is this SLURM job's earlier run, as after
        a requeue) is taken over with a warning. Release with `release()` or by leaving a ``with`` block."""
        lock, error = cls(), None
        if _rank() == 0:
            try:
                lock = cls._take(Path(run_dir) / LOCK_FILE)
            except RunLockError as e:
                error = str(e)
            except OSError as e:
                error = f"cannot take the run lock {Path(run_dir) / LOCK_FILE}: {e}"
        error = _from_rank0(error)
        if error is not None:
            raise RunLockError(error)
        return lock

    @classmethod
    def _take(cls, path: Path) -> RunLock:
        path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
              "pid_start": _process_start(os.getpid()), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
              "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RunLockError(cls._busy(path, _read_holder(fd), "it holds the lock")) from None
                except OSError as e:  # a file system without flock: the holder's record alone decides
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                try:
                    same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same_file = False
                if not same_file:  # the holder released (unlinked) it between our open and flock: start again
                    os.close(fd)
                    continue
                holder = _read_holder(fd)
                if holder:
                    cls._check_gone(path, holder, me)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
                os.fsync(fd)
                return cls(path, fd, me)
            except BaseException:
                os.close(fd)
                raise

    @staticmethod
    def _busy(path: Path, holder: dict | None, why: str) -> str:
        who = _describe_holder(holder) if holder else "a process whose record is not written yet"
        return (f"{path.parent} is in use by another training run ({who}; {why}). Two runs in one run_dir would "
                "mix and delete each other's checkpoints: wait for it to end, stop it, or use another "
                "train.run_dir.")

    @classmethod
    def _check_gone(cls, path: Path, holder: dict, me: dict) -> None:
        """Return if the recorded holder is gone (warning that its lock is taken over); else raise."""
        if "unreadable" in holder:
            logger.warning("taking over the run lock %s: its content is unreadable (%r)", path, holder["unreadable"])
            return
        same_job = bool(me["slurm_job_id"]) and holder.get("slurm_job_id") == me["slurm_job_id"]
        if holder.get("host") == me["host"] and holder.get("boot_id", "") in ("", me["boot_id"]):
            if _pid_alive(holder["pid"], holder.get("pid_start")):
                raise RunLockError(cls._busy(path, holder, "that process is running"))
            why = "its process is no longer running"
        elif holder.get("host") == me["host"]:
            why = "this host has restarted since"
        elif same_job:
            why = "it is this SLURM job's earlier run"
        elif holder.get("slurm_job_id"):
            state = slurm_job_state(holder["slurm_job_id"])
            if state is None:
                raise RunLockError(
                    f"{path.parent} is locked by a training run on another host ({_describe_holder(holder)}) and "
                    f"SLURM cannot be asked here whether job {holder['slurm_job_id']} still runs. If it has ended, "
                    f"delete {path} and start again; otherwise use another train.run_dir.")
            if state and state.split()[0] not in _ENDED_SLURM_STATES:
                raise RunLockError(cls._busy(path, holder, f"SLURM says job {holder['slurm_job_id']} is {state}"))
            why = f"SLURM job {holder['slurm_job_id']} has ended ({state or 'no longer known to SLURM'})"
        else:
            raise RunLockError(
                f"{path.parent} is locked by a training run on another host ({_describe_holder(holder)}), which "
                f"cannot be checked from here. If that run has ended, delete {path} and start again; otherwise "
                "use another train.run_dir.")
        if same_job:
            why += f"; restart {holder.get('slurm_restart_count', 0)} → {me['slurm_restart_count']}"
        logger.warning("taking over the run lock %s left by %s: %s", path, _describe_holder(holder), why)

    def release(self) -> None:
        """Give the run directory up (rank 0; a no-op elsewhere and when called again)."""
        if self._fd is None:
            return
        try:
            if _read_holder(self._fd) == self.holder and os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict | None:
    text = os.pread(fd, 1 << 16, 0).decode(errors="replace")
    if not text.strip():
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or holder["pid"] <= 0:
        return {"unreadable": text[:200]}
    return holder


# --------------------------------------------------------------------------- checkpointer

@dataclass
class _Save:
    """A save under way: what the error path needs to clean up and explain."""
    step: int
    tmp: Path
    final: Path
    writer: _Writer
    tensor_bytes: dict[str, int]
    job: Future | None = None  # async: the background write and publish


class Checkpointer:
    """Saves and resumes a run's checkpoints under ``<run_dir>/checkpoints``; see the module docstring.
    Call `close()` (collective) after the last save; as a context manager it is closed on the way out."""

    def __init__(self, cfg, run_dir: str | os.PathLike, *, run_config: dict):
        """cfg: .interval (steps, 0 = never), .keep_last (0 = keep all), .resume ("auto" | "none" | a path),
        .async_save. run_config: the whole run config as a JSON-able dict; its "model" section must match on
        load. Collective with async_save under torch.distributed (it makes the checkpoint process group)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        # A JSON round trip fails now rather than at the first save, and makes tuples lists as they will be
        # when read back, so comparing configs on load compares like with like.
        self.run_config = json.loads(json.dumps(run_config))
        self.async_save = bool(getattr(cfg, "async_save", False))
        # DCP's background collectives get a gloo group of their own, so they never interleave with training's.
        # Its timeout is the run's collective timeout (torch's default of 30 minutes otherwise).
        minutes = self.run_config.get("train", {}).get("collective_timeout_minutes")
        self._group = (dist.new_group(backend="gloo", timeout=timedelta(minutes=minutes) if minutes else None)
                       if self.async_save and dist.is_initialized() else None)
        self._stager: DefaultStager | None = None  # keeps its host buffers from one save to the next
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: _Save | None = None  # async: the save being written
        self._pruning: Future | None = None  # rank 0: deleting old checkpoints

    def due(self, step: int) -> bool:
        """Is a periodic save due at this step?"""
        return self.cfg.interval > 0 and step > 0 and step % self.cfg.interval == 0

    # ---- save

    def save(self, step: int, *, model, optimizer, state: dict) -> Path:
        """Collective. Write model, optimizer, `state` (JSON-able, the same on every rank) and every rank's
        RNG states into a temporary directory, then publish it as ``step_<NNNNNNNN>``, advance ``latest``
        and prune to keep_last (in the background). With async_save it returns once the state is staged in
        host memory; the files are written and published in the background. `model`/`optimizer` may be
        lists (one optimizer per model part). Raises CheckpointError if this save (or, with async_save, the
        previous one) failed; the newest complete checkpoint is then untouched."""
        state = json.loads(json.dumps(state))  # identical on all ranks, so all fail here together
        self.wait()
        final = self.dir / f"step_{step:08d}"
        tmp = _on_rank0(lambda: self._begin(final), f"starting checkpoint {final}")
        sd, _ = _state_dict(_parts(model, optimizer))
        sd["rng"] = {_rng_key(_rank()): json.dumps(_rng_state())}
        attempt = _Save(step, tmp, final, _Writer(tmp), _tensor_bytes(sd))
        if self.async_save:
            if self._stager is None:
                cuda = torch.cuda.is_available()
                self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                            use_async_staging=False, use_non_blocking_copy=cuda))
            upload = dcp.async_save(sd, storage_writer=attempt.writer, process_group=self._group,
                                    async_stager=self._stager, no_dist=not dist.is_initialized())
            attempt.job = self._background.submit(self._finish_in_background, upload, attempt, state)
            self._pending = attempt
            return final
        error = None
        try:
            dcp.save(sd, storage_writer=attempt.writer)
            if _rank() == 0:
                self._publish(attempt, state)
        except (Exception, CheckpointException) as e:
            error = self._save_error(e, attempt)
        self._agree_saved(error, attempt)
        if _rank() == 0:
            self._pruning = self._background.submit(self._prune, keep=final)
        return final

    def wait(self) -> None:
        """Collective with async_save. Wait for the previous save (and pruning) to finish; raise on every rank
        if any rank failed to write it."""
        if self._pruning is not None:
            self._pruning.result()  # never raises: _prune logs its failures
            self._pruning = None
        attempt, self._pending = self._pending, None
        if attempt is None:
            return
        error = None
        try:
            attempt.job.result()
        except (Exception, CheckpointException) as e:
            error = self._save_error(e, attempt)
        self._agree_saved(error, attempt)

    def close(self) -> None:
        """Collective. Finish the pending save; release the background thread and the staging buffers."""
        try:
            self.wait()
        finally:
            self._shut_down()

    def _shut_down(self) -> None:
        self._background.shutdown(wait=True)
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Leaving on an error: other ranks may not be here, so no collective; a save already under way is
        # still finished (every rank's background thread writes its share), and its failure only logged.
        attempt, self._pending = self._pending, None
        if attempt is not None:
            try:
                attempt.job.result()
            except (Exception, CheckpointException) as e:
                logger.error("checkpoint %s was not completed: %s", attempt.final, self._save_error(e, attempt))
        self._shut_down()

    def _finish_in_background(self, upload: Future, attempt: _Save, state: dict) -> None:
        upload.result()  # DCP's write: returns on every rank only after every rank's files are written
        if _rank() == 0:
            self._publish(attempt, state)
            self._prune(keep=attempt.final)

    def _begin(self, final: Path) -> Path:
        """Create the temporary directory of a save, removing ones left by dead saves."""
        self.dir.mkdir(parents=True, exist_ok=True)
        # This run holds the run lock and its own saves are sequential: a temporary directory is a dead save's.
        for p in self.dir.glob(f"{_TMP_PREFIX}*"):
            logger.warning("removing %s, left by a save that did not finish", p)
            shutil.rmtree(p, ignore_errors=True)
        tmp = self.dir / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def _publish(self, attempt: _Save, state: dict) -> None:
        tmp, final = attempt.tmp, attempt.final
        meta = {"format": FORMAT_VERSION, "step": attempt.step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "world_size": _world_size(), "torch": torch.__version__, "config": self.run_config,
                "state": state, "files": attempt.writer.checksums, "complete": True}
        # Last file written, and its directory fsynced with every other entry: it marks the checkpoint complete.
        _write_text(tmp / "meta.json", json.dumps(meta))
        if final.exists():  # e.g. resumed from an older checkpoint and reached this step again
            old = self.dir / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.dir)
        _write_text(self.dir / "latest", final.name + "\n")
        logger.info("saved checkpoint %s", final)

    def _prune(self, *, keep: Path) -> None:
        """Rank 0, in the background: delete complete checkpoints beyond keep_last (never `keep`)."""
        if self.cfg.keep_last <= 0:
            return
        try:
            complete = [p for _, p in self._step_dirs() if _incomplete_reason(p) is None]
            for p in complete[self.cfg.keep_last:]:
                if p != keep:
                    shutil.rmtree(p)
                    logger.info("removed old checkpoint %s (keep_last=%d)", p, self.cfg.keep_last)
        except OSError as e:
            logger.warning("could not remove old checkpoints in %s: %s", self.dir, e)

    def _save_error(self, e: BaseException, attempt: _Save) -> str:
        """This rank's account of a failed save; a full disk is named as such, however deep it surfaced."""
        if attempt.writer.fs.no_space or _is_no_space(e):
            return f"{_NO_SPACE} writing {attempt.writer.fs.no_space or attempt.tmp}"
        return _describe(e)

    def _agree_saved(self, error: str | None, attempt: _Save) -> None:
        """Collective: if any rank failed, remove the partial save and raise the same error on every rank."""
        errors = _gather(error)
        if all(e is None for e in errors):
            return
        if _rank() == 0:
            shutil.rmtree(attempt.tmp, ignore_errors=True)
        latest_file = self.dir / "latest"
        latest = latest_file.read_text().strip() if latest_file.exists() else None
        kept = (f"the newest complete checkpoint ({latest}) is untouched" if latest
                else "there is no earlier checkpoint")
        if any(e is not None and e.startswith(_NO_SPACE) for e in errors):
            needed = sum({k: v for sizes in _gather(attempt.tensor_bytes) for k, v in sizes.items()}.values())
            free = shutil.disk_usage(self.dir).free
            raise CheckpointError(
                f"{_NO_SPACE} while saving checkpoint {attempt.final.name} in {self.dir}: it needs about "
                f"{_size(needed)} and {_size(free)} is free there. The partial save was removed and {kept}. Free "
                "some space (a lower checkpoint.keep_last keeps fewer checkpoints) and run the same command to "
                "resume.")
        raise CheckpointError(f"saving checkpoint {attempt.final} failed ({kept}): {_by_message(errors)}")

    # ---- load

    def load(self, *, model, optimizer) -> dict | None:
        """Collective. Resume per cfg.resume: "none" → None (existing checkpoints are moved aside, see
        `_set_aside`); "auto" → the newest checkpoint that loads, None if the run directory has none, and
        CheckpointError if it has some but none loads; a path → that checkpoint (CheckpointError if it is
        incomplete or corrupt). Loads model and optimizer in place, restores this rank's RNG states and
        returns {"step": int, "state": dict (as JSON gave it back), "path": str}. A weights-only checkpoint
        (`save_weights`, written by `python -m pretrain.export --from`) loads the model alone and returns None:
        training starts from those weights at step 0 with a fresh optimizer and data position."""
        self.wait()
        resume = str(self.cfg.resume)
        if resume == "none":
            _on_rank0(self._set_aside, f"setting aside the checkpoints in {self.dir}")
            return None
        explicit = resume != "auto"
        ordered = _on_rank0(lambda: [self._explicit_path(resume)] if explicit else self._auto_order(),
                            f"looking for checkpoints in {self.dir}")
        parts = _parts(model, optimizer)
        failures = []
        for path in ordered:
            # rank 0 inspects the files, so every rank takes the same decision
            reason, found = _on_rank0(lambda: _inspect(path), f"inspecting checkpoint {path}")
            if reason is None:
                self._check_config(path, found["meta"])
                self._check_shapes(path, found["model_shapes"], parts)
                reason = _verify_files(path, found["meta"]["files"])
            weights_only = reason is None and found["meta"].get("weights_only", False)
            if reason is None:
                error = None
                try:
                    if weights_only:
                        _load_weights_into(path, parts)
                    else:
                        self._load_into(path, parts, has_rng=_rank() in found["rng_ranks"])
                except (Exception, CheckpointException) as e:  # any failure to read the files: corrupt
                    error = _describe(e)
                errors = _gather(error)
                if any(e is not None for e in errors):
                    reason = f"reading it failed: {_by_message(errors)}"
            if reason is None and weights_only:
                if _rank() == 0:
                    logger.info("starting from the weights of %s (step 0, fresh optimizer)", path)
                return None
            if reason is None:
                if _rank() == 0:
                    logger.info("resumed from checkpoint %s (step %d)", path, found["meta"]["step"])
                return {"step": found["meta"]["step"], "state": found["meta"]["state"], "path": str(path)}
            if explicit:
                raise CheckpointError(f"checkpoint {path} cannot be used: {reason}")
            if _rank() == 0:
                logger.warning("skipping checkpoint %s: %s", path, reason)
            failures.append(f"{path.name}: {reason}")
        if failures:
            raise CheckpointError(
                f"none of the {len(failures)} checkpoints in {self.dir} can be loaded:\n  " + "\n  ".join(failures)
                + "\nRepair or remove them, resume from one elsewhere with --checkpoint.resume=PATH, or start "
                "fresh with --checkpoint.resume=none (which moves them aside; nothing is deleted).")
        if _rank() == 0:
            logger.info("no checkpoint in %s; starting from scratch", self.dir)
        return None

    def _set_aside(self) -> None:
        """A fresh start where checkpoints exist: move them (and `latest`) aside, so that neither auto-resume nor
        keep_last pruning ever mixes them with this run's."""
        existing = self._step_dirs()
        if not existing:
            return
        aside = self.run_dir / f"checkpoints.superseded-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        os.rename(self.dir, aside)
        logger.warning("checkpoint.resume=none: moved the %d existing checkpoint(s) in %s to %s (nothing deleted; "
                       "resume from one with --checkpoint.resume=%s/step_...)", len(existing), self.dir, aside, aside)

    def _step_dirs(self) -> list[tuple[int, Path]]:
        """step_<N> directories, newest first."""
        if not self.dir.is_dir():
            return []
        dirs = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_DIR.fullmatch(p.name))]
        return sorted(dirs, reverse=True)

    def _auto_order(self) -> list[Path]:
        """Checkpoints to try: ``latest``'s first, then newest first; warns about unfinished saves."""
        for p in sorted(self.dir.glob(f"{_TMP_PREFIX}*")):
            logger.warning("ignoring %s: a save that did not finish (partial checkpoint)", p)
        ordered = [p for _, p in self._step_dirs()]
        latest_file = self.dir / "latest"
        if latest_file.exists():
            latest = self.dir / latest_file.read_text().strip()
            if latest in ordered:
                ordered.remove(latest)
                ordered.insert(0, latest)
            else:
                logger.warning("%s names %s, which does not exist; falling back to the newest complete "
                               "checkpoint", latest_file, latest)
        return ordered

    def _explicit_path(self, resume: str) -> Path:
        path = Path(resume).expanduser()
        if not path.exists() and (self.dir / resume).exists():  # also accept a bare "step_00000100"
            path = self.dir / resume
        return path

    def _check_config(self, path: Path, meta: dict) -> None:
        diff = _config_diff(meta["config"].get("model", {}), self.run_config.get("model", {}))
        if diff:
            raise CheckpointError(
                f"checkpoint {path.name} ({path}) was made for a different model: " + "; ".join(diff)
                + ". Resume with the config the checkpoint was made with, or start fresh with "
                "--checkpoint.resume=none (or another train.run_dir).")

    @staticmethod
    def _check_shapes(path: Path, stored: dict[str, tuple[int, ...]], parts) -> None:
        """Collective: CheckpointError on every rank if a model tensor of any rank's parts has another shape in the
        checkpoint (a model whose code changed a parameter's shape since the save): not a corrupt file, so no other
        checkpoint of the run would load either."""
        mismatch = None
        for module, _ in parts:
            mismatch = mismatch or _shape_mismatch(path, stored, get_model_state_dict(module, options=_SD_OPTIONS))
        found = sorted(m for m in _gather(mismatch) if m is not None)
        if found:
            raise CheckpointError(found[0])

    def _load_into(self, path: Path, parts, *, has_rng: bool) -> None:
        sd, keys = _state_dict(parts)
        if has_rng:
            sd["rng"] = {_rng_key(_rank()): ""}
        dcp.load(sd, storage_reader=_SafeReader(path), planner=_SafeLoadPlanner())
        for (module, optimizer), (model_keys, optim_keys) in zip(parts, keys):
            set_state_dict(module, optimizer, options=_SD_OPTIONS,
                           model_state_dict={k: sd["model"][k] for k in model_keys},
                           optim_state_dict={k: sd["optim"][k] for k in optim_keys})
        if has_rng:
            _set_rng_state(json.loads(sd["rng"][_rng_key(_rank())]))
        else:  # the run was resumed with more ranks than it was saved with
            logger.warning("%s has no RNG states for rank %d; keeping this rank's current ones", path, _rank())


def _load_weights_into(path: Path, parts) -> None:
    """The model weights of a weights-only checkpoint into every part (DCP reshards them to its layout)."""
    for module, _ in parts:
        sd = {"model": get_model_state_dict(module, options=_SD_OPTIONS)}
        dcp.load(sd, storage_reader=_SafeReader(path), planner=_SafeLoadPlanner())
        set_model_state_dict(module, sd["model"], options=_SD_OPTIONS)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or a run directory's newest checkpoint (the one ``latest`` names, else the
    highest step); CheckpointError if `path` is neither."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    directory = path / "checkpoints"
    latest = directory / "latest"
    if latest.is_file() and (directory / latest.read_text().strip() / "meta.json").is_file():
        return directory / latest.read_text().strip()
    found = sorted(directory.glob("step_*/meta.json")) if directory.is_dir() else []
    if not found:
        raise CheckpointError(f"{path} is neither a checkpoint (no meta.json) nor a run directory with checkpoints")
    return found[-1].parent


def read_meta(path: Path) -> dict:
    """One process: the meta.json of the complete checkpoint `path` once every file's checksum is verified
    (CheckpointError naming the problem otherwise)."""
    reason, found = _inspect(path)
    reason = reason or _verify_files(path, found["meta"]["files"])
    if reason:
        raise CheckpointError(f"checkpoint {path} cannot be read: {reason}")
    return found["meta"]


def load_weights(path: Path, model: nn.Module) -> None:
    """One process, no process group: the model tensors of checkpoint `path` (never its optimizer state), written
    under any layout, into the plain `model` (DCP reshards). A tied LM head may be absent from the files."""
    shapes = _stored_model_shapes(read_dcp_metadata(path))
    stored = set(shapes)
    state = model.state_dict()
    mismatch = _shape_mismatch(path, shapes, state)
    if mismatch:
        raise CheckpointError(mismatch)
    tied = {"lm_head.weight"} if getattr(model, "lm_head", None) is not None and \
        model.lm_head.weight is getattr(model.tok_emb, "weight", None) else set()
    absent = sorted(set(state) - stored - tied)
    if absent:
        raise CheckpointError(f"checkpoint {path} lacks the model tensors {absent[:5]}")
    sd = {"model": {k: v for k, v in state.items() if k in stored}}
    dcp.load(sd, storage_reader=_SafeReader(path), planner=_SafeLoadPlanner())
    model.load_state_dict({**state, **sd["model"]}, strict=True)


def save_weights(run_dir: str | os.PathLike, model: nn.Module, *, run_config: dict) -> Path:
    """One process, no process group: publish a plain model's weights alone as ``<run_dir>/checkpoints/step_00000000``
    (meta.json says "weights_only"), which `Checkpointer.load` starts a run from (auto or explicit resume) with a
    fresh optimizer at step 0. Refuses a run directory that already has checkpoints."""
    directory = Path(run_dir) / "checkpoints"
    final = directory / f"step_{0:08d}"
    if directory.is_dir() and any(_STEP_DIR.fullmatch(p.name) for p in directory.iterdir()):
        raise CheckpointError(f"{directory} already has checkpoints; write the weights into a new run directory")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    writer = _Writer(tmp)
    dcp.save({"model": model.state_dict()}, storage_writer=writer, no_dist=True)
    meta = {"format": FORMAT_VERSION, "step": 0, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": 1,
            "torch": torch.__version__, "config": json.loads(json.dumps(run_config)), "state": {},
            "weights_only": True, "files": writer.checksums, "complete": True}
    _write_text(tmp / "meta.json", json.dumps(meta))
    os.rename(tmp, final)
    _fsync_dir(directory)
    _write_text(directory / "latest", final.name + "\n")
    return final


def _read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def _incomplete_reason(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (cheap checks), or None."""
    if not path.is_dir():
        return "no such directory"
    if not _STEP_DIR.fullmatch(path.name):
        return "not a step_<N> checkpoint directory (a temporary or foreign directory)"
    if not (path / ".metadata").is_file():
        return "no DCP .metadata (the save did not finish)"
    if not (path / "meta.json").is_file():
        return "no meta.json (the save did not finish)"
    try:
        meta = _read_meta(path)
    except (OSError, ValueError) as e:
        return f"unreadable meta.json ({e})"
    if meta.get("format") != FORMAT_VERSION:
        return (f"checkpoint format {meta.get('format')!r}, this code reads format {FORMAT_VERSION} (it was written "
                "by an older version, without checksums)")
    if not meta.get("complete") or meta.get("step") != int(_STEP_DIR.fullmatch(path.name).group(1)):
        return "meta.json does not mark it complete for this step"
    if not isinstance(meta.get("files"), dict) or ".metadata" not in meta["files"]:
        return "meta.json lists no checksums"
    return None


def _inspect(path: Path) -> tuple[str | None, dict | None]:
    """(why `path` cannot be loaded, None) or (None, {"meta": its meta.json, "rng_ranks": ranks whose RNG states
    it holds}), found without touching any model or reading any payload: incomplete, unsafe metadata, missing,
    truncated or unlisted data files."""
    reason = _incomplete_reason(path)
    if reason is not None:
        return reason, None
    meta = _read_meta(path)
    try:
        metadata = read_dcp_metadata(path)
        needed = {info.relative_path for info in metadata.storage_data.values()}
    except Exception as e:  # a corrupt or crafted file fails in many ways; each means "do not load it"
        return f"unreadable .metadata ({_describe(e)})", None
    unlisted = sorted(needed - meta["files"].keys())
    if unlisted:
        return f"data file {unlisted[0]} has no checksum in meta.json", None
    for name, expected in sorted(meta["files"].items()):
        file = path / name
        if not file.is_file():
            return f"missing data file {name}", None
        if file.stat().st_size != expected["bytes"]:
            return f"data file {name} has {file.stat().st_size} bytes, {expected['bytes']} were written", None
    rng_ranks = [int(key.rsplit("_", 1)[1]) for key, md in metadata.state_dict_metadata.items()
                 if key.startswith("rng.") and isinstance(md, BytesStorageMetadata)]
    return None, {"meta": meta, "rng_ranks": rng_ranks, "model_shapes": _stored_model_shapes(metadata)}


def _stored_model_shapes(metadata: Metadata) -> dict[str, tuple[int, ...]]:
    """The global shape of every model tensor a checkpoint holds, by parameter name, from its DCP metadata."""
    return {key.removeprefix("model."): tuple(md.size) for key, md in metadata.state_dict_metadata.items()
            if key.startswith("model.") and not isinstance(md, BytesStorageMetadata)}


def _shape_mismatch(path: Path, stored: dict[str, tuple[int, ...]], model: dict[str, torch.Tensor]) -> str | None:
    """Why `model` (a state dict; DTensors give their global shape) cannot take the checkpoint's tensors of another
    shape, naming each and both shapes; None when every tensor both hold has one shape."""
    wrong = sorted(name for name, tensor in model.items()
                   if name in stored and tuple(tensor.shape) != stored[name])
    if not wrong:
        return None
    listed = "; ".join(f"{name} is {stored[name]} there, {tuple(model[name].shape)} in this model"
                       for name in wrong[:5]) + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else "")
    message = f"checkpoint {path} holds model tensors of other shapes than this model's: {listed}."
    if any(name.endswith("mixer.o_norm.weight") and len(stored[name]) == 1 and len(model[name].shape) == 1
           and stored[name][0] > model[name].shape[0] for name in wrong):
        message += (" GLA's output norm became shared across heads (one scale per channel of a head, d/H of them, "
                    "as fla's; older checkpoints hold one per head and channel, d): start fresh, or convert the "
                    "checkpoint by averaging each o_norm.weight over its heads (not exact: the outputs change).")
    else:
        message += " Load it with the model config and code it was saved with."
    return message


def _verify_files(path: Path, files: dict[str, dict]) -> str | None:
    """Collective: compare each file's crc32c with the one recorded when it was written, every rank reading a
    share of the files; the first mismatch (by file name) or None."""
    names = sorted(files)
    mismatch = None
    for name in names[_rank()::_world_size()]:
        try:
            found = file_crc32c(path / name)
        except OSError as e:
            mismatch = f"cannot read {name} ({e})"
            break
        if found != files[name]["crc32c"]:
            mismatch = (f"checksum mismatch in {name}: crc32c {found}, {files[name]['crc32c']} when it was written "
                        "(the file is corrupt)")
            break
    problems = sorted(p for p in _gather(mismatch) if p is not None)
    return problems[0] if problems else None
