import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests where no CUDA device is present (CI never has one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
