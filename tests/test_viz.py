"""vtc.apps.viz: every picture comes from the record, and the highlighted cells are exactly the kept ones."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import vtc
from vtc.apps import viz
from vtc.apps.demo import default_image
from vtc.testing import FAMILIES

IMAGE_FAMILIES = [name for name, fam in FAMILIES.items() if fam.modality == "image"]
VIDEO = [name for name, fam in FAMILIES.items() if fam.modality == "video"]


def _record(name, method="hired", budget=0.25):
    family = FAMILIES[name]
    model = family.build(seed=0)
    inputs = family.inputs(model, ((3, 4),), seed=1)
    with vtc.compressed(model, method, budget=budget):
        with torch.no_grad():
            model(**inputs)
        return vtc.last_record(model), inputs


def _png(fig) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"), dtype=np.float32)


def _not_blank(fig):
    pixels = _png(fig)
    assert pixels.std() > 10, "rendered figure is blank"


def _check_cells(picture: Image.Image, record, partition):
    """Dropped cells are dimmed, kept cells keep their brightness, missing cells are grey: as the record says."""
    drawn = viz.overlay(picture, record, partition, outline=False).astype(np.float32)
    base = np.asarray(picture.convert("RGB"), dtype=np.float32)
    mask = viz.kept_mask(record, partition)
    rows, cols = mask.shape
    h, w = base.shape[:2]
    seen = set()
    for r in range(rows):
        for c in range(cols):
            y0, y1, x0, x1 = r * h // rows, (r + 1) * h // rows, c * w // cols, (c + 1) * w // cols
            before, after = base[y0:y1, x0:x1].mean(), drawn[y0:y1, x0:x1].mean()
            if mask[r, c] == 1:
                assert after == pytest.approx(before, abs=0.5)
            elif mask[r, c] == 0:
                assert after == pytest.approx(0.25 * before, abs=0.5)
            seen.add(int(mask[r, c]))
    kept_cells = {
        record.slot[t] - record.prefix
        for t, g in enumerate(record.groups)
        if g >= 0 and record.partition[t] == partition and record.slot[t] >= record.prefix
    }
    assert set(np.flatnonzero(mask == 1).tolist()) == kept_cells
    return seen


@pytest.mark.parametrize("name", IMAGE_FAMILIES)
def test_show_kept_highlights_exactly_the_kept_cells(name):
    record, _ = _record(name)
    image = default_image()
    (im,) = record.images
    pictures = viz.views(image, im, size=96)
    for _, picture, parts in pictures:
        if len(parts) == 1:
            _check_cells(picture, im, parts[0])
        else:  # the crop canvas: one tile per crop partition
            g_h, g_w = im.arrangement
            tw, th = picture.width // g_w, picture.height // g_h
            for i, p in enumerate(parts):
                r, c = divmod(i, g_w)
                _check_cells(picture.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th)), im, p)
    _not_blank(viz.show_kept(image, record, size=96))
    if im.arrangement:
        assert len(pictures) == 2  # base view + crops, as the model saw them


def _panels(fig) -> list[np.ndarray]:
    """The pixel arrays the figure's axes show, in axes order."""
    return [np.asarray(ax.get_images()[0].get_array()) for ax in fig.axes if ax.get_images()]


def _tiles(picture: Image.Image, im, parts):
    """``(partition, tile box)`` of every partition drawn on a view (one tile, or the crop canvas)."""
    if len(parts) == 1:
        return [(parts[0], (0, 0, picture.width, picture.height))]
    g_h, g_w = im.arrangement
    tw, th = picture.width // g_w, picture.height // g_h
    boxes = []
    for i, p in enumerate(parts):
        r, c = divmod(i, g_w)
        boxes.append((p, (c * tw, r * th, (c + 1) * tw, (r + 1) * th)))
    return boxes


