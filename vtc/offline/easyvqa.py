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
