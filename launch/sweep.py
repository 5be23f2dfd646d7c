"""Throughput studies: a grid of training runs, timed, one JSON line of results per point.

A study file (TOML) names a base run and a grid; every combination of the grid's values is a point:

    [study]
    name = "tiny"                 # default output directory: runs/studies/<name>
    config = "configs/x.toml"     # optional run config every point starts from (relative to the study file)
    warmup_steps = 2              # optimizer steps run first and not timed (allocator, kernels, caches)
    timed_steps = 4               # optimizer steps timed per point
    point_timeout_minutes = 30    # a point still running after this is recorded as failed

    [base]                        # overrides of that config for every point, as in a run config file
    data = { path = "synthetic" } # random tokens: throughput does not depend on the data

    [grid]                        # lists; the study is their cartesian product
    "model.arch" = ["transformer", "gla"]                 # "section.key": one field
    model = [{ d_model = 64, n_layers = 2 }, { d_model = 128, n_layers = 4 }]  # "section": fields together
    parallel = [{ tp = 1 }, { tp = 2, sequence_parallel = true }]
    gpus = [1, 2]                 # processes per point (one per GPU; CPU processes without GPUs)
    nodes = [1]                   # nodes per point (SLURM; locally only 1)

Each point runs `pretrain.train` for warmup_steps + timed_steps steps under torchrun (locally, one point after
another) or srun (one SLURM job array per node shape, `slurm/sweep.sbatch`, on whole nodes unless --shared),
logging every step and saving no checkpoint, in `<out>/points/<id>/` (locked while it runs, so two sweeps
never run one point at once; points still queued in an earlier submission are not submitted again). Its result (`result.json` there, and one line of `<out>/results.jsonl`) is:
status ok | invalid (the layout cannot run: the reason says why, nothing was started) | oom | failed (the
reason is the error's last line), the point's overrides and full config, device, world size, nodes, timed step
time (mean, standard deviation), tokens/s total and per GPU, TFLOP/s per GPU, MFU (GPUs with a known peak),
peak memory in GiB (GPU: allocated by tensors in the training loop; CPU: resident set of rank 0), per-rank wall
and CPU seconds per step (`rank_cpu_spread`: (max − min) / mean of the CPU seconds, which show a slow rank
where collectives make the wall times equal), software versions. Paths in [base] (data.path) are relative to
the directory the sweep runs in; [study] config is relative to the study file. The point id hashes everything that defines the point, so running the sweep again skips
points already recorded as ok, invalid or oom, and runs failed ones again.

Inference studies (`[study] measure = "inference"`, `decode_tokens = N`): each point times generation instead of
training, on one process (`python -m pretrain.generate --time`): a randomly initialised model of the point's
config prefills train.micro_batch rows of model.seq_len − N tokens and decodes N more through its inference cache,
warmup_steps untimed and timed_steps timed runs. Grid over "model.seq_len" (the context) and "model.arch" to set
prefill against decode cost and memory against context length per architecture. Its result has prefill and decode
tokens/s (prefill_tokens_per_s, decode_tokens_per_s, decode_ms_per_step), the cache's bytes at the end
(cache_bytes: keys and values grow with the context, recurrent states do not), and peak memory; points with more
than one process, or tp/pp/cp above 1, are invalid.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch import slurm
from pretrain.config import SECTIONS, ConfigError, build_config, read_toml

MEASURES = ("train", "inference")
DONE = ("ok", "invalid", "oom")  # statuses a re-run keeps; "failed" points run again
SPECIAL = ("gpus", "nodes")  # grid keys that are not config fields
# torchrun's summary after a worker failed ("...ChildFailedError:"): not the error itself
LAUNCHER_NOISE = ("torch.distributed.elastic", "ChildFailedError")
# pretrain.train's one line for a known error (launch.bootstrap.report_error): "data error: ...", "... on rank 1: ..."
KNOWN_ERROR = r"\w+ error( on ranks? [\d, ]+)?: "
OOM_PATTERNS = ("CUDA out of memory", "OutOfMemoryError", "HIP out of memory", "MemoryError")
SWEEP_TEMPLATE = slurm.REPO / "slurm" / "sweep.sbatch"


class StudyError(ValueError):
    """The study file is malformed; the message says how to fix it."""


@dataclass
class Study:
    name: str
    """Name of the study; the default output directory is runs/studies/<name>."""
    path: Path
    """The study file."""
    config: Path | None = None
    """Run config every point starts from (None: the defaults)."""
    config_values: dict = field(default_factory=dict)
    """That file's tables, read once."""
    base: dict = field(default_factory=dict)
    """{section: {key: value}} overrides for every point."""
    grid: list[tuple[str, list]] = field(default_factory=list)
    """(key, values) axes in file order; key is 'section.key', 'section', 'gpus' or 'nodes'."""
    warmup_steps: int = 2
    """Untimed optimizer steps before the timed ones."""
    timed_steps: int = 5
    """Timed optimizer steps per point."""
    point_timeout_minutes: float = 30.0
    """A point running longer than this is stopped and recorded as failed."""
    measure: str = "train"
    """What a point times: 'train' (optimizer steps) or 'inference' (prefill and cached decode, one process)."""
    decode_tokens: int = 32
    """Inference: tokens decoded one at a time after a prompt of model.seq_len − decode_tokens."""


