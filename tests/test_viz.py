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


def _record(name, method="hired", budget=0.25, **options):
    family = FAMILIES[name]
    model = family.build(seed=0)
    inputs = family.inputs(model, ((3, 4),), seed=1)
    with vtc.compressed(model, method, budget=budget, **options):
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
    last = set(record.layers[max(record.layers, key=int)]) if record.layers else None  # in-LLM: the last stage
    kept_cells = {
        record.slot[t] - record.prefix
        for t, g in enumerate(record.groups)
        if g >= 0
        and (last is None or record.kept[g] in last)
        and record.partition[t] == partition
        and record.slot[t] >= record.prefix
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
    last = set(im.layers[max(im.layers, key=int)])  # HoliTom: the rows left after its inner merge
    for t, title in enumerate(titles):
        fed = sum(1 for token in im.kept if token in last and token >= 0 and im.partition[token] == t)
        covered = sum(
            1 for token, g in enumerate(im.groups) if g >= 0 and im.kept[g] in last and im.partition[token] == t
        )
        rows, cols = im.grids[t]
        assert title == f"frame {t}: {fed} fed, {covered}/{rows * cols} covered"
    assert sum(viz.fed_in_frame(im, t) for t in range(len(im.grids))) == sum(
        1 for t in im.kept if im.partition[t] >= 0 and t in last
    )
    assert sum(viz.fed_in_frame(im, t, stage="pre_llm") for t in range(len(im.grids))) == sum(
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


IN_LLM = {"fastv": {}, "pdrop": {}, "todre": {"layer": 2, "tau": 1.0}}


@pytest.mark.parametrize("method", sorted(IN_LLM))
def test_in_llm_methods_draw_the_tokens_of_their_last_stage(method):
    """The dimmed and outlined cells are the tokens left after the last prune layer (``ImageRecord.layers``),
    not every token fed to the LLM's first layer."""
    record, _ = _record("llava", method, 0.25, **IN_LLM[method])
    (im,) = record.images
    layer = max(im.layers, key=int)
    last = im.layers[layer]
    mask = viz.kept_mask(im, 0)
    assert sorted(np.flatnonzero(mask == 1).tolist()) == sorted(im.slot[t] - im.prefix for t in last)
    assert viz.final_tokens(im) == [t for t in im.kept if t in set(last)]
    assert int((viz.kept_mask(im, 0, stage="pre_llm") == 1).sum()) == len(im.kept)  # what the LLM received
    picture = viz.views(default_image(), im, size=96)[0][1]
    _check_cells(picture, im, 0)
    title = f"{len(last)} of 16 tokens from LLM layer {layer} ({len(im.kept)} before)"
    assert [ax.get_title() for ax in viz.show_kept(default_image(), record, size=96).axes] == [title]
    if method == "todre":  # its second stage removed every visual token
        assert last == [] and not (mask == 1).any()


def test_fastv_and_pdrop_pictures_differ_as_their_records_do():
    masks = {m: viz.kept_mask(_record("llava", m, 0.25)[0].images[0]) for m in ("fastv", "pdrop")}
    assert int((masks["fastv"] == 1).sum()) == 4 and int((masks["pdrop"] == 1).sum()) == 4
    records = {m: _record("llava", m, 0.25)[0].images[0] for m in ("fastv", "pdrop")}
    assert [max(r.layers, key=int) for r in records.values()] == ["2", "3"]  # different last layers: different sets


def test_holitom_inner_merge_is_drawn():
    record, _ = _record("llava_onevision", "holitom", 0.5)
    (im,) = record.images
    last = set(im.layers[max(im.layers, key=int)])
    alive = [g >= 0 and im.kept[g] in last for g in im.groups]
    assert viz.final_groups(im) == [g if a else -1 for g, a in zip(im.groups, alive, strict=True)]
    drawn = sum(int((viz.kept_mask(im, t) == 1).sum()) for t in range(len(im.grids)))
    received = sum(int((viz.kept_mask(im, t, stage="pre_llm") == 1).sum()) for t in range(len(im.grids)))
    assert drawn == sum(1 for a, p in zip(alive, im.partition, strict=True) if a and p >= 0) < received


def test_show_video_draws_the_whole_frame_the_model_saw():
    """A 16:9 frame with a green band at its left edge, on a square token grid (LLaVA-OneVision resizes each frame
    whole to a square): the band is drawn, not cropped away; ``fit="crop"`` is for processors that crop."""
    record, _ = _record("llava_onevision", "uniform", 1.0)
    (im,) = record.images
    frame = np.zeros((90, 160, 3), dtype=np.uint8)
    frame[:, :, 2] = 200
    frame[:, :16, 1], frame[:, :16, 2] = 255, 0  # the left tenth is green
    frames = [frame] * len(im.grids)
    for fit, band in (("resize", True), ("crop", False)):
        (panel, *_) = _panels(viz.show_video(frames, record, size=60, fit=fit))
        assert panel.shape[:2] == (60, 60)
        left = panel[20:40, 1:4].astype(int)
        assert (left[..., 1] > left[..., 2]).all() == band, fit


def test_seen_frames_are_the_pixels_the_model_got():
    from vtc.apps.video_demo import frames_tensor

    gen = np.random.default_rng(0)
    frames = [gen.integers(0, 255, (90, 160, 3), dtype=np.uint8) for _ in range(2)]
    seen = viz.seen_frames(frames_tensor(frames))
    assert len(seen) == 2 and seen[0].shape == (224, 224, 3)
    want = np.asarray(Image.fromarray(frames[1]).resize((224, 224), Image.BICUBIC))
    assert np.abs(seen[1].astype(int) - want.astype(int)).max() <= 1


def test_contact_sheet_has_no_blank_columns_and_readable_labels():
    tiles = [(f"m{i}", Image.new("RGB", (200, 200), "gray")) for i in range(2)]
    sheet = viz.contact_sheet(tiles, columns=4)
    assert sheet.width == 400  # two tiles: two columns, not four
    label = np.asarray(sheet.convert("L"))[: sheet.height - 200]
    assert label.shape[0] >= 20 and (label < 128).any()  # a label band of >= 20 px with text in it
