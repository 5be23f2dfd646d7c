"""`python -m launch`: run training locally, submit it to SLURM, follow it, resume it.

    python -m launch run --nproc 2 --config configs/transformer-tiny.toml --train.steps=100
    python -m launch submit --config configs/transformer-125m.toml --nodes 2 --tasks-per-node 8 \\
        --gpus-per-node 8 --time 12:00:00 --partition gpu --train.run_dir=runs/125m
    python -m launch status runs/125m
    python -m launch resume runs/125m
    python -m launch sweep configs/studies/tiny.toml           # a throughput study, point by point, here
    python -m launch sweep configs/studies/x.toml --slurm --gpus-per-node 8 --time 00:30:00   # as job arrays
    python -m launch report runs/studies/tiny/results.jsonl  # tables and plots
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from launch import slurm

EPILOG = ("Training options follow as --section.key=value (see `python -m pretrain.train --help`); "
          "they are checked before anything starts.")


def _config(args: argparse.Namespace, overrides: list[str]):
    """Load and validate the run's config as the job will, so mistakes surface before submitting."""
    from pretrain.config import ConfigError, load_config  # imports torch-free config code only

    argv = (["--config", args.config] if args.config else []) + overrides
    try:
        return load_config(argv)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def cmd_run(args: argparse.Namespace, overrides: list[str]) -> None:
    _config(args, overrides)
    nproc = args.nproc
    if nproc is None:
        import torch
        nproc = torch.cuda.device_count() or 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "pretrain.train", *(["--config", args.config] if args.config else []), *overrides]
    print("+", shlex.join(cmd), flush=True)
    os.execv(sys.executable, cmd)


def cmd_submit(args: argparse.Namespace, overrides: list[str]) -> int:
    from pretrain.config import ConfigError, validate_world

    cfg = _config(args, overrides)
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    try:
        validate_world(cfg, args.nodes * tasks)
    except ConfigError as e:
        sys.exit(f"config error with {args.nodes} node(s) x {tasks} task(s): {e}")
    run_dir = Path(cfg.train.run_dir).resolve()
    jobs = _active_jobs(run_dir)
    if jobs:
        sys.exit(f"{run_dir} already has job(s) {', '.join(jobs)} pending or running; two jobs must not share a "
                 f"run directory (scancel them, or pick another --train.run_dir)")
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    # Absolute paths: the job may start in another directory, and `resume` may run from anywhere.
    train_args = ((["--config", str(Path(args.config).resolve())] if args.config else [])
                  + _without(overrides, "--train.run_dir") + [f"--train.run_dir={run_dir}"])
    directives = {
        "job-name": args.job_name or run_dir.name, "nodes": str(args.nodes), "ntasks-per-node": str(tasks),
        "gpus-per-node": str(args.gpus_per_node) if args.gpus_per_node else None,
        "cpus-per-task": str(args.cpus_per_task) if args.cpus_per_task else None,
        "time": args.time, "partition": args.partition, "account": args.account,
        "signal": f"USR2@{args.signal_before}", "output": str(run_dir / "slurm" / "slurm-%j.out"),
        "chdir": os.getcwd(),
    }
    script = slurm.render(slurm.TEMPLATE.read_text(), directives=directives,
                          variables={"PYTHON": sys.executable, "REPO": str(slurm.REPO),
                                     "LAUNCHER": "torchrun" if args.torchrun else "srun"},
                          train_args=train_args, extra=args.sbatch)
    path = run_dir / "slurm" / "train.sbatch"
    path.write_text(script)
    if args.dry_run:
        print(f"wrote {path} (not submitted: --dry-run)")
        return 0
    return _submit(run_dir, path, [])


def _without(overrides: list[str], name: str) -> list[str]:
    """`overrides` less `name=VALUE` and `name VALUE`."""
    out, skip = [], False
    for arg in overrides:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def _submit(run_dir: Path, script: Path, extra: list[str]) -> int:
    try:
        job_id = slurm.sbatch(script, extra)
    except slurm.SlurmError as e:
        sys.exit(str(e))
    slurm.record_job(run_dir, job_id, [*extra, str(script)])
    print(f"submitted job {job_id}")
    print(f"log: {slurm.log_path(run_dir, job_id)}")
    return 0


def _active_jobs(run_dir: Path) -> list[str]:
    return [j for j in slurm.jobs_of(run_dir) if slurm.job_info(j).get("JobState") in slurm.ACTIVE_STATES]


