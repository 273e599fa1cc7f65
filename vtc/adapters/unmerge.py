"""Where a family's tower can host a method that merges inside it (``Stage.VISION_MERGE``), and what to say when
the model needs the full grid back (the merged tokens are copied onto it: :meth:`vtc.contexts.TowerMerge.unmerge`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from ..contexts import Stage


def check_tower_merge(family: str, method: Any, signals: Sequence[Any], unmerge: bool) -> None:
    """Refuse (or explain) tower merging where the model needs the full grid back (``unmerge``)."""
    if not unmerge or Stage.VISION_MERGE not in method.stages:
        return
    if signals:
        raise ValueError(
            f"{method.name!r} merges inside the {family} vision tower and copies the merged tokens back onto the grid "
            f"the model packs; a member that reads the tower's attention ({', '.join(map(str, signals))}) would read "
            f"merged tokens. Stack tome with a method that reads no tower signal (divprune, dpc_knn, random, pool)"
        )
    if Stage.PRE_LLM not in method.stages and method.config.budget != 1.0:
        warnings.warn(
            f"{method.name!r} on {family} speeds up the vision tower only: its merging blocks run on the budget's "
            f"share of the tokens, then the merged tokens are copied back onto the grid the model packs, so the LLM "
            f"still receives every visual token. Stack a pre-LLM method to reduce those too: "
            f"vtc.compress(model, ['{method.name}', 'divprune'], budget=...)",
            stacklevel=4,
        )
