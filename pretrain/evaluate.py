"""Evaluate a checkpoint: `python -m pretrain.evaluate CHECKPOINT [--tasks T1,T2 --include-path DIR] [--data DIR]`.

Perplexity: the val split of a prepared dataset (`--data`, else the run's own data.val_path / data.path) read by
`data.stream.ValLoader` as the trainer reads it (same windows, micro-batches and document masking); the loss is
the mean cross-entropy over every predicted token (labels != -100) and the perplexity its exponential.

Tasks: any lm-eval task (`--tasks`, names as lm-eval lists them; `--include-path` adds a directory of task YAMLs)
through `OurLM`, an `lm_eval.api.model.LM` around our model: no export, no GPU kernel, any architecture. Every
request is scored as a document start (an end-of-document token before it, as documents follow one another in
the training stream). Standard tasks download their data sets through Hugging Face `datasets`; a local task (a
YAML with `dataset_path: json` and local data files) needs no network.

Results: one JSON file per call, `<run_dir>/eval/<step_dir>-<UTC time>.json` (or `--out`), and scalars in the
run's TensorBoard directory `<run_dir>/tb/` at the checkpoint's step (`eval/loss`, `eval/ppl`,
`eval/<task>/<metric>`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.stream import SYNTHETIC, ValLoader
from pretrain.checkpoint import CheckpointError
from pretrain.config import ConfigError
from pretrain.checkpoint import find_checkpoint
from pretrain.generate import DTYPES, decode, load_model, load_run_tokenizer, resolve_device
from pretrain.models.common import IGNORE_INDEX
from pretrain.train import model_inputs

log = logging.getLogger("pretrain.evaluate")


@torch.no_grad()
def perplexity(model: nn.Module, loader: ValLoader, *, batches: int = 0) -> dict:
    """{"loss", "ppl", "tokens", "batches"} over the first `batches` validation batches (0: all): loss is the mean
    cross-entropy per predicted token, ppl = exp(loss)."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for batch in loader.batches(batches or loader.num_batches):
        inputs, kwargs = model_inputs(tuple(t.to(device) for t in batch))
        predicted = (kwargs["labels"] != IGNORE_INDEX).sum()
        total += model(inputs, **kwargs).double() * predicted  # the model's mean over this batch's labels, as a sum
        tokens += predicted
        count += 1
    loss = (total / tokens).item()  # one host read at the end
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(tokens), "batches": count}


def _lm_eval():
    """The lm_eval package, imported only where tasks run: perplexity alone needs no optional dependency."""
    try:
        import lm_eval.api.model
        import lm_eval.utils
    except ImportError as e:  # an optional dependency (the eval extra): say how to get it
        raise ImportError("lm-eval tasks need lm-eval: pip install -e '.[eval]' (or 'lm-eval==0.4.13')") from e
    return lm_eval


@functools.cache
def our_lm_class() -> type:
    """`OurLM`: lm-eval's TemplateLM with `_OurLMMethods`, built on first use so importing this module (and
    perplexity) does not need lm-eval. `from pretrain.evaluate import OurLM` builds it too."""
    return type("OurLM", (_OurLMMethods, _lm_eval().api.model.TemplateLM), {"__module__": __name__})


