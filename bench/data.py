"""Data pipeline throughput: prepare (MB/s per worker) and the streaming loader (tokens/s per process), as JSON.

    python bench/data.py                       # 32 MB synthetic corpus (4 MB for BPE), seq_len 4096, micro-batch 8
    python bench/data.py --mb 256 --seq-len 8192 --batches 400

The corpus is generated here (words drawn from a fixed vocabulary, jsonl documents of 1-16 KB), so nothing is
downloaded. Prepare is timed with the byte tokenizer and with a 4096-token byte-level BPE trained on the corpus
(HF tokenizers); MB/s are of input text. The loader is timed from local shards after one warm-up batch, with
num_workers=0 (batches built in the measuring process) and with DataLoader workers (tokens/s delivered).
The goal: at least 20M tokens/s per process, so data loading never holds back a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.prepare import prepare  # noqa: E402
from data.stream import Loader  # noqa: E402


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A jsonl file of ~`megabytes` MB of word salad; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    words = ["".join(chr(c) for c in rng.integers(97, 123, size=int(n))) for n in rng.integers(1, 10, size=5000)]
    weights = 1.0 / np.arange(1, len(words) + 1)  # Zipf-like, as words in text are
    weights /= weights.sum()
    target = int(megabytes * 1e6)
    with open(path, "w") as f:
        while f.tell() < target:
            n = int(rng.integers(200, 3000))
            text = " ".join(words[i] for i in rng.choice(len(words), size=n, p=weights))
            f.write(json.dumps({"text": text}) + "\n")
    return path.stat().st_size


def train_bpe(corpus: Path, out: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(corpus) as f:
        sample = [json.loads(line)["text"] for _, line in zip(range(200), f)]
    tok.train_from_iterator(sample, trainer)
    tok.save(str(out))
    return str(out)


def time_prepare(corpus: Path, out: Path, tokenizer: str, workers: int) -> dict:
    t0 = time.perf_counter()
    m = prepare([str(corpus)], out, tokenizer, workers=workers, shard_size=64 * 10**6, quiet=True)
    dt = time.perf_counter() - t0
    mb = m["input_bytes"] / 1e6
    return {"tokenizer": tokenizer if tokenizer == "byte" else "bpe-4096", "workers": workers, "seconds": round(dt, 3),
            "mb_per_s": round(mb / dt, 2), "mb_per_s_per_worker": round(mb / dt / workers, 2),
            "tokens": m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]}


def time_loader(shards: Path, *, seq_len: int, micro_batch: int, batches: int, num_workers: int,
                boundaries: bool = False) -> dict:
    loader = Loader(str(shards), seq_len=seq_len, micro_batch=micro_batch, seed=0, num_workers=num_workers,
                    return_doc_boundaries=boundaries)
    next(loader)  # opens the first shards (and starts workers)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    dt = time.perf_counter() - t0
    tokens = batches * micro_batch * seq_len
    return {"num_workers": num_workers, "doc_boundaries": boundaries, "batches": batches,
            "tokens_per_s": round(tokens / dt), "ms_per_batch": round(1e3 * dt / batches, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python bench/data.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=32, help="size of the synthetic jsonl corpus in MB (default 32)")
    p.add_argument("--bpe-mb", type=float, default=4,
                   help="size of the corpus prepared with the BPE tokenizer, which is far slower (default 4)")
    p.add_argument("--seq-len", type=int, default=4096, help="loader window length (default 4096)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per loader batch (default 8)")
    p.add_argument("--batches", type=int, default=200, help="timed loader batches per point (default 200)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="prepare worker counts to time (default 1 2)")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2],
                   help="loader DataLoader worker counts to time (default 0 2)")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one, removed after)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        size = make_corpus(corpus, args.mb)
        small = tmp / "small.jsonl"
        make_corpus(small, args.bpe_mb, seed=1)
        bpe = train_bpe(small, tmp / "tokenizer.json")
        prep = [time_prepare(corpus, tmp / f"byte-{w}", "byte", w) for w in args.workers]
        prep += [time_prepare(small, tmp / f"bpe-{w}", bpe, w) for w in args.workers]
        shards = tmp / f"byte-{args.workers[0]}"
        load = [time_loader(shards, seq_len=args.seq_len, micro_batch=args.micro_batch, batches=args.batches,
                            num_workers=w) for w in args.loader_workers]
        load.append(time_loader(shards, seq_len=args.seq_len, micro_batch=args.micro_batch, batches=args.batches,
                                num_workers=0, boundaries=True))
    result = {
        "bench": "data", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                     "python": platform.python_version()},
        "corpus_mb": round(size / 1e6, 1), "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "prepare": prep, "loader": load,
        "loader_goal_tokens_per_s": 20_000_000,
        "loader_meets_goal": all(x["tokens_per_s"] >= 20_000_000 for x in load if x["num_workers"] == 0),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
