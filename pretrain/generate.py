"""Text generation from a checkpoint: `python -m pretrain.generate CHECKPOINT --prompt TEXT [options]`.

The prompt is run once through the model (prefill) into an `InferenceCache`, then each new token is one step through
the cache: Transformer and FoX keep keys and values (FoX also the running sum of its log forget gates), GLA and
RWKV-7 their recurrent state, so a token costs the same at any position for the linear mixers. Temperature 0 is
greedy (the argmax); otherwise tokens are sampled, after top-k and top-p (nucleus) filtering, from a generator
seeded with `--seed`, so a seed gives the same text every time on the same device.

`python -m pretrain.generate --time --config FILE [--section.key=value ...] [--decode-tokens N ...]` times
inference instead (a point of an inference throughput study, `launch.sweep`): a model of the config, randomly
initialised (speed does not depend on the weights), prefills train.micro_batch rows of model.seq_len − N random
tokens, then decodes N tokens greedily through the cache; it reports prefill and decode tokens/s, the cache's
bytes and the peak memory as JSON.

Loading (also used by `pretrain.evaluate`): CHECKPOINT is a run directory (its `checkpoints/latest`, else the
newest) or one `checkpoints/step_<N>` directory, whose files' checksums are verified. The model is rebuilt from the
config stored in the checkpoint and only its weights are read (DCP reshards them from whatever layout saved them,
tp/pp/FSDP, onto this one process; the optimizer state is never read). The tokenizer is the run's `data.tokenizer`
('byte' or a tokenizer.json / .tiktoken path, which `--tokenizer` replaces if the file moved).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from data.tokenizer import load_tokenizer
from pretrain.checkpoint import CheckpointError, find_checkpoint, load_weights, read_meta
from pretrain.config import ConfigError, build_config, load_config
from pretrain.models import build_model
from pretrain.models.common import InferenceCache

log = logging.getLogger("pretrain.generate")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def load_model(checkpoint: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               attn_impl: str | None = None) -> tuple[nn.Module, dict]:
    """(the model of `checkpoint` on `device` in `dtype`, in eval mode, with its weights; the run config stored in
    it). `checkpoint` is a checkpoint directory or a run directory (its newest, `checkpoint.find_checkpoint`); the
    files' checksums are verified first. `attn_impl` replaces the run's model.attn_impl (None: keep it, except
    that 'fla', which needs CUDA, becomes 'auto' elsewhere)."""
    device = torch.device(device)
    path = find_checkpoint(checkpoint)
    run_config = read_meta(path)["config"]
    model_values = dict(run_config["model"])
    if attn_impl is not None:
        model_values["attn_impl"] = attn_impl
    elif device.type != "cuda" and model_values.get("attn_impl") == "fla":
        model_values["attn_impl"] = "auto"
    cfg = build_config({}, {"model": model_values}).model
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        model = build_model(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty unties them
        model.lm_head.weight = model.tok_emb.weight
    load_weights(path, model)
    return model.to(dtype).eval(), run_config


def load_run_tokenizer(run_config: dict, override: str | None = None):
    """The tokenizer the run trained with (its data.tokenizer), or `override`; a tokenizer.json's EOS token comes
    from the run's data manifest where that is still readable."""
    data = run_config.get("data", {})
    spec = override or data.get("tokenizer", "byte")
    if spec == "byte":
        return load_tokenizer("byte")
    eos_token = None
    manifest = Path(data.get("path", "")) / "manifest.json"
    if manifest.is_file():
        eos_token = json.loads(manifest.read_text()).get("tokenizer", {}).get("eos_token")
    return load_tokenizer(spec, eos_token)


