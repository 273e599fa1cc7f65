"""Pipelines that run a compressed model over a dataset: :class:`VideoQA` (video question answering)."""

from .qa import DatasetError, Sample, load_samples, parse_choice, question_prompt
from .report import Summary, summarize
from .results import ResultStore
from .videoqa import SampleError, VideoQA, load_checkpoint

__all__ = [
    "VideoQA",
    "load_checkpoint",
    "Sample",
    "SampleError",
    "DatasetError",
    "load_samples",
    "parse_choice",
    "question_prompt",
    "Summary",
    "summarize",
    "ResultStore",
]
