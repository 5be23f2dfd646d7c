"""`data.document_mask=true` end to end on the real corpus: the loader's position ids reach the model, resuming is
exact, and the metrics count attention within documents beside the full-square count."""

import json
import random
import sysconfig
from pathlib import Path

import pytest

from data.prepare import prepare
from pretrain.config import ConfigError
from tests.pretrain.test_train import run, tiny


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Short documents (5–60 bytes: lines of the standard library's sources), so most 64-token windows pack several."""
    lines = [line.strip() for line in Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text().splitlines()]
    docs = [line[:60] for line in lines if len(line) >= 5]
    random.Random(0).shuffle(docs)
    src = tmp_path_factory.mktemp("short-docs-src") / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path_factory.mktemp("short-docs")
    prepare([str(src)], str(out), val_fraction=0.0, quiet=True)
    return str(out)



def masked(corpus, run_dir, **sections):
    tree = tiny(corpus, run_dir, **sections)
    tree["data"]["document_mask"] = True
    return tree


@pytest.mark.parametrize("arch", ["transformer", "rwkv7"])
def test_exact_resume_with_document_mask(corpus, tmp_path, arch):
    model = {"arch": arch, "dropout": 0.1} if arch == "transformer" else {"arch": arch}
    straight = run(masked(corpus, tmp_path / "a", model=model, train={"steps": 8}))
    first = run(masked(corpus, tmp_path / "b", model=model, train={"steps": 8, "exit_after_steps": 4}))
    second = run(masked(corpus, tmp_path / "b", model=model, train={"steps": 8}))
    assert first + second == straight  # bitwise
    unmasked = run(tiny(corpus, tmp_path / "c", model=model, train={"steps": 8}))
    assert unmasked != straight  # the stdlib corpus packs many short files per window: the mask matters


def test_metrics_count_attention_within_documents(corpus, tmp_path):
    run(masked(corpus, tmp_path, train={"steps": 2}, optim={"warmup_steps": 1}))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    # documents of 5–60 tokens (plus an end-of-document id): Σ len² / T lies between 6 and 61, far below seq_len
    assert 6 <= row["attention_span"] <= 61
    assert 0 < row["tflops_per_gpu_documents"] < row["tflops_per_gpu"]


def test_document_mask_needs_documents(tmp_path):
    with pytest.raises(ConfigError, match="document_mask"):
        run({"data": {"path": "synthetic", "document_mask": True},
             "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 16},
             "optim": {"warmup_steps": 0},
             "train": {"steps": 1, "global_batch": 2, "micro_batch": 2, "run_dir": str(tmp_path)}})