def cmd_resume(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        sys.exit(f"resume takes no training options ({' '.join(overrides)}): it reruns {args.run_dir}/slurm/"
                 "train.sbatch as submitted; edit that file to change the run")
    run_dir = Path(args.run_dir).resolve()
    script = run_dir / "slurm" / "train.sbatch"
    if not script.exists():
        sys.exit(f"{script} not found: `resume` takes a run directory made by `python -m launch submit`")
    jobs = _active_jobs(run_dir)
    if jobs:
        sys.exit(f"job(s) {', '.join(jobs)} of {run_dir} are still pending or running; resume after they end")
    extra = [f"--{k}={v}" for k, v in (("time", args.time), ("partition", args.partition),
                                        ("account", args.account)) if v]
    return _submit(run_dir, script, extra)


def _newest_checkpoint(run_dir: Path) -> str:
    latest = run_dir / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.exists() else "none"


def _last_metrics(run_dir: Path) -> str:
    path = run_dir / "metrics.jsonl"
    rows = path.read_text().splitlines() if path.exists() else []
    if not rows:
        return "no metrics yet"
    row = json.loads(rows[-1])
    return f"step {row['step']}, loss {row['loss']:.4f}"


def cmd_status(args: argparse.Namespace, overrides: list[str]) -> int:
    runs = [Path(r) for r in args.run_dir] or sorted(p.parents[1] for p in Path("runs").glob("*/slurm/jobs.jsonl"))
    if not runs:
        print("no submitted runs found (give run directories, or submit with `python -m launch submit`)")
    for run_dir in runs:
        print(f"{run_dir}: checkpoint {_newest_checkpoint(run_dir)}; {_last_metrics(run_dir)}")
        for job_id in slurm.jobs_of(run_dir):
            info = slurm.job_info(job_id)
            state = (f"{info.get('JobState')} ({info.get('Reason')}), run time {info.get('RunTime')}, "
                     f"restarts {info.get('Restarts')}") if info else "finished (no longer known to SLURM)"
            print(f"  job {job_id}: {state}; log {slurm.log_path(run_dir, job_id)}")
    return 0


def cmd_sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    from launch import report, sweep

    if overrides:
        sys.exit(f"sweep takes no training options ({' '.join(overrides)}): put them in the study's [base] table")
    try:
        study = sweep.load_study(args.study)
    except sweep.StudyError as e:
        sys.exit(f"study error: {e}")
    out_dir = (args.out or Path("runs") / "studies" / study.name).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.slurm:
        try:
            jobs = sweep.submit_arrays(study, out_dir, gpus_per_node=args.gpus_per_node, time_limit=args.time,
                                       partition=args.partition, account=args.account,
                                       max_concurrent=args.max_concurrent, exclusive=not args.shared,
                                       extra=args.sbatch)
        except (slurm.SlurmError, sweep.StudyError) as e:
            sys.exit(str(e))
        if not args.wait:
            print(f"when the arrays have finished: python -m launch report {out_dir / 'results.jsonl'}")
            return 0
        sweep.wait_for_jobs(list(jobs))
        results = sweep.read_results(out_dir)
        missing = [p for ids in jobs.values() for p in ids if p not in results]
        if missing:
            print(f"{len(missing)} submitted point(s) left no result (killed by SLURM?): see "
                  f"{out_dir / 'slurm'}/sweep-*.out", flush=True)
        bad = len(missing) + sum(results[p]["status"] == "failed" for ids in jobs.values() for p in ids
                                 if p in results)
    else:
        bad = sweep.sweep_local(study, out_dir)
    if (out_dir / "results.jsonl").exists() and not args.no_report:
        try:
            md = report.write_report(out_dir / "results.jsonl", cluster_path=args.cluster)
            print(f"report: {md} ({md.with_suffix('.html').name} and the plots beside it)")
        except (OSError, ValueError, ImportError) as e:
            print(f"the results are saved, but the report failed: {e}", file=sys.stderr)
    return 1 if bad else 0


def cmd_sweep_task(args: argparse.Namespace, overrides: list[str]) -> int:
    from launch import sweep

    return sweep.run_array_task(Path(args.out_dir), Path(args.array_file), args.index)


def cmd_report(args: argparse.Namespace, overrides: list[str]) -> int:
    from launch import report

    try:
        md = report.write_report(args.results, args.out, cluster_path=args.cluster)
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    print(f"wrote {md}, {md.with_suffix('.html').name} and the plots in {md.parent}")
    return 0


def parser() -> argparse.ArgumentParser:
    # No abbreviations: `--node 2` must be an error, not a silent `--nodes 2`; `--train.x` must stay unknown.
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,submit,status,resume,sweep,report}")

    run = sub.add_parser("run", allow_abbrev=False,
                         help="train on this machine with N processes (torchrun --standalone)",
                         description="Train on this machine: torchrun starts N processes (gloo on CPU, NCCL on "
                                     "GPUs).", epilog=EPILOG)
    run.add_argument("--config", help="TOML config of the run (configs/*.toml)")
    run.add_argument("--nproc", type=int, help="processes to start (default: one per GPU, else 2)")
    run.set_defaults(fn=cmd_run)

    s = sub.add_parser("submit", allow_abbrev=False, help="render slurm/train.sbatch for a run and sbatch it",
                       description="Write <run_dir>/slurm/train.sbatch from slurm/train.sbatch and submit it. The "
                                   "job runs this Python interpreter on this source tree, one task per GPU (or "
                                   "per CPU process without GPUs), saves and requeues itself before its time "
                                   "limit, and resumes from its newest checkpoint.", epilog=EPILOG)
    s.add_argument("--config", required=True, help="TOML config of the run (configs/*.toml)")
    s.add_argument("--nodes", type=int, default=1, help="nodes to allocate (default 1)")
    s.add_argument("--tasks-per-node", type=int,
                   help="training processes per node: one per GPU (default: --gpus-per-node, else 1)")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs to allocate per node (default 0: CPU run)")
    s.add_argument("--cpus-per-task", type=int, help="CPU cores per process (sets OMP_NUM_THREADS too)")
    s.add_argument("--time", help="time limit, e.g. 04:00:00 or 2-00:00:00 (default: the template's)")
    s.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    s.add_argument("--account", help="account to charge (default: yours)")
    s.add_argument("--job-name", help="job name (default: the run directory's name)")
    s.add_argument("--signal-before", type=int, default=300, metavar="SECONDS",
                   help="send USR2 this long before the time limit; it must cover a step plus a checkpoint "
                        "save (default 300)")
    s.add_argument("--torchrun", action="store_true",
                   help="one torchrun per node starting the node's processes, instead of one srun task each")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="any other sbatch option, verbatim and repeatable, e.g. --sbatch=--qos=high")
    s.add_argument("--dry-run", action="store_true", help="write the script but do not submit it")
    s.set_defaults(fn=cmd_submit)

    st = sub.add_parser("status", allow_abbrev=False,
                        help="jobs, newest checkpoint and last logged step of submitted runs",
                        description="For each run directory: its newest checkpoint, its last metrics row and "
                                    "the state of every job submitted for it.")
    st.add_argument("run_dir", nargs="*", help="run directories (default: every runs/*/ with submitted jobs)")
    st.set_defaults(fn=cmd_status)

    r = sub.add_parser("resume", allow_abbrev=False,
                       help="submit a run directory's job script again; it resumes from its checkpoint",
                       description="Submit <run_dir>/slurm/train.sbatch again, e.g. after the job failed or ran "
                                   "out of requeues; training resumes from the newest complete checkpoint.")
    r.add_argument("run_dir", help="a run directory made by `submit`")
    r.add_argument("--time", help="a new time limit for this job")
    r.add_argument("--partition", help="another partition for this job")
    r.add_argument("--account", help="another account for this job")
    r.set_defaults(fn=cmd_resume)

    sw = sub.add_parser("sweep", allow_abbrev=False, help="run a throughput study: every point of a grid, timed",
                        description="Run every point of a study file (configs/studies/) here one after another, or "
                                    "as SLURM job arrays; one JSON line per point in <out>/results.jsonl, then "
                                    "the report. Points that cannot run are recorded with the reason; running "
                                    "the sweep again skips points already done and retries failed ones.")
    sw.add_argument("study", help="the study TOML ([study], [base], [grid]; see launch/sweep.py)")
    sw.add_argument("--out", type=Path, help="output directory (default runs/studies/<study name>)")
    sw.add_argument("--slurm", action="store_true",
                    help="submit the points as job arrays (one per node shape) instead of running them here")
    sw.add_argument("--wait", action="store_true", help="with --slurm: wait for the arrays, then write the report")
    sw.add_argument("--gpus-per-node", type=int, default=0,
                    help="with --slurm: GPUs to allocate per node (default 0: CPU processes)")
    sw.add_argument("--time", help="with --slurm: time limit of one point, e.g. 00:30:00 (default: the study's "
                                   "point_timeout_minutes + 5 minutes)")
    sw.add_argument("--partition", help="with --slurm: SLURM partition")
    sw.add_argument("--account", help="with --slurm: account to charge")
    sw.add_argument("--max-concurrent", type=int, default=0,
                    help="with --slurm: array tasks running at once (default 0: no limit)")
    sw.add_argument("--shared", action="store_true",
                    help="with --slurm: let points share nodes (default: --exclusive, so timings are undisturbed)")
    sw.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                    help="with --slurm: any other sbatch option, verbatim and repeatable")
    sw.add_argument("--cluster", type=Path,
                    help="cluster TOML (configs/clusters/) for the report's modelled step-time breakdown")
    sw.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    sw.set_defaults(fn=cmd_sweep)

    # Run inside a sweep's array task by slurm/sweep.sbatch; not for people.
    task = sub.add_parser("sweep-task", allow_abbrev=False)
    task.add_argument("out_dir")
    task.add_argument("array_file")
    task.add_argument("index", type=int)
    task.set_defaults(fn=cmd_sweep_task)

    rp = sub.add_parser("report", allow_abbrev=False, help="tables and plots of a study's results.jsonl",
                        description="Write report.md, report.html and PNG plots (scaling with the ideal line, "
                                    "MFU by architecture and sequence length, memory per recompute mode, the "
                                    "modelled step-time breakdown) from a study's results.jsonl.")
    rp.add_argument("results", type=Path, help="a study's results.jsonl")
    rp.add_argument("--out", type=Path, help="directory for the report (default: beside results.jsonl)")
    rp.add_argument("--cluster", type=Path,
                    help="cluster TOML (configs/clusters/) for the modelled step-time breakdown plot")
    rp.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args, overrides = parser().parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") and "." not in o.split("=")[0]]
    if bad:
        parser().error(f"unrecognized arguments: {' '.join(bad)} (see python -m launch {args.command} --help)")
    return args.fn(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
