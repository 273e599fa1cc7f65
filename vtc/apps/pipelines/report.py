"""The summary of a results file: accuracy, failures, mean prefill with and without compression, visual tokens."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable

from .qa import Sample
from .results import Row, key_of


@dataclasses.dataclass(frozen=True)
class Summary:
    """Over the dataset's samples that have a row. Accuracy counts rows without an error that have an answer.

    Times are means in seconds over the rows that have both (or, uncompressed runs, the one) prefill times.
    """

    label: str
    samples: int
    done: int
    failed: int
    scored: int
    correct: int
    scored_uncompressed: int
    correct_uncompressed: int
    timed: int
    prefill_s: float | None
    prefill_s_uncompressed: float | None
    visual_before: float | None
    visual_after: float | None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None

    @property
    def accuracy_uncompressed(self) -> float | None:
        return self.correct_uncompressed / self.scored_uncompressed if self.scored_uncompressed else None

    def text(self) -> str:
        """Three lines: accuracy (and failures), prefill times, visual tokens."""
        pending = self.samples - self.done
        line = f"accuracy [{self.label}]: " + _percent(self.correct, self.scored)
        if self.scored_uncompressed:
            line += " | uncompressed: " + _percent(self.correct_uncompressed, self.scored_uncompressed)
        line += f" | {self.done}/{self.samples} samples done, {self.failed} failed"
        if pending:
            line += f", {pending} not run yet"
        lines = [line]
        if self.prefill_s_uncompressed is None:
            lines.append("prefill: not timed")
        elif self.prefill_s is None or self.label == "uncompressed":
            mean = self.prefill_s_uncompressed * 1e3
            lines.append(f"prefill mean over {self.timed} samples: uncompressed {mean:.1f} ms")
        else:
            ratio = self.prefill_s_uncompressed / self.prefill_s if self.prefill_s > 0 else float("inf")
            lines.append(
                f"prefill mean over {self.timed} samples: uncompressed {self.prefill_s_uncompressed * 1e3:.1f} ms, "
                f"{self.label} {self.prefill_s * 1e3:.1f} ms ({ratio:.2f}x)"
            )
        if self.visual_before is not None:
            lines.append(f"visual tokens per sample (mean): {self.visual_before:.1f} -> {self.visual_after:.1f}")
        return "\n".join(lines)


def _percent(correct: int, scored: int) -> str:
    return f"{100 * correct / scored:.1f}% ({correct}/{scored})" if scored else "n/a (0 scored)"


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def summarize(rows: Iterable[Row], samples: list[Sample], label: str) -> Summary:
    """A :class:`Summary` of the rows whose ids are in ``samples``."""
    keys = {s.key for s in samples}
    rows = [r for r in rows if key_of(r) in keys]
    ok = [r for r in rows if not r.get("error")]
    scored = [r for r in ok if r.get("correct") is not None]
    scored_u = [r for r in ok if r.get("correct_uncompressed") is not None]
    timed = [r for r in ok if r.get("prefill_s_uncompressed") is not None]
    both = [r for r in timed if r.get("prefill_s") is not None]
    counted = [r for r in ok if r.get("visual_tokens_before") is not None]
    return Summary(
        label=label,
        samples=len(samples),
        done=len(rows),
        failed=len(rows) - len(ok),
        scored=len(scored),
        correct=sum(bool(r["correct"]) for r in scored),
        scored_uncompressed=len(scored_u),
        correct_uncompressed=sum(bool(r["correct_uncompressed"]) for r in scored_u),
        timed=len(both) if both else len(timed),
        prefill_s=_mean(r["prefill_s"] for r in both),
        prefill_s_uncompressed=_mean(r["prefill_s_uncompressed"] for r in (both or timed)),
        visual_before=_mean(r["visual_tokens_before"] for r in counted),
        visual_after=_mean(r["visual_tokens_after"] for r in counted),
    )
