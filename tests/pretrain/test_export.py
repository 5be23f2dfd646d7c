"""pretrain.export against the libraries that load its files: HF transformers (Llama, GPT-2), fla (GLA, FoX, RWKV-7)
and BlinkDL's rwkv package (x070). Every parameter is perturbed randomly first, so parts that start at zero or one
are checked too; logits must agree within TOL relative to their scale (fp32, CPU). The measured differences are
printed (`pytest -s`).

fla's model classes run Triton kernels: on CPU they run under TRITON_INTERPRET=1 with the bridges of
tests/ops/fla_interpret.py, which must be in place before triton is imported, so those checks run in a fresh process
(`python -m tests.pretrain.test_export fla DIR`, this file's main).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import build_config, load_config
from pretrain.export import ExportError, format_for, import_model, import_run, load_checkpoint_model, write
from pretrain.models import build_model

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4  # max |ours − theirs| / max |ours|
VOCAB, T = 97, 24


def tiny(arch: str = "transformer", **model):
    tree = {"arch": arch, "d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": VOCAB, "seq_len": 32, **model}
    if "preset" in model:
        tree.pop("arch")
    return build_config({}, {"model": tree}).model


RWKV7 = dict(norm="layernorm", bias=True, mlp_ratio=4.0)


def perturbed_model(cfg, seed: int = 0):
    """The model of `cfg` with every parameter moved randomly (zero-initialised output projections included)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def tokens(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / ours.abs().max()).item()


def report(target: str, error: float) -> None:
    print(f"\n[export] {target}: max |logits difference| / max |logits| = {error:.2e}")
    assert error < TOL, f"{target}: logits differ by {error:.2e} relative to their scale"


