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


def assign(
    placeholders: torch.Tensor, lengths: Sequence[int], what: str = "image", segmented: bool = False
) -> list[tuple[int, torch.Tensor]]:
    """Give each image (in batch order) the next ``n`` placeholders; returns ``(sample, rows)`` per image.

    An image's placeholders are one contiguous run, unless ``segmented``: then they may span several runs of
    its sample with text between them (Qwen3-VL writes every video frame as its own block behind a text
    timestamp), never two samples.
    """
    total, expected = int(placeholders.sum()), int(sum(lengths))
    if total != expected:
        raise ValueError(
            f"the prompt has {total} {what} placeholder tokens but the {what}s give {expected} visual tokens; "
            f"build inputs with the model's processor so every <{what}> is expanded"
        )
    rows = [torch.nonzero(row).flatten() for row in placeholders]
    out, b, used = [], 0, 0
    for n in lengths:
        while used == rows[b].numel():
            b, used = b + 1, 0
        if used + n > rows[b].numel():
            raise ValueError(f"a {what}'s placeholder tokens span two prompts of the batch")
        mine = rows[b][used : used + n]
        if n and not segmented and int(mine[-1] - mine[0]) != n - 1:
            raise ValueError(f"a {what}'s placeholder tokens are not contiguous in the prompt")
        out.append((b, mine))
        used += n
    return out


def segments(rows: torch.Tensor) -> list[tuple[int, int]]:
    """The contiguous pieces of sorted ``rows`` as ``(offset into rows, length)``."""
    if rows.numel() == 0:
        return []
    breaks = (torch.nonzero(rows[1:] - rows[:-1] != 1).flatten() + 1).tolist()
    bounds = [0, *breaks, int(rows.numel())]
    return [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def token_segments(rows: torch.Tensor, red: Reduction | None) -> torch.Tensor:
    """``[k]`` for each output token of an image whose placeholders are ``rows``, the segment it belongs to: its
    anchor's segment; a token without a source joins the segment of the token before it (the first: 0)."""
    n = int(rows.numel())
    seg_of_input = torch.zeros(n, dtype=torch.long)
    for s, (offset, length) in enumerate(segments(rows)):
        seg_of_input[offset : offset + length] = s
    anchors = torch.arange(n) if red is None else red.index.cpu()
    out = torch.where(anchors >= 0, seg_of_input[anchors.clamp_min(0)], torch.full_like(anchors, -1))
    for t in range(out.numel()):  # source-less tokens: the segment of the previous token
        if out[t] < 0:
            out[t] = out[t - 1] if t else 0
    return out


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
    images: Sequence[tuple[int, torch.Tensor]],
    reductions: Sequence[Reduction | None],
    pad_id: int,
    policy: str,
    side: str,
    rows: Mapping[str, tuple[torch.Tensor, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], list[list[int]]]:
    """Rebuild a batch of prompts after each image's placeholders are reduced.

    Args:
        input_ids, attention_mask: ``[B, L]``.
        base_positions: ``[..., B, L]`` positions the stock model would use for the full prompt (1-D RoPE:
            ``[B, L]``; M-RoPE: ``[C, B, L]``).
        images: per image ``(sample, rows)``: its placeholder rows of ``input_ids[sample]`` (ascending; one
            contiguous run, or several segments with text between them).
        reductions: per image; None keeps its rows unchanged. A segmented image's output tokens must be in
            segment order (:func:`token_segments` nondecreasing): each segment's tokens take its place.
        pad_id: id of the padding rows added when samples end up with different lengths.
        policy: ``"original"`` keeps each kept row's base position; ``"compact"`` subtracts the number of
            tokens removed before it (1-D positions only).
        side: ``"left"`` or ``"right"``: where padding goes when samples end up with different lengths. The
            caller's own padding rows (``attention_mask == 0``) are dropped first, so the new batch is as long
            as its longest compressed sample, not as the uncompressed batch's padding made it.
        rows: other ``[B, L]`` inputs aligned with the prompt rows (labels, token types), each with the fill
            value of new padding; they take the same rows as the ids.

    Returns:
        ``(input_ids, attention_mask, positions, rows, source_positions)`` of the new batch, where
        ``source_positions[b][r]`` is the input position row ``r`` came from (-1: added padding, or a
        merged / source-less visual row). A visual row keeps its segment's placeholder id.
    """
    bsz, _ = input_ids.shape
    device = input_ids.device
    if policy == "compact" and base_positions.dim() != 2:
        raise ValueError("compact positions are only defined for 1-D position ids")
    # per sample, every segment of every image: (first row, length, the image's take / src rows of that segment)
    pieces: list[list[tuple[int, int, torch.Tensor, torch.Tensor]]] = [[] for _ in range(bsz)]
    for (sample, image_rows), red in zip(images, reductions, strict=True):
        image_rows = image_rows.to(device)
        n = int(image_rows.numel())
        parts = segments(image_rows)
        if red is None:
            take = src = image_rows
        else:
            anchor = red.index.to(device)
            has = anchor >= 0
            src = torch.where(has, image_rows[anchor.clamp_min(0)], torch.full_like(anchor, -1))
            if red.tokens is not None:  # merged rows have no single source
                merged = red.resolve_groups(n).to(device)
                sizes = torch.bincount(merged[merged >= 0], minlength=int(anchor.numel()))
                src = torch.where(sizes == 1, src, torch.full_like(src, -1))
            take = torch.where(has, image_rows[anchor.clamp_min(0)], torch.full_like(anchor, -1))
        seg = token_segments(image_rows.cpu(), red).to(device)
        if seg.numel() and bool((seg[1:] < seg[:-1]).any()):
            raise ValueError("an image's output tokens are not in the order of its prompt segments")
        for s, (offset, length) in enumerate(parts):
            first = int(image_rows[offset])
            mine = seg == s
            t = torch.where(take[mine] >= 0, take[mine], torch.full_like(take[mine], first))  # source-less: its id
            pieces[sample].append((first, length, t, src[mine]))

    take_rows, src_rows, pos_rows = [], [], []
    for b in range(bsz):
        takes, srcs, poss = [], [], []
        cursor, removed = 0, 0
        real = attention_mask[b].to(device) != 0  # the caller's padding rows are dropped, then padded anew
        for start, n, take, src in sorted(pieces[b], key=lambda p: p[0]):
            text = torch.arange(cursor, start, device=device)[real[cursor:start]]
            takes.append(text)
            srcs.append(text)
            poss.append(base_positions[..., b, text] - (removed if policy == "compact" else 0))
            k = int(take.numel())
            takes.append(take)
            srcs.append(src)
            if policy == "compact":
                poss.append(base_positions[..., b, start] - removed + torch.arange(k, device=device))
            else:
                poss.append(base_positions[..., b, take])
            removed += n - k
            cursor = start + n
        tail = torch.arange(cursor, input_ids.shape[1], device=device)[real[cursor:]]
        takes.append(tail)
        srcs.append(tail)
        poss.append(base_positions[..., b, tail] - (removed if policy == "compact" else 0))
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
