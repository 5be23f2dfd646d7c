"""Checkpoints: DCP sharded save/load, atomic publish, keep-last-k and auto-resume.

Layout of ``<run_dir>/checkpoints/``::

    step_00000100/            a published checkpoint
        .metadata             DCP metadata (read with a restricted unpickler, see _SafeUnpickler)
        __<rank>_<i>.distcp   tensor payloads of model and optimizer (DCP, resharded on load)
        rng/rank_<r>.json     each rank's RNG states
        meta.json             step, run config, training state, world size; written last, so its
                              presence with "complete": true marks the checkpoint complete
    .tmp-step_00000200-<hex>/ a save in progress; never resumed from, removed by the next save
    latest                    name of the newest published checkpoint, replaced atomically

Everything that is not a tensor is written as JSON, so loading never unpickles arbitrary objects:
DCP's ``.metadata`` goes through an allowlist and DCP's non-tensor items through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)")
_TMP_PREFIX = ".tmp-"
# Flattened optimizer state ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr") keys everything by parameter
# name, so it reshards and survives pipeline stages holding different parameters (as in torchtitan).
_SD_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


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
        raise RuntimeError(f"{what} failed on rank 0: {message}")
    return result


def _raise_if_any(error: str | None, what: str) -> None:
    """Collective: raise on every rank if any rank reports an error (so no rank is left waiting)."""
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    by_message: dict[str, list[int]] = {}
    for rank, e in enumerate(errors):
        if e is not None:
            by_message.setdefault(e, []).append(rank)
    if by_message:
        raise RuntimeError(f"{what} failed: " + "; ".join(f"(seen by ranks {ranks}) {e}"
                                                          for e, ranks in by_message.items()))


@contextmanager
def _single_process_ok():
    """Silence DCP's warning that it runs in a single process: without a process group that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


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


# --------------------------------------------------------------------------- checkpointer

