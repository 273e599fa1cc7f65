"""Pruning methods and baselines that select tokens (one file each); importing this package registers them."""

from . import cdpruner, dart, divprune, fastv, fopru, hired, mmtok, pdrop, random, scope, todre, uniform, vispruner  # noqa: F401
