import numpy as np
import pytest
import torch

from data.prepare import prepare
from data.shards import Manifest, Shard

indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def build(prefix: str, documents: list[list[np.ndarray]], dtype) -> None:
    """A Megatron-LM indexed dataset written by megatron-core's own builder (documents of several sequences)."""
    builder = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in documents:
        for seq in doc:
            builder.add_item(torch.from_numpy(seq.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def shard_documents(out) -> list[list[int]]:
    m = Manifest(str(out))
    docs = []
    for entry in m.shards("train"):
        shard = Shard(m, entry)
        docs += [shard.tokens(d, 0, n).tolist() for d, n in enumerate(shard.lengths)]
    return docs


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_dataset_converts_identically(tmp_path, dtype):
    rng = np.random.default_rng(0)
    documents = [[rng.integers(0, 256, size=int(rng.integers(1, 40))) for _ in range(int(rng.integers(1, 4)))]
                 for _ in range(25)]
    documents[3][-1] = np.append(documents[3][-1], 256)  # already ends with EOS (Megatron's --append-eod)
    prefix = str(tmp_path / "corpus_text_document")
    build(prefix, documents, dtype)
    ds = indexed_dataset.IndexedDataset(prefix)
    assert len(ds.document_indices) - 1 == len(documents)
    m = prepare([prefix + ".bin"], tmp_path / "out", val_fraction=0, shard_size=2000, workers=2, quiet=True)
    assert len(m["splits"]["train"]["shards"]) > 1 and m["documents"] == 25
    expected = [np.concatenate(doc).tolist() for doc in documents]
    expected = [d if d[-1] == 256 else d + [256] for d in expected]
    assert shard_documents(tmp_path / "out") == expected
    # Naming the prefix, or the .idx, is the same input.
    again = prepare([prefix], tmp_path / "again", val_fraction=0, shard_size=2000, quiet=True)
    assert again["splits"] == m["splits"]


def test_megatron_ids_outside_the_vocabulary(tmp_path):
    prefix = str(tmp_path / "big")
    build(prefix, [[np.array([5, 300, 7])]], np.int32)
    with pytest.raises(ValueError, match=r"big\.bin document 0 has token id 300.*--tokenizer"):
        prepare([prefix], tmp_path / "out", quiet=True)
