"""Video decoding for video-LLMs: frame sampling with timestamps, read with decord.

>>> video = load_video("clip.mp4", num_frames=8)            # 8 frames evenly spaced over the whole clip
>>> video.frames.shape, video.timestamps                    # (8, H, W, 3) uint8, seconds
>>> video = load_video("clip.mp4", fps=1, max_frames=64)    # 1 frame per second of video, at most 64

Frames are a uint8 numpy array ``[T, H, W, 3]`` (RGB): every Hugging Face video processor accepts it as one
video, it costs one allocation, and ``video.metadata()`` gives the matching ``video_metadata`` entry (native
fps and the sampled indices; Qwen2.5-VL derives its temporal positions from it).

decord seeks frame-accurately (``tests/test_video.py`` reads the frame index back from the pixels) and is
imported only when a video is loaded. Nothing is decoded before the request has passed the memory guard: at
most ``max_frames`` frames and ``max_bytes`` bytes of decoded RGB. A file that cannot be used raises
:class:`VideoError` (a data problem, as opposed to a bug): :class:`VideoDecodeError` for an unreadable, corrupt
or empty file, :class:`VideoTooLargeError` for the guard. A missing file raises :class:`FileNotFoundError`.
What decord's ffmpeg writes to the process's stderr while it reads a file (pages of codec messages for a
corrupt one, which would break a progress bar) is held back; its first line joins the error's message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

#: default cap on the frames one call may decode
MAX_FRAMES = 256
#: default cap on the decoded RGB bytes one call may hold (2 GiB: 64 frames of 4K, 1000 frames of 1080p / 4)
MAX_BYTES = 2 * 1024**3


class VideoError(Exception):
    """A video that cannot be used as asked (unreadable, corrupt, empty, or over the memory guard)."""


class VideoDecodeError(VideoError):
    """decord could not open or decode the file, or it holds no video frames."""


class VideoTooLargeError(VideoError):
    """The request would decode more frames or bytes than the memory guard allows."""


@dataclasses.dataclass(frozen=True)
class Video:
    """Frames sampled from a video file.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 RGB (after any resize on decode).
        timestamps: start time of each sampled frame in seconds, from the container's timestamps.
        indices: index of each sampled frame in the file (ascending).
        fps: the file's average frame rate; num_frames_total: frames in the file.
    """

    path: str
    frames: np.ndarray
    timestamps: list[float]
    indices: list[int]
    fps: float
    num_frames_total: int

    @property
    def duration(self) -> float:
        """Length of the whole file in seconds (frames / average fps)."""
        return self.num_frames_total / self.fps

    def metadata(self) -> dict[str, Any]:
        """This video's ``video_metadata`` entry for a Hugging Face processor (``frames_indices``, native fps)."""
        return {
            "total_num_frames": self.num_frames_total,
            "fps": self.fps,
            "duration": self.duration,
            "frames_indices": list(self.indices),
            "height": int(self.frames.shape[1]),
            "width": int(self.frames.shape[2]),
            "video_backend": "decord",
        }


