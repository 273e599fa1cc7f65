"""``vtc.apps.video.load_video``: the sampled frames are the intended ones (read back from the pixels), timestamps,
errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("decord")
pytest.importorskip("av")

from vtc.apps import video as vmod  # noqa: E402
from vtc.apps.video import (  # noqa: E402
    VideoDecodeError,
    VideoError,
    VideoTooLargeError,
    fps_indices,
    load_video,
    uniform_indices,
)

from .videoqa_helpers import decode_index, write_empty_video, write_video  # noqa: E402

FPS = 16
TOTAL = 48  # 3 s at 16 fps


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", TOTAL, fps=FPS)


def _decoded(video) -> list[int]:
    return [decode_index(f) for f in video.frames]


def test_uniform_sampling_decodes_the_evenly_spaced_frames(clip):
    video = load_video(clip, num_frames=8)
    expected = [0, 7, 13, 20, 27, 34, 40, 47]  # round(i * 47 / 7), both ends included
    assert video.indices == expected == uniform_indices(TOTAL, 8)
    assert _decoded(video) == expected  # what is in the pixels, not only what was asked for
    assert video.frames.shape == (8, 64, 64, 3) and video.frames.dtype == np.uint8
    assert video.timestamps == pytest.approx([i / FPS for i in expected])
    assert video.fps == FPS and video.num_frames_total == TOTAL and video.duration == pytest.approx(3.0)


def test_fps_sampling_takes_one_frame_per_period_of_video_time(clip):
    video = load_video(clip, fps=2)
    assert video.indices == [0, 8, 16, 24, 32, 40]
    assert _decoded(video) == video.indices
    assert video.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    meta = video.metadata()
    assert meta["frames_indices"] == video.indices and meta["fps"] == FPS and meta["total_num_frames"] == TOTAL


def test_fps_sampling_is_capped_by_max_frames_over_the_whole_clip(clip):
    video = load_video(clip, fps=16, max_frames=5)  # 48 frames asked; 5 spread to the end instead
    assert video.indices == [0, 12, 24, 35, 47] and _decoded(video) == video.indices
    assert load_video(clip, fps=100).indices == list(range(TOTAL))  # faster than the file: every frame once


def test_all_frames_and_resize_on_decode(clip):
    video = load_video(clip, width=32)  # height follows the aspect ratio
    assert video.frames.shape == (TOTAL, 32, 32, 3)
    assert _decoded(video) == list(range(TOTAL))
    for width, height in ((48, 16), (40, 24)):  # decord 0.6 fails to scale to width 48: resized by vtc instead
        video = load_video(clip, num_frames=2, width=width, height=height)
        assert video.frames.shape == (2, height, width, 3) and _decoded(video) == [0, 47]


def test_index_helpers_edge_cases():
    assert uniform_indices(3, 5) == [0, 1, 1, 2, 2]  # short clip: frames repeat, count kept
    assert uniform_indices(10, 1) == [4]
    assert fps_indices(10, 10.0, 0.01, 4) == [0]  # a clip shorter than one period still gives a frame


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such video file"):
        load_video(tmp_path / "nope.mp4", num_frames=4)


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100], ids=["zero-bytes", "garbage"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoDecodeError, match="cannot read the video"):
        load_video(path, num_frames=4)


def test_truncated_file(tmp_path, clip):
    path = tmp_path / "cut.mp4"
    path.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with pytest.raises(VideoError, match="cut.mp4"):
        load_video(path, num_frames=4)


@pytest.mark.parametrize("cut", [2, 3])
def test_ffmpeg_messages_do_not_reach_the_terminal(tmp_path, clip, capfd, cut):
    """decord's ffmpeg prints codec errors straight to file descriptor 2 (pages of them for a damaged file, which
    breaks a progress bar); they are held back, and the error says what went wrong in one line."""
    path = tmp_path / "cut.mp4"
    data = bytearray(clip.read_bytes())
    data[len(data) // cut :] = b"\x00" * (len(data) - len(data) // cut)  # the moov atom and the tail zeroed
    path.write_bytes(bytes(data))
    capfd.readouterr()
    with pytest.raises(VideoError) as err:
        load_video(path, num_frames=4)
    assert capfd.readouterr().err == ""
    assert "\n" not in str(err.value) and "cut.mp4" in str(err.value)


def test_empty_video(tmp_path):
    with pytest.raises(VideoDecodeError, match="no video frames"):
        load_video(write_empty_video(tmp_path / "empty.mp4"), num_frames=4)


def test_zero_frames_reported_by_the_reader(tmp_path, monkeypatch, clip):
    class Empty:
        def __len__(self):
            return 0

    monkeypatch.setattr(vmod, "_open", lambda *a, **k: Empty())
    with pytest.raises(VideoDecodeError, match="0 frames"):
        load_video(clip, num_frames=4)


def test_memory_guard_refuses_before_decoding(clip, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded despite the guard")

    monkeypatch.setattr(vmod, "_decode", no_decode)
    with pytest.raises(VideoTooLargeError, match=r"asked for 300 frames, over the max_frames=256.*--max-frames"):
        load_video(clip, num_frames=300)
    with pytest.raises(VideoTooLargeError, match=r"all 48 frames is over the max_frames=10"):
        load_video(clip, max_frames=10)
    # 8 frames of 64 x 64 x 3 = 98304 bytes
    with pytest.raises(VideoTooLargeError, match=r"8 frames of 64x64 RGB needs 0.1 MiB, over the max_bytes=90000"):
        load_video(clip, num_frames=8, max_bytes=90_000)


def test_memory_guard_counts_the_resized_frames(clip):
    assert load_video(clip, num_frames=8, max_bytes=90_000, width=32).frames.shape == (8, 32, 32, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_frames": 4, "fps": 1.0},
        {"num_frames": 0},
        {"num_frames": 2.5},
        {"fps": 0},
        {"fps": float("nan")},
        {"max_frames": 0},
        {"width": -1},
    ],
)
def test_bad_arguments(clip, kwargs):
    with pytest.raises(ValueError):
        load_video(clip, **kwargs)


def test_missing_decord_gives_an_install_hint(clip, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "decord":
            raise ImportError("No module named 'decord'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'vtc-compress\[video\]'"):
        load_video(clip, num_frames=2)
