import numpy as np
import pytest
import torch

from data.blend import Schedule, parse_blend, quotas
from data.stream import Loader, ValLoader
from tests.data.synthetic import EOS, global_stream, make_dataset

SEQ = 8


def prefix_discrepancy(weights, samples):
    """max over prefixes g and datasets i of |c_i(g) − g·p_i| for the target proportions p."""
    s = Schedule(weights)
    p = np.asarray(weights, float) / sum(weights)
    which = np.array([s.locate(g)[0] for g in range(samples)])
    counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[which], axis=0)  # [samples, datasets]
    g = np.arange(1, samples + 1)[:, None]
    return np.abs(counts - g * p).max(), s


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 1], [0.5, 0.25, 0.125, 0.125], [3, 1], [0.1, 0.2, 0.3, 0.4],
                                     [0.01, 0.99], [2.5, 1.0, 0.75]])
def test_proportions_hold_at_every_prefix_within_one_sample(weights):
    worst, s = prefix_discrepancy(weights, 3 * sum(quotas(weights)) + 17)
    assert worst < 1.0, (weights, worst)
    # Seekable: (dataset, index) of any sample equals the running count of that dataset.
    seen = [0] * len(weights)
    for g in range(2 * s.period + 5):
        i, j = s.locate(g)
        assert j == seen[i]
        seen[i] += 1
    assert s.counts(2 * s.period + 5) == seen


def test_random_weights_bound():
    rng = np.random.default_rng(0)
    for _ in range(20):
        weights = list(rng.uniform(0.05, 1.0, size=int(rng.integers(2, 6))).round(3))
        assert prefix_discrepancy(weights, 4000)[0] < 1.0 + 4000 * 2**-16, weights  # rounding only beyond 2^16


def test_parse_blend():
    assert parse_blend("0.7:/a,0.3:http://host/x/manifest.json") == [(0.7, "/a"), (0.3, "http://host/x/manifest.json")]
    for bad in ("", "a:/x", "0:/x", "0.5", "-1:/x"):
        with pytest.raises(ValueError, match="data.blend"):
            parse_blend(bad)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    make_dataset(a, 401, first_id=1, val_tokens=150)
    make_dataset(b, 301, first_id=100_000, seed=5, val_tokens=150)
    return f"0.75:{a},0.25:{b}"


def source_of(rows: torch.Tensor) -> np.ndarray:
    """0 for windows from dataset a (ids < 100000), 1 for b: every window has a non-EOS token."""
    big = torch.where(rows == EOS, torch.zeros_like(rows), rows).max(1).values
    return (big >= 100_000).long().numpy()


def test_blended_loader_proportions_resume_and_dp(two_sets):
    ld = Loader("", seq_len=SEQ, micro_batch=4, seed=1, blend=two_sets, shuffle_window=8)
    stream = torch.cat([next(ld)[0] for _ in range(50)])  # 200 samples: dataset b wraps around (37 windows/epoch)
    src = source_of(stream)
    counts = np.cumsum(src)
    assert np.abs(counts - 0.25 * np.arange(1, 201)).max() < 1.0
    assert ld.epoch >= 1
    # Resume on another dp: dp=2 for 10 steps (80 samples), then dp=4 continues the same global stream.
    first = [Loader("", seq_len=SEQ, micro_batch=4, seed=1, blend=two_sets, shuffle_window=8, dp_rank=r, dp_size=2)
             for r in range(2)]
    got = [[next(first[r]) for _ in range(10)] for r in range(2)]
    state = first[1].state_dict()
    rest = []
    for r in range(4):
        ld = Loader("", seq_len=SEQ, micro_batch=4, seed=1, blend=two_sets, shuffle_window=8, dp_rank=r, dp_size=4)
        ld.load_state_dict(state)
        rest.append([next(ld) for _ in range(3)])
    assert torch.equal(torch.cat([global_stream(got), global_stream(rest)]), stream[:128])


def test_blend_weights_are_part_of_the_state(two_sets):
    state = Loader("", seq_len=SEQ, micro_batch=4, blend=two_sets).state_dict()
    other = two_sets.replace("0.75:", "0.5:")
    with pytest.raises(ValueError, match="different data"):
        Loader("", seq_len=SEQ, micro_batch=4, blend=other).load_state_dict(state)


def test_blended_validation(two_sets):
    val = ValLoader("", seq_len=SEQ, micro_batch=4, blend=two_sets)
    # 18 windows each; at 3:1 dataset a runs out first: 18 of a come with 6 of b → 24 samples = 6 batches.
    assert val.num_batches == 6
    rows = torch.cat([b[0] for b in val.batches(10)])
    assert source_of(rows).sum() == 6


def test_tiny_weights_are_ratios_or_a_clear_error():
    # Only ratios matter, however small the numbers.
    assert quotas([4e-7, 2e-7]) == quotas([2, 1]) == [2, 1]
    assert quotas([1e-6, 6e-7]) == [5, 3]
    assert quotas([0.7, 0.3]) == [7, 3] and quotas([0.01, 0.99]) == [1, 99]  # schedules of earlier runs stay
    # A share the 2^16 period cannot hold is an error, whichever way the weights are written.
    for weights in ([1, 4e-7], [1, 1e-6], [1e6, 1], [0.999999, 0.000001]):
        with pytest.raises(ValueError, match=r"too uneven.*1/65536"):
            quotas(weights)
