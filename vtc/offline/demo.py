"""``vtc demo`` on the offline VLM: real answers from a real (small) model, uncompressed and compressed.

Two examples: the bundled photo (Grace Hopper) and a bundled easy-VQA test image (a red triangle, MIT
licence). For the uncompressed model and each method the demo prints the greedy answers, the visual
tokens kept and the prefill time, and draws what was kept on both images.
"""

from __future__ import annotations

import importlib.resources
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

PHOTO_QUESTION = "What color is the shape?"
EASYVQA_IMAGE = "easyvqa_test_0.png"  # easy-VQA test image 0: a red triangle
EASYVQA_QUESTION = "What shape is in the image?"
EASYVQA_ANSWER = "triangle"


@dataclass
class Example:
    name: str
    image: Image.Image
    question: str


@dataclass
class OfflineRow:
    name: str
    visual_tokens: int
    equivalent: float
    prefill_ms: float
    answers: list[str]


def bundled_examples(image: Image.Image | None = None, question: str | None = None) -> list[Example]:
    """The photo and the easy-VQA image; ``image`` / ``question`` replace the photo's."""
    from ..demo import default_image

    path = importlib.resources.files("vtc") / "assets" / EASYVQA_IMAGE
    with importlib.resources.as_file(path) as p:
        shape = Image.open(p).convert("RGB")
    return [
        Example("photo" if image is None else "your image", image or default_image(), question or PHOTO_QUESTION),
        Example("easy-VQA", shape, EASYVQA_QUESTION),
    ]


def _inputs(processor, examples: Sequence[Example]) -> dict:
    from .easyvqa import messages

    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(messages(e.question), add_generation_prompt=True) for e in examples]
    return processor(images=[e.image for e in examples], text=texts, padding=True, return_tensors="pt")


@torch.no_grad()
def _answers(model, processor, inputs: dict) -> list[str]:
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts]


@torch.no_grad()
def _prefill_ms(model, inputs: dict) -> float:
    start = time.perf_counter()
    model(**inputs, logits_to_keep=1)
    return (time.perf_counter() - start) * 1000


def run_offline(
    methods: Sequence[str],
    budget: float | int,
    out: str | None,
    repeats: int = 3,
    image: Image.Image | None = None,
    question: str | None = None,
    log=print,
) -> list[OfflineRow]:
    """Answers, kept tokens and prefill time for the uncompressed model and each method (builds on first use)."""
    import vtc

    from ..demo import interleaved_times
    from ..viz import contact_sheet, fit_square, kept_overlay
    from .build import IMAGE_SIZE, load_offline_vlm

    model, processor = load_offline_vlm(log=log)
    examples = bundled_examples(image, question)
    inputs = _inputs(processor, examples)
    n = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    base_answers = _answers(model, processor, inputs)
    _prefill_ms(model, inputs)  # warm-up
    base_times: list[float] = []
    rows, tiles = [], []
    view = 4 * IMAGE_SIZE  # what the model saw (shortest-edge resize + centre crop), enlarged for the picture
    for name in methods:
        vtc.compress(model, name, budget=budget)
        try:
            answers = _answers(model, processor, inputs)
            rec = vtc.last_record(model)
            times, base = interleaved_times(model, name, budget, repeats, lambda: _prefill_ms(model, inputs))
            base_times += base
        finally:
            vtc.restore(model)
        final = list(rec.images[0].counts.values())[-1]
        rows.append(OfflineRow(name, final, rec.equivalent_budget, statistics.median(times), answers))
        for i, ex in enumerate(examples):
            picture = kept_overlay(fit_square(ex.image, view), rec.images[i])
            tiles.append((f"{name} ({final}/{n}): {answers[i]}", picture))
    base = statistics.median(base_times) if base_times else _prefill_ms(model, inputs)
    rows.insert(0, OfflineRow("uncompressed", n, 1.0, base, base_answers))
    if out and tiles:
        contact_sheet(tiles, columns=4).save(out)
    return rows


def offline_table(rows: list[OfflineRow], examples: list[Example]) -> str:
    base = rows[0].prefill_ms
    head = " | ".join(f"answer: {e.name}" for e in examples)
    lines = [
        f"| run | visual tokens (last stage) | equivalent budget | prefill ms (median) | speed-up | {head} |",
        "|---|---:|---:|---:|---:|" + "---|" * len(examples),
    ]
    for r in rows:
        answers = " | ".join(r.answers)
        lines.append(
            f"| {r.name} | {r.visual_tokens} | {r.equivalent:.3f} | {r.prefill_ms:.1f} | {base / r.prefill_ms:.2f}x "
            f"| {answers} |"
        )
    return "\n".join(lines)