@dataclass
class Point:
    id: str
    """Hash of everything that defines the point: config, overrides, processes, nodes, steps."""
    label: str
    """Readable grid coordinates, e.g. 'arch=gla seq_len=512 tp=2 gpus=2'."""
    overrides: dict
    """{section: {key: value}}: the base overrides plus this point's grid values."""
    gpus: int
    """Processes (one per GPU) of the run."""
    nodes: int
    """Nodes the processes are spread over (SLURM)."""

    def train_args(self, study: Study, run_dir: Path) -> list[str]:
        """Arguments of `python -m pretrain.train` for this point."""
        args = ["--config", str(study.config)] if study.config else []
        for section, values in self.overrides.items():
            args += [f"--{section}.{key}={_cli_value(value)}" for key, value in values.items()]
        return args + [f"--train.run_dir={run_dir}"]

    def command(self, study: Study, run_dir: Path) -> list[str]:
        """The Python command of this point: training, or `pretrain.generate --time` for an inference study."""
        if study.measure == "inference":
            return [sys.executable, "-m", "pretrain.generate", "--time", *self.train_args(study, run_dir),
                    f"--decode-tokens={study.decode_tokens}", f"--warmup={study.warmup_steps}",
                    f"--repeats={study.timed_steps}", f"--out={run_dir / INFERENCE_RESULT}"]
        return [sys.executable, "-m", "pretrain.train", *self.train_args(study, run_dir)]


INFERENCE_RESULT = "inference.json"


def _cli_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def load_study(path: str | Path) -> Study:
    path = Path(path)
    try:
        doc = read_toml(path)
    except ConfigError as e:
        raise StudyError(f"study file {e}") from None
    unknown = set(doc) - {"study", "base", "grid"}
    if unknown:
        raise StudyError(f"{path}: unknown table(s) {sorted(unknown)}; a study has [study], [base] and [grid]")
    head = dict(doc.get("study", {}))
    fields = {"name", "config", "warmup_steps", "timed_steps", "point_timeout_minutes", "measure", "decode_tokens"}
    if set(head) - fields:
        raise StudyError(f"{path}: unknown key(s) {sorted(set(head) - fields)} in [study]; known: {sorted(fields)}")
    config, config_values = head.pop("config", None), {}
    if config is not None:
        config = (path.parent / config).resolve()
        try:
            config_values = read_toml(config)
        except ConfigError as e:
            raise StudyError(f"{path}: [study] config: {e}") from None
    if head.get("measure", "train") not in MEASURES:
        raise StudyError(f"{path}: [study] measure = {head['measure']!r}; use one of {', '.join(MEASURES)}")
    for key in ("warmup_steps", "timed_steps", "point_timeout_minutes", "decode_tokens"):
        if key in head and (not isinstance(head[key], (int, float)) or isinstance(head[key], bool)):
            raise StudyError(f"{path}: [study] {key} = {head[key]!r} should be a number")
    study = Study(name=str(head.pop("name", path.stem)), path=path.resolve(), config=config,
                  config_values=config_values, **head)
    if study.warmup_steps < 0 or study.timed_steps < 1 or study.point_timeout_minutes <= 0 or study.decode_tokens < 1:
        raise StudyError(f"{path}: warmup_steps must be >= 0, timed_steps >= 1, point_timeout_minutes > 0 and "
                         f"decode_tokens >= 1")
    study.base = doc.get("base", {})
    for key, values in doc.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise StudyError(f"{path}: grid key {key!r} needs a non-empty list of values, e.g. {key} = [1, 2]")
        section = key.split(".")[0]
        if key not in SPECIAL and section not in SECTIONS:
            raise StudyError(f"{path}: grid key {key!r} is neither 'section.key' nor 'section' (sections: "
                             f"{', '.join(SECTIONS)}) nor one of {SPECIAL}")
        if "." not in key and key not in SPECIAL and not all(isinstance(v, dict) for v in values):
            raise StudyError(f"{path}: grid key {key!r} is a whole section: its values must be tables, "
                             f"e.g. {key} = [{{ a = 1 }}, {{ a = 2 }}]")
        study.grid.append((key, values))
    return study


