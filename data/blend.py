"""A deterministic mixture of datasets whose proportions hold at every prefix, and seekable in O(1).

Weights become integer quotas n_i over a period D (the weights themselves when they are integers, else their
exact fractions when the common denominator is at most 2^16, else a largest-remainder rounding to 2^16; only the
ratios matter, and a weight too small for any sample in the period is an error, never a silent 0). Within a
period, sample t (1-based) goes to the dataset with the largest deficit t·n_i − D·c_i (c_i its samples so far;
ties to the lower index). Over any prefix of g samples every dataset has within one sample of its share:
|c_i(g) − g·n_i/D| < 1 (checked in tests/data/test_blend.py). After D samples every c_i = n_i, so the order repeats
with period D and global sample g maps to (dataset, its own sample index) without looking at earlier samples.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

MAX_PERIOD = 1 << 16


def parse_blend(text: str) -> list[tuple[float, str]]:
    """'0.7:/data/web,0.3:/data/code' → [(0.7, '/data/web'), (0.3, '/data/code')] (a path may contain ':')."""
    parts = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        weight, sep, path = item.partition(":")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not sep or not path or not w > 0 or not math.isfinite(w):
            raise ValueError(f"data.blend entry {item!r} should look like WEIGHT:PATH with WEIGHT > 0, "
                             "e.g. data.blend='0.7:/data/web,0.3:/data/code'")
        parts.append((w, path))
    if not parts:
        raise ValueError("data.blend is empty; give WEIGHT:PATH entries separated by commas")
    return parts


def quotas(weights: list[float]) -> list[int]:
    """Integer shares n_i of one period D = sum(n_i), proportional to `weights`; every n_i >= 1."""
    if all(float(w).is_integer() for w in weights) and sum(weights) <= MAX_PERIOD:
        return [int(w) for w in weights]
    # Fractions with denominators up to 10^6 cannot hold a weight below 1e-6 (it would become 0): such weights are
    # taken relative to the largest. Only then, so that every blend that was already exact keeps its schedule.
    scale = 1 / max(weights) if min(weights) < 1e-6 else 1.0
    fracs = [Fraction(w * scale).limit_denominator(10**6) for w in weights]
    total = sum(fracs)
    shares = [f / total for f in fracs]
    period = math.lcm(*(s.denominator for s in shares))
    if period <= MAX_PERIOD:
        n = [int(s * period) for s in shares]
    else:
        exact = [s * MAX_PERIOD for s in shares]
        n = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(n)), key=lambda i: (-(exact[i] - n[i]), i))
        for i in by_remainder[:MAX_PERIOD - sum(n)]:
            n[i] += 1
    if min(n) == 0:
        smallest = min(range(len(weights)), key=lambda i: weights[i])
        raise ValueError(
            f"blend weights {weights} are too uneven: weight {weights[smallest]} is "
            f"{weights[smallest] / math.fsum(weights):.2g} of the total, and the blend gives each dataset a whole "
            f"number of samples in every {MAX_PERIOD}, so each weight must be at least about 1/{MAX_PERIOD} "
            f"({1 / MAX_PERIOD:.2g}) of the total; raise that weight or leave the dataset out of data.blend")
    return n


class Schedule:
    """Global sample g → (dataset i, sample index within dataset i)."""

    def __init__(self, weights: list[float]):
        self.n = quotas(weights)
        self.period = sum(self.n)
        which = np.empty(self.period, np.int64)
        before = np.empty(self.period, np.int64)
        counts = [0] * len(self.n)
        for t in range(1, self.period + 1):
            i = max(range(len(self.n)), key=lambda k: (t * self.n[k] - self.period * counts[k], -k))
            which[t - 1], before[t - 1] = i, counts[i]
            counts[i] += 1
        self.which, self.before = which, before  # [period] each

    def locate(self, g: int) -> tuple[int, int]:
        q, r = divmod(g, self.period)
        i = int(self.which[r])
        return i, q * self.n[i] + int(self.before[r])

    def counts(self, g: int) -> list[int]:
        """Samples of each dataset among global samples [0, g)."""
        q, r = divmod(g, self.period)
        return [q * n + int(np.count_nonzero(self.which[:r] == i)) for i, n in enumerate(self.n)]


class BlendedStream:
    """Several streams mixed by a Schedule; the same `fill` interface as one stream."""

    def __init__(self, streams: list, weights: list[float]):
        self.streams, self.schedule = streams, Schedule(weights)

    def fill(self, g: int, tokens: np.ndarray, positions: np.ndarray | None = None):
        i, j = self.schedule.locate(g)
        self.streams[i].fill(j, tokens, positions)

    def epoch(self, consumed: int) -> int:
        """The most epochs any component has completed after `consumed` samples (the one that repeats first)."""
        return max(s.epoch(c) for s, c in zip(self.streams, self.schedule.counts(consumed)))

    def windows(self) -> int:
        """Samples available before any component wraps around (for a fixed validation set)."""
        lo, hi = 0, min(s.windows() * self.schedule.period // n for s, n in zip(self.streams, self.schedule.n)) + 1
        while lo < hi:  # the largest g whose counts all fit
            mid = (lo + hi + 1) // 2
            if all(c <= s.windows() for s, c in zip(self.streams, self.schedule.counts(mid))):
                lo = mid
            else:
                hi = mid - 1
        return lo

    @property
    def skipped(self) -> dict:
        return {name: why for s in self.streams for name, why in s.skipped.items()}
