"""vtc.viz: every picture comes from the record, and the highlighted cells are exactly the kept ones."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import vtc
from vtc import viz
from vtc.demo import default_image
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


def test_show_merges_colours_groups():
    record, _ = _record("llava", method="pool")
    (im,) = record.images
    groups = viz.group_colours(im)
    assert set(np.unique(groups).tolist()) == set(range(len(im.kept)))  # every cell is in one pooled token
    _not_blank(viz.show_merges(default_image(), record, size=96))


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


def test_compare_and_budget_curve():
    records = {m: _record("llava", method=m)[0] for m in ("hired", "random", "uniform")}
    _not_blank(viz.compare(default_image(), records, size=96, columns=3))
    rows = [
        {"method": m, "budget": b, "accuracy": a}
        for m, base in (("random", 0.6), ("pool", 0.7))
        for b, a in ((0.05, base - 0.2), (0.25, base - 0.1), (0.5, base))
    ]
    fig = viz.budget_curve({"results": rows})
    _not_blank(fig)
    (ax,) = fig.axes
    assert sorted(line.get_label() for line in ax.get_lines()) == ["pool", "random"]
    with pytest.raises(ValueError, match="prefill"):
        viz.budget_curve(rows, metric="prefill")


def test_figures_leave_no_global_state():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    record, _ = _record("llava")
    viz.show_kept(default_image(), record, size=64)
    assert plt.get_fignums() == before
