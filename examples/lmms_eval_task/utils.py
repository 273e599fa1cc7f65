"""Helpers of the ``vtc_shapes`` task: one local image and one one-word question per JSONL row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

#: image paths in the JSONL are relative to this folder, so the task works from any working directory
HERE = Path(__file__).resolve().parent


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The row's image, opened relative to this folder (an absolute path is used as is)."""
    with Image.open(HERE / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    """The question, between the task's pre- and post-prompt."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1.0 when the answer's first word is the expected word (case and punctuation ignored)."""
    words = results[0].strip().lower().replace(".", " ").replace(",", " ").split()
    return {"exact_match": float(bool(words) and words[0] == doc["answer"].lower())}
