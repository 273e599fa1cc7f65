"""Data, batched scoring and statistics for ``eval/accuracy.py``.

Two ways to score a question, chosen per row:

* **choices** (easy-VQA, or a JSONL row with ``options``): one forward over the prompt, left-padded so the
  last column is every row's last prompt token; the prediction is the option whose *first* token has the
  highest next-token logit (``logits_to_keep=1``). The options' first tokens must differ (checked).
* **generate** (a JSONL row with only ``answer``): greedy ``generate``; the prediction matches when the
  decoded text, lower-cased and stripped of surrounding punctuation, equals the answer.

**Shared visual prefix** (choices mode, methods that do not read the prompt): the prompt is split where the
question starts; the compressed model runs once per image on the part before it (chat header and image),
and the KV cache it leaves serves every question about that image, continued through the stock language
model at the positions the compressed prefix ends on. By causality this equals running each full prompt
(the first image of every run is checked against the full path, and a mismatch is an error).

Every call goes through the stock ``forward`` / ``generate`` of the (compressed) model, so what is
measured is exactly what a user of ``vtc.compress`` gets.
"""

from __future__ import annotations

import copy
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


def scenes_items(n: int | None, seed: int = 0) -> list[Item]:
    """Scenes VQA test questions (:mod:`vtc.offline.scenes`): the smallest test set with at least ``n``.

    The test split is generated with ``n_scenes`` = 10, 20, ... until it holds ``n`` questions (answers are
    balanced within each family over exactly those scenes); ``n=None`` takes 300 scenes. The pictures are
    written once under ``$VTC_CACHE``.
    """
    from vtc.offline import scenes
    from vtc.offline.build import cache_root

    count = 300 if n is None else 10
    while True:
        chosen = scenes.generate("test", count, seed)
        if n is None or sum(len(s.questions) for s in chosen) >= n:
            break
        count += 10
    folder = cache_root() / f"scenes-test-v{scenes.VERSION}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for scene in chosen:
        path = folder / f"{scene.index:05d}.png"
        if not path.is_file():
            scene.render().save(path)
        for q in scene.questions:
            items.append(Item(str(path), q.question, q.answer, q.options, {"family": q.family}))
    return items


