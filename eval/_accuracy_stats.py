"""Paired statistics for the accuracy benchmarks: bootstrap intervals of accuracy differences.

Two runs scored on the same questions are compared question by question (a *paired* comparison): the
difference of accuracies is the mean of per-question differences. Questions about the same picture or clip
are not independent (a method that loses an object loses every question about it), so the bootstrap
resamples **pictures (clusters) with all their questions**, which gives wider, honest intervals than
resampling questions one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def paired_difference(
    a: Sequence[int], b: Sequence[int], clusters: Sequence[str | int], resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Accuracy of ``a`` minus accuracy of ``b`` (0/1 per question, same questions) with a 95 % interval.

    Args:
        a, b: per-question correctness of the two runs (same order).
        clusters: per question, the picture or clip it is about (the resampling unit).
        resamples: bootstrap resamples (percentile interval).
        seed: seed of the resampling (fixed: the same data give the same interval).

    Returns:
        ``{"diff", "low", "high", "n", "clusters"}`` (differences in accuracy, not percent).
    """
    x = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if x.shape[0] != len(clusters) or len(a) != len(b):
        raise ValueError("a, b and clusters must describe the same questions")
    _, cluster_of = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    k = int(cluster_of.max()) + 1
    sums = np.bincount(cluster_of, weights=x, minlength=k)  # per cluster: sum of differences
    counts = np.bincount(cluster_of, minlength=k).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, k, size=(resamples, k))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"diff": float(x.mean()), "low": float(low), "high": float(high), "n": int(x.shape[0]), "clusters": k}


def excludes_zero(d: dict[str, float]) -> bool:
    """The interval lies entirely above or entirely below 0."""
    return d["low"] > 0 or d["high"] < 0