def expand(study: Study) -> list[Point]:
    """Every point of the study's grid, in file order (the last axis varies fastest)."""
    points = []
    for combo in itertools.product(*(values for _, values in study.grid)):
        overrides = json.loads(json.dumps(study.base))  # a deep copy
        gpus, nodes, label = 1, 1, []
        for (key, _), value in zip(study.grid, combo):
            if key == "gpus":
                gpus = int(value)
            elif key == "nodes":
                nodes = int(value)
            elif "." in key:
                section, name = key.split(".", 1)
                overrides.setdefault(section, {})[name] = value
            else:
                overrides.setdefault(key, {}).update(value)
            label.append(f"{key.split('.')[-1]}={_label(value)}")
        # the timing settings every point shares: log every step, save nothing, evaluate nothing
        train = overrides.setdefault("train", {})
        train.update(steps=study.warmup_steps + study.timed_steps, eval_interval=0, exit_after_steps=0)
        overrides.setdefault("optim", {}).update(warmup_steps=0)
        overrides.setdefault("checkpoint", {}).update(interval=0, save_at_end=False, resume="none")
        overrides.setdefault("log", {}).update(interval=1, progress=False, tensorboard=False)
        what = {"config": study.config_values, "overrides": overrides, "gpus": gpus, "nodes": nodes,
                "warmup_steps": study.warmup_steps}
        if study.measure == "inference":  # (training points keep the ids they had before inference studies)
            what.update(measure=study.measure, decode_tokens=study.decode_tokens, timed_steps=study.timed_steps)
        ident = json.dumps(what, sort_keys=True)
        points.append(Point(id=hashlib.sha1(ident.encode()).hexdigest()[:12], label=" ".join(label),
                            overrides=overrides, gpus=gpus, nodes=nodes))
    return points


def _label(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}:{_cli_value(v)}" for k, v in value.items())
    return _cli_value(value)


def point_config(study: Study, point: Point):
    """The point's validated Config; ConfigError if it is not a valid run."""
    return build_config(study.config_values, point.overrides, file_name=str(study.config or "the study"))


def why_invalid(study: Study, point: Point) -> str | None:
    """Why the point can never run (a config or layout error), or None."""
    from parallel.mesh import ParallelDims

    if point.gpus < 1 or point.nodes < 1 or point.gpus % point.nodes:
        return f"gpus={point.gpus} must be a positive multiple of nodes={point.nodes}"
    try:
        cfg = point_config(study, point)
        if study.measure == "inference":
            return _why_no_inference(study, point, cfg)
        ParallelDims.from_config(cfg, point.gpus)
    except ConfigError as e:
        return str(e)
    return None


