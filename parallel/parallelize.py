"""The one entry the training loop calls to lay a model out over the processes."""

from __future__ import annotations

import torch
import torch.nn as nn

from parallel.data_parallel import apply_ddp


def parallelize(model: nn.Module, *, dp: int, device: torch.device) -> nn.Module:
    """Wrap `model` for `dp` data-parallel processes (a no-op for one process).

    Order, as layouts grow: tensor parallel first (it changes parameter shapes), then recomputation
    (wraps blocks whose layout is fixed), then compile, and data parallelism last (it wraps the final
    parameters).
    """
    if dp > 1:
        model = apply_ddp(model, device)
    return model
