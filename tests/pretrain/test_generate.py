"""Generation: the inference cache continues a sequence exactly as the full-sequence forward computes it, and
`python -m pretrain.generate` decodes with it (greedy = recomputing the whole prefix each token; seeded sampling)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.prepare import prepare
from data.tokenizer import ByteTokenizer
from pretrain.config import build_config
from pretrain.checkpoint import find_checkpoint
from pretrain.generate import (generate, load_model, load_run_tokenizer, main, next_token, parse_args,
                               time_inference)
from pretrain.models import build_model
from pretrain.models.common import InferenceCache
from pretrain.train import train

TINY = dict(d_model=32, n_layers=3, n_heads=2, vocab_size=61, seq_len=64, mlp_multiple_of=8)
ARCHS = {
    "transformer": dict(arch="transformer"),
    "transformer_pro": dict(arch="transformer", pro=True),
    "gpt": dict(preset="gpt"),
    "fox": dict(arch="fox"),
    "fox_pro": dict(arch="fox", pro=True),
    "gla": dict(arch="gla"),
    "rwkv7": dict(arch="rwkv7"),
    "hybrid": dict(arch="hybrid", mixers="gla,transformer,rwkv7"),
    "hybrid_fox_first": dict(arch="hybrid", mixers="fox,rwkv7,gla"),
}


def perturbed_model(overrides: dict) -> torch.nn.Module:
    """A tiny fp64 model in eval mode with every parameter moved off its initial value (zero-initialised output
    projections, unit norm scales and LoRA biases would otherwise hide terms the cache must carry)."""
    cfg = build_config({}, {"model": {**TINY, **overrides}}).model
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


@pytest.mark.parametrize("pieces, capacity", [([5] + [1] * 19, None), ([7, 1, 3, 9], None), ([4] + [1] * 16, 24),
                                             ([1] * 10, None)],
                         ids=["prefill_then_tokens", "uneven", "preallocated", "tokens_from_the_start"])
@pytest.mark.parametrize("name", ARCHS)
@torch.no_grad()
def test_cache_continues_the_full_forward(name, pieces, capacity):
    model = perturbed_model(ARCHS[name])
    tokens = torch.randint(0, TINY["vocab_size"], (2, sum(pieces)), generator=torch.Generator().manual_seed(2))
    full = model(tokens)  # (B, T, V)
    cache, outputs, start = InferenceCache(capacity), [], 0
    for n in pieces:
        outputs.append(model(tokens[:, start:start + n], cache=cache))
        start += n
    assert cache.steps == tokens.shape[1]
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=0, atol=1e-9)


@torch.no_grad()
def test_a_cache_that_drops_a_term_is_caught():
    """The check above can fail: forgetting the token shift's last step (RWKV-7) changes the continued logits."""
    model = perturbed_model(ARCHS["rwkv7"])
    tokens = torch.randint(0, TINY["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(3))
    full = model(tokens)
    cache = InferenceCache()
    model(tokens[:, :4], cache=cache)
    for layer in cache.layers.values():
        del layer.tensors["time_shift"]
    assert (model(tokens[:, 4:], cache=cache) - full[:, 4:]).abs().max() > 1e-3


def test_a_preallocated_cache_refuses_steps_past_its_capacity():
    model = perturbed_model(ARCHS["transformer"])
    cache = InferenceCache(capacity=6)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="capacity"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_time_inference_reports_prefill_decode_and_the_cache():
    model = perturbed_model(ARCHS["rwkv7"]).float()
    result = time_inference(model, prompt_tokens=12, decode_tokens=4, batch=2, warmup=0, repeats=2)
    assert result["prefill_tokens_per_s"] == pytest.approx(2 * 12 / result["prefill_s"])
    assert result["decode_tokens_per_s"] == pytest.approx(2 * 4 / result["decode_s"])
    # per layer: the state (B, H, D, D) and two token shifts (B, 1, d), fp32
    assert result["cache_bytes"] == TINY["n_layers"] * (2 * 2 * 16 * 16 + 2 * 2 * 32) * 4


def test_cache_rejects_document_masking_and_learned_positions_past_the_table():
    model = perturbed_model(ARCHS["gpt"])
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="position_ids"):
        model(tokens, position_ids=torch.arange(4)[None], cache=InferenceCache())
    cache = InferenceCache()
    model(torch.zeros(1, TINY["seq_len"] - 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="learned position table"):
        model(tokens, cache=cache)


# ------------------------------------------------------------------ python -m pretrain.generate on a trained run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("stdlib")
    prepare(["stdlib"], out, max_bytes=200_000, quiet=True)
    return str(out)


@pytest.fixture(scope="module", params=["transformer", "rwkv7"])
def trained_run(request, corpus, tmp_path_factory) -> Path:
    """A run directory after 30 training steps of a tiny model on real text, with its final checkpoint."""
    run_dir = tmp_path_factory.mktemp(f"run-{request.param}")
    arch = {"transformer": {"arch": "transformer", "pro": True}, "rwkv7": {"arch": "rwkv7"}}[request.param]
    train(build_config({}, {
        "model": {**arch, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 64},
        "data": {"path": corpus},
        "optim": {"lr": 1e-2, "warmup_steps": 5},
        "train": {"steps": 30, "global_batch": 4, "micro_batch": 4, "run_dir": str(run_dir), "eval_interval": 0},
        "checkpoint": {"interval": 0},
        "log": {"interval": 5, "progress": False, "tensorboard": False},
    }))
    return run_dir


def recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the slow way: the whole prefix through the model (no cache) for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_the_cache_equals_recomputing_the_prefix(trained_run):
    assert find_checkpoint(trained_run).name == "step_00000030"
    model, run_config = load_model(trained_run, dtype=torch.float64)
    tokenizer = load_run_tokenizer(run_config)
    prompt = [tokenizer.eos_id] + tokenizer.encode("def main(")
    cached = generate(model, prompt, max_new_tokens=30)  # no eos_id: all 30 tokens
    assert cached == recompute_greedy(model, prompt, 30)


def test_sampling_is_reproducible_per_seed_and_top_k_1_is_greedy(trained_run):
    model, _ = load_model(trained_run)
    prompt = [256] + list(b"import ")

    def sample(seed, **kw):
        return generate(model, prompt, max_new_tokens=20, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(3, top_k=1) == generate(model, prompt, max_new_tokens=20)
    assert sample(4, top_p=1e-6) == generate(model, prompt, max_new_tokens=20)  # the nucleus is the top token


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen_k = {int(next_token(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(s)))
              for s in range(200)}
    seen_p = {int(next_token(logits, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(s)))
              for s in range(200)}
    assert seen_k == {0, 1}
    assert seen_p == {0, 1, 2}  # 0.5 + 0.3 < 0.9, so the third token is still needed


def test_cli_generates_and_explains_its_options(trained_run):
    env_run = [sys.executable, "-m", "pretrain.generate"]
    out = subprocess.run([*env_run, str(trained_run), "--prompt", "def ", "--max-new-tokens", "12"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    model, _ = load_model(trained_run)
    expected = generate(model, [256] + list(b"def "), max_new_tokens=12, eos_id=256)
    assert out.stdout == ByteTokenizer().decode(expected) + "\n"


def test_cli_explains_its_options_and_rejects_bad_ones(tmp_path, capsys):
    helped = subprocess.run([sys.executable, "-m", "pretrain.generate", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    for option in ("--prompt", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--device",
                   "--dtype", "--tokenizer"):
        assert option in helped.stdout
    with pytest.raises(SystemExit):
        parse_args([str(tmp_path), "--prompt", "x", "--top-p", "0"])
    missing = subprocess.run([sys.executable, "-m", "pretrain.generate", str(tmp_path), "--prompt", "x"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert missing.returncode == 1 and "nor a run directory with checkpoints" in missing.stderr
    with pytest.raises(SystemExit):
        main(["--time", "--help"])
    time_help = capsys.readouterr().out
    for option in ("--decode-tokens", "--warmup", "--repeats", "--out"):
        assert option in time_help


@pytest.mark.parametrize("name", ["transformer", "gpt", "gla", "rwkv7", "hybrid"])
@torch.no_grad()
def test_last_only_equals_the_full_forwards_last_row(name):
    model = perturbed_model(ARCHS[name])
    tokens = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    full = model(tokens)  # (B, T, V)
    last = model(tokens, last_only=True)  # (B, 1, V)
    assert last.shape == (2, 1, TINY["vocab_size"])
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-12)
    torch.testing.assert_close(model(tokens, cache=InferenceCache(), last_only=True), last, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="last_only"):
        model(tokens, tokens, last_only=True)


@torch.no_grad()
def test_prefill_runs_the_head_on_the_last_position_only():
    """decode and time_inference prefill a prompt of 7 tokens; the LM head sees one position per row each call."""
    from pretrain.generate import decode
    model = perturbed_model(ARCHS["gla"])
    positions = []
    model.lm_head.register_forward_hook(lambda module, args, out: positions.append(args[0].shape[1]))
    prompt = torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(4))
    assert len(list(decode(model, prompt, max_new_tokens=3))) == 3
    time_inference(model, prompt_tokens=7, decode_tokens=2, batch=2, warmup=0, repeats=1)
    assert positions == [1] * 6
