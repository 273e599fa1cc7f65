"""Prompt surgery shared by the vision-language adapters: placeholder runs, shorter runs spliced back, padding.

The processor expands every image placeholder into ``n`` placeholder ids; images fill the placeholder runs
in batch order. After compression each run holds ``k`` rows, and :func:`splice` rebuilds the batch around
them: ids, mask, positions and every row stream the adapter declares, re-padded on the caller's side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..contexts import ImageTokens, Reduction


def check_prompt(kwargs: Mapping[str, Any]) -> None:
    """A compressed call needs the prompt's ids (to find the placeholders) and the pixels (not features)."""
    if kwargs.get("input_ids") is None:
        raise ValueError(
            "vtc needs input_ids to find the visual placeholders; pass input_ids (not inputs_embeds) "
            "together with the pixel values"
        )
    if kwargs.get("mm_encoder_outputs"):
        raise ValueError("pass pixel values, not pre-computed mm_encoder_outputs, to a compressed model")


def find_runs(mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Contiguous runs of True per row of a ``[B, L]`` bool mask: ``[[(start, length), ...], ...]``."""
    runs = []
    for row in mask.tolist():
        found, start = [], None
        for i, flag in enumerate(row + [False]):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                found.append((start, i - start))
                start = None
        runs.append(found)
    return runs


def assign(placeholders: torch.Tensor, lengths: Sequence[int], what: str = "image") -> list[tuple[int, int]]:
    """Give each image (in batch order) the next ``n`` placeholders; returns ``(sample, start)`` per image."""
    total, expected = int(placeholders.sum()), int(sum(lengths))
    if total != expected:
        raise ValueError(
            f"the prompt has {total} {what} placeholder tokens but the {what}s give {expected} visual tokens; "
            f"build inputs with the model's processor so every <{what}> is expanded"
        )
    spans, queue = [], [(b, start, length) for b, runs in enumerate(find_runs(placeholders)) for start, length in runs]
    run, offset = 0, 0
    for n in lengths:
        b, start, length = queue[run]
        if offset + n > length:
            raise ValueError(f"a {what}'s placeholder tokens are not contiguous in the prompt")
        spans.append((b, start + offset))
        offset += n
        if offset == length:
            run, offset = run + 1, 0
    return spans


def text_after(
    input_ids: torch.Tensor, mask: torch.Tensor | None, visual: torch.Tensor, sample: int, end: int
) -> torch.Tensor:
    """The sample's prompt text after position ``end``: no padding, no visual placeholders."""
    keep = ~visual[sample, end:]
    if mask is not None:
        keep &= mask[sample, end:] != 0
    return input_ids[sample, end:][keep]


def reduced_tokens(image: ImageTokens, red: Reduction | None) -> torch.Tensor:
    """``[k, D]`` the tokens an image contributes to the LLM after its reduction (all of them for None)."""
    if red is None:
        return image.tokens
    if red.tokens is not None:
        return red.tokens.to(image.tokens.dtype)
    return image.tokens[red.index]


def prompt_positions(kwargs: Mapping[str, Any], mask: torch.Tensor, for_generate: bool) -> torch.Tensor:
    """``[B, L]`` the 1-D positions the stock model would give the full prompt (``mask [B, L]``)."""
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"].expand(mask.shape[0], -1)
    if for_generate:  # GenerationMixin._prepare_position_ids_for_generation
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    return (torch.arange(mask.shape[1], device=mask.device) + past).unsqueeze(0).expand(mask.shape[0], -1)


def pad_id(configs: Sequence[Any], placeholders: set[int]) -> int:
    """The first ``pad_token_id`` among ``configs`` that is not a placeholder id (else 0, or 1 if 0 is one)."""
    for cfg in configs:
        pad = getattr(cfg, "pad_token_id", None)
        if isinstance(pad, int) and pad not in placeholders:
            return pad
    return 0 if 0 not in placeholders else 1


def padding_side(attention_mask: torch.Tensor | None, for_generate: bool) -> str:
    """Side to add padding on: the side the caller padded, else left for generate and right for forward."""
    if attention_mask is not None and bool((attention_mask == 0).any()):
        if bool((attention_mask[:, -1] != 0).all()):
            return "left"
        if bool((attention_mask[:, 0] != 0).all()):
            return "right"
    return "left" if for_generate else "right"


def splice(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    base_positions: torch.Tensor,
    images: Sequence[tuple[int, int, int]],
    reductions: Sequence[Reduction | None],
    pad_id: int,
    policy: str,
    side: str,
    rows: Mapping[str, tuple[torch.Tensor, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], list[list[int]]]:
    """Rebuild a batch of prompts after each image's placeholder run is reduced.

    Args:
        input_ids, attention_mask: ``[B, L]``.
        base_positions: ``[..., B, L]`` positions the stock model would use for the full prompt (1-D RoPE:
            ``[B, L]``; M-RoPE: ``[C, B, L]``).
        images: per image ``(sample, start, n)``; the run ``input_ids[sample, start:start+n]``.
        reductions: per image; None keeps the run unchanged.
        pad_id: id of the padding rows added when samples end up with different lengths.
        policy: ``"original"`` keeps each kept row's base position; ``"compact"`` subtracts the number of
            tokens removed before it (1-D positions only).
        side: ``"left"`` or ``"right"``: where padding goes when samples end up with different lengths.
        rows: other ``[B, L]`` inputs aligned with the prompt rows (labels, token types), each with the fill
            value of new padding; they take the same rows as the ids.

    Returns:
        ``(input_ids, attention_mask, positions, rows, source_positions)`` of the new batch, where
        ``source_positions[b][r]`` is the input position row ``r`` came from (-1: added padding, or a
        merged / source-less visual row). A visual row keeps its run's placeholder id.
    """
    bsz, _ = input_ids.shape
    device = input_ids.device
    if policy == "compact" and base_positions.dim() != 2:
        raise ValueError("compact positions are only defined for 1-D position ids")
    per_sample: list[list[tuple[int, int, Reduction | None]]] = [[] for _ in range(bsz)]
    for (sample, start, n), red in zip(images, reductions, strict=True):
        per_sample[sample].append((start, n, red))

    take_rows, src_rows, pos_rows = [], [], []
    for b in range(bsz):
        takes, srcs, poss = [], [], []
        cursor, removed = 0, 0
        for start, n, red in sorted(per_sample[b], key=lambda t: t[0]):
            text = torch.arange(cursor, start, device=device)
            takes.append(text)
            srcs.append(text)
            poss.append(base_positions[..., b, cursor:start] - (removed if policy == "compact" else 0))
            if red is None:
                run = torch.arange(start, start + n, device=device)
                takes.append(run)
                srcs.append(run)
                poss.append(base_positions[..., b, start : start + n] - (removed if policy == "compact" else 0))
                k = n
            else:
                anchor = red.index.to(device)
                k = int(anchor.numel())
                has = anchor >= 0
                src = torch.where(has, anchor + start, torch.full_like(anchor, -1))
                take = torch.where(has, src, torch.full_like(anchor, start))  # source-less rows: the run's id
                if red.tokens is not None:  # merged rows have no single source
                    merged = red.resolve_groups(n).to(device)
                    sizes = torch.bincount(merged[merged >= 0], minlength=k)
                    src = torch.where(sizes == 1, src, torch.full_like(src, -1))
                takes.append(take)
                srcs.append(src)
                if policy == "compact":
                    first = base_positions[..., b, start] - removed
                    poss.append(first + torch.arange(k, device=device))
                else:
                    poss.append(base_positions[..., b, take])
            removed += n - k
            cursor = start + n
        tail = torch.arange(cursor, input_ids.shape[1], device=device)
        takes.append(tail)
        srcs.append(tail)
        poss.append(base_positions[..., b, cursor:] - (removed if policy == "compact" else 0))
        take_rows.append(torch.cat(takes))
        src_rows.append(torch.cat(srcs))
        pos_rows.append(torch.cat(poss, dim=-1))

    new_len = max(int(t.numel()) for t in take_rows)
    lead = base_positions.shape[:-2]
    ids = input_ids.new_full((bsz, new_len), pad_id)
    mask = attention_mask.new_zeros((bsz, new_len))
    pos = base_positions.new_zeros((*lead, bsz, new_len))
    extra = {name: t.new_full((bsz, new_len), fill) for name, (t, fill) in (rows or {}).items()}
    sources = []
    for b in range(bsz):
        take, src = take_rows[b], src_rows[b]
        m = int(take.numel())
        sl = slice(new_len - m, new_len) if side == "left" else slice(0, m)
        ids[b, sl] = input_ids[b, take]
        mask[b, sl] = attention_mask[b, take]
        pos[..., b, sl] = pos_rows[b]
        for name, (t, _) in (rows or {}).items():
            extra[name][b, sl] = t[b, take]
        padded = [-1] * (new_len - m)
        row_src = src.tolist()
        sources.append(padded + row_src if side == "left" else row_src + padded)
    return ids, mask, pos, extra, sources