def uniform_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` indices evenly spaced over ``total`` frames, first and last frame included.

    Index ``i`` is ``round(i * (total - 1) / (num_frames - 1))`` (halves round up). A clip shorter than
    ``num_frames`` repeats frames, so the count is always ``num_frames``.
    """
    if num_frames == 1:
        return [(total - 1) // 2]
    step = (total - 1) / (num_frames - 1)
    return [int(math.floor(i * step + 0.5)) for i in range(num_frames)]


def fps_indices(total: int, video_fps: float, fps: float, max_frames: int) -> list[int]:
    """Frames at ``0, 1/fps, 2/fps, ...`` seconds of video time: the frame shown at each time, each once.

    A time ``t`` maps to frame ``floor(t * video_fps)``. When that gives more than ``max_frames`` frames,
    ``max_frames`` frames are spread evenly over the whole clip instead (:func:`uniform_indices`), so a long
    video is covered to its end at a lower rate rather than cut.
    """
    duration = total / video_fps
    count = max(1, math.ceil(duration * fps - 1e-9))
    picked = sorted({min(total - 1, int(math.floor(k / fps * video_fps + 1e-6))) for k in range(count)})
    if len(picked) > max_frames:
        return uniform_indices(total, max_frames)
    return picked


def load_video(
    path: str | os.PathLike[str],
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int = MAX_FRAMES,
    max_bytes: int = MAX_BYTES,
    width: int | None = None,
    height: int | None = None,
    num_threads: int = 0,
) -> Video:
    """Sample frames from a video file with decord, with their timestamps.

    Args:
        path: the video file (anything ffmpeg reads: mp4, mkv, webm, avi...).
        num_frames: sample this many frames evenly spaced over the whole clip (:func:`uniform_indices`).
        fps: instead, sample ``fps`` frames per second of video time (:func:`fps_indices`), at most
            ``max_frames`` (beyond that, ``max_frames`` frames spread over the clip). With neither
            ``num_frames`` nor ``fps``, every frame is decoded.
        max_frames: memory guard: a request for more frames is refused before decoding (fps sampling is
            capped to it instead).
        max_bytes: memory guard: the decoded ``T * H * W * 3`` bytes may not exceed this.
        width, height: resize on decode; give one to keep the aspect ratio.
        num_threads: decord decoding threads (0: decord's choice).

    Returns:
        a :class:`Video` with ``frames`` ``[T, H, W, 3]`` uint8 and ``timestamps`` in seconds.

    Raises:
        FileNotFoundError: no such file. VideoDecodeError: unreadable, corrupt or empty file.
        VideoTooLargeError: over ``max_frames`` or ``max_bytes``. ValueError: invalid arguments.
        ImportError: decord is not installed.
    """
    _check_args(num_frames, fps, max_frames, max_bytes, width, height)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such video file: {path}")
    with _native_stderr_held() as held:
        try:
            return _load(path, num_frames, fps, max_frames, max_bytes, width, height, num_threads)
        except VideoDecodeError as err:
            said = re.sub(r" @ 0x[0-9a-f]+", "", held())  # ffmpeg names its context's heap address: not the file's
            if said and said not in str(err):
                raise VideoDecodeError(f"{err} (ffmpeg: {said})") from err.__cause__
            raise


def _load(path, num_frames, fps, max_frames, max_bytes, width, height, num_threads) -> Video:
    reader = _open(path, num_threads=num_threads)
    total = len(reader)
    if total <= 0:
        raise VideoDecodeError(f"{path}: the video has 0 frames")
    video_fps = float(reader.get_avg_fps())
    if fps is not None and not (math.isfinite(video_fps) and video_fps > 0):
        raise VideoDecodeError(f"{path}: the file reports no frame rate ({video_fps}); sample with num_frames=")
    if num_frames is not None:
        if num_frames > max_frames:
            raise VideoTooLargeError(
                f"{path}: asked for {num_frames} frames, over the max_frames={max_frames} memory guard; "
                f"ask for fewer, or raise max_frames (CLI: --max-frames)"
            )
        indices = uniform_indices(total, num_frames)
    elif fps is not None:
        indices = fps_indices(total, video_fps, fps, max_frames)
    else:
        if total > max_frames:
            raise VideoTooLargeError(
                f"{path}: decoding all {total} frames is over the max_frames={max_frames} memory guard; "
                f"sample with num_frames= or fps=, or raise max_frames (CLI: --max-frames)"
            )
        indices = list(range(total))

    src_h, src_w = _frame_shape(reader, path)
    out_w, out_h = _target_size(src_w, src_h, width, height)
    needed = len(indices) * out_h * out_w * 3
    if needed > max_bytes:
        raise VideoTooLargeError(
            f"{path}: decoding {len(indices)} frames of {out_w}x{out_h} RGB needs {needed / 2**20:.1f} MiB, over the "
            f"max_bytes={max_bytes} ({max_bytes / 2**20:.1f} MiB) memory guard; sample fewer frames, resize on "
            f"decode (width=/height=), or raise max_bytes"
        )
    frames = None
    if (out_w, out_h) != (src_w, src_h):
        try:
            frames = _decode(_open(path, num_threads=num_threads, width=out_w, height=out_h), indices, path)
        except VideoDecodeError:  # decord 0.6's scaler fails for some widths (e.g. 48): resize here instead
            frames = _decode_resized(reader, indices, path, out_w, out_h)
    else:
        frames = _decode(reader, indices, path)
    return Video(
        path=path,
        frames=frames,
        timestamps=_timestamps(reader, indices, video_fps),
        indices=indices,
        fps=video_fps,
        num_frames_total=total,
    )


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[Any]:
    """Send what native code writes to file descriptor 2 to a temporary file while the block runs; yields a
    function giving its first non-empty line. (Nothing is held where fd 2 cannot be redirected.)"""
    fd = 2  # where ffmpeg's C code writes, whatever Python's sys.stderr is
    try:
        saved = os.dup(fd)
    except OSError:
        yield lambda: ""
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stderr.flush()
        os.dup2(sink.fileno(), fd)

        def first_line() -> str:
            sink.seek(0)
            lines = [ln.strip() for ln in sink.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            return lines[0][:200] if lines else ""

        try:
            yield first_line
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def _check_args(num_frames, fps, max_frames, max_bytes, width, height) -> None:
    if num_frames is not None and fps is not None:
        raise ValueError("pass num_frames (uniform sampling) or fps (frames per second of video), not both")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf):
        raise ValueError(f"fps must be a number > 0, got {fps!r}")
    for name, value in (("max_frames", max_frames), ("max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name, value in (("width", width), ("height", height)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")


def _decord():
    try:
        import decord
    except ImportError as err:
        raise ImportError(
            "reading videos needs decord: pip install 'vtc-compress[video]' (or pip install decord)"
        ) from err
    return decord


def _open(path: str, num_threads: int, width: int = -1, height: int = -1):
    decord = _decord()
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), width=width, height=height, num_threads=num_threads)
    except Exception as err:  # decord raises RuntimeError or its own DECORDError (not a RuntimeError)
        text = str(err)
        if "cannot find video stream" in text:
            raise VideoDecodeError(f"{path}: no video frames (no video stream, or an empty one)") from err
        reason = _first_line(text)
        raise VideoDecodeError(f"{path}: cannot read the video (corrupt or not a video file): {reason}") from err


def _frame_shape(reader, path: str) -> tuple[int, int]:
    try:
        shape = reader[0].shape
    except Exception as err:
        raise VideoDecodeError(f"{path}: cannot decode the first frame: {_first_line(str(err))}") from err
    return int(shape[0]), int(shape[1])


def _target_size(src_w: int, src_h: int, width: int | None, height: int | None) -> tuple[int, int]:
    if width is None and height is None:
        return src_w, src_h
    if width is None:
        width = max(1, round(src_w * height / src_h))
    if height is None:
        height = max(1, round(src_h * width / src_w))
    return width, height


def _decode(reader, indices: list[int], path: str) -> np.ndarray:
    try:
        batch = reader.get_batch(indices)
    except Exception as err:
        raise VideoDecodeError(f"{path}: decoding frames failed: {_first_line(str(err))}") from err
    if hasattr(batch, "asnumpy"):  # decord's native bridge
        frames = batch.asnumpy()
    elif hasattr(batch, "numpy"):  # a torch (or other) bridge set with decord.bridge.set_bridge
        frames = batch.cpu().numpy() if hasattr(batch, "cpu") else batch.numpy()
    else:
        frames = np.asarray(batch)
    return np.ascontiguousarray(frames, dtype=np.uint8)  # [T, H, W, 3]


def _decode_resized(reader, indices: list[int], path: str, width: int, height: int, chunk: int = 16) -> np.ndarray:
    """Decode at the native size ``chunk`` frames at a time and resize each with PIL (bicubic)."""
    from PIL import Image

    out = np.empty((len(indices), height, width, 3), dtype=np.uint8)  # [T, H', W', 3]
    for start in range(0, len(indices), chunk):
        for j, frame in enumerate(_decode(reader, indices[start : start + chunk], path)):
            out[start + j] = np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))
    return out


def _timestamps(reader, indices: list[int], video_fps: float) -> list[float]:
    try:
        stamps = np.asarray(reader.get_frame_timestamp(indices), dtype=np.float64).reshape(len(indices), -1)[:, 0]
        return [float(s) for s in stamps]
    except Exception:  # no usable timestamps in the container: derive them from the frame rate
        return [i / video_fps for i in indices]


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else "unknown error"