def hf_logits(directory: Path, x: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits


def ours_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- logits against the references

@pytest.mark.parametrize("target, model", [
    pytest.param("llama", {}, id="llama"),
    pytest.param("llama", {"tie_embeddings": True, "rope_theta": 500000.0, "norm_eps": 1e-6}, id="llama-tied"),
    pytest.param("gpt2", {"preset": "gpt"}, id="gpt2"),
])
def test_hf_logits_equal_ours(tmp_path, target, model):
    cfg = tiny(**model)
    ours = perturbed_model(cfg)
    assert format_for(cfg, "hf") == target
    write(ours, cfg, target, tmp_path)
    report(f"HF {target} {model}", relative_error(ours_logits(ours, tokens()), hf_logits(tmp_path, tokens())))


def rwkv_package_logits(directory: Path, x: torch.Tensor) -> torch.Tensor:
    os.environ["RWKV_V7_ON"] = "1"  # read when rwkv.model is imported: its x070 model
    os.environ.setdefault("RWKV_JIT_ON", "0")
    from rwkv.model import RWKV

    model = RWKV(model=str(directory / "model"), strategy="cpu fp32")
    return torch.stack([model.forward(row.tolist(), None, full_output=True)[0] for row in x])


@pytest.mark.parametrize("heads", [2, 1], ids=["head32", "head64"])
def test_rwkv_package_logits_equal_ours(tmp_path, heads):
    """BlinkDL's format works at any head size (its GroupNorm eps is ours, 64e-5)."""
    cfg = tiny("rwkv7", n_heads=heads, **RWKV7)
    ours = perturbed_model(cfg)
    write(ours, cfg, format_for(cfg, "rwkv"), tmp_path)
    report(f"rwkv x070 head {64 // heads}", relative_error(ours_logits(ours, tokens()),
                                                          rwkv_package_logits(tmp_path, tokens())))


FLA_CASES = {
    "gla": ("gla", {}),
    "fox": ("fox", {}),
    "rwkv7": ("rwkv7", {"n_heads": 1, **RWKV7}),  # head size 64: fla's GroupNorm eps is 64 × 1e-5, ours
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FLA_CASES))
def test_fla_logits_equal_ours(tmp_path, case):
    arch, model = FLA_CASES[case]
    cfg = tiny(arch, **model)
    ours = perturbed_model(cfg)
    write(ours, cfg, format_for(cfg, "fla"), tmp_path)
    torch.save({"tokens": tokens(), "logits": ours_logits(ours, tokens())}, tmp_path / "expected.pt")
    # the interpreter is chosen when triton is first imported: set for the whole process, not only by the bridges
    done = subprocess.run([sys.executable, "-m", "tests.pretrain.test_export", "fla", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report(f"fla {case}", float(done.stdout.strip().splitlines()[-1]))


def fla_check(directory: Path) -> float:
    """In a fresh process: fla's model class (interpreted Triton kernels) on the exported files; the relative
    error of its logits against ours (saved beside them)."""
    from tests.ops.fla_interpret import flash_attn_stand_in  # TRITON_INTERPRET=1 and the bridges, before fla
    import fla  # noqa: F401  (registers fla's model types with transformers' Auto classes)

    expected = torch.load(directory / "expected.pt")
    with flash_attn_stand_in():  # for the softmax Attention layers of hybrids (fla's `attn` option)
        return relative_error(expected["logits"], hf_logits(directory, expected["tokens"]))


# --------------------------------------------------------------------------- import, round trip

@pytest.mark.parametrize("source, model", [
    pytest.param("hf", {}, id="llama"), pytest.param("hf", {"tie_embeddings": True}, id="llama-tied"),
    pytest.param("hf", {"preset": "gpt"}, id="gpt2"), pytest.param("fla", {"arch": "gla"}, id="fla-gla"),
    pytest.param("fla", {"arch": "fox"}, id="fla-fox"),
    pytest.param("fla", {"arch": "rwkv7", "n_heads": 1, **RWKV7}, id="fla-rwkv7"),
])
def test_theirs_to_ours_to_theirs_is_bitwise(tmp_path, source, model):
    from safetensors.torch import load_file

    cfg = tiny(**model)
    fmt = format_for(cfg, source)
    write(perturbed_model(cfg), cfg, fmt, tmp_path / "first")
    back = import_model(source, tmp_path / "first", cfg)
    write(back, cfg, fmt, tmp_path / "second")
    first, second = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("first", "second"))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert json.loads((tmp_path / "first" / "config.json").read_text()) == \
        json.loads((tmp_path / "second" / "config.json").read_text())


def test_import_checks_the_config(tmp_path):
    cfg = tiny()
    write(perturbed_model(cfg), cfg, "llama", tmp_path)
    with pytest.raises(ExportError, match="num_hidden_layers=2 there, 3 for this config"):
        import_model("hf", tmp_path, tiny(n_layers=3))
    with pytest.raises(ExportError, match="rope_theta=10000.0 there, 500000.0 for this config"):
        import_model("hf", tmp_path, tiny(rope_theta=500000.0))
    with pytest.raises(ExportError, match="model.arch"):
        import_model("fla", tmp_path, cfg)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="rope_type='llama3' there, 'default'"):
        import_model("hf", tmp_path, cfg)


