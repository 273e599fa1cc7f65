"""Pictures of what a method kept, drawn from a :class:`vtc.Record` only.

``kept_overlay`` needs nothing but Pillow (it serves ``vtc demo``). Dropped tokens are dimmed, tokens that
survive inside a merged token are shown at full brightness, and each token fed to the LLM is outlined at
its anchor cell.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from .record import ImageRecord


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shortest side to ``size`` and center-crop to ``size x size`` (CLIP preprocessing)."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.convert("RGB").resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def kept_overlay(image: Image.Image, record: ImageRecord, partition: int = 0, dim: float = 0.25) -> Image.Image:
    """The image (as the model saw it: one partition's square view) with dropped grid cells dimmed.

    Args:
        image: the picture the partition covers (already cropped to what the model saw).
        record: one image's record.
        partition: which partition's grid to draw.
        dim: brightness multiplier for dropped cells.
    """
    rows, cols = record.grids[partition]
    base = image.convert("RGB")
    w, h = base.size
    dark = base.point(lambda v: int(v * dim))
    out = base.copy()
    draw = ImageDraw.Draw(out)
    anchors = {i for i in record.kept if i >= 0}

    def box(token: int) -> tuple[int, int, int, int]:
        cell = record.slot[token] - record.prefix
        r, c = divmod(cell, cols)
        return (c * w // cols, r * h // rows, (c + 1) * w // cols, (r + 1) * h // rows)

    for token, group in enumerate(record.groups):
        if record.partition[token] != partition or record.slot[token] < record.prefix:
            continue
        if group < 0:
            x0, y0, x1, y1 = box(token)
            out.paste(dark.crop((x0, y0, x1, y1)), (x0, y0))
    for token in anchors:
        if record.partition[token] == partition and record.slot[token] >= record.prefix:
            x0, y0, x1, y1 = box(token)
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 214, 0), width=max(1, w // (cols * 8)))
    return out


def contact_sheet(tiles: list[tuple[str, Image.Image]], columns: int = 4) -> Image.Image:
    """Label and tile several overlays into one picture."""
    w, h = tiles[0][1].size
    label = 18
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * (h + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, tile) in enumerate(tiles):
        x, y = (i % columns) * w, (i // columns) * (h + label)
        draw.text((x + 4, y + 3), name, fill="black")
        sheet.paste(tile, (x, y + label))
    return sheet