def _why_no_inference(study: Study, point: Point, cfg) -> str | None:
    """Inference points run on one process with the whole model."""
    split = {k: getattr(cfg.parallel, k) for k in ("tp", "pp", "cp") if getattr(cfg.parallel, k) > 1}
    if point.gpus != 1 or point.nodes != 1 or split:
        layout = " ".join(f"{k}={v}" for k, v in {"gpus": point.gpus, "nodes": point.nodes, **split}.items())
        return f"inference points run on one process with the whole model; this one asks for {layout}"
    if study.decode_tokens >= cfg.model.seq_len:
        return (f"decode_tokens={study.decode_tokens} leaves no prompt in model.seq_len={cfg.model.seq_len} "
                "(the prompt is seq_len - decode_tokens)")
    return None


def why_not_here(study: Study, point: Point) -> str | None:
    """Why a valid point cannot run on this machine (a local sweep), or None. Such points are not recorded: a
    sweep on SLURM, or on a bigger machine, runs them."""
    import torch

    if point.nodes > 1:
        return f"nodes={point.nodes}: a local sweep runs on this machine only; submit with --slurm"
    device = point_config(study, point).train.device
    if device != "cpu" and torch.cuda.is_available() and point.gpus > torch.cuda.device_count():
        return f"gpus={point.gpus} but this machine has {torch.cuda.device_count()} GPU(s)"
    return None


# ------------------------------------------------------------------------------------------- results

def read_results(out_dir: Path) -> dict[str, dict]:
    """Recorded results by point id (the per-point result.json files are the record)."""
    results = {}
    for path in sorted((out_dir / "points").glob("*/result.json")):
        try:
            row = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a result being written, or damaged: the point runs again
        results[row["point"]] = row
    return results


def write_result(out_dir: Path, row: dict) -> None:
    """Publish a point's result: result.json atomically, then one line appended to results.jsonl under a lock
    (array tasks of one study may finish at the same time)."""
    point_dir = out_dir / "points" / row["point"]
    point_dir.mkdir(parents=True, exist_ok=True)
    tmp = point_dir / "result.json.tmp"
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    os.replace(tmp, point_dir / "result.json")
    with open(out_dir / "results.jsonl", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(row) + "\n")
        fcntl.flock(f, fcntl.LOCK_UN)