def jsonl_items(path: str, n: int | None = None) -> list[Item]:
    """Rows ``{"image": path, "question": str, "answer": str, "options": [str, ...] (optional)}``.

    Relative image paths are taken from the JSONL file's folder; an optional ``"family"`` is reported on.
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
            meta = {"family": str(row["family"])} if "family" in row else {}
            items.append(Item(image, row["question"], str(row["answer"]), options, meta))
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
        #: extra processor arguments for every picture (the ``native`` baseline's resolution knob)
        self.image_kwargs: dict = {}
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

    def image_size(self, path: str) -> tuple[int, int]:
        """``(height, width)`` of a picture."""
        return self._image(path).size[::-1]

    def _image(self, path: str) -> Image.Image:
        if path not in self._images:
            self._images[path] = Image.open(path).convert("RGB")
        return self._images[path]

    def _inputs(self, items: Sequence[Item]) -> dict:
        texts = [self.prompt(it) for it in items]
        images = [self._image(it.image) for it in items if it.image]
        kwargs = {"images": images, **self.image_kwargs} if images else {}
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

    def split_prompt(self) -> tuple[str, str]:
        """``(prefix, suffix template)``: the prompt up to where the question starts, and the rest (``{q}``)."""
        marker = "\x00QUESTION\x00"
        full = self.prompt(Item("image", marker, ""))
        head, tail = full.split(marker)
        return head, "{q}" + tail

    @torch.no_grad()
    def predict_shared(
        self, items: Sequence[Item], on_batch: Callable[[int], None] | None = None, check: bool = True
    ) -> list[str]:
        """Choices-mode predictions with one compressed visual prefix per image (see the module docstring).

        Args:
            check: compare the first image's questions against the full-prompt path (error on a mismatch).
        """
        if not all(it.image and it.options for it in items):
            raise ValueError("a shared visual prefix needs items with an image and options")
        head, tail = self.split_prompt()
        by_image: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            by_image.setdefault(it.image, []).append(i)
        images = list(by_image)
        preds: list[str] = [""] * len(items)
        lm = self.model.model.language_model
        per = max(1, self.batch_size // 2)  # images per prefix batch
        for s in range(0, len(images), per):
            group = images[s : s + per]
            pictures = [self._image(p) for p in group]
            inputs = self.processor(
                text=[head] * len(group), images=pictures, return_tensors="pt", **self.image_kwargs
            )
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
            start = self._continue_at(len(group), inputs["input_ids"].shape[1])
            rows = [(g, i) for g, path in enumerate(group) for i in by_image[path]]
            for c in range(0, len(rows), self.batch_size):
                chunk = rows[c : c + self.batch_size]
                cache = copy.deepcopy(out.past_key_values)
                cache.batch_select_indices(torch.tensor([g for g, _ in chunk]))
                enc = self.tokenizer(
                    [tail.format(q=items[i].question) for _, i in chunk],
                    padding=True,
                    padding_side="right",
                    add_special_tokens=False,
                    return_tensors="pt",
                )
                length = cache.get_seq_length()
                cached = torch.ones(len(chunk), length, dtype=enc.attention_mask.dtype)
                mask = torch.cat([cached, enc.attention_mask], 1)
                pos = start[[g for g, _ in chunk]][:, None] + torch.arange(enc.input_ids.shape[1])[None]
                hidden = lm(
                    input_ids=enc.input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache
                ).last_hidden_state
                last = enc.attention_mask.sum(1) - 1
                logits = self.model.lm_head(hidden[torch.arange(len(chunk)), last])
                for j, (row, (_, i)) in enumerate(zip(logits, chunk, strict=True)):
                    opts = items[i].options
                    assert opts is not None
                    preds[i] = opts[int(row[self.first_tokens(opts)].argmax())]
                    if check and s == 0 and c == 0 and j < 2:  # same logits as the full prompt (raises if not)
                        self.predict([items[i]], check_logits=row)
            if on_batch:
                on_batch(len(rows))
        return preds

    def _continue_at(self, batch: int, prompt_length: int) -> torch.Tensor:
        """``[B]`` position of the first question token after each compressed (or plain) prefix."""
        import vtc

        record = vtc.last_record(self.model) if vtc.is_compressed(self.model) else None
        if record is None:
            return torch.full((batch,), prompt_length, dtype=torch.long)
        starts = []
        for sample in record.samples:
            positions = torch.tensor(sample.position_ids)
            if positions.numel() == 0:  # nothing was compressed: the model's own numbering
                starts.append(prompt_length)
                continue
            if positions.ndim != 1:
                raise ValueError("a shared visual prefix needs 1-D positions (not M-RoPE): run without it")
            starts.append(int(positions.max()) + 1)
        return torch.tensor(starts)

    @torch.no_grad()
    def predict(
        self,
        items: Sequence[Item],
        on_batch: Callable[[int], None] | None = None,
        check_logits: torch.Tensor | None = None,
    ) -> list[str]:
        preds: list[str] = [""] * len(items)
        for group in self.batches(items):
            chunk = [items[i] for i in group]
            inputs = self._inputs(chunk)
            if chunk[0].options is not None:
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]  # [B, V]
                if check_logits is not None and not torch.allclose(logits[0], check_logits, atol=1e-3, rtol=1e-3):
                    diff = float((logits[0] - check_logits).abs().max())
                    raise RuntimeError(f"shared-prefix scoring differs from the full prompt by {diff:.2e}")
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
    """Accuracy with its binomial standard error, non-yes/no accuracy, the share of "yes" answers, accuracy
    per question family (items with ``meta["family"]``) and the per-question outcome (``"0110..."``)."""
    right = [normalise(p) == normalise(it.answer) for it, p in zip(items, preds, strict=True)]
    families: dict[str, list[bool]] = {}
    for r, it in zip(right, items, strict=True):
        if "family" in it.meta:
            families.setdefault(it.meta["family"], []).append(r)
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
        "families": {f: {"n": len(v), "accuracy": sum(v) / len(v)} for f, v in sorted(families.items())},
        "correct": "".join("1" if r else "0" for r in right),
    }
