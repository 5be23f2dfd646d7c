"""The performance model: reproduces its inputs on measured points, α-β and bubble formulas, Korthikanti's activation
memory, layout suggestions and the CLI. Pure arithmetic on meta-device models: no process group, a few seconds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from launch.perfmodel import (KERNEL_LATENCY_S, Cluster, Layout, activation_bytes_per_layer, bubble_fraction, calibrate,
                              candidate_layouts, collective_time, cp_layer_volume, cp_time, cp_volume, main,
                              memory_breakdown, model_stats, predict,
                              rank_params, suggest, validate)
from pretrain.config import build_config

REPO = Path(__file__).resolve().parents[2]
H100 = Cluster.load(REPO / "configs/clusters/h100-nvlink-ib.toml")
CPU = Cluster.load(REPO / "configs/clusters/cpu-gloo.toml")
TINY = {"d_model": 64, "n_layers": 4, "n_heads": 4, "vocab_size": 256, "seq_len": 64}


def sweep_row(world_size: int, tokens_per_s: float, *, parallel=None, train=None, model=None, status="ok") -> dict:
    """A results.jsonl row as the sweep writes it (only the fields the model reads are real)."""
    cfg = build_config({"model": {**TINY, **(model or {})}, "parallel": parallel or {},
                        "train": {"global_batch": 8, "micro_batch": 2, **(train or {})}})
    return {"point": f"w{world_size}", "status": status, "reason": None, "overrides": {}, "config": cfg.to_dict(),
            "world_size": world_size, "nodes": 1, "device": "cpu", "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": tokens_per_s / world_size, "step_time_s": 8 * 64 / tokens_per_s,
            "tflops_per_gpu": None, "mfu": None, "peak_memory_gb": None, "flops_per_token": None}


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_reproduces_its_own_inputs_on_a_measured_single_device_point(recompute):
    rows = [sweep_row(1, 1234.5, parallel={"recompute": recompute}),
            sweep_row(2, 2000.0, parallel={"dp": 2, "recompute": recompute}),
            sweep_row(1, 99.0, status="failed")]
    point = calibrate(rows)[("transformer", "d64-L4-H4", 64)]
    assert point["tokens_per_s"] == 1234.5 and point["recompute"] == recompute
    checked = validate(rows, CPU)
    single = next(v for v in checked if v["world_size"] == 1)
    assert single["predicted_tokens_per_s"] == pytest.approx(1234.5, rel=1e-6)
    assert single["ratio"] == pytest.approx(1.0, abs=1e-6)
    two = next(v for v in checked if v["world_size"] == 2)
    assert 0 < two["predicted_tokens_per_s"] <= 2 * 1234.5  # dp adds devices and communication, never speed-up > 2
    assert len(checked) == 2  # the failed row is not validated


def test_collective_times_are_ring_alpha_beta():
    n, alpha, beta = 1e6, 1e-5, 1e9
    assert collective_time("all_reduce", calls=1, nbytes=n, group=4, alpha=alpha, beta=beta) == \
        pytest.approx(2 * 3 / 4 * n / beta + 2 * 3 * alpha)
    for kind in ("all_gather", "reduce_scatter"):
        assert collective_time(kind, calls=2, nbytes=n, group=8, alpha=alpha, beta=beta) == \
            pytest.approx(7 / 8 * n / beta + 2 * 7 * alpha)
    send = collective_time("send", calls=3, nbytes=n, group=2, alpha=alpha, beta=beta)
    assert send == pytest.approx(n / beta + 3 * alpha)
    assert collective_time("all_reduce", calls=5, nbytes=n, group=1, alpha=alpha, beta=beta) == 0.0


def test_bubble():
    assert bubble_fraction(1, 1, 8, "1f1b") == 0.0
    assert bubble_fraction(4, 1, 8, "1f1b") == pytest.approx(3 / 8)
    assert bubble_fraction(4, 2, 8, "interleaved_1f1b") == pytest.approx(3 / 16)
    assert bubble_fraction(4, 2, 8, "zero_bubble") == pytest.approx(3 / 48)
    cfg = build_config({"model": TINY}).model
    flat = predict(cfg, Layout(dp=1, pp=1, micro_batch=1, global_batch=8), 64, H100)
    piped = predict(cfg, Layout(pp=2, micro_batch=1, global_batch=8), 64, H100)
    br = piped.breakdown_s
    assert br["bubble"] == pytest.approx((2 - 1) / 8 * (br["compute"] + br["tp_comm"] + br["pp_comm"]))
    assert br["compute"] == pytest.approx(flat.breakdown_s["compute"] / 2)


def test_tp_communication_time_matches_the_hand_count():
    cfg = build_config({"model": TINY}).model
    layout = Layout(tp=2, micro_batch=2, global_batch=8)  # 4 micro-batches, TP + SP
    pred = predict(cfg, layout, 64, H100)
    a = 64 * 2 * 64 * 2  # s·b·h bf16 bytes
    per_collective = 1 / 2 * a / H100.intra_beta + H100.intra_alpha
    calls = 4 * (4 * 4 + 2)  # micro-batches × (4 per block + embedding + head)
    loss = 2 * 1 / 2 * (4 * 3 * 64 * 2 * 4) / H100.intra_beta + 4 * 3 * 2 * H100.intra_alpha
    assert pred.breakdown_s["tp_comm"] == pytest.approx(2 * calls * per_collective + loss)


GPT = {"preset": "gpt", "d_model": 256, "n_heads": 8, "n_layers": 2, "vocab_size": 128, "seq_len": 512}


@pytest.mark.parametrize("t, sp", [(1, False), (2, False), (4, False), (2, True), (4, True)])
def test_activation_memory_is_korthikanti(t, sp):
    cfg = build_config({"model": GPT}).model
    s, b, h, a = 512, 2, 256, 8
    sbh = s * b * h
    formula = {  # DESIGN §5
        "none": sbh * (34 / t + 5 * a * s / (h * t)) if sp else sbh * (10 + 24 / t + 5 * a * s / (h * t)),
        "selective": 34 * sbh / t if sp else sbh * (10 + 24 / t),
        "full": 2 * sbh / (t if sp else 1),
    }
    for mode, expected in formula.items():
        got = activation_bytes_per_layer(cfg, s=s, b=b, t=t, sequence_parallel=sp, recompute=mode, dtype_bytes=2)
        assert got == pytest.approx(expected), mode


def test_weights_and_optimizer_memory_shard():
    cfg = build_config({"model": TINY}).model
    st = model_stats(cfg, 64)
    base = memory_breakdown(cfg, Layout(global_batch=8), 64, H100)["weights_grads_optimizer"]
    assert base == pytest.approx(16 * st.params)
    fsdp = memory_breakdown(cfg, Layout(dp=4, global_batch=8), 64, H100)["weights_grads_optimizer"]
    ddp = memory_breakdown(cfg, Layout(dp=4, data_parallel="ddp", global_batch=8), 64, H100)
    assert fsdp == pytest.approx(base / 4) and ddp["weights_grads_optimizer"] == pytest.approx(base)
    tp2 = memory_breakdown(cfg, Layout(tp=2, global_batch=8), 64, H100)["weights_grads_optimizer"]
    assert tp2 == pytest.approx(base / 2)
    pp2 = memory_breakdown(cfg, Layout(pp=2, global_batch=8), 64, H100)["weights_grads_optimizer"]
    first_stage = st.layer_params * 2 + max(st.embed_params, st.head_params)
    assert pp2 == pytest.approx(16 * first_stage)


def test_gradient_accumulation_counts_both_fsdp_modes():
    """Reduce-scatter after every micro-step (sharded gradients): m times the gradient traffic of reducing once, whose
    gradients accumulate unsharded (4 bytes per parameter more, less the shard). A pipeline always reduces once."""
    cfg = build_config({"model": TINY}).model
    P = model_stats(cfg, 64).params
    every = Layout(dp=4, micro_batch=1, global_batch=16)  # 4 micro-steps
    once = dataclasses.replace(every, fsdp_reduce_every_micro_step=False)
    assert every.label() != once.label() and "reduce-once" in once.label()
    mem = {layout: memory_breakdown(cfg, layout, 64, H100)["weights_grads_optimizer"] for layout in (every, once)}
    assert mem[every] == pytest.approx(16 * P / 4)
    assert mem[once] == pytest.approx(12 * P / 4 + 4 * P)
    piped = Layout(dp=2, pp=2, micro_batch=1, global_batch=16)
    first_stage = rank_params(model_stats(cfg, 64), cfg, piped)
    assert memory_breakdown(cfg, piped, 64, H100)["weights_grads_optimizer"] == pytest.approx(12 * first_stage / 2
                                                                                              + 4 * first_stage)
    units, g, a, b = 4 + 1, 4, H100.intra_alpha, H100.intra_beta
    gathers = 2 * 4 * units * (g - 1) * a + (g - 1) / g * 2 * 4 * P * 2 / b  # 2 per micro-step, bf16
    for layout, reduces in ((every, 4), (once, 1)):
        reduce_scatter = reduces * units * (g - 1) * a + (g - 1) / g * reduces * P * 4 / b  # fp32
        assert predict(cfg, layout, 64, H100).breakdown_s["dp_comm"] == pytest.approx(gathers + reduce_scatter)


def test_hsdp_shards_inside_a_node_and_all_reduces_across_nodes():
    cfg = build_config({"model": TINY}).model
    st = model_stats(cfg, 64)
    P = st.params
    hsdp = Layout(dp=16, dp_replicate=2, micro_batch=1, global_batch=64)  # 8-way shards on each of 2 nodes, m = 4
    assert hsdp.dp_shard == 8 and hsdp.label().startswith("dp16=r2s8") and "hsdp" in hsdp.label()
    assert memory_breakdown(cfg, hsdp, 64, H100)["weights_grads_optimizer"] == pytest.approx(16 * P / 8)
    units, m = 4 + 1, 4
    shard = 2 * m * units * 7 * H100.intra_alpha + 7 / 8 * 2 * m * P * 2 / H100.intra_beta \
        + m * units * 7 * H100.intra_alpha + 7 / 8 * m * P * 4 / H100.intra_beta
    replicas = units * 2 * H100.inter_alpha + 2 * 1 / 2 * P * 4 / 8 / H100.inter_beta
    assert predict(cfg, hsdp, 64, H100).breakdown_s["dp_comm"] == pytest.approx(shard + replicas)
    layouts = candidate_layouts(cfg, 64, 16, H100, 64)
    assert {(c.dp_replicate, c.fsdp_reduce_every_micro_step) for c in layouts if c.tp == 1 and c.pp == 1
            and c.data_parallel == "fsdp"} == {(1, True), (1, False), (2, True), (2, False)}
    run = build_config({"model": TINY, "parallel": {"dp_replicate": 2, "fsdp_reduce_every_micro_step": False}})
    from_run = Layout.from_config(run, 4)
    assert (from_run.dp, from_run.dp_replicate, from_run.dp_shard, from_run.fsdp_reduce_every_micro_step) == \
        (4, 2, 2, False)


def test_suggestions_fit_use_every_gpu_and_are_sorted():
    cfg = build_config({"model": TINY}).model
    preds = suggest(cfg, 64, 8, dataclasses.replace(H100, memory_bytes=5.2e9), 32)
    assert preds
    assert all(p.fits_in_memory and p.layout.gpus == 8 and p.kind == "prediction" for p in preds)
    rates = [p.tokens_per_s for p in preds]
    assert rates == sorted(rates, reverse=True)
    assert {p.layout.tp for p in preds} >= {1, 2, 4} and all(4 % p.layout.tp == 0 for p in preds)


def test_a_7b_like_transformer_on_1024_gpus():
    cfg = build_config({"model": {"d_model": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 32000,
                                  "seq_len": 4096, "mlp_multiple_of": 256}}).model
    preds = suggest(cfg, 4096, 1024, H100, 1024)
    assert preds and preds[0].layout.tp <= 8 and preds[0].layout.gpus == 1024
    assert 0.1 < preds[0].mfu < H100.efficiency  # communication and bubble only take away from peak × efficiency
    # the whole model replicated with AdamW states (16 bytes × 6.7B) cannot fit on one 80 GB device
    replicated = Layout(dp=1024, data_parallel="ddp", micro_batch=1, global_batch=1024)
    assert not predict(cfg, replicated, 4096, H100).fits_in_memory


def test_cli_prints_predictions(capsys, tmp_path):
    main(["--cluster", str(REPO / "configs/clusters/h100-nvlink-ib.toml"), "--gpus", "16", "--seq-len", "64",
          "--global-batch", "32", "--top", "3", *[f"--model.{k}={v}" for k, v in TINY.items()]])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("PREDICTIONS") and "dp" in out
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in (sweep_row(1, 500.0), sweep_row(2, 800.0, parallel={"tp": 2}))))
    main(["--cluster", str(REPO / "configs/clusters/cpu-gloo.toml"), "--gpus", "2", "--json", "--results",
          str(results), "--global-batch", "8", *[f"--model.{k}={v}" for k, v in TINY.items()]])
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "prediction" and report["suggestions"][0]["compute_source"] == "measured single-device"
    assert [round(v["ratio"], 6) for v in report["validation"]][0] == 1.0
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "PREDICT" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ context parallelism

def test_context_parallel_activations_per_rank_are_one_cp_th():
    """Each cp rank holds seq_len / cp steps: activations and logits shrink by cp (full recomputation keeps no ring
    extras, so exactly); parameters are replicated over cp but FSDP shards them over dp × cp."""
    cfg = build_config({"model": {**TINY, "arch": "gla"}}).model
    one = memory_breakdown(cfg, Layout(dp=1, recompute="full", global_batch=1), 4096, H100)
    four = memory_breakdown(cfg, Layout(dp=1, cp=4, recompute="full", global_batch=1), 4096, H100)
    assert four["activations"] == pytest.approx(one["activations"] / 4)
    assert four["logits"] == pytest.approx(one["logits"] / 4)
    assert four["weights_grads_optimizer"] == pytest.approx(one["weights_grads_optimizer"] / 4)  # FSDP over cp
    for arch in ("transformer", "fox", "gla", "rwkv7"):
        cfg = build_config({"model": {**TINY, "arch": arch}}).model
        none = [memory_breakdown(cfg, Layout(cp=cp, global_batch=1), 4096, H100)["activations"] for cp in (1, 2)]
        assert 0.45 < none[1] / none[0] < 0.75, (arch, none)  # 1/2, plus the ring's fp32 copies / V+K columns


def test_context_parallel_volumes_are_the_hand_count():
    """Per block and micro-batch at cp = N: ring attention moves k and v (fp32) N−1 hops in forward and again in
    backward, plus the dK|dV accumulator N hops; state passing gathers (S_loc, M) once and reduces it in backward."""
    N, s, b, H, d = 4, 64, 2, 4, 64
    D, T = d // H, s // N
    cfg = build_config({"model": {**TINY, "arch": "transformer"}}).model
    vol = cp_layer_volume(cfg, s=s, b=b, cp=N, dtype_bytes=2)
    kv = 2 * b * T * H * D * 4
    assert vol["ring"]["send"] == (2 * 2 * (N - 1) + N, 2 * (N - 1) * kv + N * kv)
    assert vol["ring"]["recv"] == vol["ring"]["send"] and vol["other"] == {}
    rwkv = build_config({"model": {**TINY, "arch": "rwkv7"}}).model
    vol = cp_layer_volume(rwkv, s=s, b=b, cp=N, dtype_bytes=2, reduce_scatter=False)["other"]
    state = N * 2 * b * H * (D * D + D * D) * 4  # gathered (S_loc, M) of both chunks of every rank
    halo = N * 2 * b * d * 2  # the two chunk ends of every rank, for each of the two token shifts
    assert vol == {"all_gather": (3, state + 2 * halo), "all_reduce": (3, state + 2 * halo)}
    gla = build_config({"model": {**TINY, "arch": "gla"}}).model
    K = d // 2 // H
    assert cp_layer_volume(gla, s=s, b=b, cp=N, dtype_bytes=2)["other"]["all_gather"] == \
        (1, N * 2 * b * H * (K * D + K) * 4)  # GLA's transition is diagonal: only K numbers
    assert cp_volume(gla, s=s, b=b, cp=1, micro_batches=2, dtype_bytes=2) == {}


def test_ring_hides_behind_compute_until_the_link_is_slow():
    """Ring hops are exposed only when a hop's transfer outlasts its block's compute; state passing's collectives
    are latency on the critical path."""
    cfg = build_config({"model": {"d_model": 1024, "n_layers": 2, "n_heads": 8, "vocab_size": 256,
                                  "seq_len": 32768}}).model
    layout = Layout(cp=4, global_batch=1)
    achieved = H100.peak_flops * H100.efficiency
    fast = cp_time(cfg, layout, 32768, H100, achieved=achieved)
    slow_link = dataclasses.replace(H100, intra_beta=H100.intra_beta / 1000)
    slow = cp_time(cfg, layout, 32768, slow_link, achieved=achieved)
    D, T_loc = 1024 // 8, 32768 // 4
    acc_hop = T_loc * 8 * 2 * D * 4 / H100.intra_beta + H100.intra_alpha  # the accumulator's last hop home
    loss = 2 * 3 * H100.intra_alpha  # one all-reduce of 2 numbers over 4 ranks
    assert fast == pytest.approx(2 * acc_hop + loss)  # every other hop hidden behind its block's attention
    assert slow > 10 * fast
    # GLA at infinite bandwidth: per block the all-gather and its backward reduce-scatter ((N−1)·α each), the
    # chain's 2N kernels; and the loss
    gla = dataclasses.replace(cfg, arch="gla")
    latency_only = dataclasses.replace(H100, intra_beta=float("inf"))
    t = cp_time(gla, layout, 32768, latency_only, achieved=float("inf"))
    alpha = H100.intra_alpha
    assert t == pytest.approx(2 * (2 * 3 * alpha + 2 * 4 * KERNEL_LATENCY_S) + 2 * 3 * alpha)


def test_cp_is_suggested_for_long_sequences_that_do_not_fit_otherwise():
    cfg = build_config({"model": {"d_model": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 32000,
                                  "seq_len": 4096, "mlp_multiple_of": 256}}).model
    short = suggest(cfg, 4096, 8, H100, 8)
    assert short[0].layout.cp == 1 and any(p.layout.cp > 1 for p in short)  # at 4K dp and tp communicate less
    long = suggest(cfg, 1 << 20, 64, H100, 4)  # 1M tokens per sequence, 4 sequences per step
    assert long and all(p.layout.cp > 1 for p in long)  # no layout without cp fits in 80 GB
    assert long[0].breakdown_s["cp_comm"] > 0 and long[0].layout.gpus == 64


def test_studies_accept_parallel_cp(tmp_path):
    """A study's grid may vary parallel.cp: points are valid where the sequence splits into 2·cp chunks, and the
    performance model lays them out with cp (world = dp × tp × pp × cp)."""
    from launch import sweep

    study_file = tmp_path / "cp.toml"
    study_file.write_text('[study]\nname = "cp"\n[base]\nmodel = { d_model = 32, n_layers = 2, n_heads = 2, '
                          'vocab_size = 128, seq_len = 30 }\ntrain = { global_batch = 4, micro_batch = 2 }\n'
                          '[grid]\ngpus = [2]\n"parallel.cp" = [1, 2]\n"model.seq_len" = [30, 64]\n')
    study = sweep.load_study(study_file)
    points = sweep.expand(study)
    reasons = {p.label: sweep.why_invalid(study, p) for p in points}
    assert reasons["gpus=2 cp=1 seq_len=30"] is None and reasons["gpus=2 cp=2 seq_len=64"] is None
    assert "divisible by 2 × parallel.cp" in reasons["gpus=2 cp=2 seq_len=30"]
    layout = Layout.from_config(sweep.point_config(study, points[-1]), 2)
    assert (layout.cp, layout.dp, layout.gpus) == (2, 1, 2) and "cp2" in layout.label()
    pred = predict(build_config({"model": {**TINY, "seq_len": 64}}).model, layout, 64, CPU)
    assert pred.breakdown_s["cp_comm"] > 0 and pred.breakdown_s["dp_comm"] > 0  # FSDP over cp
    from launch.report import layout as report_layout

    row = {"world_size": 2, "config": sweep.point_config(study, points[-1]).to_dict()}
    assert report_layout(row) == "dp1·tp1·pp1·cp2"  # the study report names the cp points as such


def test_tensor_and_pipeline_volumes_carry_a_cp_ranks_own_steps():
    cfg = build_config({"model": {**TINY, "seq_len": 4096}}).model
    no_latency = dataclasses.replace(H100, intra_alpha=0.0, inter_alpha=0.0)
    one, two = (predict(cfg, Layout(tp=2, pp=2, cp=cp, global_batch=4), 4096, no_latency) for cp in (1, 2))
    assert two.breakdown_s["tp_comm"] == pytest.approx(one.breakdown_s["tp_comm"] / 2)
    assert two.breakdown_s["pp_comm"] == pytest.approx(one.breakdown_s["pp_comm"] / 2)


def test_a_hybrids_pipeline_carry_starts_at_its_first_rwkv7_layer():
    """As parallel/pipeline.py's stage_carries: RWKV-7's carry crosses only the boundaries after the first RWKV-7
    layer (4 stages of one layer, rank 0 holding stages 0 and 2, rank 1 stages 1 and 3)."""
    from launch.perfmodel import boundaries, carry_boundaries

    def model(arch, mixers=""):
        return build_config({"model": {**TINY, "arch": arch, "mixers": mixers}}).model
    hybrid = model("hybrid", "gla,rwkv7")  # the carry starts at layer 1: boundaries 1→2 and 2→3 carry it
    assert [carry_boundaries(hybrid, r, 2, 2, "1,1,1,1") for r in (0, 1)] == [2, 2]
    assert [boundaries(r, 2, 2) for r in (0, 1)] == [3, 3]
    assert carry_boundaries(model("rwkv7"), 0, 2, 2) == 3 and carry_boundaries(model("gla"), 0, 2, 2) == 0
    no_latency = dataclasses.replace(H100, intra_alpha=0.0, inter_alpha=0.0)
    layout = Layout(pp=2, pp_schedule="interleaved_1f1b", virtual_stages=2, global_batch=4)
    pp_comm = {name: predict(cfg, layout, 64, no_latency).breakdown_s["pp_comm"]
               for name, cfg in (("gla", model("gla")), ("hybrid", model("hybrid", "rwkv7,gla")),
                                 ("late", model("hybrid", "gla*3,rwkv7")), ("rwkv7", model("rwkv7")))}
    assert pp_comm["hybrid"] == pytest.approx(pp_comm["rwkv7"]) and pp_comm["late"] == pytest.approx(pp_comm["gla"])
    assert pp_comm["rwkv7"] > pp_comm["gla"]


def test_a_ddp_layout_over_cp_is_named_ddp():
    assert Layout(cp=2, data_parallel="ddp").label().split()[-3] == "ddp"
    assert "fsdp" in Layout(cp=2).label() and "ddp" not in Layout(dp=1).label()