class Checkpointer:
    """Saves and resumes a run's checkpoints under ``<run_dir>/checkpoints``; see the module docstring."""

    def __init__(self, cfg, run_dir: str | os.PathLike, *, run_config: dict):
        """cfg: .interval (steps, 0 = never), .keep_last (0 = keep all), .resume ("auto" | "none" | a path).
        run_config: the whole run config as a JSON-able dict; its "model" section must match on load."""
        self.cfg = cfg
        self.dir = Path(run_dir) / "checkpoints"
        # A JSON round trip fails now rather than at the first save, and makes tuples lists as they will be
        # when read back, so comparing configs on load compares like with like.
        self.run_config = json.loads(json.dumps(run_config))

    def due(self, step: int) -> bool:
        """Is a periodic save due at this step?"""
        return self.cfg.interval > 0 and step > 0 and step % self.cfg.interval == 0

    # ---- save

    def save(self, step: int, *, model, optimizer, state: dict) -> Path:
        """Collective. Write model, optimizer, `state` (JSON-able, the same on every rank) and every rank's
        RNG states into a temporary directory, then publish it as ``step_<NNNNNNNN>``, advance ``latest``
        and prune to keep_last. `model`/`optimizer` may be lists (one optimizer per model part)."""
        json.dumps(state)  # identical on all ranks, so all fail here together
        final = self.dir / f"step_{step:08d}"
        tmp = _on_rank0(lambda: self._begin(final), f"starting checkpoint {final}")

        sd, _ = _state_dict(_parts(model, optimizer))
        with _single_process_ok():
            dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        error = None
        try:
            (tmp / "rng").mkdir(exist_ok=True)
            _write_text(tmp / "rng" / f"rank_{_rank()}.json", json.dumps(_rng_state()))
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
        _raise_if_any(error, f"saving RNG states into {tmp}")

        _on_rank0(lambda: self._publish(tmp, final, step=step, state=state), f"publishing checkpoint {final}")
        return final

    def _begin(self, final: Path) -> Path:
        """Create the temporary directory of a save, removing ones left by dead saves."""
        self.dir.mkdir(parents=True, exist_ok=True)
        # Saves within a run are sequential, so a temporary directory seen now belongs to a dead save.
        for p in self.dir.glob(f"{_TMP_PREFIX}*"):
            logger.warning("removing %s, left by a save that did not finish", p)
            shutil.rmtree(p, ignore_errors=True)
        tmp = self.dir / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def _publish(self, tmp: Path, final: Path, *, step: int, state: dict) -> None:
        meta = {"format": FORMAT_VERSION, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "world_size": _world_size(), "torch": torch.__version__, "config": self.run_config,
                "state": state, "complete": True}
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
        self._prune(keep=final)

    def _prune(self, *, keep: Path) -> None:
        if self.cfg.keep_last <= 0:
            return
        complete = [p for _, p in self._step_dirs() if _incomplete_reason(p) is None]
        for p in complete[self.cfg.keep_last:]:
            if p != keep:
                shutil.rmtree(p)
                logger.info("removed old checkpoint %s (keep_last=%d)", p, self.cfg.keep_last)

    # ---- load

    def load(self, *, model, optimizer) -> dict | None:
        """Collective. Resume per cfg.resume: "none" → None; "auto" → the newest complete checkpoint that
        loads (None if there is none); a path → that checkpoint (error if it is incomplete or corrupt).
        Loads model and optimizer in place, restores this rank's RNG states and returns
        {"step": int, "state": dict (as JSON gave it back), "path": str}."""
        resume = str(self.cfg.resume)
        if resume == "none":
            return None
        explicit = resume != "auto"
        ordered = _on_rank0(lambda: [self._explicit_path(resume)] if explicit else self._auto_order(),
                            f"looking for checkpoints in {self.dir}")
        parts = _parts(model, optimizer)
        touched = False
        for path in ordered:
            # rank 0 inspects the files, so every rank takes the same decision
            reason, meta = _on_rank0(lambda: _inspect(path), f"inspecting checkpoint {path}")
            if reason is not None:
                if explicit:
                    raise ValueError(f"checkpoint {path} cannot be used: {reason}")
                if _rank() == 0:
                    logger.warning("skipping checkpoint %s: %s", path, reason)
                continue
            self._check_config(path, meta)
            touched = True
            error = None
            try:
                self._load_into(path, parts)
            except (Exception, CheckpointException) as e:  # any failure to read the files: a corrupt checkpoint
                error = _describe(e)
            try:
                _raise_if_any(error, f"loading checkpoint {path}")
            except RuntimeError as e:
                if explicit:
                    raise
                if _rank() == 0:
                    logger.warning("skipping corrupt checkpoint %s: %s", path, e)
                continue
            if _rank() == 0:
                logger.info("resumed from checkpoint %s (step %d)", path, meta["step"])
            return {"step": meta["step"], "state": meta["state"], "path": str(path)}
        if touched:
            raise RuntimeError(f"no checkpoint in {self.dir} could be loaded, and the failed attempts may have "
                               "overwritten part of the model; repair or delete the corrupt checkpoints, or "
                               "start fresh with --checkpoint.resume=none")
        if _rank() == 0:
            logger.info("no complete checkpoint in %s; starting from scratch", self.dir)
        return None

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
            raise ValueError(
                f"checkpoint {path.name} ({path}) was made for a different model: " + "; ".join(diff)
                + ". Resume with the config the checkpoint was made with, or start fresh with "
                "--checkpoint.resume=none (or another train.run_dir).")

    def _load_into(self, path: Path, parts) -> None:
        sd, keys = _state_dict(parts)
        with _single_process_ok():
            dcp.load(sd, storage_reader=_SafeReader(path), planner=_SafeLoadPlanner())
        for (module, optimizer), (model_keys, optim_keys) in zip(parts, keys):
            set_state_dict(module, optimizer, options=_SD_OPTIONS,
                           model_state_dict={k: sd["model"][k] for k in model_keys},
                           optim_state_dict={k: sd["optim"][k] for k in optim_keys})
        rng_file = path / "rng" / f"rank_{_rank()}.json"
        if rng_file.exists():
            _set_rng_state(json.loads(rng_file.read_text()))
        else:  # the run was resumed with more ranks than it was saved with
            logger.warning("%s has no RNG states for rank %d; keeping this rank's current ones", path, _rank())


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
        return f"checkpoint format {meta.get('format')!r}, this code reads format {FORMAT_VERSION}"
    if not meta.get("complete") or meta.get("step") != int(_STEP_DIR.fullmatch(path.name).group(1)):
        return "meta.json does not mark it complete for this step"
    return None


def _inspect(path: Path) -> tuple[str | None, dict | None]:
    """(why `path` cannot be loaded, None) or (None, its meta.json), found without touching any model:
    incomplete, unsafe metadata, missing or truncated data files."""
    reason = _incomplete_reason(path)
    if reason is not None:
        return reason, None
    needed: dict[str, int] = {}
    try:
        for info in read_dcp_metadata(path).storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # a corrupt or crafted file fails in many ways; each means "do not load it"
        return f"unreadable .metadata ({_describe(e)})", None
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"missing data file {name}", None
        if file.stat().st_size < size:
            return f"data file {name} is truncated ({file.stat().st_size} of {size} bytes)", None
    return None, _read_meta(path)
