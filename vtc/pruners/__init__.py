"""Pruning methods and baselines that select tokens (one file each); importing this package registers them."""

from . import (  # noqa: F401
    cdpruner,
    dart,
    divprune,
    evs,
    fastv,
    fopru,
    freevideo,
    hired,
    mmtok,
    mustdrop,
    pdrop,
    random,
    scope,
    todre,
    transprune,
    uniform,
    vidcom2,
    vispruner,
)
