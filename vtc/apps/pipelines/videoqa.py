"""Video question answering with a compressed video-LLM: one JSONL in, one results JSONL out.

>>> qa = VideoQA("path/to/checkpoint", method="divprune", budget=0.2, num_frames=8)
>>> summary = qa.run("data.jsonl", "results.jsonl")      # resumes; shards under torchrun

Per sample: frames are sampled with :func:`vtc.apps.video.load_video`, the prompt is built with the processor's
chat template (else a plain ``<video token>\\n<question>``), the model is compressed for the call with
:func:`vtc.compressed` and answers with its stock ``generate`` (greedy), and a row goes to the results file.

What "prefill" means here: the wall time of one ``model(**inputs)`` forward over the whole prompt (vision
tower, projector, vtc, LLM; only the last position's logits), on the same inputs that ``generate`` gets,
timed once compressed and once uncompressed (the model restored) per sample, in alternating order, after an
untimed warm-up forward for each on the first sample of the process. Those two extra forwards are not part of
``generate``; ``timing=False`` (CLI ``--no-timing``) skips them. ``compare=True`` also generates the answer
uncompressed, so the summary gives both accuracies.

Setup errors are found once, at construction, before any sample: a checkpoint that takes no video, an unknown
method or option, more frames than the memory guard allows, and a budget the method cannot meet with these
frames (a probe runs vtc's part of one call on a blank video).

Errors: a sample whose video is missing, unreadable or over the memory guard, or that the processor rejects,
becomes a row with its ``error`` and the run goes on (unless ``max_consecutive_failures`` samples in a row fail
that way: that points at the setup, not the data). Anything raised by vtc or the model stops the run; the
rows written so far stay, so re-running resumes.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ... import api
from ..video import MAX_BYTES, VideoError, load_video
from .qa import Sample, load_samples, question_prompt, score
from .report import Summary, summarize
from .results import ResultStore

#: exceptions from the processor that mean "this sample's input" (bad frames, aspect ratio, lengths...)
PROCESSOR_DATA_ERRORS = (ValueError, TypeError, IndexError, KeyError)


class SampleError(Exception):
    """A sample that cannot be run because of its data; ``stage`` is ``"video"`` or ``"processor"``."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.stage = stage


