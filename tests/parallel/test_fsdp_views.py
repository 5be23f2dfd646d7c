"""FSDP2 registers its pre-backward hook on the tensors each wrapped module returns, and warns where one is a view
(an in-place op on a view drops the hook). No block of the four architectures returns one: RWKV-7's blocks, which
hand on the first layer's values they were given (under FSDP2 a view FSDP2 made of them), return them as no view."""

import warnings

from tests.dist import run_distributed
from tests.parallel.layouts import ARCHS, train_layouts


def _view_warnings_of_a_step(archs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_layouts(archs, {"dp": 2}, {"micro_batch": 2}, steps=1)
    return [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]


def test_no_fsdp_wrapped_module_returns_a_view():
    for found in run_distributed(_view_warnings_of_a_step, 2, ARCHS):
        assert found == []
