"""Throughput studies: a real local sweep (torchrun, gloo), its results and report, re-runs, and a SLURM job array."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launch import report, sweep
from launch.report import efficiency, layout, load_rows
from tests.launch.conftest import REPO, clean_env

STUDY = """\
    [study]
    name = "t"
    warmup_steps = 1
    timed_steps = 3

    [base]
    model = {{ d_model = 32, n_layers = 2, n_heads = 2, vocab_size = 128, seq_len = 32 }}
    data = {{ path = "synthetic" }}
    train = {{ global_batch = 4, micro_batch = 2, device = "cpu" }}

    [grid]
    {grid}
    """


def write_study(tmp_path: Path, grid: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(STUDY.format(grid=grid)))
    return path


def launch(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def test_local_sweep_records_points_writes_report_and_skips_done_points_on_rerun(tmp_path):
    study = write_study(tmp_path, '"parallel.tp" = [1, 2]\ngpus = [1, 2]')
    out = tmp_path / "out"
    run = launch("sweep", str(study), "--out", str(out), "--cluster", str(REPO / "configs/clusters/cpu-gloo.toml"),
                 cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {(r["config"]["parallel"]["tp"], r["world_size"]): r for r in results(out)}
    assert set(rows) == {(1, 1), (1, 2), (2, 1), (2, 2)}

    invalid = rows[(2, 1)]
    assert invalid["status"] == "invalid" and "does not divide the 1 processes" in invalid["reason"]
    assert not (out / "points" / invalid["point"] / "train.log").exists(), "an invalid point must not start"
    for key in [(1, 1), (1, 2), (2, 2)]:
        r = rows[key]
        assert r["status"] == "ok", r
        logged = [json.loads(line) for line in (out / "points" / r["point"] / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in logged] == [1, 2, 3, 4]  # 1 warm-up + 3 timed steps, each logged
        # the step time agrees with the one clocked independently on every rank (launch/monitor.py), and the
        # timed steps fit in the point's wall-clock time
        assert all(w == pytest.approx(r["step_time_s"], rel=0.3) for w in r["rank_wall_s"]), r
        assert 0 < 3 * r["step_time_s"] < r["run_s"]
        assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_time_s"])
        assert r["mfu"] is None and r["memory_kind"] == "cpu_rss_rank0" and r["peak_memory_gb"] > 0
        assert len(r["rank_cpu_s"]) == r["world_size"] and r["versions"]["torch"]
        assert not (out / "points" / r["point"] / "checkpoints").exists(), "a sweep point saves no checkpoint"
    assert layout(rows[(2, 2)]) == "dp1·tp2·pp1+sp" and layout(rows[(1, 2)]) == "dp2·tp1·pp1"

    for name in ("report.md", "report.html", "scaling.png", "mfu.png", "breakdown.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "## Scaling efficiency" in md and "does not divide the 1 processes" in md
    # the performance model, calibrated on the single-process point, gives it back and predicts the others
    section = md.split("## Performance model check")[1].split("##")[0]
    checks = {(cells[1].strip(), int(cells[2])): float(cells[5]) for cells in
              (line.split("|") for line in section.splitlines() if line.startswith("| tp="))}
    assert set(checks) == {("tp=1", 1), ("tp=1", 2), ("tp=2", 2)} and checks[("tp=1", 1)] == 1.0
    assert efficiency(load_rows(out / "results.jsonl"))["tp=1"][2] == pytest.approx(
        rows[(1, 2)]["tokens_per_s_per_gpu"] / rows[(1, 1)]["tokens_per_s_per_gpu"])

    # a second run skips every recorded point; a failed one runs again
    lines = (out / "results.jsonl").read_text().splitlines()
    again = launch("sweep", str(study), "--out", str(out), "--no-report", cwd=tmp_path)
    assert again.returncode == 0 and "0 point(s) to run, 4 done, invalid or not for here" in again.stdout, again.stdout
    assert (out / "results.jsonl").read_text().splitlines() == lines
    failed = out / "points" / rows[(1, 1)]["point"] / "result.json"
    failed.write_text(json.dumps({**json.loads(failed.read_text()), "status": "failed"}))
    third = launch("sweep", str(study), "--out", str(out), "--no-report", cwd=tmp_path)
    assert third.returncode == 0 and "1 point(s) to run, 3 done, invalid or not for here" in third.stdout, third.stdout
    assert json.loads(failed.read_text())["status"] == "ok"


def test_failed_point_is_recorded_with_its_error_and_the_sweep_goes_on(tmp_path):
    # the data path does not exist: the config is valid, the run starts and stops with a clear error
    study = write_study(tmp_path, '"data.path" = ["/nonexistent/shards"]')
    out = tmp_path / "out"
    run = launch("sweep", str(study), "--out", str(out), "--no-report", cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    (row,) = results(out)
    assert row["status"] == "failed" and "/nonexistent/shards" in row["reason"], row["reason"]


def test_failure_classifies_out_of_memory_and_keeps_the_last_error_line():
    log = "step 1\nTraceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB\n"
    assert sweep.failure(log, 1) == ("oom", "torch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB")
    log = "Traceback:\nValueError: bad thing\nRuntimeError: worse thing happened\n"
    assert sweep.failure(log, 1) == ("failed", "RuntimeError: worse thing happened")
    # torchrun's own summary comes last and names no cause: the worker's error is the reason
    log = ("[rank1]: FileNotFoundError: no shards in /data\nTraceback (most recent call last):\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n====\npretrain.train FAILED\n")
    assert sweep.failure(log, 1) == ("failed", "[rank1]: FileNotFoundError: no shards in /data")
    assert sweep.failure("", -9)[1].startswith("killed by a signal")


def test_study_expands_to_the_product_with_stable_ids(tmp_path):
    study = sweep.load_study(write_study(tmp_path, '"model.arch" = ["transformer", "gla"]\n'
                                                    'parallel = [{ tp = 1 }, { tp = 2, sequence_parallel = true }]\n'
                                                    'gpus = [1, 2, 4]'))
    points = sweep.expand(study)
    assert len(points) == 12 and len({p.id for p in points}) == 12
    assert [p.id for p in sweep.expand(study)] == [p.id for p in points]
    assert points[-1].label == "arch=gla parallel=tp:2,sequence_parallel:true gpus=4"
    assert points[-1].overrides["parallel"] == {"tp": 2, "sequence_parallel": True}
    assert points[-1].overrides["model"]["arch"] == "gla" and points[-1].overrides["model"]["d_model"] == 32
    study.base["model"]["d_model"] = 64  # another base is another study: no point may be taken as done
    assert not {p.id for p in sweep.expand(study)} & {p.id for p in points}


@pytest.mark.parametrize("grid, message", [
    ('"model.arch" = "gla"', "needs a non-empty list"),
    ('"modle.arch" = ["gla"]', "neither 'section.key' nor 'section'"),
    ('model = [1, 2]', "must be tables"),
])
def test_bad_study_files_are_explained(tmp_path, grid, message):
    with pytest.raises(sweep.StudyError, match=message):
        sweep.load_study(write_study(tmp_path, grid))


def test_invalid_config_values_are_invalid_points_not_crashes(tmp_path):
    study = sweep.load_study(write_study(tmp_path, '"model.arch" = ["transformer", "mamba"]'))
    reasons = [sweep.why_invalid(study, p) for p in sweep.expand(study)]
    assert reasons[0] is None and "model.arch='mamba' is not one of" in reasons[1]


def test_example_study_is_valid():
    study = sweep.load_study(REPO / "configs" / "studies" / "tiny.toml")
    assert all(sweep.why_invalid(study, p) is None and sweep.why_not_here(study, p) is None
               for p in sweep.expand(study))


@pytest.mark.slurm
def test_sweep_as_a_job_array_on_slurm(slurm_cluster, tmp_path):
    study = write_study(tmp_path, 'gpus = [1, 2]\nnodes = [1]')
    out = tmp_path / "out"
    run = launch("sweep", str(study), "--out", str(out), "--slurm", "--wait", "--time", "00:05:00", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("submitted job array") == 2  # one array per node shape: 1x1 and 1x2
    rows = results(out)
    assert sorted(r["world_size"] for r in rows) == [1, 2]
    assert all(r["status"] == "ok" and r["slurm_job"].split("_")[1] == "0" for r in rows), rows
    log = next((out / "slurm").glob("sweep-*_0.out")).read_text()
    assert "array task" in log
    assert (out / "report.md").exists()


def test_points_too_big_for_this_machine_are_left_for_slurm_not_recorded(tmp_path, capsys):
    study = sweep.load_study(write_study(tmp_path, 'gpus = [2]\nnodes = [2]'))
    out = tmp_path / "out"
    todo, skipped = sweep.plan(study, out, local=True)
    assert todo == [] and len(skipped) == 1 and "submit with --slurm" in capsys.readouterr().out
    assert not (out / "results.jsonl").exists()
    todo, _ = sweep.plan(study, out, local=False)
    assert len(todo) == 1


def test_inference_study_times_prefill_and_decode_per_architecture_and_context(tmp_path):
    study = tmp_path / "inference.toml"
    study.write_text(textwrap.dedent("""\
        [study]
        name = "inf"
        measure = "inference"
        decode_tokens = 8
        warmup_steps = 1
        timed_steps = 2

        [base]
        model = { d_model = 32, n_layers = 2, n_heads = 2, vocab_size = 128 }
        data = { path = "synthetic" }
        train = { micro_batch = 2, device = "cpu" }

        [grid]
        "model.arch" = ["transformer", "gla"]
        "model.seq_len" = [32, 64]
        gpus = [1, 2]
        """))
    out = tmp_path / "out"
    run = launch("sweep", str(study), "--out", str(out), "--no-report", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {(r["config"]["model"]["arch"], r["config"]["model"]["seq_len"], r["world_size"]): r
            for r in results(out)}
    assert len(rows) == 8
    for (arch, seq_len, gpus), r in rows.items():
        assert r["measure"] == "inference"
        if gpus == 2:
            assert r["status"] == "invalid" and "one process" in r["reason"], r
            continue
        assert r["status"] == "ok", r
        assert (r["batch"], r["prompt_tokens"], r["decode_tokens"], r["repeats"]) == (2, seq_len - 8, 8, 2)
        assert r["prefill_tokens_per_s"] == pytest.approx(2 * (seq_len - 8) / r["prefill_s"])
        assert r["decode_tokens_per_s"] == pytest.approx(2 * 8 / r["decode_s"])
        assert r["peak_memory_gb"] > 0 and r["memory_kind"] == "cpu_rss" and r["versions"]["torch"]
        assert not (out / "points" / r["point"] / "metrics.jsonl").exists(), "no training ran"
    # keys and values: 2 layers × (k, v) × 2 rows × 2 heads × 16 channels × fp32 per step of the context;
    # GLA's state: 2 layers × 2 rows × 2 heads × 8 × 16 fp32, whatever the context
    for seq_len in (32, 64):
        assert rows[("transformer", seq_len, 1)]["cache_bytes"] == 2 * 2 * 2 * 2 * 16 * 4 * seq_len
        assert rows[("gla", seq_len, 1)]["cache_bytes"] == 2 * 2 * 2 * 8 * 16 * 4
    again = launch("sweep", str(study), "--out", str(out), "--no-report", cwd=tmp_path)
    assert again.returncode == 0 and "0 point(s) to run, 8 done" in again.stdout, again.stdout

    md = report.write_report(out / "results.jsonl").read_text()
    assert md.startswith("# Inference study: inf") and "## Points\n" not in md, md  # no training table
    table = [line for line in md.splitlines() if line.startswith("| arch=")]
    assert len(table) == 4 + 4, md  # the 4 points that ran, then the 4 that cannot run on one process
    gla_64 = rows[("gla", 64, 1)]
    assert (f"| {report.series_key(gla_64)} | 64 | 2 | {gla_64['prefill_tokens_per_s']:,.0f} | "
            f"{gla_64['decode_tokens_per_s']:,.0f} |") in md, md
    assert "![Inference](inference.png)" in md and (out / "inference.png").stat().st_size > 0


def test_inference_studies_are_valid_and_their_ids_differ_from_training_ones(tmp_path):
    for name in ("inference-tiny.toml", "inference.toml"):
        study = sweep.load_study(REPO / "configs" / "studies" / name)
        assert study.measure == "inference"
        assert all(sweep.why_invalid(study, p) is None for p in sweep.expand(study))
    training = sweep.load_study(write_study(tmp_path, '"model.arch" = ["gla"]'))
    inference = sweep.load_study(write_study(tmp_path, '"model.arch" = ["gla"]'))
    inference.measure = "inference"
    assert sweep.expand(training)[0].id != sweep.expand(inference)[0].id
    unknown = tmp_path / "serve.toml"
    unknown.write_text('[study]\nmeasure = "serve"\n')
    with pytest.raises(sweep.StudyError, match="measure = 'serve'; use one of train, inference"):
        sweep.load_study(unknown)