def next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row from its logits (B, V): the argmax at temperature 0, else a sample of
    softmax(logits / temperature) restricted to the top_k most likely tokens (0: all) and to the smallest set of
    most likely tokens whose probability reaches top_p (1: all). Returns (B,) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (B, V)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ranked, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = ranked.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs  # (B, V): probability of the tokens ranked higher
        drop_ranked = mass_above >= top_p  # the most likely token has 0 above it and always stays
        logits = logits.masked_fill(drop_ranked.scatter(-1, order, drop_ranked), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def decode(model: nn.Module, prompt: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield up to max_new_tokens next tokens (B,) for the rows of `prompt` (B, T): one prefill of the prompt into
    an inference cache, then one cached step per token. The caller decides when to stop (EOS, stop strings)."""
    # every step fed, known up front: the prompt and all new tokens but the last
    cache = InferenceCache(capacity=prompt.shape[1] + max(max_new_tokens - 1, 0))
    # only the last position predicts the next token: the head runs there alone
    logits = model(prompt, cache=cache, last_only=True)[:, -1]  # (B, V)
    for i in range(max_new_tokens):
        token = next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)  # (B,)
        yield token
        if i + 1 < max_new_tokens:
            logits = model(token[:, None], cache=cache)[:, -1]  # (B, V)


def check_length(model: nn.Module, prompt_len: int, max_new_tokens: int) -> None:
    """Learned positions end at the table's size (model.seq_len): refuse a generation that would run past it."""
    cfg = model.cfg
    if cfg.pos == "learned" and prompt_len + max_new_tokens > cfg.seq_len + 1:
        raise ValueError(f"the prompt ({prompt_len} tokens) and --max-new-tokens {max_new_tokens} exceed the "
                         f"learned position table of {cfg.seq_len} positions (model.seq_len); lower "
                         f"--max-new-tokens to {max(cfg.seq_len + 1 - prompt_len, 0)} or shorten the prompt")


def generate(model: nn.Module, prompt: list[int], *, max_new_tokens: int, eos_id: int | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> list[int]:
    """The tokens that follow `prompt` (ids), up to max_new_tokens, ending before the first `eos_id`."""
    check_length(model, len(prompt), max_new_tokens)
    device = next(model.parameters()).device
    out = []
    for token in decode(model, torch.tensor([prompt], device=device), max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, generator=generator):
        token = int(token)  # a host read per token, to stop at EOS
        if token == eos_id:
            break
        out.append(token)
    return out


@torch.no_grad()
def time_inference(model: nn.Module, *, prompt_tokens: int, decode_tokens: int, batch: int, warmup: int = 1,
                   repeats: int = 3, seed: int = 0) -> dict:
    """Prefill and decode speed of `model` on `batch` rows: a random prompt of prompt_tokens prefilled in one call,
    then decode_tokens greedy steps through the cache (no host read between steps), `warmup` untimed runs, then
    `repeats` timed ones (means). Also the bytes the cache holds at the end (keys and values grow with the
    context; recurrent states do not) and the peak memory (GPU: allocated by tensors; CPU: the process's resident
    set)."""
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt = torch.randint(model.cfg.vocab_size, (batch, prompt_tokens), device=device, generator=generator)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    prefill_s, decode_s = [], []
    for run in range(warmup + repeats):
        cache = InferenceCache(capacity=prompt_tokens + decode_tokens)
        synchronize()
        start = time.perf_counter()
        logits = model(prompt, cache=cache, last_only=True)[:, -1]  # (B, V)
        synchronize()
        prefilled = time.perf_counter()
        for _ in range(decode_tokens):
            logits = model(logits.argmax(dim=-1)[:, None], cache=cache)[:, -1]  # (B, V)
        synchronize()
        if run >= warmup:
            prefill_s.append(prefilled - start)
            decode_s.append(time.perf_counter() - prefilled)
    prefill, decode_time = statistics.fmean(prefill_s), statistics.fmean(decode_s)
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers.values() for t in layer.tensors.values())
    peak = (torch.cuda.max_memory_allocated(device) if on_gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # ru_maxrss: KiB on Linux
    return {
        "batch": batch, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
        "context": prompt_tokens + decode_tokens, "warmup": warmup, "repeats": repeats,
        "prefill_s": prefill, "prefill_s_std": statistics.stdev(prefill_s) if repeats > 1 else 0.0,
        "prefill_tokens_per_s": batch * prompt_tokens / prefill,
        "decode_s": decode_time, "decode_s_std": statistics.stdev(decode_s) if repeats > 1 else 0.0,
        "decode_ms_per_step": decode_time / decode_tokens * 1e3,
        "decode_tokens_per_s": batch * decode_tokens / decode_time,
        "cache_bytes": cache_bytes, "peak_memory_gb": peak / 2**30,
        "memory_kind": "gpu_allocated" if on_gpu else "cpu_rss",
    }


def time_main(argv: list[str]) -> int:
    """`python -m pretrain.generate --time --config FILE [--section.key=value ...] [options]`: `time_inference` on
    a randomly initialised model of the config; prints (and with --out writes) the JSON."""
    p = argparse.ArgumentParser(
        prog="python -m pretrain.generate --time",
        description="Time inference on a randomly initialised model of a run config: prefill train.micro_batch "
                    "rows of model.seq_len - N random tokens, then decode N tokens through the cache. Other "
                    "arguments are the run config (--config FILE, --section.key=value).")
    p.add_argument("--time", action="store_true", help="this mode")
    p.add_argument("--decode-tokens", type=int, default=32, help="N, tokens decoded one at a time (default 32)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, averaged (default 3)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args, config_args = p.parse_known_args(argv)
    try:
        cfg = load_config(config_args)
        if not 0 < args.decode_tokens < cfg.model.seq_len:
            raise ConfigError(f"--decode-tokens must be in [1, model.seq_len) = [1, {cfg.model.seq_len}): the "
                              f"prompt is model.seq_len - N tokens; got {args.decode_tokens}")
        if args.warmup < 0 or args.repeats < 1:
            raise ConfigError(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    device = resolve_device("auto" if cfg.train.device == "auto" else cfg.train.device)
    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        model = build_model(cfg.model)
    model = model.to(torch.bfloat16 if use_bf16 else torch.float32).eval()
    result = time_inference(model, prompt_tokens=cfg.model.seq_len - args.decode_tokens,
                            decode_tokens=args.decode_tokens, batch=cfg.train.micro_batch, warmup=args.warmup,
                            repeats=args.repeats, seed=cfg.train.seed)
    result.update(arch=cfg.model.arch, dtype="bf16" if use_bf16 else "fp32", device=str(device))
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.generate",
        description="Continue a prompt with a trained model, using its inference cache (key/value cache for the "
                    "Transformer and FoX, recurrent state for GLA and RWKV-7). Prints the continuation; timings go "
                    "to stderr. `python -m pretrain.generate --time --help` explains the timing mode (inference "
                    "throughput on a config's randomly initialised model).")
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint) or one checkpoints/step_<N> "
                                      "directory")
    p.add_argument("--prompt", required=True, help="the text to continue; it is encoded after an end-of-document "
                                                   "token, as documents start in the training stream")
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to generate (default 200); "
                                                                   "generation stops earlier at end-of-document")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy, always the most likely token; > 0: sample from softmax(logits / T)")
    p.add_argument("--top-k", type=int, default=0, help="sample only among the K most likely tokens (0, default: "
                                                        "no limit; 1 is greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample only among the most likely tokens whose "
                                                            "probabilities sum to P (nucleus sampling; default 1: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0): the same "
                                                       "seed gives the same text")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights and activations (default fp32)")
    p.add_argument("--tokenizer", default=None, help="the run's tokenizer file, if it moved since training "
                                                     "(default: the run's data.tokenizer)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0 (0 = no limit), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--time" in argv:
        return time_main(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    device = resolve_device(args.device)
    try:
        model, run_config = load_model(args.checkpoint, device=device, dtype=DTYPES[args.dtype])
        tokenizer = load_run_tokenizer(run_config, args.tokenizer)
        prompt = [tokenizer.eos_id] + tokenizer.encode(args.prompt)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        start = time.perf_counter()
        out = generate(model, prompt, max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    log.info("%d prompt tokens, %d generated in %.2f s", len(prompt), len(out), seconds)
    print(tokenizer.decode(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
