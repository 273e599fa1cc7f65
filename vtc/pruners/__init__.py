"""Pruning methods (one file each); importing this package registers them."""

from . import divprune, fastv, fopru, hired, mmtok, pdrop, pool, random, todre, uniform, visionzip  # noqa: F401
