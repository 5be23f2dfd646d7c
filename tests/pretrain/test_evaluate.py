"""`python -m pretrain.evaluate` on a real short run: perplexity is exp of the mean loss computed by hand, and a
local lm-eval multiple-choice task reports the accuracy that our model's log-likelihoods give by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from data.prepare import prepare
from data.stream import ValLoader
from pretrain.config import build_config
from pretrain.evaluate import OurLM, main
from pretrain.generate import generate, load_model, load_run_tokenizer
from pretrain.train import train

SEQ_LEN = 64
# Python-flavoured questions (the model trained on the standard library's sources); answers vary in position.
QUESTIONS = [
    ("import", [" os", " }", "(("], 0),
    ("def __init__(self", [" 9", ", x):", "}}"], 1),
    ("for i in", ["))", " !", " range(n):"], 2),
    ("return", [" self", " ]]", " ;;"], 0),
    ("class Foo", ["(object):", "++", " 0]"], 0),
    ("    if x is", [" None:", " ==", "(("], 0),
    ("from collections import", [" }", " deque", "}}"], 1),
    ("raise", ["))", " ;", " ValueError("], 2),
    ("self.", ["))", "name", " 7"], 1),
    ("while", [" True:", "((", " }"], 0),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("stdlib")
    prepare(["stdlib"], out, max_bytes=300_000, val_fraction=0.05, quiet=True)
    return str(out)


def train_tiny(corpus: str, run_dir: Path, *, model: dict | None = None, document_mask: bool = False) -> Path:
    """A run after 30 training steps of a tiny model (GLA unless `model` says otherwise) on real text, validated at
    the end, with its final checkpoint."""
    train(build_config({}, {
        "model": {**(model or {"arch": "gla"}), "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": SEQ_LEN},
        "data": {"path": corpus, "document_mask": document_mask},
        "optim": {"lr": 1e-2, "warmup_steps": 5},
        "train": {"steps": 30, "global_batch": 4, "micro_batch": 4, "run_dir": str(run_dir), "eval_interval": 30,
                  "eval_batches": 3},
        "checkpoint": {"interval": 0},
        "log": {"interval": 10, "progress": False, "tensorboard": True},
    }))
    return run_dir


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory) -> Path:
    return train_tiny(corpus, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def model(run_dir):
    return load_model(run_dir, dtype=torch.float64)[0]


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """A multiple-choice lm-eval task `tiny_python` over a local jsonl file (no network); the choices are the
    literal continuations (no delimiter)."""
    data = tmp_path / "tiny_python.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "tiny_python.yaml").write_text(f"""task: tiny_python
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
target_delimiter: ""
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return tmp_path


def log_likelihood_by_hand(model, context: bytes, continuation: bytes) -> float:
    """log p(continuation | end-of-document, context) from one full forward, byte tokens."""
    ids = [256, *context, *continuation]
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)  # (T, V)
    positions = range(len(ids) - 1 - len(continuation), len(ids) - 1)
    return sum(float(logprobs[t, ids[t + 1]]) for t in positions)


