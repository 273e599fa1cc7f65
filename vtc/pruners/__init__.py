"""Pruning methods (one file each); importing this package registers them."""

from . import divprune, fopru, hired, mmtok, pool, random, uniform, visionzip  # noqa: F401
