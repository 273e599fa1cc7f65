"""Data, batched scoring and statistics for ``eval/accuracy.py``.

Two ways to score a question, chosen per row:

* **choices** (easy-VQA, or a JSONL row with ``options``): one forward over the prompt, left-padded so the
  last column is every row's last prompt token; the prediction is the option whose *first* token has the
  highest next-token logit (``logits_to_keep=1``). The options' first tokens must differ (checked).
* **generate** (a JSONL row with only ``answer``): greedy ``generate``; the prediction matches when the
  decoded text, lower-cased and stripped of surrounding punctuation, equals the answer.

Every call goes through the stock ``forward`` / ``generate`` of the (compressed) model, so what is
measured is exactly what a user of ``vtc.compress`` gets.
"""

from __future__ import annotations

import json
import math
import os
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

YES_NO = ("yes", "no")


@dataclass
class Item:
    image: str | None  # path; None = question only
    question: str
    answer: str
    options: tuple[str, ...] | None = None
    meta: dict = field(default_factory=dict)


def easyvqa_items(n: int | None, seed: int = 0) -> list[Item]:
    """easy-VQA test questions: the first ``n`` of a seeded shuffle (all 9,673 when ``n`` is None).

    Larger ``n`` extends smaller ``n`` (same order), so a quick run is a prefix of a longer one.
    """
    from vtc.offline.easyvqa import ANSWERS, load_split

    questions = load_split("test")
    random.Random(seed).shuffle(questions)
    chosen = questions if n is None else questions[:n]
    return [Item(q.image, q.question, q.answer, ANSWERS, {"kind": q.kind}) for q in chosen]


def jsonl_items(path: str, n: int | None = None) -> list[Item]:
    """Rows ``{"image": path, "question": str, "answer": str, "options": [str, ...] (optional)}``.

    Relative image paths are taken from the JSONL file's folder.
    """
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in ("image", "question", "answer") if k not in row]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing {missing} (need image, question, answer[, options])")
            image = row["image"] if os.path.isabs(row["image"]) else os.path.join(base, row["image"])
            options = tuple(row["options"]) if row.get("options") else None
            if options is not None and row["answer"] not in options:
                raise ValueError(f"{path}:{line_no}: answer {row['answer']!r} is not among the options")
            items.append(Item(image, row["question"], str(row["answer"]), options))
            if n is not None and len(items) == n:
                break
    return items


def normalise(text: str) -> str:
    return text.strip().split("\n")[0].strip().strip(string.punctuation + " ").lower()


class Scorer:
    """Batched predictions for a list of items with one model + processor."""

    def __init__(self, model, processor, batch_size: int = 16, max_new_tokens: int = 8):
        self.model, self.processor = model, processor
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        self._images: dict[str, Image.Image] = {}

    def prompt(self, item: Item) -> str:
        content = ([{"type": "image"}] if item.image else []) + [{"type": "text", "text": item.question}]
        messages = [{"role": "user", "content": content}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image = "<image>\n" if item.image else ""
        return f"USER: {image}{item.question} ASSISTANT:"

    def _image(self, path: str) -> Image.Image:
        if path not in self._images:
            self._images[path] = Image.open(path).convert("RGB")
        return self._images[path]

    def _inputs(self, items: Sequence[Item]) -> dict:
        texts = [self.prompt(it) for it in items]
        images = [self._image(it.image) for it in items if it.image]
        kwargs = {"images": images} if images else {}
        return self.processor(text=texts, padding=True, return_tensors="pt", **kwargs)

    def first_tokens(self, options: Sequence[str]) -> list[int]:
        ids = [self.tokenizer.encode(o, add_special_tokens=False)[0] for o in options]
        if len(set(ids)) != len(ids):
            raise ValueError(f"options {list(options)} share a first token: use answer-only rows (generate mode)")
        return ids

    def batches(self, items: Sequence[Item]) -> list[list[int]]:
        """Indices grouped into batches of similar prompt length and equal mode (less padding)."""
        order = sorted(range(len(items)), key=lambda i: (items[i].options is None, len(items[i].question)))
        groups: list[list[int]] = []
        for i in order:
            if (
                groups
                and len(groups[-1]) < self.batch_size
                and (items[groups[-1][0]].options is None) == (items[i].options is None)
            ):
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    @torch.no_grad()
    def predict(self, items: Sequence[Item], on_batch: Callable[[int], None] | None = None) -> list[str]:
        preds: list[str] = [""] * len(items)
        for group in self.batches(items):
            chunk = [items[i] for i in group]
            inputs = self._inputs(chunk)
            if chunk[0].options is not None:
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]  # [B, V]
                for i, it in zip(group, chunk, strict=True):
                    options = it.options
                    assert options is not None
                    scores = logits[group.index(i), self.first_tokens(options)]
                    preds[i] = options[int(scores.argmax())]
            else:
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
                texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                for i, text in zip(group, texts, strict=True):
                    preds[i] = text
            if on_batch:
                on_batch(len(group))
        return preds


def summarise(items: Sequence[Item], preds: Sequence[str]) -> dict:
    """Accuracy with its binomial standard error, non-yes/no accuracy and the share of "yes" answers."""
    right = [normalise(p) == normalise(it.answer) for it, p in zip(items, preds, strict=True)]
    n = len(right)
    acc = sum(right) / n if n else float("nan")
    open_rows = [r for r, it in zip(right, items, strict=True) if normalise(it.answer) not in YES_NO]
    yn_preds = [normalise(p) for p, it in zip(preds, items, strict=True) if normalise(it.answer) in YES_NO]
    return {
        "n": n,
        "accuracy": acc,
        "se": math.sqrt(acc * (1 - acc) / n) if n else float("nan"),
        "open_n": len(open_rows),
        "open_accuracy": sum(open_rows) / len(open_rows) if open_rows else None,
        "yes_no_n": len(yn_preds),
        "yes_share": sum(p == "yes" for p in yn_preds) / len(yn_preds) if yn_preds else None,
    }
