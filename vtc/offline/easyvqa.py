"""easy-VQA (Victor Zhou, MIT): 64 x 64 images of one coloured shape, questions with 13 possible answers.

Read straight from the ``easy-vqa==1.0`` package's data folder (4,000 train / 1,000 test images, 38,575 /
9,673 questions). Every answer starts with a different SmolLM2 token, so a question can be scored from the
next-token logits of one forward pass (:func:`answer_token_ids`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .assets import package_dir, require_assets

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
YES_NO = ("yes", "no")
ANSWERS = YES_NO + SHAPES + COLORS


@dataclass(frozen=True)
class Question:
    image: str  # path of the PNG
    image_id: int
    question: str
    answer: str

    @property
    def kind(self) -> str:
        """``"yes/no"``, ``"shape"`` or ``"color"``."""
        return "yes/no" if self.answer in YES_NO else "shape" if self.answer in SHAPES else "color"


def data_dir() -> str:
    require_assets(("easy_vqa",))
    root = package_dir("easy_vqa")
    assert root is not None
    return os.path.join(root, "data")


def load_split(split: str) -> list[Question]:
    """All questions of ``"train"`` or ``"test"``, in the file's order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = os.path.join(data_dir(), split)
    with open(os.path.join(folder, "questions.json")) as f:
        rows = json.load(f)
    return [Question(os.path.join(folder, "images", f"{int(i)}.png"), int(i), q, a) for q, a, i in rows]


def messages(question: str) -> list[dict]:
    """One user turn: the image, then the question (render with ``processor.apply_chat_template``)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def answer_token_ids(tokenizer, answers: tuple[str, ...] = ANSWERS) -> list[int]:
    """First token of each answer as the assistant's reply starts; raises if two answers share one."""
    ids = [tokenizer.encode(a, add_special_tokens=False)[0] for a in answers]
    if len(set(ids)) != len(ids):
        raise ValueError("two answers start with the same token: first-token scoring would be ambiguous")
    return ids


def write_jsonl(path: str, questions: int | None = None, seed: int = 0) -> int:
    """Write easy-VQA test questions as ``{"id", "image", "question", "answer"}`` rows (absolute image paths).

    The rows are the first ``questions`` of a seeded shuffle, the same order ``eval/accuracy.py`` uses, so
    a JSONL run and a default run score the same questions. Returns the number of rows written.
    """
    import random

    rows = load_split("test")
    random.Random(seed).shuffle(rows)
    rows = rows if questions is None else rows[:questions]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for i, q in enumerate(rows):
            f.write(json.dumps({"id": i, "image": q.image, "question": q.question, "answer": q.answer}) + "\n")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m vtc.offline.easyvqa --jsonl PATH [--questions N]``: export test questions as JSONL."""
    import argparse

    parser = argparse.ArgumentParser(description="Export easy-VQA test questions as JSONL (absolute image paths).")
    parser.add_argument("--jsonl", required=True, help="output file")
    parser.add_argument("--questions", type=int, default=None, help="first N of the seeded shuffle (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = write_jsonl(args.jsonl, args.questions, args.seed)
    print(f"wrote {n} questions to {args.jsonl}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
