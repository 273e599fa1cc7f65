"""Pictures of what a method kept and merged, drawn from a :class:`vtc.Record` only.

Every function takes the picture(s) the model saw plus a record and returns a ``matplotlib.figure.Figure``
(no pyplot state; save with ``fig.savefig(path)``). The overlays themselves are plain arrays, so what is
drawn can be checked against the record:

* :func:`final_groups` — per input token, the row that still stands for it after the method's *last* stage
  (for in-LLM methods, the rows left from their last prune layer on: ``ImageRecord.layers``);
* :func:`kept_mask` — per partition, which grid cells reach the LLM's last stage (alone or inside a merged token);
* :func:`overlay` — the partition's picture with dropped cells dimmed and fed tokens outlined;
* :func:`show_kept`, :func:`show_merges`, :func:`show_video`, :func:`compare`, :func:`budget_curve`;
* :func:`seen_frames` — a video's frames as the model saw them, from its ``pixel_values_videos``.

Grids: LLaVA-1.5 is one 24 x 24 partition; LLaVA-NeXT shows the base view and the crop canvas as the
model saw them (the canvas is the image fitted into the ``g_h x g_w`` tiles and centred, as the processor
pads it; cells the model unpadded away are hatched grey); Qwen2-VL shows its 2 x 2 patch groups on the
image's own grid; a video is a strip of frames. ``kept_overlay`` and ``contact_sheet`` need only Pillow
(they serve ``vtc demo``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..record import ImageRecord, Record

OUTLINE = (255, 214, 0)


# -- geometry ---------------------------------------------------------------------------------------------
def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shortest side to ``size`` and center-crop to ``size x size`` (CLIP preprocessing)."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.convert("RGB").resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def fit_canvas(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit ``image`` inside a ``width x height`` canvas keeping its aspect ratio, centred on black."""
    image = image.convert("RGB")
    scale = min(width / image.width, height / image.height)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(resized, ((width - resized.width) // 2, (height - resized.height) // 2))
    return canvas


def last_layer(record: ImageRecord) -> int | None:
    """The LLM layer from which the method's last in-LLM stage holds (None: no in-LLM stage acted)."""
    return max((int(k) for k in record.layers), default=None)


def final_groups(record: ImageRecord, stage: str = "last") -> list[int]:
    """Per input token, the output row that stands for it at ``stage``, -1 if none.

    ``stage="pre_llm"``: the rows fed to the LLM (``record.groups``); ``"last"``: those that are still there
    after the method's last stage (for in-LLM methods, the rows whose anchor ``ImageRecord.layers`` lists at
    the last prune layer; a row merged away there, as HoliTom's inner merge does, counts as gone).
    """
    layer = last_layer(record) if stage == "last" else None
    if layer is None:
        return list(record.groups)
    alive = set(record.layers[str(layer)])
    return [g if g >= 0 and record.kept[g] in alive else -1 for g in record.groups]


def final_tokens(record: ImageRecord, stage: str = "last") -> list[int]:
    """The tokens fed to the LLM (their anchors, ``record.kept`` order) that are still there at ``stage``."""
    rows = set(final_groups(record, stage))
    return [t for g, t in enumerate(record.kept) if g in rows]


def kept_mask(record: ImageRecord, partition: int = 0, stage: str = "last") -> np.ndarray:
    """``[rows, cols]`` int8 per grid cell of ``partition``: 1 still in the LLM at ``stage`` (kept or merged; see
    :func:`final_groups`), 0 dropped, -1 no token (cut by unpadding)."""
    rows, cols = record.grids[partition]
    groups = final_groups(record, stage)
    mask = np.full(rows * cols, -1, dtype=np.int8)
    for token, (p, slot) in enumerate(zip(record.partition, record.slot, strict=True)):
        if p == partition and slot >= record.prefix:
            mask[slot - record.prefix] = 1 if groups[token] >= 0 else 0
    return mask.reshape(rows, cols)


def _cells(width: int, height: int, rows: int, cols: int):
    for r in range(rows):
        for c in range(cols):
            yield r, c, (c * width // cols, r * height // rows, (c + 1) * width // cols, (r + 1) * height // rows)


def overlay(
    image: Image.Image,
    record: ImageRecord,
    partition: int = 0,
    dim: float = 0.25,
    outline: bool = True,
    stage: str = "last",
) -> np.ndarray:
    """``[H, W, 3]`` uint8: the partition's picture with the cells dropped by ``stage`` dimmed (the last stage by
    default: :func:`final_groups`), missing cells grey, and the anchor cell of every token left outlined."""
    rows, cols = record.grids[partition]
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base.copy()
    mask = kept_mask(record, partition, stage)
    h, w = base.shape[:2]
    for r, c, (x0, y0, x1, y1) in _cells(w, h, rows, cols):
        if mask[r, c] == 0:
            out[y0:y1, x0:x1] *= dim
        elif mask[r, c] < 0:
            out[y0:y1, x0:x1] = 96
            out[y0:y1:4, x0:x1] = 140  # hatching: no token here
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if outline:
        draw = ImageDraw.Draw(picture)
        width = max(1, w // (cols * 10))
        for token in final_tokens(record, stage):
            if token < 0 or record.partition[token] != partition or record.slot[token] < record.prefix:
                continue
            r, c = divmod(record.slot[token] - record.prefix, cols)
            draw.rectangle(
                (c * w // cols, r * h // rows, (c + 1) * w // cols - 1, (r + 1) * h // rows - 1),
                outline=OUTLINE,
                width=width,
            )
    return np.asarray(picture)


def group_colours(record: ImageRecord, partition: int = 0, stage: str = "last") -> np.ndarray:
    """``[rows, cols]`` output row (merge group) of every cell at ``stage``, -1 if dropped or missing."""
    rows, cols = record.grids[partition]
    groups = final_groups(record, stage)
    out = np.full(rows * cols, -1, dtype=np.int64)
    for token, (p, slot) in enumerate(zip(record.partition, record.slot, strict=True)):
        if p == partition and slot >= record.prefix:
            out[slot - record.prefix] = groups[token]
    return out.reshape(rows, cols)


# -- what the model saw -------------------------------------------------------------------------------------
def views(image: Image.Image, record: ImageRecord, size: int = 336) -> list[tuple[str, Image.Image, list[int]]]:
    """The pictures the model saw for ``record``: ``(title, picture, partitions drawn on it)``.

    LLaVA-NeXT: the base view (partition 0) and the crop canvas (all crops, as one picture); otherwise one
    view per partition (LLaVA-1.5 and Qwen: one; videos: see :func:`show_video`). Tiles whose place in the
    picture the call does not give (InternVL: its processor keeps the tile grid to itself) are each drawn over
    the whole picture, titled ``tile i``.
    """
    if record.arrangement:
        g_h, g_w = record.arrangement
        canvas = fit_canvas(image, g_w * size, g_h * size)
        return [("base view", fit_square(image, size), [0]), ("crops", canvas, list(range(1, 1 + g_h * g_w)))]

    def fit(rows: int, cols: int) -> Image.Image:
        if rows == cols:
            return fit_square(image, size)
        return image.convert("RGB").resize((size * cols // max(rows, cols), size * rows // max(rows, cols)))

    if len(record.grids) == 1:
        return [("image", fit(*record.grids[0]), [0])]
    return [(f"tile {p}", fit(*grid), [p]) for p, grid in enumerate(record.grids)]


def _canvas_overlay(picture: Image.Image, record: ImageRecord, parts: list[int], merges: bool) -> np.ndarray:
    if len(parts) == 1:
        return overlay(picture, record, parts[0]) if not merges else _merge_overlay(picture, record, parts[0])
    g_h, g_w = record.arrangement
    tile_w, tile_h = picture.width // g_w, picture.height // g_h
    out = np.asarray(picture.convert("RGB")).copy()
    for i, p in enumerate(parts):
        r, c = divmod(i, g_w)
        tile = picture.crop((c * tile_w, r * tile_h, (c + 1) * tile_w, (r + 1) * tile_h))
        drawn = overlay(tile, record, p) if not merges else _merge_overlay(tile, record, p)
        out[r * tile_h : (r + 1) * tile_h, c * tile_w : (c + 1) * tile_w] = drawn
    return out


def _merge_overlay(picture: Image.Image, record: ImageRecord, partition: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    rows, cols = record.grids[partition]
    groups = group_colours(record, partition)
    out = np.asarray(picture.convert("RGB"), dtype=np.float32).copy()
    h, w = out.shape[:2]
    for r, c, (x0, y0, x1, y1) in _cells(w, h, rows, cols):
        g = groups[r, c]
        if g < 0:
            out[y0:y1, x0:x1] *= 0.2
        else:
            colour = np.array(cmap(g % 20)[:3]) * 255
            out[y0:y1, x0:x1] = 0.45 * out[y0:y1, x0:x1] + 0.55 * colour
    return out.clip(0, 255).astype(np.uint8)


def _figure(panels: int, width: float = 4.0, height: float = 4.0, rows: int = 1):
    from matplotlib.figure import Figure

    cols = (panels + rows - 1) // rows
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes:
        ax.axis("off")
    return fig, axes


def _title(record: ImageRecord, name: str | None = None) -> str:
    """``"name: k of n tokens"``; for an in-LLM stage, the tokens left from its last layer on and how many the
    LLM received."""
    head = f"{name + ': ' if name else ''}"
    layer = last_layer(record)
    if layer is None:
        return f"{head}{len(record.kept)} of {record.num_input} tokens"
    left = len(final_tokens(record))
    return f"{head}{left} of {record.num_input} tokens from LLM layer {layer} ({len(record.kept)} before)"


# -- figures ---------------------------------------------------------------------------------------------
def _show(image: Image.Image, record: ImageRecord | Record, size: int, title: str | None, merges: bool):
    record = record.images[0] if isinstance(record, Record) else record
    pics = views(image, record, size)
    fig, axes = _figure(len(pics))
    for ax, (name, picture, parts) in zip(axes, pics, strict=False):
        ax.imshow(_canvas_overlay(picture, record, parts, merges=merges))
        ax.set_title(name if len(pics) > 1 else (title or _title(record)), fontsize=9)
    if len(pics) > 1:
        fig.suptitle(title or _title(record), fontsize=10)
    return fig


def show_kept(image: Image.Image, record: ImageRecord | Record, size: int = 336, title: str | None = None):
    """The image as the model saw it, dropped tokens dimmed, fed tokens outlined. Returns a Figure."""
    return _show(image, record, size, title, merges=False)


def show_merges(image: Image.Image, record: ImageRecord | Record, size: int = 336, title: str | None = None):
    """Each token fed to the LLM and the input tokens it stands for in one colour; dropped ones dark."""
    return _show(image, record, size, title, merges=True)


def fed_in_frame(record: ImageRecord, partition: int, stage: str = "last") -> int:
    """Tokens left at ``stage`` (:func:`final_tokens`) whose anchor lies in ``partition`` (a frame, for videos)."""
    return sum(1 for t in final_tokens(record, stage) if t >= 0 and record.partition[t] == partition)


def covered(record: ImageRecord, partition: int, stage: str = "last") -> int:
    """Cells of ``partition`` whose token is in the LLM at ``stage``, alone or inside a merged token."""
    return int((kept_mask(record, partition, stage) == 1).sum())


def temporal_spans(record: ImageRecord) -> dict[int, list[int]]:
    """For every output row that stands for tokens of several frames: the frames it covers."""
    frames: dict[int, set[int]] = {}
    for token, group in enumerate(record.groups):
        if group >= 0 and record.partition[token] >= 0:
            frames.setdefault(group, set()).add(record.partition[token])
    return {g: sorted(f) for g, f in frames.items() if len(f) > 1}


def seen_frames(
    pixel_values_videos: Any, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)
) -> list[np.ndarray]:
    """The frames of the first video of ``pixel_values_videos`` (``[B, T, 3, H, W]`` or ``[T, 3, H, W]``, as
    the LLaVA video processors return them) as the model saw them, ``[H, W, 3]`` uint8 each. ``mean`` / ``std``:
    the processor's ``image_mean`` / ``image_std`` (SigLIP's 0.5 by default)."""
    x = np.asarray(pixel_values_videos.float().cpu() if hasattr(pixel_values_videos, "float") else pixel_values_videos)
    x = x[0] if x.ndim == 5 else x  # [T, 3, H, W]
    x = x * np.asarray(std, dtype=np.float32)[:, None, None] + np.asarray(mean, dtype=np.float32)[:, None, None]
    return [np.ascontiguousarray((f.transpose(1, 2, 0) * 255).round().clip(0, 255).astype(np.uint8)) for f in x]


def _frame_view(picture: Image.Image, rows: int, cols: int, size: int, fit: str) -> Image.Image:
    """The frame at the aspect ratio of its token grid, ``size`` px on its long side: resized whole (what a
    processor that resizes to a fixed size, or keeps the aspect ratio, gives the model), or ``fit="crop"``:
    centre-cropped to that aspect first (a processor that crops)."""
    width, height = max(1, round(size * cols / max(rows, cols))), max(1, round(size * rows / max(rows, cols)))
    if fit == "crop":
        scale = max(width / picture.width, height / picture.height)
        big = picture.resize((max(width, round(picture.width * scale)), max(height, round(picture.height * scale))))
        left, top = (big.width - width) // 2, (big.height - height) // 2
        return big.crop((left, top, left + width, top + height))
    if fit != "resize":
        raise ValueError(f"fit must be 'resize' or 'crop', got {fit!r}")
    return picture.resize((width, height), Image.BICUBIC)


def show_video(
    frames: Sequence[Image.Image | np.ndarray], record: ImageRecord | Record, size: int = 160, fit: str = "resize"
):
    """A strip of frames, each titled with the tokens left at the method's last stage that sit in it and the cells
    they cover; cells merged across frames are tinted blue and the longest spans are named above the strip.

    Each frame is drawn whole at its token grid's aspect ratio, as a processor that resizes gives it to the
    model (LLaVA-OneVision, Qwen2-VL); ``fit="crop"`` centre-crops it first (a processor that crops, such as
    LLaVA-NeXT-Video's). :func:`seen_frames` gives the exact frames from the model's inputs.
    """
    record = record.images[0] if isinstance(record, Record) else record
    n_frames = len(record.grids)
    if len(frames) != n_frames:
        raise ValueError(f"the record has {n_frames} frames (partitions) but {len(frames)} pictures were given")
    spans = temporal_spans(record)
    fig, axes = _figure(n_frames, width=2.2, height=2.6)
    for t, (ax, frame) in enumerate(zip(axes, frames, strict=False)):
        picture = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
        rows, cols = record.grids[t]
        view = _frame_view(picture.convert("RGB"), rows, cols, size, fit)
        drawn = overlay(view, record, t).astype(np.float32)
        groups = group_colours(record, t)
        for r, c, (x0, y0, x1, y1) in _cells(view.width, view.height, rows, cols):
            if groups[r, c] in spans:  # stands for tokens of several frames: tint it
                drawn[y0:y1, x0:x1] = 0.5 * drawn[y0:y1, x0:x1] + 0.5 * np.array([0, 160, 255])
        ax.imshow(drawn.clip(0, 255).astype(np.uint8))
        ax.set_title(
            f"frame {t}: {fed_in_frame(record, t)} fed, {covered(record, t)}/{rows * cols} covered", fontsize=8
        )
    if spans:
        longest = sorted(spans.values(), key=len, reverse=True)[:4]
        fig.suptitle(
            "blue: merged across frames, e.g. " + "; ".join(f"frames {s[0]}-{s[-1]}" for s in longest), fontsize=8
        )
    return fig


def compare(image: Image.Image, records: Mapping[str, ImageRecord | Record], size: int = 256, columns: int = 4):
    """The same image under several methods (one record each) side by side, first view of each."""
    names = list(records)
    rows = (len(names) + columns - 1) // columns
    fig, axes = _figure(len(names), width=3.0, height=3.2, rows=rows)
    for ax, name in zip(axes, names, strict=False):
        record = records[name]
        record = record.images[0] if isinstance(record, Record) else record
        _, picture, parts = views(image, record, size)[0]
        ax.imshow(_canvas_overlay(picture, record, parts, merges=False))
        ax.set_title(_title(record, name), fontsize=9)
    return fig


def budget_curve(
    results: Sequence[Mapping[str, Any]] | Mapping[str, Any], metric: str = "accuracy", x: str = "budget"
):
    """One line per method of ``metric`` against ``x`` from benchmark results (a list of row dicts, or a dict
    with a ``"results"`` list); rows without the metric are skipped."""
    from matplotlib.figure import Figure

    rows = results["results"] if isinstance(results, Mapping) else results
    by_method: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get(metric) is None or row.get(x) is None:
            continue
        by_method.setdefault(str(row["method"]), []).append((float(row[x]), float(row[metric])))
    if not by_method:
        raise ValueError(f"no rows with both {x!r} and {metric!r}")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for method, points in sorted(by_method.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# -- Pillow-only pieces for `vtc demo` ---------------------------------------------------------------------
def kept_overlay(image: Image.Image, record: ImageRecord, partition: int = 0, dim: float = 0.25) -> Image.Image:
    """:func:`overlay` as a PIL image."""
    return Image.fromarray(overlay(image, record, partition, dim))


def contact_sheet(tiles: list[tuple[str, Image.Image]], columns: int = 4) -> Image.Image:
    """Label and tile several overlays into one picture (no more columns than tiles; labels sized to the tiles)."""
    from PIL import ImageFont

    w, h = tiles[0][1].size
    columns = max(1, min(columns, len(tiles)))
    size = max(12, min(24, w // 16))
    font = ImageFont.load_default(size=size)
    label = size + 8
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * (h + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, tile) in enumerate(tiles):
        x, y = (i % columns) * w, (i // columns) * (h + label)
        draw.text((x + 4, y + 4), name, fill="black", font=font)
        sheet.paste(tile, (x, y + label))
    return sheet