@pytest.mark.parametrize("name", IMAGE_FAMILIES)
def test_show_merges_colours_exactly_the_record_groups(name):
    """Every cell shows its merge group's colour (tinted over the picture), dropped cells are darkened."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    record, _ = _record(name, method="pool")
    (im,) = record.images
    image = default_image()
    fig = viz.show_merges(image, record, size=96)
    _not_blank(fig)
    panels = _panels(fig)
    views = viz.views(image, im, size=96)
    assert len(panels) == len(views)
    seen_groups = set()
    for panel, (_, picture, parts) in zip(panels, views, strict=True):
        base_all = np.asarray(picture.convert("RGB"), dtype=np.float32)
        for p, (x0, y0, x1, y1) in _tiles(picture, im, parts):
            groups = viz.group_colours(im, p)
            rows, cols = groups.shape
            base, drawn = base_all[y0:y1, x0:x1], panel[y0:y1, x0:x1].astype(np.float32)
            h, w = base.shape[:2]
            for r in range(rows):
                for c in range(cols):
                    ys, xs = slice(r * h // rows, (r + 1) * h // rows), slice(c * w // cols, (c + 1) * w // cols)
                    g = groups[r, c]
                    want = (
                        0.2 * base[ys, xs] if g < 0 else 0.45 * base[ys, xs] + 0.55 * 255 * np.array(cmap(g % 20)[:3])
                    )
                    assert np.abs(drawn[ys, xs] - want).max() <= 1.0, (p, r, c, g)
                    seen_groups.add(int(g))
    # pooling: every fed token stands for at least one cell, and only fed tokens colour cells
    assert {g for g in seen_groups if g >= 0} == set(range(len(im.kept)))


@pytest.mark.parametrize("name", IMAGE_FAMILIES)
def test_compare_draws_each_method_exactly_as_recorded(name):
    records = {m: _record(name, method=m)[0] for m in ("hired", "random")}
    image = default_image()
    fig = viz.compare(image, records, size=96, columns=2)
    _not_blank(fig)
    panels = _panels(fig)
    assert len(panels) == 2
    for panel, (method, record) in zip(panels, records.items(), strict=True):
        (im,) = record.images
        _, picture, parts = viz.views(image, im, size=96)[0]
        for p, box in _tiles(picture, im, parts):
            tile = picture.crop(box)
            x0, y0, x1, y1 = box
            # the panel is the checked overlay: dimmed exactly where the record dropped tokens
            assert np.array_equal(panel[y0:y1, x0:x1], viz.overlay(tile, im, p)), method
            _check_cells(tile, im, p)
    assert [ax.get_title() for ax in fig.axes if ax.get_images()] == [
        f"{m}: {len(r.images[0].kept)} of {r.images[0].num_input} tokens" for m, r in records.items()
    ]


@pytest.mark.parametrize("name", VIDEO)
def test_show_video_counts_per_frame(name):
    record, inputs = _record(name, method="holitom", budget=0.5)
    (im,) = record.images
    frames = [np.full((48, 48, 3), 40 * (t + 1), dtype=np.uint8) for t in range(len(im.grids))]
    fig = viz.show_video(frames, record, size=48)
    _not_blank(fig)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    for t, title in enumerate(titles):
        fed = sum(1 for token in im.kept if token >= 0 and im.partition[token] == t)
        covered = int((viz.kept_mask(im, t) == 1).sum())
        rows, cols = im.grids[t]
        assert title == f"frame {t}: {fed} fed, {covered}/{rows * cols} covered"
    assert sum(viz.fed_in_frame(im, t) for t in range(len(im.grids))) == sum(
        1 for t in im.kept if im.partition[t] >= 0
    )
    spans = viz.temporal_spans(im)
    assert all(len(frames_) > 1 for frames_ in spans.values())
    with pytest.raises(ValueError, match="frames"):
        viz.show_video(frames[:-1], record)


def test_budget_curve_draws_one_line_per_method_from_the_results():
    rows = [
        {"method": m, "budget": b, "accuracy": a}
        for m, base in (("random", 0.6), ("pool", 0.7))
        for b, a in ((0.05, base - 0.2), (0.25, base - 0.1), (0.5, base))
    ]
    fig = viz.budget_curve({"results": rows})
    _not_blank(fig)
    (ax,) = fig.axes
    assert sorted(line.get_label() for line in ax.get_lines()) == ["pool", "random"]
    for line in ax.get_lines():  # the plotted points are the results' rows, sorted by budget
        expected = sorted((r["budget"], r["accuracy"]) for r in rows if r["method"] == line.get_label())
        assert list(zip(line.get_xdata(), line.get_ydata(), strict=True)) == expected
    with pytest.raises(ValueError, match="prefill"):
        viz.budget_curve(rows, metric="prefill")


def test_figures_leave_no_global_state():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    record, _ = _record("llava")
    viz.show_kept(default_image(), record, size=64)
    assert plt.get_fignums() == before