class VideoQA:
    """Answer the questions of a JSONL dataset about videos with a (compressed) Hugging Face video-LLM.

    Args:
        model: a loaded ``...ForConditionalGeneration`` model (then ``processor`` is required), or the path of
            a local checkpoint folder, loaded with ``AutoModelForImageTextToText`` / ``AutoProcessor``
            (``local_files_only=True``).
        processor: the model's processor (tokenizer + video processor).
        method: a vtc method name or config object, or None / ``"none"`` to run uncompressed.
        budget: the vtc budget (float fraction or int tokens per video).
        options: method options (fields of the method's config dataclass).
        num_frames: frames sampled evenly over each video; or ``fps``: frames per second of video time,
            at most ``max_frames`` (see :func:`vtc.apps.video.load_video`). Default: 8 frames.
        max_new_tokens: answer length limit (greedy decoding).
        compare: also generate uncompressed answers (accuracy with and without compression).
        timing: time the prefill with and without compression (two extra forwards per sample).
        device, dtype: where and how a checkpoint path is loaded (default: ``cuda:$LOCAL_RANK`` if there is a
            GPU, else CPU; dtype ``"auto"`` keeps the checkpoint's). Ignored for a loaded model.
        video_kwargs: more :func:`vtc.apps.video.load_video` arguments (``width``, ``height``, ``max_bytes``...).
        max_consecutive_failures: stop after this many samples in a row fail on their data.
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike[str],
        processor: Any = None,
        method: Any = None,
        budget: float | int = 0.2,
        options: dict[str, Any] | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int = 64,
        max_new_tokens: int = 16,
        compare: bool = False,
        timing: bool = True,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        video_kwargs: dict[str, Any] | None = None,
        max_consecutive_failures: int = 20,
    ):
        if num_frames is not None and fps is not None:
            raise ValueError("pass num_frames or fps, not both")
        if num_frames is not None and num_frames > max_frames:
            raise ValueError(
                f"num_frames={num_frames} is over max_frames={max_frames} (the memory guard): every sample would "
                f"fail; sample fewer frames or raise max_frames (CLI: --frames / --max-frames)"
            )
        if max_new_tokens < 1 or max_consecutive_failures < 1:
            raise ValueError("max_new_tokens and max_consecutive_failures must be >= 1")
        if isinstance(model, (str, os.PathLike)):
            model, processor = load_checkpoint(model, device=device, dtype=dtype, processor=processor)
        elif processor is None:
            raise ValueError("pass the model's processor with a loaded model (or give a checkpoint path)")
        if api.is_compressed(model):
            raise ValueError("the model is already compressed by vtc; pass it uncompressed (VideoQA compresses it)")
        if not _accepts(model.forward, "pixel_values_videos"):
            raise ValueError(
                f"this checkpoint ({type(model).__name__}, model_type {model.config.model_type!r}) takes no video "
                f"input; videoqa needs a video-LLM (LLaVA-OneVision, LLaVA-NeXT-Video, Qwen2-VL, Qwen2.5-VL)"
            )
        self.model = model.eval()
        self.processor = processor
        self.method = None if isinstance(method, str) and method.lower() == "none" else method
        self.budget = budget
        self.options = dict(options or {})
        if self.method is not None:  # fail now, not on the first sample: unknown method/option, unsupported model
            api.compress(self.model, self.method, self.budget, **self.options)
            api.restore(self.model)
        elif self.options:
            raise ValueError(f"method options {sorted(self.options)} given without a method")
        self.sampling = {"num_frames": 8 if num_frames is None and fps is None else num_frames, "fps": fps}
        self.video_kwargs = {"max_frames": max_frames, "max_bytes": MAX_BYTES, **(video_kwargs or {})}
        self.max_new_tokens = max_new_tokens
        self.compare = compare and self.method is not None
        self.timing = timing
        self.max_consecutive_failures = max_consecutive_failures
        self._warm: set[bool] = set()
        self._timed_samples = 0
        self._forward_kwargs = {"logits_to_keep": 1} if _accepts(model.forward, "logits_to_keep") else {}
        self._placeholders = _visual_token_ids(model)
        self._probe()

    def _probe(self) -> None:
        """vtc's part of one call on a blank video with this run's frame count: what would fail on every sample
        (no video tokens in the prompt, a budget the method cannot meet) fails here, once."""
        count = self.sampling["num_frames"] or min(self.video_kwargs["max_frames"], 8)
        frames = np.zeros((count, 224, 224, 3), dtype=np.uint8)  # [T, H, W, 3]
        meta = {"total_num_frames": count, "fps": 1.0, "duration": float(count), "frames_indices": list(range(count))}
        meta.update(height=224, width=224, video_backend="decord")
        probe = Sample(id="probe", video="", question="what happens in the video?", options={}, answer=None)
        try:
            inputs = self._batch(self.prompt(probe), frames, meta)
        except SampleError:
            return  # this processor wants other frames: the samples will tell
        if not self._count_visual(inputs):
            raise ValueError(
                f"the processor puts no video token in the prompt of {type(self.model).__name__}: the model would see "
                f"no video; use a video-LLM checkpoint with its own processor"
            )
        if self.method is not None:
            with api.compressed(self.model, self.method, self.budget, **self.options), torch.inference_mode():
                api.session_of(self.model).prepare(dict(inputs), for_generate=True)

    # -- one sample --------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        if self.method is None:
            return "uncompressed"
        name = self.method if isinstance(self.method, str) else getattr(self.method, "method", "config")
        return f"{name}@{self.budget}"

    def setup(self) -> dict[str, Any]:
        """What makes results comparable; stored in every row, a resumed run must match it."""
        method = self.method if self.method is None or isinstance(self.method, str) else repr(self.method)
        return {
            "method": method,
            "budget": None if self.method is None else self.budget,
            "options": {k: repr(v) for k, v in sorted(self.options.items())},
            **self.sampling,
            "max_frames": self.video_kwargs["max_frames"],
            "max_new_tokens": self.max_new_tokens,
            "compare": self.compare,
        }

    def prompt(self, sample: Sample) -> str:
        """The full prompt text, video placeholder included (chat template if the processor has one)."""
        text = question_prompt(sample)
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        token = getattr(self.processor, "video_token", None)
        if not token:
            raise ValueError("the processor has no chat template and no video_token; cannot place the video")
        return f"{token}\n{text}\n"

    def inputs(self, sample: Sample) -> tuple[dict[str, Any], Any]:
        """Model inputs for one sample, on the model's device, and the loaded video. Raises SampleError."""
        try:
            video = load_video(sample.video, **self.sampling, **self.video_kwargs)
        except (OSError, VideoError) as err:
            raise SampleError("video", err) from err
        return self._batch(self.prompt(sample), video.frames, video.metadata()), video

    def _batch(self, text: str, frames: np.ndarray, metadata: dict[str, Any]) -> dict[str, Any]:
        try:
            batch = self.processor(
                text=[text],
                videos=[frames],
                video_metadata=[metadata],
                do_sample_frames=False,  # the frames are already sampled; a processor must not resample them
                return_tensors="pt",
            )
        except PROCESSOR_DATA_ERRORS as err:
            raise SampleError("processor", err) from err
        device, dtype = self.model.device, self.model.dtype
        moved = {
            k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            if isinstance(v, torch.Tensor)
            else v
            for k, v in batch.items()
        }
        return moved

    def answer(self, sample: Sample) -> dict[str, Any]:
        """Run one sample; returns its results row (with ``error`` set for a data error)."""
        row: dict[str, Any] = {"id": sample.id, "video": sample.video, "question": sample.question}
        row.update(answer=sample.answer, prediction=None, raw=None, correct=None, error=None, error_stage=None)
        try:
            inputs, video = self.inputs(sample)
        except SampleError as err:
            return {**row, "error": str(err), "error_stage": err.stage}
        row.update(frames=len(video.indices), frame_timestamps=[round(t, 4) for t in video.timestamps])
        if self.method is None:
            row["prefill_s_uncompressed"] = self._timed_forward(inputs, False) if self.timing else None
            row["prefill_s"] = row["prefill_s_uncompressed"]
            reply, row["generate_s"] = self._generate(inputs)
            row["visual_tokens_before"] = row["visual_tokens_after"] = self._count_visual(inputs)
        else:
            self._timed_samples += 1  # alternate which side is timed first, so drift favours neither
            uncompressed_first = self._timed_samples % 2 == 1
            if self.timing and uncompressed_first:
                row["prefill_s_uncompressed"] = self._timed_forward(inputs, False)
            with api.compressed(self.model, self.method, self.budget, **self.options):
                row["prefill_s"] = self._timed_forward(inputs, True) if self.timing else None
                reply, row["generate_s"] = self._generate(inputs)
                record = api.last_record(self.model)
            if self.timing and not uncompressed_first:
                row["prefill_s_uncompressed"] = self._timed_forward(inputs, False)
            row.setdefault("prefill_s_uncompressed", None)
            row["visual_tokens_before"] = sum(im.num_input for im in record.images)
            row["visual_tokens_after"] = sum(min(im.counts.values(), default=im.num_kept) for im in record.images)
            row["equivalent_budget"] = round(record.equivalent_budget, 6)
            row["seconds_in_vtc"] = record.seconds_in_vtc
            if self.compare:
                raw_u, _ = self._generate(inputs)
                row["raw_uncompressed"] = raw_u
                row["prediction_uncompressed"], row["correct_uncompressed"] = score(sample, raw_u)
        row["raw"] = reply
        row["prediction"], row["correct"] = score(sample, reply)
        return row

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    @torch.inference_mode()
    def _timed_forward(self, inputs: dict[str, Any], compressed: bool) -> float:
        if compressed not in self._warm:
            self.model(**inputs, **self._forward_kwargs)
            self._warm.add(compressed)
        self._sync()
        start = time.perf_counter()
        self.model(**inputs, **self._forward_kwargs)
        self._sync()
        return time.perf_counter() - start

    @torch.inference_mode()
    def _generate(self, inputs: dict[str, Any]) -> tuple[str, float]:
        start = time.perf_counter()
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        self._sync()
        seconds = time.perf_counter() - start
        new = out[0, inputs["input_ids"].shape[1] :]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        return tokenizer.decode(new, skip_special_tokens=True).strip(), seconds

    def _count_visual(self, inputs: dict[str, Any]) -> int:
        ids = inputs["input_ids"]
        return int(torch.isin(ids, torch.tensor(sorted(self._placeholders), device=ids.device)).sum())

    # -- a dataset ---------------------------------------------------------------------------------------------
    def run(
        self,
        data: str | os.PathLike[str],
        out: str | os.PathLike[str],
        limit: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        progress: bool = True,
        shard_timeout: float = 1800.0,
        poll: float = 1.0,
        verbose: bool = True,
    ) -> Summary | None:
        """Answer every sample of ``data`` not yet in ``out``; returns the summary on rank 0 (None elsewhere).

        ``limit`` keeps the first samples of the dataset only. ``rank`` / ``world_size`` default to the
        ``RANK`` / ``WORLD_SIZE`` environment (torchrun); see :mod:`vtc.apps.pipelines.results` for the sharding.
        """
        dataset = load_samples(data)
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        samples = dataset[:limit]
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        store = ResultStore(out, rank, world, run=self.setup())
        done_at_start = store.done_at_start()
        done = store.done()
        todo = [s for i, s in enumerate(samples) if i % world == rank and s.key not in done]
        failures = 0
        with store.writer() as write:
            for sample in _progress(todo, len(todo), enabled=progress and rank == 0, label=self.label):
                row = self.answer(sample)
                write(row)
                failures = failures + 1 if row["error"] else 0
                if failures >= self.max_consecutive_failures:
                    raise RuntimeError(
                        f"{failures} samples in a row failed on their data (last: {row['error']}); stopping, as this "
                        f"points at the setup (paths, processor) rather than at single bad samples. Fix it and "
                        f"re-run, or raise max_consecutive_failures (CLI --max-consecutive-failures)"
                    )
        if rank != 0:
            return None
        if world > 1:
            expected = {
                r: {s.key for i, s in enumerate(samples) if i % world == r and s.key not in done_at_start}
                for r in range(1, world)
            }
            store.wait_for_others(expected, timeout=shard_timeout, poll=poll)
        rows = store.merge([s.key for s in dataset])
        summary = summarize(rows, dataset, self.label)
        if verbose:
            print(summary.text())
            print(f"results: {store.out}")
        return summary


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "auto",
    processor: Any = None,
) -> tuple[nn.Module, Any]:
    """Load a local checkpoint folder (no hub access) with its processor, in eval mode on ``device``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such checkpoint folder: {path}")
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
    if processor is None:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), processor


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _visual_token_ids(model: nn.Module) -> set[int]:
    cfg = model.config
    names = ("video_token_id", "video_token_index", "image_token_id", "image_token_index")
    return {int(v) for v in (getattr(cfg, n, None) for n in names) if isinstance(v, int)}


def _progress(items: list, total: int, enabled: bool, label: str) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _simple_progress(items, total, label)
    return tqdm(items, total=total, desc=f"videoqa {label}", unit="sample", file=sys.stderr)


def _simple_progress(items: list, total: int, label: str, every: float = 2.0) -> Iterator:
    start = last = time.monotonic()
    for done, item in enumerate(items):
        yield item
        now = time.monotonic()
        if now - last >= every or done + 1 == total:
            last = now
            print(f"videoqa {label}: {done + 1}/{total} samples, {now - start:.0f} s", file=sys.stderr, flush=True)
