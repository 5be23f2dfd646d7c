"""bench/gpu_suite.py: the smoke run end to end (through bench/gpu_suite.sh, as a GPU machine runs it), and the time
bounding that keeps a run's results when it is cut short."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_suite  # noqa: E402


def _rows(results: dict, part: str, **match) -> list[dict]:
    return [r for r in results["parts"][part]["rows"] if all(r.get(k) == v for k, v in match.items())]


@pytest.mark.slow
def test_smoke_run_writes_measured_results_and_report(tmp_path):
    # WHEELS=none: `make gpu-wheels` may have left wheels for the GPU image's Python in .whl/
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WHEELS": "none"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), str(tmp_path), "--smoke", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [out] = tmp_path.glob("gpu-cpu-*-smoke")
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["smoke"] and results["meta"]["device"] == "cpu"
    assert {name: p["status"] for name, p in results["parts"].items()} == {name: "ok" for name in gpu_suite.PARTS}
    assert "[kernels]" in (tmp_path / "suite.log").read_text()

    # 1. kernels: our torch path in fp32 agrees with its float64 run; bf16 rounding shows; FlexAttention (PyTorch's
    # code, forward only on CPU) gives our FoX output; fla's kernels are skipped for want of CUDA
    for op in gpu_suite.OPS:
        fp32, bf16 = (_rows(results, "kernels", op=op, impl="torch", dtype=d)[0] for d in ("fp32", "bf16"))
        assert fp32["status"] == bf16["status"] == "ok"
        assert fp32["max_rel_err"] < 1e-5 and 1e-4 < bf16["max_rel_err"] < 3e-2
        assert set(fp32["errors"]) == {"o", *(f"d{n}" for n in gpu_suite.OP_INPUTS[op])}
        assert fp32["fwd_ms"] > 0 and fp32["fwd_bwd_ms"] > 0
    flex = _rows(results, "kernels", impl="flex", dtype="fp32")[0]
    assert flex["status"] == "ok" and flex["errors"]["o"]["max_rel"] < 1e-5 and "bwd_ms" not in flex
    assert all("CUDA" in r["reason"] for r in _rows(results, "kernels", impl="fla"))

    # 2. throughput: real training steps (each repeats one random batch: its loss falls below ln V, the loss at
    # initialisation)
    ours = _rows(results, "throughput", compile=False)
    assert len(ours) == 4 * len(gpu_suite.SMOKE.seqs) and all(r["status"] == "ok" for r in ours)
    for r in ours:
        assert r["finite"] and 0 < r["loss"] < math.log(257) and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq"] / (r["step_ms"] / 1e3), rel=0.01)
    assert all(r["status"] == "skipped" for r in _rows(results, "throughput", compile=True))

    # 3. peers: HF's Llama at our Transformer's shape (same parameter count), and the ratios from the rows
    llama = _rows(results, "peers", peer="hf-llama", compile=False)
    assert llama and all(r["status"] == "ok" and r["params"] == r["ours_params"] for r in llama)
    ratios = [r for r in results["parts"]["peers"]["ratios"] if r["compile"] is False]
    assert len(ratios) == len(gpu_suite.SMOKE.seqs)
    for r in ratios:
        [mine] = _rows(results, "throughput", arch="transformer", seq=r["seq"], compile=False)
        [theirs] = _rows(results, "peers", peer="hf-llama", seq=r["seq"], compile=False)
        assert r["ratio"] == pytest.approx(mine["tokens_per_s"] / theirs["tokens_per_s"], abs=1e-3)

    # 4. activations per layer: full recompute keeps exactly the block input (2sbh); the paper's other rows are
    # lower bounds here (CPU keeps dropout masks in bf16, the causal mask, LayerNorm statistics)
    gpt = {r["recompute"]: r for r in _rows(results, "longest", model="gpt preset")}
    assert gpt["full"]["measured_over_sbh"] == 2.0 and gpt["full"]["ratio"] == 1.0
    assert 1.0 <= gpt["selective"]["ratio"] < 1.2 and 1.0 <= gpt["none"]["ratio"] < 1.3
    # longest sequence: every trial agrees with the capacity; a converged bisection brackets the answer within 5%,
    # near the linear fit's prediction; MsT + full recomputation leaves room for far longer sequences
    for arch in gpu_suite.SMOKE.longest_archs:
        series = {(r["recompute"], r["mst_chunks"]): r for r in _rows(results, "longest", arch=arch)}
        capacity = series[("none", 1)]["capacity_bytes"]  # exact: capacity_gib is rounded for the report
        for r in series.values():
            assert r["status"] == "ok"
            for t in r["trials"]:
                assert (t["status"] == "ok") == (t["peak_bytes"] <= capacity)
            if r["stop"].startswith("converged"):
                gap = r["first_failed"] - r["longest_ok"]
                assert 0 < gap <= max(gpu_suite.SMOKE.granularity, 0.05 * r["longest_ok"])
                assert abs(r["longest_ok"] - r["predicted"]) < 0.15 * r["predicted"]
        assert series[("full", 4)]["predicted"] > 2 * series[("none", 1)]["predicted"]
    assert any(r["stop"].startswith("converged") for r in _rows(results, "longest") if "stop" in r)

    # 5. memory by phase: full recomputation keeps less in forward; the prediction is of the same order
    for arch in ("transformer", "gla"):
        none, full = (_rows(results, "memory", arch=arch, recompute=m)[0] for m in ("none", "full"))
        assert full["phases"]["forward"]["peak_gib"] < none["phases"]["forward"]["peak_gib"]
        for r in (none, full):
            assert r["phases"]["start"]["now_gib"] < r["phases"]["forward"]["peak_gib"]
            assert 0.5 < r["measured_over_predicted"] < 2.0

    # 6. checkpoint blocking: measured where bench/checkpoint.py is present, else skipped saying so
    [ckpt] = results["parts"]["checkpoint"]["rows"]
    if ckpt["status"] == "ok":
        assert ckpt["async_over_sync_blocked"] == ckpt["result"]["async_over_sync_blocked"] > 0
    else:
        assert ckpt["status"] == "skipped" and "bench/checkpoint.py" in ckpt["reason"]

    report = (out / "report.md").read_text()
    for title, _ in gpu_suite.SECTIONS.values():
        assert f"## {title}" in report
    assert "table not made" not in report
    assert f"| hf-llama | {ratios[0]['seq']} | no |" in report and f"{ratios[0]['ratio']:.3g}" in report
    for png in ("kernels", "throughput", "longest", "memory"):
        data = (out / f"{png}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert len(list(out.iterdir())) + 1 <= 8  # with the log: what one device call brings back


def _suite(tmp_path, seconds: float) -> gpu_suite.Suite:
    results = gpu_suite.Results(tmp_path / "results.json",
                                gpu_suite.run_meta(torch.device("cpu"), [], smoke=True, minutes=seconds / 60))
    return gpu_suite.Suite(gpu_suite.SMOKE, torch.device("cpu"), tmp_path, results,
                           deadline=time.monotonic() + seconds)


def test_parts_are_time_bounded_and_keep_what_they_measured(tmp_path, monkeypatch):
    # of a 10 s run, about 5 s for the first part, 2 s for the second; the third needs more than is left
    monkeypatch.setattr(gpu_suite, "PART_SHARES", {"kernels": 0.6, "throughput": 0.2, "checkpoint": 0.2})
    monkeypatch.setattr(gpu_suite, "PART_MIN_SECONDS", {"kernels": 0, "throughput": 0, "checkpoint": 1e6})

    def kernels(suite, part):
        part.point("kernel torch:a", {"point": "ok"}, lambda: {"value": 1.0})
        part.point("kernel torch:b", {"point": "error"}, lambda: 1 / 0)
        def out_of_memory():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        part.point("kernel torch:c", {"point": "oom"}, out_of_memory)
        suite.measured["kernel torch:d"] = 1e6  # a point measured before as taking very long
        part.point("kernel torch:d", {"point": "too long"}, lambda: {"value": 2.0})

    def throughput(suite, part):
        part.point("ours eager:x", {"point": "kept"}, lambda: {"value": 3.0})

        def hang():
            while True:
                time.sleep(0.01)

        part.point("ours eager:y", {"point": "hangs"}, hang)
        part.point("ours eager:z", {"point": "never reached"}, lambda: {"value": 4.0})

    def checkpoint(suite, part):
        raise AssertionError("this part needs more time than is left: it must not start")

    suite = _suite(tmp_path, 10.0)
    gpu_suite.run_parts(suite, ["kernels", "throughput", "checkpoint"],
                        {"kernels": kernels, "throughput": throughput, "checkpoint": checkpoint})
    saved = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert saved["kernels"]["status"] == "ok"
    assert [(r["point"], r["status"]) for r in saved["kernels"]["rows"]] == [
        ("ok", "ok"), ("error", "error"), ("oom", "oom"), ("too long", "skipped")]
    assert "ZeroDivisionError" in saved["kernels"]["rows"][1]["reason"]
    assert "would overrun" in saved["kernels"]["rows"][3]["reason"]
    assert saved["throughput"]["status"] == "cut" and "time limit" in saved["throughput"]["reason"]
    assert [(r["point"], r["status"]) for r in saved["throughput"]["rows"]] == [("kept", "ok"), ("hangs", "cut")]
    assert saved["throughput"]["rows"][0]["value"] == 3.0
    assert saved["checkpoint"]["status"] == "skipped" and "would overrun" in saved["checkpoint"]["reason"]
    assert (tmp_path / "report.md").exists()


def test_peer_ratios_pair_equal_settings_and_best_with_best():
    ours = [{"arch": "transformer", "seq": 2048, "compile": False, "tokens_per_s": 110.0, "status": "ok"},
            {"arch": "transformer", "seq": 2048, "compile": True, "tokens_per_s": 150.0, "status": "ok"},
            {"arch": "gla", "seq": 2048, "compile": False, "tokens_per_s": 90.0, "status": "ok"}]
    peers = [{"peer": "hf-llama", "seq": 2048, "compile": False, "tokens_per_s": 100.0, "status": "ok"},
             {"peer": "hf-llama", "seq": 2048, "compile": True, "tokens_per_s": 140.0, "status": "ok"},
             {"peer": "fla-gla", "seq": 2048, "compile": False, "tokens_per_s": 100.0, "status": "ok"},
             {"peer": "fla-rwkv7", "seq": 2048, "compile": False, "status": "skipped"}]
    got = {(r["peer"], r["compile"]): (r["ratio"], r["meets_goal"]) for r in gpu_suite.peer_ratios(ours, peers)}
    assert got == {("hf-llama", False): (1.1, True), ("hf-llama", True): (round(150 / 140, 3), False),
                   ("hf-llama", "best"): (round(150 / 140, 3), False), ("fla-gla", False): (0.9, False),
                   ("fla-gla", "best"): (0.9, False)}


@pytest.mark.parametrize("argv, message", [(["--parts", "kernels,bogus"], "unknown part(s) bogus"),
                                           (["--minutes", "0"], "--minutes must be positive")])
def test_bad_arguments_are_refused_with_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(argv)
    assert message in capsys.readouterr().err


def test_gpu_wheels_cover_every_runtime_dependency_the_gpu_image_lacks():
    """The lent GPU machines have no package index: `make gpu-wheels` must fetch every runtime dependency that their
    image lacks, or `import pretrain` fails there (the Makefile's comment lists what the image has)."""
    import re
    import tomllib

    makefile = (REPO / "Makefile").read_text()
    image = re.search(r"they have (.+?), and no package index", makefile.replace("\n#", "")).group(1)
    has = {name.strip() for name in re.split(r",| and ", image) if name.strip()}
    wheels = {spec.split("==")[0] for spec in re.search(r"GPU_WHEELS \?= (.+)", makefile).group(1).split()}
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    needed = {re.split(r"[<>=!\[ ;]", dep)[0].lower() for dep in deps}
    assert needed - has - wheels == set(), "add them to GPU_WHEELS in the Makefile"


def test_the_context_ceiling_part_trains_each_architecture_at_batch_1_with_full_recompute(tmp_path):
    """Part 8 (the single-device ceiling context parallelism goes beyond), at smoke sizes on CPU: every architecture
    at every length, one sequence per step, measured tokens/s, and its section in the report."""
    suite = _suite(tmp_path, 120.0)
    gpu_suite.run_parts(suite, ["ceiling"])
    entry = json.loads((tmp_path / "results.json").read_text())["parts"]["ceiling"]
    assert entry["status"] == "ok"
    rows = entry["rows"]
    assert [(r["arch"], r["seq"]) for r in rows] == [(a, s) for s in gpu_suite.SMOKE.ceiling_seqs
                                                     for a in gpu_suite.ARCHS]
    for r in rows:
        assert r["status"] == "ok" and r["batch"] == 1 and r["cp"] == 1 and r["recompute"] == "full", r
        assert r["tokens_per_s"] > 0 and r["finite"]
    assert "8. Single-device context ceiling" in (tmp_path / "report.md").read_text()
    assert gpu_suite.FULL.ceiling_seqs == (32768, 65536)
