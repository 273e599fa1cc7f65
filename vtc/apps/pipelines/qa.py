"""Question-answering datasets as JSONL: reading and checking samples, prompts, parsing and scoring answers.

One sample per line: ``{"id": ..., "video": "clips/a.mp4", "question": "...", "options": [...], "answer": "B"}``.

- ``id``: a string or an int, unique in the file (results are keyed by it).
- ``video``: a path; a relative one is resolved against the JSONL file's folder.
- ``options`` (optional, multiple choice): a list of option texts (lettered A, B, ... in order), or a dict
  ``{"A": "...", "B": "..."}``. Texts that already start with their letter (``"A. a cat"``) are accepted.
- ``answer`` (optional): for multiple choice an option letter or an option's exact text; otherwise free text,
  scored by normalised exact match. Without an answer the sample is run but not scored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
from pathlib import Path
from typing import Any

LETTERS = string.ascii_uppercase
#: appended to multiple-choice prompts (the wording of the LLaVA-Video / Video-MME evaluation prompts)
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_PREFIXED = re.compile(r"^\(?([A-Z])[.):]\s+(.*)$", re.S)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One question about one video. ``options`` maps letters to texts (empty: open-ended)."""

    id: str | int
    video: str
    question: str
    options: dict[str, str]
    answer: str | None

    @property
    def key(self) -> str:
        """The id as a string: how results are matched (``1`` and ``"1"`` are the same sample)."""
        return str(self.id)

    @property
    def is_choice(self) -> bool:
        return bool(self.options)


class DatasetError(ValueError):
    """The JSONL dataset itself is malformed (reported with its line number, before anything runs)."""


def load_samples(path: str | os.PathLike[str]) -> list[Sample]:
    """Read and check a JSONL dataset; relative video paths are resolved against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such dataset file: {path}")
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: not valid JSON ({err.msg})") from None
            sample = _sample(row, where, path.parent)
            if sample.key in seen:
                raise DatasetError(f"{where}: id {sample.id!r} already used on line {seen[sample.key]}")
            seen[sample.key] = number
            samples.append(sample)
    if not samples:
        raise DatasetError(f"{path}: no samples")
    return samples


def _sample(row: Any, where: str, folder: Path) -> Sample:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
    missing = [k for k in ("id", "video", "question") if k not in row]
    if missing:
        raise DatasetError(f"{where}: missing {missing} (needs id, video, question; options and answer optional)")
    sid = row["id"]
    if isinstance(sid, bool) or not isinstance(sid, (str, int)):
        raise DatasetError(f"{where}: id must be a string or an int, got {sid!r}")
    for key in ("video", "question"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise DatasetError(f"{where}: {key} must be a non-empty string, got {row[key]!r}")
    options = _options(row.get("options"), where)
    answer = row.get("answer")
    if answer is not None:
        if not isinstance(answer, (str, int)) or isinstance(answer, bool):
            raise DatasetError(f"{where}: answer must be a string, got {answer!r}")
        answer = str(answer).strip()
        if options:
            answer = _answer_letter(answer, options, where)
    video = Path(os.path.expanduser(row["video"]))
    return Sample(
        id=sid,
        video=str(video if video.is_absolute() else folder / video),
        question=row["question"].strip(),
        options=options,
        answer=answer,
    )


def _options(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, dict):
        items = [(str(k).strip().upper(), v) for k, v in raw.items()]
        if any(len(k) != 1 or k not in LETTERS for k, _ in items):
            raise DatasetError(f"{where}: option keys must be single letters A-Z, got {list(raw)}")
    elif isinstance(raw, list):
        if len(raw) > len(LETTERS):
            raise DatasetError(f"{where}: at most {len(LETTERS)} options, got {len(raw)}")
        items = list(zip(LETTERS, raw, strict=False))  # LETTERS is longer
    else:
        raise DatasetError(f"{where}: options must be a list or a {{letter: text}} object, got {type(raw).__name__}")
    if len(items) < 2:
        raise DatasetError(f"{where}: a multiple-choice question needs at least 2 options")
    options: dict[str, str] = {}
    for letter, text in items:
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where}: option {letter} must be a non-empty string, got {text!r}")
        prefixed = _PREFIXED.match(text.strip())
        options[letter] = prefixed.group(2).strip() if prefixed and prefixed.group(1) == letter else text.strip()
    return options


def _answer_letter(answer: str, options: dict[str, str], where: str) -> str:
    letter = answer.strip("().: ").upper()
    if len(letter) == 1 and letter in options:
        return letter
    prefixed = _PREFIXED.match(answer)
    if prefixed and prefixed.group(1) in options:
        return prefixed.group(1)
    for key, text in options.items():
        if normalize(text) == normalize(answer):
            return key
    raise DatasetError(
        f"{where}: answer {answer!r} is neither an option letter {sorted(options)} nor an option's text"
    )


def question_prompt(sample: Sample) -> str:
    """The text part of the prompt: the question, then for multiple choice ``A. ...`` lines and the instruction."""
    if not sample.is_choice:
        return sample.question
    lines = [sample.question] + [f"{k}. {v}" for k, v in sample.options.items()] + [CHOICE_INSTRUCTION]
    return "\n".join(lines)


def parse_choice(text: str, options: dict[str, str]) -> str | None:
    """The option a model's reply picks: its first standalone option letter, else the option whose text it names.

    A letter counts when no letter or digit touches it (``"B"``, ``"(B)"``, ``"B. a dog"``, ``"Answer: B"``);
    ``"A"`` or ``"I"`` followed by a lowercase word is read as an English word, not an option. Failing that,
    the option whose normalised text occurs in the reply (the longest, if several do) is taken. None: no pick.
    """
    for match in re.finditer(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])", text):
        letter = match.group(1)
        if letter not in options:
            continue
        if letter in "AI" and re.match(r"\s+[a-z]", text[match.end() :]):
            continue
        return letter
    reply = f" {normalize(text)} "
    named = [(len(normalize(t)), k) for k, t in options.items() if normalize(t) and f" {normalize(t)} " in reply]
    return max(named)[1] if named else None


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: what free-text answers are compared on."""
    text = text.lower().translate(str.maketrans({c: " " for c in string.punctuation}))
    return " ".join(text.split())


def score(sample: Sample, reply: str) -> tuple[str | None, bool | None]:
    """``(prediction, correct)`` for a reply; correct is None when the sample has no answer."""
    prediction = parse_choice(reply, sample.options) if sample.is_choice else reply.strip()
    if sample.answer is None:
        return prediction, None
    if sample.is_choice:
        return prediction, prediction == sample.answer
    return prediction, normalize(reply) == normalize(sample.answer)