def test_perplexity_is_exp_of_the_mean_loss_by_hand(run_dir, corpus, model):
    out = run_dir / "eval" / "ppl.json"
    assert main([str(run_dir), "--batches", "3", "--dtype", "fp64", "--out", str(out)]) == 0
    report = json.loads(out.read_text())["perplexity"]
    loader = ValLoader(corpus, "val", seq_len=SEQ_LEN, micro_batch=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, labels in loader.batches(3):
            logits = model(inputs)  # (B, T, V)
            total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
            count += labels.numel()
    assert report["batches"] == 3 and report["tokens"] == count == 3 * 4 * SEQ_LEN
    # the model's loss takes its logits to fp32 (LanguageModel.loss), so agreement is to fp32 rounding
    assert report["loss"] == pytest.approx(total / count, rel=1e-6)
    assert report["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
    assert report["ppl"] == pytest.approx(math.exp(report["loss"]), rel=1e-12)
    assert 1 < report["ppl"] < 257  # trained: better than uniform over bytes

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/ppl")][-1] == (30, pytest.approx(report["ppl"]))


def test_perplexity_equals_the_trainers_validation_at_the_same_step(run_dir):
    """The trainer validated the final weights on the same 3 batches: evaluate reads them as it does."""
    val_loss = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    out = run_dir / "eval" / "same.json"
    assert main([str(run_dir), "--batches", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["perplexity"]["loss"] == pytest.approx(val_loss, rel=1e-6)


def test_perplexity_under_document_masking_reads_the_documents_as_the_trainer_does(corpus, tmp_path):
    """A run that trained with document masking is evaluated with it: the val loader's position ids (learned
    positions restart at each document, nothing crosses a document start) and the labels it skips."""
    run_dir = train_tiny(corpus, tmp_path / "masked", model={"preset": "gpt"}, document_mask=True)
    out = tmp_path / "masked.json"
    assert main([str(run_dir), "--batches", "2", "--dtype", "fp64", "--out", str(out)]) == 0
    report = json.loads(out.read_text())["perplexity"]
    model = load_model(run_dir, dtype=torch.float64)[0]
    masked, unmasked, count = 0.0, 0.0, 0
    with torch.no_grad():
        for inputs, labels, position_ids in ValLoader(corpus, "val", seq_len=SEQ_LEN, micro_batch=4,
                                                      return_doc_boundaries=True).batches(2):
            for kwargs, into in (({"position_ids": position_ids}, "masked"), ({}, "unmasked")):
                loss = float(F.cross_entropy(model(inputs, **kwargs).flatten(0, 1), labels.flatten(),
                                             reduction="sum", ignore_index=-100))
                masked, unmasked = (masked + loss, unmasked) if into == "masked" else (masked, unmasked + loss)
            count += int((labels != -100).sum())
    assert report["tokens"] == count
    assert report["loss"] == pytest.approx(masked / count, rel=1e-6)
    assert abs(unmasked - masked) / count > 1e-3, "the windows should continue documents (positions not 0 … T-1)"
    val_loss = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    assert main([str(run_dir), "--batches", "3", "--out", str(out)]) == 0  # the trainer's 3 batches, fp32
    assert json.loads(out.read_text())["perplexity"]["loss"] == pytest.approx(val_loss, rel=1e-6)


def test_local_task_accuracy_equals_the_models_log_likelihoods_by_hand(run_dir, model, task_dir):
    scores, right = {}, []
    for question, choices, answer in QUESTIONS:
        scores[question] = [log_likelihood_by_hand(model, question.encode(), c.encode()) for c in choices]
        right.append(max(range(len(choices)), key=scores[question].__getitem__) == answer)
    accuracy = sum(right) / len(right)
    assert 0 < accuracy < 1, "the task should separate a right from a wrong scorer"

    out = run_dir / "eval" / "task.json"
    assert main([str(run_dir), "--tasks", "tiny_python", "--include-path", str(task_dir), "--dtype", "fp64",
                 "--log-samples", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "perplexity" not in report  # tasks alone unless --data names a dataset
    assert report["tasks"]["results"]["tiny_python"]["acc,none"] == pytest.approx(accuracy, abs=0)
    samples = report["tasks"]["samples"]["tiny_python"]
    assert len(samples) == len(QUESTIONS)
    for sample in samples:  # every choice's log-likelihood as lm-eval received it
        reported = [float(r[0]) for r in sample["filtered_resps"]]
        assert reported == pytest.approx(scores[sample["doc"]["question"]], abs=1e-9)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert events.Scalars("eval/tiny_python/acc")[-1].value == pytest.approx(accuracy)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_the_lm_scores_and_generates_as_the_model_does(run_dir, model):
    lm = OurLM(model, load_run_tokenizer({"data": {"tokenizer": "byte"}}), batch_size=3)
    pairs = [(q, c) for q, choices, _ in QUESTIONS[:4] for c in choices]  # batched, padded, sorted
    scored = lm.loglikelihood([request("loglikelihood", *p) for p in pairs])
    for (context, continuation), (logprob, _) in zip(pairs, scored):
        assert logprob == pytest.approx(log_likelihood_by_hand(model, context.encode(), continuation.encode()),
                                        abs=1e-9)

    text = "import os\nimport sys\n\ndef main():\n    return sys.argv[1:]\n" * 3  # longer than one window
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(list(text.encode()), 256, SEQ_LEN, 1)]
    assert len(windows) > 2
    expected = sum(log_likelihood_by_hand(model, bytes(c for c in ctx if c != 256), bytes(cont))
                   if ctx[0] == 256 else window_by_hand(model, ctx, cont) for ctx, cont in windows)
    assert lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])[0] == pytest.approx(expected, abs=1e-8)

    [generated] = lm.generate_until([request("generate_until", "def ", {"until": ["\n"], "max_gen_toks": 20})])
    greedy = bytes(generate(model, [256, *b"def "], max_new_tokens=20, eos_id=256)).decode(errors="replace")
    assert generated == greedy.split("\n")[0]


def window_by_hand(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) for a rolling window that starts mid-text (no end-of-document before it)."""
    ids = context + continuation
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
    return sum(float(logprobs[t, ids[t + 1]]) for t in range(len(context) - 1, len(ids) - 1))


def test_log_softmax_in_fp64_covers_only_the_scored_positions(model, monkeypatch):
    """The fp64 log-softmax is taken over each request's continuation, never the whole (b, T, V) batch."""
    import pretrain.evaluate
    shapes, log_softmax = [], F.log_softmax

    def spy(x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return log_softmax(x, *args, **kwargs)

    monkeypatch.setattr(pretrain.evaluate.F, "log_softmax", spy)
    lm = OurLM(model, load_run_tokenizer({"data": {"tokenizer": "byte"}}), batch_size=4)
    pairs = [(q, c) for q, choices, _ in QUESTIONS[:2] for c in choices]
    lm.loglikelihood([request("loglikelihood", *p) for p in pairs])
    assert sorted(shapes) == sorted((len(c.encode()), model.cfg.vocab_size) for _, c in pairs)


PERPLEXITY_WITHOUT_LM_EVAL = """
import sys
sys.modules["lm_eval"] = None  # import lm_eval now raises ImportError
from pretrain.evaluate import main
sys.exit(main(sys.argv[1:]))
"""


def test_help_and_perplexity_work_without_lm_eval(run_dir, tmp_path):
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]

    def evaluate(*args):
        return subprocess.run([sys.executable, "-c", PERPLEXITY_WITHOUT_LM_EVAL, *args], cwd=root,
                              capture_output=True, text=True, timeout=300)

    assert evaluate("--help").returncode == 0
    out = tmp_path / "ppl.json"
    done = evaluate(str(run_dir), "--batches", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["perplexity"]["batches"] == 1
    tasks = evaluate(str(run_dir), "--tasks", "anything", "--out", str(tmp_path / "tasks.json"))
    assert tasks.returncode != 0 and "pip install -e '.[eval]'" in tasks.stderr
