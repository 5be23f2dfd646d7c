"""Synthetic shard sets for the data tests: every non-EOS token id is unique, so coverage is checkable exactly."""

import numpy as np
import torch

from data.shards import write_shards

EOS = 0
IDENTITY = {"kind": "test", "vocab_size": 1 << 20, "eos_id": EOS}


def unique_docs(total_tokens: int, *, seed: int = 0, first_id: int = 1, max_len: int = 12) -> list[np.ndarray]:
    """Documents of 2..max_len tokens (last one EOS) summing exactly to `total_tokens`; ids first_id, first_id+1, …"""
    rng = np.random.default_rng(seed)
    docs, next_id, left = [], first_id, total_tokens
    while left:
        n = min(int(rng.integers(2, max_len + 1)), left)
        if left - n == 1:  # never leave a remainder too short for a document
            n += 1
        docs.append(np.append(np.arange(next_id, next_id + n - 1), EOS))
        next_id += n - 1
        left -= n
    return docs


def make_dataset(out_dir, total_tokens: int, *, shard_size: int = 4096, seed: int = 0, first_id: int = 1,
                 val_tokens: int = 0) -> list[np.ndarray]:
    """Write shards (several, at the default size) of unique-id documents; returns the train documents."""
    docs = unique_docs(total_tokens, seed=seed, first_id=first_id)
    splits = {"train": docs}
    if val_tokens:
        splits["val"] = unique_docs(val_tokens, seed=seed + 1, first_id=first_id + total_tokens)
    write_shards(str(out_dir), splits, IDENTITY, shard_size=shard_size)
    return docs


def global_stream(per_rank_batches: list[list[tuple]], index: int = 0) -> torch.Tensor:
    """Rows of tensor `index` in global-sample order from each rank's list of micro-batches ([steps][dp])."""
    steps = len(per_rank_batches[0])
    return torch.cat([per_rank_batches[r][s][index] for s in range(steps) for r in range(len(per_rank_batches))])