def test_import_reads_gpt2_files_saved_from_gpt2model(tmp_path):
    """GPT-2 checkpoints as published: tensors without the `transformer.` prefix, causal-mask buffers beside the
    weights, n_inner null (4 · n_embd); they import to the same model."""
    from safetensors.torch import load_file, save_file

    cfg = tiny(preset="gpt", tie_embeddings=True)
    write(perturbed_model(cfg), cfg, "gpt2", tmp_path / "ours")
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    tensors = {k.removeprefix("transformer."): v for k, v in ours.items()}
    tensors.update({f"h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(cfg.n_layers)})
    (tmp_path / "published").mkdir()
    save_file(tensors, str(tmp_path / "published" / "model.safetensors"))
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    (tmp_path / "published" / "config.json").write_text(json.dumps({**config, "n_inner": None}))
    a, b = (import_model("hf", tmp_path / d, cfg).state_dict() for d in ("ours", "published"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_imported_checkpoint_starts_training_at_step_0(tmp_path):
    """`--from hf` writes a weights-only checkpoint: auto-resume (and an explicit path) load the weights, a fresh
    optimizer and step 0; a short run then trains from them."""
    from pretrain.checkpoint import Checkpointer
    from pretrain.optim import build_optimizer
    config = tmp_path / "run.toml"
    config.write_text('[model]\nd_model = 64\nn_layers = 2\nn_heads = 4\nvocab_size = 97\nseq_len = 32\n'
                      '[data]\npath = "synthetic"\n[optim]\nwarmup_steps = 1\n'
                      '[train]\nsteps = 2\nglobal_batch = 2\nmicro_batch = 2\n'
                      'eval_interval = 0\n[log]\ninterval = 1\nprogress = false\n[checkpoint]\ninterval = 0\n')
    source = perturbed_model(tiny())
    write(source, tiny(), "llama", tmp_path / "hf")
    run_dir = tmp_path / "run"
    assert import_run("hf", tmp_path / "hf", config, run_dir).name == "step_00000000"

    cfg = load_config(["--config", str(config), f"--train.run_dir={run_dir}"])
    for resume in ("auto", str(run_dir / "checkpoints" / "step_00000000")):
        cfg.checkpoint.resume = resume
        model = build_model(cfg.model)
        optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
        ckpt = Checkpointer(cfg.checkpoint, run_dir, run_config=cfg.to_dict())
        assert ckpt.load(model=model, optimizer=optimizer) is None  # nothing to resume but the weights
        ckpt.close()
        for (name, a), b in zip(model.state_dict().items(), source.state_dict().values()):
            assert torch.equal(a, b), name
        assert not optimizer.state

    out = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(config),
                          f"--train.run_dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "starting from the weights of" in out.stdout + out.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps[-1] == 2


# --------------------------------------------------------------------------- from training checkpoints

def _train(tree: dict) -> None:
    from pretrain.train import train

    train(build_config({}, tree))


def run_tree(run_dir: Path, parallel: dict, model: dict) -> dict:
    return {"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": VOCAB, "seq_len": 32, **model},
            "parallel": parallel, "data": {"path": "synthetic"},
            "optim": {"lr": 1e-2, "warmup_steps": 1},
            "train": {"steps": 3, "global_batch": 4, "micro_batch": 2, "run_dir": str(run_dir), "eval_interval": 0,
                      "seed": 5},
            "checkpoint": {"interval": 0, "save_at_end": True}, "log": {"progress": False}}


def loaded_logits(target: str, directory: Path, x: torch.Tensor) -> torch.Tensor:
    return rwkv_package_logits(directory, x) if target == "rwkv" else hf_logits(directory, x)


@pytest.mark.parametrize("model, parallel, target", [
    pytest.param({}, {"tp": 2, "pp": 2}, "hf", id="llama-tp2-pp2"),
    pytest.param({"tie_embeddings": True}, {"dp": 2}, "hf", id="llama-tied-dp2-fsdp"),
    pytest.param({"arch": "rwkv7", **RWKV7}, {"tp": 2, "pp": 2}, "rwkv", id="rwkv-tp2-pp2", marks=pytest.mark.slow),
])
def test_export_from_parallel_and_one_process_checkpoints(tmp_path, model, parallel, target):
    """A short real run under a parallel layout (gloo processes) and the same run on one process: each checkpoint
    exports (DCP reshards into one plain model), and the target's logits from either equal our model's from the
    one-process run."""
    from pretrain.export import export
    from tests.dist import run_distributed

    _train(run_tree(tmp_path / "one", {}, model))
    world = math.prod(parallel.values())
    run_distributed(_train, world, run_tree(tmp_path / "parallel", parallel, model))
    ours, cfg, _ = load_checkpoint_model(tmp_path / "one")
    reference = ours_logits(ours, tokens())
    for run in ("one", "parallel"):
        export(tmp_path / run, target, tmp_path / f"{run}-out")
        error = relative_error(reference, loaded_logits(target, tmp_path / f"{run}-out", tokens()))
        report(f"{target} from the {run} checkpoint ({parallel})", error)


# --------------------------------------------------------------------------- refusals, options

@pytest.mark.parametrize("arch, model, target, message", [
    ("transformer", {"pro": True}, "hf", "model.pro=True"),
    ("transformer", {"mlp": "gelu"}, "hf", "model.mlp='gelu'"),
    ("transformer", {"bias": True}, "hf", "model.bias=True"),
    ("transformer", {}, "fla", "model.arch='transformer'"),
    ("gla", {}, "hf", "model.arch='gla'"),
    ("gla", {"norm": "layernorm"}, "fla", "model.norm='layernorm'"),
    ("fox", {"pro": True}, "fla", "KV-shift"),
    ("rwkv7", RWKV7, "fla", "head_dim × norm_eps = 16 × 1e-05"),
    ("rwkv7", {"n_heads": 1, **RWKV7, "norm_eps": 1e-6}, "rwkv", "model.norm_eps=1e-06"),
    ("rwkv7", {"norm": "rmsnorm"}, "rwkv", "model.norm='rmsnorm'"),
    ("gla", {}, "rwkv", "model.arch='gla'"),
])
def test_unfaithful_configs_are_refused_naming_the_option(arch, model, target, message):
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(".", r"\.")):
        format_for(tiny(arch, **model), target)


NATURAL_TARGET = {"transformer": "hf", "gla": "fla", "rwkv7": "rwkv"}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.toml")))
def test_shipped_configs_build_their_reference_models(path):
    """Issue 14 item 4: a shipped config of an architecture builds its reference model, so it exports (RWKV-7:
    LayerNorm with bias and a 4·d channel mix, BlinkDL's). FoX configs are Pro models (fla's FoX has no Pro block);
    of the hybrids, GLA + transformer ones export to fla's GLA with 'attn' (the others: test_export_hybrid)."""
    from pretrain.config import layer_mixers
    from pretrain.models.common import mlp_hidden_size

    cfg = load_config(["--config", str(REPO / path)]).model
    if cfg.arch in NATURAL_TARGET:
        format_for(cfg, NATURAL_TARGET[cfg.arch])
    if cfg.arch == "hybrid" and set(layer_mixers(cfg)) == {"gla", "transformer"}:
        assert format_for(cfg, "fla") == "fla-gla"
    if cfg.arch == "rwkv7":
        assert mlp_hidden_size(cfg) == 4 * cfg.d_model


def test_cli(tmp_path):
    """--help names every option; export from a checkpoint in bf16; errors are one line, exit code 2."""
    helped = subprocess.run([sys.executable, "-m", "pretrain.export", "--help"], cwd=REPO, capture_output=True,
                            text=True)
    assert helped.returncode == 0
    assert all(option in helped.stdout for option in ("--to", "--from", "--config", "--out", "--dtype"))
    _train(run_tree(tmp_path / "run", {}, {}))
    done = subprocess.run([sys.executable, "-m", "pretrain.export", str(tmp_path / "run"), "--to", "hf", "--out",
                           str(tmp_path / "hf"), "--dtype", "bf16"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "hf" / "model.safetensors")).values()} == {torch.bfloat16}
    refused = subprocess.run([sys.executable, "-m", "pretrain.export", str(tmp_path / "run"), "--to", "fla", "--out",
                              str(tmp_path / "fla")], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "model.arch='transformer'" in refused.stderr
    config = tmp_path / "run.toml"
    config.write_text(f"[model]\nd_model = 64\nn_layers = 2\nn_heads = 4\nvocab_size = {VOCAB}\nseq_len = 32\n")
    imported = subprocess.run([sys.executable, "-m", "pretrain.export", "--from", "hf", str(tmp_path / "hf"),
                               "--config", str(config), "--out", str(tmp_path / "continued")],
                              cwd=REPO, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    assert (tmp_path / "continued" / "checkpoints" / "step_00000000" / "meta.json").is_file()


def test_tokenizer_json_goes_along(tmp_path):
    """A run that trained with a tokenizer.json exports it: AutoTokenizer loads it and encodes as data.prepare did;
    config.json names its EOS id."""
    from transformers import AutoTokenizer

    from data.tokenizer import load_tokenizer
    from tests.data.test_tokenizer import TEXT, train_tiny_bpe

    path = train_tiny_bpe(tmp_path / "tokenizer.json")
    cfg = tiny(vocab_size=320)
    write(perturbed_model(cfg), cfg, "llama", tmp_path / "hf", run_config={"data": {"tokenizer": path}})
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.encode(TEXT, add_special_tokens=False) == ours.encode(TEXT)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert theirs.eos_token_id == ours.eos_id == config["eos_token_id"]


def test_pro_qk_norm_eps_is_the_references():
    model = build_model(tiny("fox", pro=True, norm_eps=1e-6))
    mixer = model.layers["0"].mixer
    assert mixer.q_norm.eps == mixer.k_norm.eps == 1e-5 and mixer.o_norm.eps == 1e-6


if __name__ == "__main__":
    if sys.argv[1:2] == ["fla"]:
        print(fla_check(Path(sys.argv[2])))


# --------------------------------------------------------------------------- hybrids, loaders

@pytest.mark.parametrize("arch, target", [("gla", "fla"), ("transformer", "hf"), ("rwkv7", "rwkv")])
def test_a_hybrid_of_one_mixer_exports_as_the_pure_model(tmp_path, arch, target):
    """'NAME*2' builds the pure model bitwise (same parameters): its files are the pure model's, byte for byte."""
    extra = RWKV7 if arch == "rwkv7" else {}
    pure, hybrid = tiny(arch, **extra), tiny("hybrid", mixers=f"{arch}*2", **extra)
    assert format_for(hybrid, target) == format_for(pure, target)
    from pretrain.export import pure_config
    files = {}
    for name, cfg in (("pure", pure), ("hybrid", hybrid)):
        write(perturbed_model(cfg), pure_config(cfg), format_for(cfg, target), tmp_path / name)
        files[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}
    assert files["hybrid"] == files["pure"]


def test_a_hybrid_of_one_mixer_exports_from_its_checkpoint(tmp_path):
    from pretrain.export import export
    _train(run_tree(tmp_path / "run", {}, {"arch": "hybrid", "mixers": "transformer"}))
    export(tmp_path / "run", "hf", tmp_path / "hf")
    ours, cfg, _ = load_checkpoint_model(tmp_path / "run")
    assert cfg.arch == "hybrid"
    report("HF llama from a one-mixer hybrid", relative_error(ours_logits(ours, tokens()),
                                                               hf_logits(tmp_path / "hf", tokens())))


def test_checkpoint_loader_and_tokenizer_are_generates(tmp_path):
    """Export reads a checkpoint as pretrain.generate does (model.attn_impl 'fla' runs as 'auto' off CUDA, the stored
    config validated) and the run's tokenizer with the EOS token its data manifest names."""
    from pretrain.checkpoint import save_weights
    from pretrain.export import run_tokenizer
    from tests.data.test_tokenizer import train_tiny_bpe

    cfg = tiny("gla")
    run_config = build_config({}, {"model": {**cfg.__dict__, "attn_impl": "fla"}}).to_dict()
    save_weights(tmp_path / "run", perturbed_model(cfg), run_config=run_config)
    model, loaded, _ = load_checkpoint_model(tmp_path / "run")
    assert loaded.attn_impl == "auto"
    run_config["model"]["mixers"] = "gla*2"  # mixers without model.arch='hybrid': build_config refuses it
    save_weights(tmp_path / "bad", perturbed_model(cfg), run_config=run_config)
    with pytest.raises(ExportError, match="model.mixers='gla\\*2' is read only by model.arch='hybrid'"):
        load_checkpoint_model(tmp_path / "bad")

    path = train_tiny_bpe(tmp_path / "tokenizer.json", special_tokens=("<|endoftext|>", "<doc>"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"tokenizer": {"eos_token": "<doc>"}}))
    tokenizer = run_tokenizer({"data": {"tokenizer": path, "path": str(data)}})
    assert tokenizer.eos_token == "<doc>"
    cfg = tiny(vocab_size=320)
    write(perturbed_model(cfg), cfg, "llama", tmp_path / "hf", run_config={"data": {"tokenizer": path,
                                                                                     "path": str(data)}})
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == tokenizer.eos_id
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["eos_token"] == "<doc>"
