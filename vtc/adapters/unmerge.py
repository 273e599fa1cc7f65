"""What leaves a vision tower that merges tokens (``Stage.VISION_MERGE``): the merged token set, as LLaVA-1.5's LLM
takes it (:func:`merged_item`), or the full grid again where the model packs one (the merged tokens copied back onto
it: :meth:`vtc.contexts.TowerMerge.unmerge`), with the checks and warnings that go with the latter."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..contexts import Layout, Reduction, Stage, TowerMerge


def check_tower_merge(family: str, method: Any, signals: Sequence[Any], unmerge: bool) -> None:
    """Refuse (or explain) tower merging where the model needs the full grid back (``unmerge``)."""
    if not unmerge or Stage.VISION_MERGE not in method.stages:
        return
    if Stage.LLM_LAYER in method.stages:
        skip = " (tower_stage=False)" if hasattr(method.config, "tower_stage") else ""
        raise ValueError(
            f"{method.name!r} merges inside the vision tower and then prunes the merged token set inside the LLM, but "
            f"the {family} model packs full grids: the merged tokens would be copied back onto them. Run its LLM "
            f"stages alone{skip}, or use a LLaVA-1.5 model"
        )
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


def merged_item(
    merged: TowerMerge, feat: torch.Tensor, proj_in: torch.Tensor, rows: list[int], layout: Layout, strategy: str
) -> tuple[Reduction | None, torch.Tensor, torch.Tensor]:
    """An image whose tokens were merged inside the tower: ``(reduction, tokens [n, D], vision tokens [n, C])``.

    ``feat [k, D]`` are the merged tokens the LLM gets; the image's ``n`` input tokens each take the row of
    the group they ended in (what the uncompressed positions now hold), so ``ImageTokens.n`` stays ``n``.
    """
    if len(rows) != 1:
        raise RuntimeError("token merging in the tower needs one tower row per image")
    (row,) = rows
    groups, anchors = merged.consumer_view(0 if strategy == "full" else layout.prefix)
    groups, anchors = groups[row].to(feat.device), anchors[row].to(feat.device)
    if groups.numel() != layout.num_tokens or anchors.numel() != feat.shape[0]:
        raise RuntimeError(
            f"the merged tower output has {feat.shape[0]} tokens for {groups.numel()} inputs, but the image's "
            f"layout has {layout.num_tokens} (bug in the tower merge)"
        )
    red = Reduction(index=anchors, tokens=feat, groups=groups) if feat.shape[0] < layout.num_tokens else None
    return red, feat[groups], proj_in[row].to(feat.device)[groups]
