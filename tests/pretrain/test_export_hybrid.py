"""Export of hybrids of several mixers to fla, against fla itself.

fla configures a hybrid as a GLA (or RWKV-7) config whose `attn` option puts its softmax `Attention` at the listed
layers. GLA + transformer hybrids export to that: every parameter perturbed, fla's GLAForCausalLM from the exported
directory gives our logits (fp32, CPU). fla's Attention calls flash-attn, which has no CPU build: torch SDPA stands
in (tests/ops/fla_interpret.py, checked against softmax attention written out in fp64 in the same process first).
fla's GLA kernels run under Triton's interpreter, so that part runs in one fresh process (this file's main) for all
the cases at once (slow); it also saves each model with fla's save_pretrained, which must import to the same
model, and checks the first reason RWKV-7 + attention hybrids are refused: fla's RWKV7ForCausalLM with `attn`
fails in its forward. The round trip, the import checks and every refusal run in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.export import ExportError, format_for, import_model, write
from tests.pretrain.test_export import (RWKV7, REPO, TOL, fla_check, ours_logits, perturbed_model, tiny, tokens)

# pattern, extra model options: attention last and first, another rotary base, a tied embedding
GLA_HYBRIDS = {
    "gla*3,transformer": {"n_layers": 4},
    "transformer,gla": {"n_layers": 2, "rope_theta": 500000.0, "tie_embeddings": True},
}


def hybrid(mixers: str, **model):
    return tiny("hybrid", mixers=mixers, **{"n_layers": 4, **model})


@pytest.mark.slow  # one fresh process: fla's import and interpreted kernels, ~20 s of CPU
def test_gla_hybrids_give_fla_our_logits(tmp_path):
    directories = []
    for i, (mixers, model) in enumerate(GLA_HYBRIDS.items()):
        cfg = hybrid(mixers, **model)
        ours = perturbed_model(cfg, seed=i)
        out = tmp_path / f"case{i}"
        write(ours, cfg, format_for(cfg, "fla"), out)
        torch.save({"tokens": tokens(), "logits": ours_logits(ours, tokens())}, out / "expected.pt")
        directories.append(str(out))
    done = subprocess.run([sys.executable, "-m", "tests.pretrain.test_export_hybrid", *directories], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # fla's config parser keeps our 'attn' as written: every field it would fill in is there already
    assert result["attn_as_fla_reads_it"] == [json.loads((Path(d) / "config.json").read_text())["attn"]
                                              for d in directories]
    for mixers, error in zip(GLA_HYBRIDS, result["errors"]):
        print(f"\n[export] fla GLA hybrid {mixers!r}: max |logits difference| / max |logits| = {error:.2e}")
        assert error < TOL, f"{mixers}: logits differ by {error:.2e} relative to their scale"
    # fla → ours starting from files fla itself wrote (save_pretrained): the same model as from ours
    for (mixers, model), directory in zip(GLA_HYBRIDS.items(), directories):
        cfg = hybrid(mixers, **model)
        ours, theirs = (import_model("fla", d, cfg).state_dict() for d in (directory, directory + "-saved-by-fla"))
        assert all(torch.equal(ours[name], theirs[name]) for name in ours), mixers
    # the first reason RWKV7_HYBRID_REASONS gives: if fla fixes it, the refusal needs a new look
    assert result["rwkv7_attn_forward"] == "ValueError: not enough values to unpack (expected 4, got 3)", result
    assert result["rwkv7_attn_feed_forward"] == "RWKV7FeedForward", result


def fla_probe(directories: list[str]) -> dict:
    """In a fresh process (TRITON_INTERPRET=1): the SDPA stand-in against fp64 softmax attention, then fla's logits
    from each exported directory against ours, fla's own save of each (DIR-saved-by-fla), then fla's RWKV-7 model
    with an attention layer."""
    from tests.ops.fla_interpret import check_flash_attn, flash_attn_stand_in

    check_flash_attn()
    errors = [fla_check(Path(d)) for d in directories]
    from fla.models import GLAConfig, GLAForCausalLM, RWKV7Config, RWKV7ForCausalLM

    with flash_attn_stand_in():
        for d in directories:
            GLAForCausalLM.from_pretrained(d).save_pretrained(d + "-saved-by-fla")

    config = RWKV7Config(hidden_size=64, num_hidden_layers=2, head_dim=64, vocab_size=97, attn={"layers": [0],
                                                                                                "num_heads": 1})
    with flash_attn_stand_in():
        model = RWKV7ForCausalLM(config).eval()
        try:
            with torch.no_grad():
                model(tokens())
            outcome = "ran"
        except ValueError as error:
            outcome = f"ValueError: {error}"
    return {"errors": errors, "attn_as_fla_reads_it": [GLAConfig.from_pretrained(d).attn for d in directories],
            "rwkv7_attn_forward": outcome,
            "rwkv7_attn_feed_forward": type(model.model.layers[0].ffn).__name__}


# --------------------------------------------------------------------------- round trip, import checks

@pytest.mark.parametrize("mixers", list(GLA_HYBRIDS))
def test_fla_to_ours_to_fla_is_bitwise(tmp_path, mixers):
    from safetensors.torch import load_file

    cfg = hybrid(mixers, **GLA_HYBRIDS[mixers])
    write(perturbed_model(cfg), cfg, "fla-gla", tmp_path / "first")
    back = import_model("fla", tmp_path / "first", cfg)
    write(back, cfg, "fla-gla", tmp_path / "second")
    first, second = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("first", "second"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("first", "second")]
    assert configs[0] == configs[1]
    layers = [i for i, name in enumerate(back.mixers) if name == "transformer"]
    assert configs[0]["attn"]["layers"] == layers and any(k.startswith(f"model.layers.{layers[0]}.attn.q_proj")
                                                          for k in first)


def test_import_checks_the_attention_layers(tmp_path):
    cfg = hybrid("gla*3,transformer")
    write(perturbed_model(cfg), cfg, "fla-gla", tmp_path)
    with pytest.raises(ExportError, match=r"softmax attention \('attn' layers\) at layers \[3\], "
                                          r"model.mixers='transformer,gla\*3' at \[0\]"):
        import_model("fla", tmp_path, hybrid("transformer,gla*3"))
    with pytest.raises(ExportError, match=r"at layers \[3\], model.arch='gla' at \[\]"):
        import_model("fla", tmp_path, tiny("gla", n_layers=4))
    with pytest.raises(ExportError, match="rope_theta=10000.0 there, 500000.0 for this config"):
        import_model("fla", tmp_path, hybrid("gla*3,transformer", rope_theta=500000.0))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attn": [{**config["attn"], "window_size": 8}]}))
    with pytest.raises(ExportError, match="'attn' window_size=8 there, None for this config"):
        import_model("fla", tmp_path, cfg)
    pure = tiny("gla", n_layers=4)
    write(perturbed_model(pure), pure, "fla-gla", tmp_path / "pure")
    with pytest.raises(ExportError, match=r"at layers \[\], model.mixers='gla\*3,transformer' at \[3\]"):
        import_model("fla", tmp_path / "pure", cfg)
    # an 'attn' entry with no layers (its settings then apply to none) imports into a pure GLA config as before
    expected = import_model("fla", tmp_path / "pure", pure).state_dict()
    pure_config = json.loads((tmp_path / "pure" / "config.json").read_text())
    no_attention = {**pure_config, "attn": {**config["attn"], "layers": []}}
    (tmp_path / "pure" / "config.json").write_text(json.dumps(no_attention))
    imported = import_model("fla", tmp_path / "pure", pure).state_dict()
    assert imported.keys() == expected.keys() and all(torch.equal(imported[k], expected[k]) for k in expected)


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("mixers, model, target, message", [
    ("gla*3,transformer", {}, "hf", "Llama and GPT-2 have softmax attention in every layer"),
    ("gla*3,transformer", {}, "rwkv", "runs RWKV-7 blocks only"),
    ("rwkv7*3,transformer", RWKV7, "rwkv", "runs RWKV-7 blocks only"),
    ("gla*3,fox", {}, "fla", "fla has no hybrid with FoX layers"),
    ("fox*3,transformer", {}, "fla", "its FoX model \\(ForgettingTransformerConfig\\) takes no other mixer"),
    ("gla,rwkv7", {"norm": "layernorm", "bias": True}, "fla", "no config with both GLA and RWKV-7 layers"),
    ("rwkv7*3,transformer", {"n_heads": 1, **RWKV7}, "fla", "not enough values to unpack"),
    ("transformer,rwkv7*3", {"n_heads": 1, **RWKV7}, "fla", "attention at layer 0 differs twice"),
    ("gla*3,transformer", {"pos": "none"}, "fla", "model.pos='none' \\(it needs 'rope': it rotates q and k"),
    ("gla*3,transformer", {"pos": "learned"}, "fla", "model.pos='learned'"),
    ("gla*3,transformer", {"pro": True}, "fla", "model.pro=True .*no KV-shift, output gate or output norm"),
    ("gla*3,transformer", {"mlp": "gelu"}, "fla", "model.mlp='gelu'"),
    ("gla*3,transformer", {"norm": "layernorm"}, "fla", "model.norm='layernorm'"),
    ("gla*3,transformer", {"bias": True}, "fla", "model.bias=True"),
])
def test_unfaithful_hybrids_are_refused_with_the_reason(mixers, model, target, message):
    with pytest.raises(ExportError, match=message):
        format_for(hybrid(mixers, **model), target)


def test_rwkv7_hybrid_import_is_refused(tmp_path):
    with pytest.raises(ExportError, match="RWKV-7 \\+ softmax attention hybrids do not export to fla"):
        import_model("fla", tmp_path, hybrid("rwkv7*3,transformer", n_heads=1, **RWKV7))


if __name__ == "__main__":
    print(json.dumps(fla_probe(sys.argv[1:])))