def __getattr__(name: str):
    if name == "OurLM":
        return our_lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _OurLMMethods:
    """lm-eval's model interface for one of our models and its tokenizer (mixed into lm-eval's TemplateLM by
    `our_lm_class`).

    loglikelihood scores continuations in batches of `batch_size` rows (right-padded: the models are causal, so the
    padding never reaches the scored positions); loglikelihood_rolling cuts long texts into windows of the model's
    trained context (model.seq_len) as lm-eval's own models do; generate_until decodes with the inference cache
    (greedy unless the task asks for sampling). Each request starts after an end-of-document token."""

    def __init__(self, model: nn.Module, tokenizer, *, batch_size: int = 8, seed: int = 0):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self._device = next(model.parameters()).device
        self.max_length = model.cfg.seq_len
        self.seed = seed

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def _as_document(self, context: list[int], continuation: list[int]) -> list[int]:
        """EOS + context + continuation, cut on the left to model.seq_len + 1 tokens (the input is all but the last)."""
        head = [] if context[:1] == [self.eot_token_id] else [self.eot_token_id]
        return (head + context + continuation)[-(self.max_length + 1):]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings, context ids, continuation ids); returns (sum of the
        continuation's log-probabilities, whether greedy decoding would produce it) for each, in order."""
        rows = [self._as_document(ctx, cont) for _, ctx, cont in requests]
        scored = [len(cont) for _, _, cont in requests]
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        # longest first, so each batch pads little
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = max(len(rows[i]) - 1 for i in chunk)
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)  # (b, T), right-padded
            for r, i in enumerate(chunk):
                inputs[r, :len(rows[i]) - 1] = torch.tensor(rows[i][:-1])
            logits = self.model(inputs.to(self.device))  # (b, T, V) in the model's dtype
            for r, i in enumerate(chunk):
                n, end = scored[i], len(rows[i]) - 1
                target = torch.tensor(rows[i][-n:], device=self.device)  # (n,)
                # fp64 only over the continuation's predictions: a whole (b, T, V) in fp64 would be 2-4× the logits
                window = F.log_softmax(logits[r, end - n:end].double(), dim=-1)  # (n, V)
                results[i] = (window.gather(-1, target[:, None]).sum().item(),
                              bool((window.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in (req.args for req in requests):
            utils = _lm_eval().utils
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.eot_token_id, max_seq_len=self.max_length,
                context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(logprob for logprob, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        for context, gen_kwargs in (req.args for req in requests):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            # greedy unless the task samples (do_sample, or a temperature > 0 without do_sample), as lm-eval's HF model
            sampling = gen_kwargs.get("do_sample", float(gen_kwargs.get("temperature", 0.0)) > 0)
            temperature = float(gen_kwargs.get("temperature", 1.0)) if sampling else 0.0
            # the prompt and the fed tokens stay within the trained context (and a learned position table)
            max_new = min(max_new, self.max_length)
            prompt = self._as_document(self.tok_encode(context), [])[-(self.max_length + 1 - max_new):]
            tokens: list[int] = []
            text = ""
            for token in decode(self.model, torch.tensor([prompt], device=self.device), max_new_tokens=max_new,
                                temperature=temperature, top_k=int(gen_kwargs.get("top_k") or 0),
                                top_p=float(gen_kwargs.get("top_p") or 1.0), generator=generator):
                if int(token) == self.eot_token_id:
                    break
                tokens.append(int(token))
                text = self.tokenizer.decode(tokens)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def run_tasks(lm: _OurLMMethods, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
              limit: float | None = None, log_samples: bool = False) -> dict:
    """lm-eval's results for `tasks`: its `simple_evaluate` output, with the per-sample records only if
    `log_samples` (every request's arguments and our model's responses)."""
    _lm_eval()  # the install hint when lm-eval is missing
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:  # index the directory alone when it holds every task asked for: the built-ins take long
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = TaskManager(include_path=include_path)
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=log_samples)
    return {key: results[key] for key in ("results", "versions", "n-shot", "configs", "samples") if key in results}


def scalars(report: dict) -> dict[str, float]:
    """TensorBoard tags → values: eval/loss, eval/ppl and eval/<task>/<metric> for every numeric metric."""
    out = {f"eval/{k}": v for k, v in report.get("perplexity", {}).items() if k in ("loss", "ppl")}
    for task, metrics in report.get("tasks", {}).get("results", {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
                out[f"eval/{task}/{name.replace(',none', '')}"] = float(value)
    return out


def write_report(report: dict, run_dir: Path, step: int, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(run_dir / "tb")) as tb:
        for tag, value in scalars(report).items():
            tb.add_scalar(tag, value, step)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.evaluate",
        description="Perplexity on a prepared dataset's val split and lm-eval tasks for a checkpoint. Writes JSON to "
                    "<run_dir>/eval/ and scalars to <run_dir>/tb/; prints the JSON.")
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint) or one checkpoints/step_<N> "
                                      "directory")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task names (none by default)")
    p.add_argument("--include-path", default=None, help="a directory of extra lm-eval task YAMLs (local tasks)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the task's)")
    p.add_argument("--limit", type=float, default=None, help="at most this many examples per task (a fraction if < 1)")
    p.add_argument("--log-samples", action="store_true", help="keep every task request and the model's responses "
                                                              "in the JSON")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward when scoring task requests (default 8)")
    p.add_argument("--data", default=None, help="a prepared dataset (shard directory or manifest) whose val split "
                                                "gives the perplexity; default: the run's own, when no --tasks")
    p.add_argument("--batches", type=int, default=0, help="validation batches to read (default 0: all of them)")
    p.add_argument("--micro-batch", type=int, default=0, help="rows per validation batch (default: the run's "
                                                              "train.micro_batch)")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights and activations (default fp32)")
    p.add_argument("--tokenizer", default=None, help="the run's tokenizer file, if it moved since training")
    p.add_argument("--seed", type=int, default=0, help="seed for tasks that sample generations (default 0)")
    p.add_argument("--out", default=None, help="the JSON file to write (default <run_dir>/eval/<step>-<time>.json)")
    args = p.parse_args(argv)
    for name in ("batches", "micro_batch"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def evaluate(args: argparse.Namespace) -> tuple[dict, Path]:
    """The report of one `python -m pretrain.evaluate` call and the JSON file it was written to."""
    checkpoint = find_checkpoint(args.checkpoint)
    run_dir, step = checkpoint.parent.parent, int(checkpoint.name.split("_")[1])
    model, config = load_model(checkpoint, device=resolve_device(args.device), dtype=DTYPES[args.dtype])
    tasks = [t for t in args.tasks.split(",") if t]
    report: dict = {"checkpoint": str(checkpoint), "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime())}
    data = args.data or (None if tasks else (config["data"].get("val_path") or config["data"]["path"]))
    if data == SYNTHETIC:
        raise ValueError("the run trained on synthetic tokens, which have no val split: give --data (a prepared "
                         "dataset) or --tasks")
    if data is not None:
        cfg_data, train = config["data"], config["train"]
        loader = ValLoader(data, "val", seq_len=model.cfg.seq_len, micro_batch=args.micro_batch or train["micro_batch"],
                           blend="" if args.data or cfg_data.get("val_path") else cfg_data.get("blend", ""),
                           on_error=cfg_data.get("on_error", "raise"),
                           return_doc_boundaries=cfg_data.get("document_mask", False),
                           vocab_size=model.cfg.vocab_size)
        report["perplexity"] = {"data": str(data), **perplexity(model, loader, batches=args.batches)}
    if tasks:
        lm = our_lm_class()(model, load_run_tokenizer(config, args.tokenizer), batch_size=args.batch_size,
                            seed=args.seed)
        report["tasks"] = run_tasks(lm, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                                    limit=args.limit, log_samples=args.log_samples)
    out = Path(args.out) if args.out else run_dir / "eval" / f"{checkpoint.name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    write_report(report, run_dir, step, out)
    return report, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        report, out = evaluate(args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log.info("wrote %s", out)
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