@functools.cache
def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import fla
        out["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        pass
    git = subprocess.run(["git", "-C", str(slurm.REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True)
    if git.returncode == 0:
        out["pretrain"] = git.stdout.strip()
    return out


@functools.cache
def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def base_row(study: Study, point: Point, status: str, reason: str | None = None) -> dict:
    config = None
    try:
        config = point_config(study, point).to_dict()
    except ConfigError:
        pass
    return {"point": point.id, "label": point.label, "study": study.name, "measure": study.measure,
            "status": status, "reason": reason,
            "overrides": point.overrides, "config": config, "world_size": point.gpus, "nodes": point.nodes,
            "warmup_steps": study.warmup_steps, "timed_steps": study.timed_steps,
            "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def measure_inference(run_dir: Path) -> dict:
    """The timing of a finished inference point, from the JSON `pretrain.generate --time` wrote."""
    result = json.loads((run_dir / INFERENCE_RESULT).read_text())
    result.pop("arch", None)  # in the config already
    return {**result, "device": device_name(), "versions": versions()}


def measure(study: Study, point: Point, run_dir: Path) -> dict:
    """The timing of a finished run from its metrics.jsonl and step_times.jsonl (steps after the warm-up)."""
    import torch

    from pretrain.metrics import flops_per_token, peak_flops

    cfg = point_config(study, point)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in rows if r["step"] > study.warmup_steps]
    if len(timed) < study.timed_steps:
        raise RuntimeError(f"{len(timed)} timed steps logged in {run_dir / 'metrics.jsonl'}, "
                           f"expected {study.timed_steps}")
    tokens_per_step = cfg.train.global_batch * cfg.model.seq_len
    step_times = [tokens_per_step / r["tokens_per_s"] for r in timed]  # log.interval = 1: one step per row
    step_time = statistics.fmean(step_times)
    tokens_per_s = tokens_per_step / step_time
    flops = flops_per_token(cfg.model)
    tflops = tokens_per_s * flops / point.gpus / 1e12
    on_gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
    peak = peak_flops(torch.device("cuda")) if on_gpu else None
    ranks = [json.loads(line) for line in (run_dir / "step_times.jsonl").read_text().splitlines() if line.strip()]
    ranks = [r for r in ranks if r["step"] > study.warmup_steps]
    wall = [statistics.fmean(col) for col in zip(*(r["wall_s"] for r in ranks))] if ranks else []
    cpu = [statistics.fmean(col) for col in zip(*(r["cpu_s"] for r in ranks))] if ranks else []
    memory = [r["memory_gb"] for r in timed if r.get("memory_gb") is not None]
    return {
        "device": device_name(), "step_time_s": step_time,
        "step_time_std_s": statistics.stdev(step_times) if len(step_times) > 1 else 0.0,
        "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / point.gpus,
        "flops_per_token": flops, "tflops_per_gpu": tflops, "mfu": tflops * 1e12 / peak if peak else None,
        "peak_memory_gb": max(memory) if memory else None,
        "memory_kind": "gpu_allocated" if on_gpu else "cpu_rss_rank0",
        "rank_wall_s": wall, "rank_cpu_s": cpu,
        "rank_cpu_spread": (max(cpu) - min(cpu)) / statistics.fmean(cpu) if len(cpu) > 1 else 0.0,
        "final_loss": timed[-1]["loss"], "versions": versions(),
    }


def failure(log_text: str, returncode: int) -> tuple[str, str]:
    """(status, reason) of a run that did not finish: oom when the log shows an out-of-memory error."""
    status = "oom" if any(p in log_text for p in OOM_PATTERNS) else "failed"
    errors = [line.strip() for line in log_text.splitlines()
              if (re.match(r"\s*(\[rank\d+\]:\s*)?(\w+\.)*\w*(Error|Exception)\b.*:", line) or "out of memory" in line
                  or re.match(KNOWN_ERROR, line))
              and not line.lstrip().startswith(LAUNCHER_NOISE)]
    if errors:
        return status, errors[-1][:500]
    if returncode < 0 or returncode in (137, 143):
        return status, f"killed by a signal (exit {returncode}); out of host memory, or the point timed out"
    tail = [line for line in log_text.splitlines() if line.strip()][-3:]
    return status, f"exit {returncode}: " + " | ".join(tail)[:500]


def run_point(study: Study, point: Point, out_dir: Path, *, launcher: str) -> dict | None:
    """Run one point (launcher 'torchrun' on this machine, 'srun' inside a SLURM allocation); its result row,
    or None when another sweep is running this point right now."""
    run_dir = out_dir / "points" / point.id
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        for name in ("metrics.jsonl", "step_times.jsonl", "result.json", INFERENCE_RESULT):  # an earlier attempt's
            (run_dir / name).unlink(missing_ok=True)
        return _run_locked(study, point, run_dir, launcher=launcher)


def _run_locked(study: Study, point: Point, run_dir: Path, *, launcher: str) -> dict:
    train = point.command(study, run_dir)
    if launcher == "torchrun" and point.gpus == 1:
        cmd = train  # one process needs no rendezvous: skip torchrun's start-up
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(point.gpus),
               *train[1:]]
    else:
        cmd = ["srun", "--kill-on-bad-exit=1", f"--nodes={point.nodes}", f"--ntasks={point.gpus}", *train]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(slurm.REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    log_path = run_dir / "train.log"
    start = time.monotonic()
    with log_path.open("w") as log:
        log.write("+ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            returncode = proc.wait(timeout=study.point_timeout_minutes * 60)
        except subprocess.TimeoutExpired:
            # SIGTERM first: torchrun and srun pass it on to the workers, which run in sessions of their own
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            returncode = None
    row = base_row(study, point, "ok")
    row["run_s"] = round(time.monotonic() - start, 1)
    log_text = log_path.read_text()
    if returncode is None:
        row.update(status="failed", reason=f"timed out after {study.point_timeout_minutes} minutes "
                                           f"(study.point_timeout_minutes); log {log_path}")
    elif returncode != 0:
        status, reason = failure(log_text, returncode)
        row.update(status=status, reason=reason)
    else:
        try:
            row.update(measure_inference(run_dir) if study.measure == "inference" else measure(study, point, run_dir))
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            row.update(status="failed", reason=f"the run finished but its timing could not be read: {e}")
    return row


def plan(study: Study, out_dir: Path, *, local: bool) -> tuple[list[Point], list[Point]]:
    """(points to run, points not to run: done, invalid, or too big for this machine). Invalid points are
    recorded here; failed ones run again."""
    done = read_results(out_dir)
    queued = queued_points(out_dir)
    todo, skipped = [], []
    for point in expand(study):
        previous = done.get(point.id)
        if (previous and previous["status"] in DONE) or point.id in queued:
            skipped.append(point)
            continue
        reason = why_invalid(study, point)
        if reason:
            write_result(out_dir, base_row(study, point, "invalid", reason))
            print(f"  invalid  {point.label}: {reason}", flush=True)
            skipped.append(point)
        elif local and (reason := why_not_here(study, point)):
            print(f"  not here {point.label}: {reason}", flush=True)
            skipped.append(point)
        else:
            todo.append(point)
    return todo, skipped


def sweep_local(study: Study, out_dir: Path) -> int:
    """Run the study's points here one after another; the number that failed (invalid and oom are results)."""
    todo, skipped = plan(study, out_dir, local=True)
    print(f"study {study.name}: {len(todo)} point(s) to run, {len(skipped)} done, invalid or not for here; results in "
          f"{out_dir / 'results.jsonl'}", flush=True)
    bad, start = 0, time.monotonic()
    for i, point in enumerate(todo, 1):
        row = run_point(study, point, out_dir, launcher="torchrun")
        eta = (time.monotonic() - start) / i * (len(todo) - i)
        if row is None:
            print(f"[{i}/{len(todo)}] skipped {point.label}: another sweep is running it", flush=True)
            continue
        write_result(out_dir, row)
        if row["status"] == "ok" and study.measure == "inference":
            what = (f"prefill {row['prefill_tokens_per_s']:,.0f} tok/s, decode {row['decode_tokens_per_s']:,.0f} "
                    f"tok/s ({row['decode_ms_per_step']:.1f} ms/step), cache {row['cache_bytes'] / 2**20:.1f} MiB")
        elif row["status"] == "ok":
            what = (f"{row['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, step {row['step_time_s'] * 1e3:.0f} ms"
                    + (f", MFU {row['mfu']:.1%}" if row["mfu"] else ""))
        else:
            bad += row["status"] == "failed"
            what = row["reason"]
        print(f"[{i}/{len(todo)}] {row['status']:7s} {point.label}: {what} (eta {eta:.0f}s)", flush=True)
    return bad


# ----------------------------------------------------------------------------------------------- SLURM

def queued_points(out_dir: Path) -> set[str]:
    """Ids of the points in this study's job arrays that SLURM still has pending or running."""
    path = out_dir / "slurm" / "jobs.jsonl"
    if not path.exists() or shutil.which("squeue") is None:  # no SLURM here: nothing of ours can be queued
        return set()
    queued = set()
    for line in path.read_text().splitlines():
        job = json.loads(line)
        tasks = subprocess.run(["squeue", "--noheader", "--array", "--format=%K", "--jobs", job["job_id"]],
                               capture_output=True, text=True)
        points = json.loads(Path(job["array"]).read_text())["points"]
        queued.update(points[int(i)] for i in tasks.stdout.split() if tasks.returncode == 0 and i.isdigit())
    return queued


def submit_arrays(study: Study, out_dir: Path, *, gpus_per_node: int, time_limit: str | None,
                  partition: str | None, account: str | None, max_concurrent: int, exclusive: bool,
                  extra: list[str]) -> dict[str, list[str]]:
    """Submit one job array per node shape (nodes, tasks per node) over the points still to run; {job id:
    point ids}. Each task gets whole nodes unless `exclusive` is off: points sharing a node disturb each other."""
    todo, skipped = plan(study, out_dir, local=False)
    shapes: dict[tuple[int, int], list[Point]] = {}
    for point in todo:
        tasks = point.gpus // point.nodes
        device = point_config(study, point).train.device
        if device == "cuda" and not gpus_per_node:
            raise StudyError(f"{point.label} trains on train.device=cuda: give --gpus-per-node")
        if gpus_per_node and tasks > gpus_per_node:
            reason = f"{tasks} processes per node but --gpus-per-node={gpus_per_node}"
            write_result(out_dir, base_row(study, point, "invalid", reason))
            print(f"  invalid  {point.label}: {reason}", flush=True)
            continue
        shapes.setdefault((point.nodes, tasks), []).append(point)
    print(f"study {study.name}: {sum(map(len, shapes.values()))} point(s) to submit, {len(skipped)} done, "
          f"invalid or already queued", flush=True)
    # one point's time limit: its timeout plus start-up, so a point that runs too long is recorded as failed
    minutes = time_limit or f"{math.ceil(study.point_timeout_minutes) + 5}"
    (out_dir / "slurm").mkdir(parents=True, exist_ok=True)
    submitted = {}
    for (nodes, tasks), points in shapes.items():
        array_file = out_dir / "slurm" / f"array-n{nodes}-t{tasks}-{int(time.time())}.json"
        array_file.write_text(json.dumps({"study": str(study.path), "points": [p.id for p in points]}, indent=1))
        directives = {
            "job-name": f"sweep-{study.name}", "nodes": str(nodes), "ntasks-per-node": str(tasks),
            "gpus-per-node": str(gpus_per_node) if gpus_per_node else None, "time": minutes,
            "partition": partition, "account": account,
            "array": f"0-{len(points) - 1}" + (f"%{max_concurrent}" if max_concurrent else ""),
            "output": str(out_dir / "slurm" / "sweep-%A_%a.out"), "chdir": os.getcwd(),
        }
        script = slurm.render(SWEEP_TEMPLATE.read_text(), directives=directives,
                              variables={"PYTHON": sys.executable, "REPO": str(slurm.REPO)},
                              train_args=[str(out_dir.resolve()), str(array_file.resolve())],
                              extra=(["--exclusive"] if exclusive else []) + extra)
        path = array_file.with_suffix(".sbatch")
        path.write_text(script)
        job_id = slurm.sbatch(path)
        submitted[job_id] = [p.id for p in points]
        with (out_dir / "slurm" / "jobs.jsonl").open("a") as f:
            f.write(json.dumps({"job_id": job_id, "array": str(array_file), "points": len(points)}) + "\n")
        print(f"submitted job array {job_id}: {len(points)} point(s) of {nodes} node(s) x {tasks} task(s); logs "
              f"{out_dir / 'slurm'}/sweep-{job_id}_<index>.out", flush=True)
    return submitted


def run_array_task(out_dir: Path, array_file: Path, index: int) -> int:
    """Inside a SLURM array task: run point `index` of `array_file` with srun and record its result, also when
    something goes wrong here (the study file changed or is gone, an unexpected error)."""
    spec = json.loads(array_file.read_text())
    point_id, label = spec["points"][index], f"point {spec['points'][index]}"
    try:
        study = load_study(spec["study"])
        points = {p.id: p for p in expand(study)}
        if point_id not in points:
            raise StudyError(f"point {point_id} is no longer in {spec['study']} (was the study edited?)")
        label = points[point_id].label
        row = run_point(study, points[point_id], out_dir, launcher="srun")
        if row is None:
            print(f"{label}: another sweep is running this point; nothing to do", flush=True)
            return 0
    except Exception as e:  # noqa: BLE001 — whatever it was, the study must show the point as failed
        row = {"point": point_id, "label": label, "status": "failed", "reason": f"{type(e).__name__}: {e}",
               "world_size": None, "nodes": None, "config": None}
    row["slurm_job"] = f"{os.environ.get('SLURM_ARRAY_JOB_ID')}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    write_result(out_dir, row)
    print(f"{row['status']} {row['label']}: {row.get('reason') or row.get('tokens_per_s_per_gpu')}", flush=True)
    return 0


def wait_for_jobs(job_ids: list[str], *, poll_s: float = 5.0) -> None:
    """Block until no task of these job arrays is pending or running."""
    while True:
        out = subprocess.run(["squeue", "--noheader", "--format=%i %T", "--jobs", ",".join(job_ids)],
                             capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            return
        time.sleep(poll_s)
