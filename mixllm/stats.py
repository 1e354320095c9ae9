"""Uncertainty of evaluation figures: paired bootstrap intervals and mean ± std over seeds.

A comparison of two rankers on the same users is *paired*: each user gives one difference
``a[u] - b[u]`` (say HR@1 of the student minus HR@1 of SASRec), and the interval is a percentile
bootstrap over users of the mean difference: resample the users with replacement ``resamples`` times
(seeded, numpy's PCG64, the same numbers on every machine), take the mean difference of each resample,
and report the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles. An interval that lies
above zero says ``a`` beats ``b`` on this population of users beyond the noise of which users were drawn.

Hand-written (a dozen lines of numpy) rather than ``scipy.stats.bootstrap``: scipy is not otherwise a
dependency, and the percentile method is all this needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over paired units, and its bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    resamples: int

    @property
    def above_zero(self) -> bool:
        return self.low > 0

    def to_dict(self) -> dict:
        return {**asdict(self), "above_zero": self.above_zero}

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def paired_bootstrap(a, b, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """The mean of ``a - b`` (paired arrays of per-unit values) with its percentile bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("paired values are empty: nothing to compare")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # (chunk, n) index blocks keep memory flat for many users
        count = min(1000, resamples - start)
        means[start : start + count] = diff[rng.integers(0, len(diff), size=(count, len(diff)))].mean(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(float(diff.mean()), float(low), float(high), len(diff), confidence, resamples)


def mean_std(values) -> dict[str, float]:
    """``{"mean", "std", "n"}`` of a few values (e.g. one metric over candidate seeds); std is the sample
    standard deviation (ddof 1), 0 for a single value."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"need a non-empty 1-D list of values, got shape {values.shape}")
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "n": len(values)}
