"""The one place that interprets a token budget.

A budget is either

* a float in (0, 1]: the fraction of an image's visual tokens that the LLM keeps once every stage of a
  method has run, or
* an int >= 1: an absolute number of visual tokens kept per image (per video for video inputs).

For an image whose uncompressed model feeds ``n`` visual tokens to the LLM, the number kept is
``k = max(1, floor(budget * n + 0.5))`` for a fraction (round half up, never zero) and ``min(budget, n)``
for a count. ``k == n`` means the image passes through untouched, for every method: this is what makes
``budget=1.0`` reproduce the uncompressed model exactly.

Methods never interpret a budget themselves; they receive ``k`` (and, for multi-stage methods, call the
helpers below).
"""

from __future__ import annotations

import math
import numbers

Budget = float | int

__all__ = ["Budget", "validate_budget", "keep_count", "split_count", "stage_counts", "describe_budget"]


def validate_budget(budget: object) -> Budget:
    """Check a user-supplied budget and return it as a plain ``float`` or ``int``.

    Raises:
        TypeError: for anything that is not a real number (strings, bools, tensors, None).
        ValueError: for NaN, infinities, fractions outside (0, 1] and counts below 1.
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(
            f"budget must be a float in (0, 1] (fraction of visual tokens kept) or an int >= 1 (tokens kept "
            f"per image), got {budget!r} of type {type(budget).__name__}. Example: budget=0.2 or budget=64."
        )
    if isinstance(budget, numbers.Integral):
        value = int(budget)
        if value < 1:
            raise ValueError(
                f"budget={value} keeps no tokens: an integer budget is a token count and must be >= 1; "
                f"for a fraction pass a float in (0, 1], e.g. 0.2."
            )
        return value
    value = float(budget)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"budget must be a finite number, got {value!r}.")
    if not 0.0 < value <= 1.0:
        hint = (
            f" For an absolute token count pass an int, e.g. budget={int(value)}."
            if value > 1 and value.is_integer()
            else ""
        )
        raise ValueError(
            f"a float budget is the fraction of visual tokens kept and must be in (0, 1], got {value}.{hint}"
        )
    return value


def keep_count(budget: Budget, n: int) -> int:
    """Number of visual tokens kept out of ``n`` under ``budget`` (see the module docstring)."""
    if n < 0:
        raise ValueError(f"token count must be >= 0, got {n}")
    if n == 0:
        return 0
    if isinstance(budget, int):
        return min(budget, n)
    return min(n, max(1, math.floor(budget * n + 0.5)))


def describe_budget(budget: Budget) -> str:
    """Human-readable form used in tables and records."""
    if isinstance(budget, int):
        return f"{budget} tokens"
    return f"{budget:.4g} of tokens"


def split_count(k: int, weights: list[float] | list[int]) -> list[int]:
    """Split ``k`` tokens across parts in proportion to ``weights`` (largest-remainder rounding).

    The result sums to exactly ``min(k, sum(weights))`` when weights are part sizes, never exceeds a part's
    size when weights are sizes, and ties in the remainder go to the earlier part.
    """
    if k < 0 or any(w < 0 for w in weights):
        raise ValueError("k and weights must be non-negative")
    total = float(sum(weights))
    if total == 0 or k == 0:
        return [0] * len(weights)
    quotas = [k * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: k - sum(counts)]:
        counts[i] += 1
    return counts


def stage_counts(budget: Budget, n: int, stages: int) -> list[int]:
    """Visual tokens kept after each of ``stages`` geometric stages, ending at ``keep_count(budget, n)``.

    Stage ``s`` (1-based) keeps ``floor(n * r**s)`` with ``r = (k / n) ** (1 / stages)``, and the last stage
    keeps exactly ``k``. PyramidDrop's official schedule (ratio 0.5 at three stages: n/2, n/4, n/8) is
    ``budget=0.125``.
    """
    if stages < 1:
        raise ValueError("stages must be >= 1")
    k = keep_count(budget, n)
    if n == 0:
        return [0] * stages
    ratio = (k / n) ** (1.0 / stages)
    counts = [max(k, min(n, math.floor(n * ratio**s + 1e-9))) for s in range(1, stages)]
    return [*counts, k]
