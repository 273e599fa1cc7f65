"""``vtc videoqa`` / ``vtc.apps.pipelines.VideoQA`` end to end on synthetic videos and a tiny Qwen2-VL saved to disk.

The tiny model answers at random: the tests check what the pipeline writes and prints, not the accuracy.
"""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("decord")
pytest.importorskip("av")
pytest.importorskip("torchvision")  # Qwen2-VL's video processor

import vtc  # noqa: E402
from vtc.apps.cli import main  # noqa: E402
from vtc.apps.pipelines import VideoQA, load_checkpoint, load_samples  # noqa: E402
from vtc.apps.pipelines.results import read_rows, shard_path  # noqa: E402

from .videoqa_helpers import save_tiny_qwen2_vl, write_video  # noqa: E402

QUESTION = {"question": "which way does the square move ?", "options": ["left", "right", "up", "down"], "answer": "B"}
GOOD = ["0", "1", "3", "4"]
BAD = {"2": "cannot read the video", "5": "no such video file"}
FAST = {"max_new_tokens": 3}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("videoqa")
    clips = root / "data" / "clips"
    clips.mkdir(parents=True)
    rows = []
    for i, frames in zip((0, 1, 3, 4), (24, 32, 40, 48), strict=True):
        write_video(clips / f"v{i}.mp4", frames)
        rows.append({"id": i, "video": f"clips/v{i}.mp4", **QUESTION})
    (clips / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 40)
    rows.insert(2, {"id": 2, "video": "clips/broken.mp4", "question": "what color is it ?", "answer": "red"})
    rows.append({"id": "5", "video": "clips/missing.mp4", **QUESTION})
    data = root / "data" / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_tiny_qwen2_vl(root / "model")
    return {"root": root, "data": data, "model": root / "model"}


@pytest.fixture(scope="module")
def loaded(workspace):
    return load_checkpoint(workspace["model"], device="cpu")


def _cli(workspace, out, *extra):
    args = ["videoqa", "--model", str(workspace["model"]), "--data", str(workspace["data"]), "--out", str(out)]
    return main([*args, "--frames", "8", "--max-new-tokens", "3", "--no-progress", *extra])


def _spy(monkeypatch) -> list[str]:
    ran: list[str] = []
    original = VideoQA.answer

    def answer(self, sample):
        ran.append(sample.key)
        return original(self, sample)

    monkeypatch.setattr(VideoQA, "answer", answer)
    return ran


def test_cli_writes_results_records_broken_videos_and_resumes(workspace, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.jsonl"
    ran = _spy(monkeypatch)
    assert _cli(workspace, out, "--method", "random", "--budget", "0.25", "--limit", "3") == 0
    text = capsys.readouterr().out
    assert ran == ["0", "1", "2"]
    assert "accuracy [random@0.25]:" in text and "3/6 samples done, 1 failed, 3 not run yet" in text
    assert "uncompressed" in text and "ms" in text  # prefill with and without compression

    # an interrupted run: the last row lost and half of a row written
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:25])
    ran.clear()
    assert _cli(workspace, out, "--method", "random", "--budget", "0.25") == 0
    text = capsys.readouterr().out
    assert ran == ["2", "3", "4", "5"]  # only what was missing
    assert "6/6 samples done, 2 failed" in text
    rows = read_rows(out)
    assert [str(r["id"]) for r in rows] == ["0", "1", "2", "3", "4", "5"]  # dataset order, one row each
    by_id = {str(r["id"]): r for r in rows}
    for key, message in BAD.items():
        assert message in by_id[key]["error"] and by_id[key]["error_stage"] == "video"
        assert by_id[key]["prediction"] is None
    for key in GOOD:
        row = by_id[key]
        assert row["error"] is None and isinstance(row["raw"], str) and isinstance(row["correct"], bool)
        assert row["visual_tokens_before"] == 64 and row["visual_tokens_after"] == 16  # 4 x 8 x 8 / 4 -> 25 %
        assert row["prefill_s"] > 0 and row["prefill_s_uncompressed"] > 0 and row["frames"] == 8
        assert row["run"]["method"] == "random" and row["run"]["budget"] == 0.25

    ran.clear()  # a third run has nothing to do
    assert _cli(workspace, out, "--method", "random", "--budget", "0.25") == 0
    assert ran == [] and "6/6 samples done" in capsys.readouterr().out


def test_resuming_with_another_setup_is_refused(workspace, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert _cli(workspace, out, "--method", "uniform", "--budget", "0.25", "--limit", "1", "--no-timing") == 0
    capsys.readouterr()
    assert _cli(workspace, out, "--method", "uniform", "--budget", "0.5", "--no-timing") == 1
    _one_line_and_a_hint(capsys.readouterr().err, "another setup")
    with pytest.raises(ValueError, match="another setup"):  # --debug: the exception itself, with its traceback
        _cli(workspace, out, "--method", "uniform", "--budget", "0.5", "--no-timing", "--debug")


def _one_line_and_a_hint(err: str, words: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith(("vtc", "hint"))]
    assert len(lines) == 2 and words in lines[0] and lines[1].startswith("hint: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "case, words",
    [
        ("no model folder", "no such checkpoint folder"),
        ("malformed JSONL", "not valid JSON"),
        ("unknown option", "unknown option(s) ['nope']"),
        ("budget below DyCoke's floor", "budget >= 0.250"),
        ("a checkpoint without video", "takes no video input"),
    ],
)
def test_cli_user_errors_print_one_line_and_a_hint(workspace, tmp_path, capsys, case, words):
    model, data = str(workspace["model"]), str(workspace["data"])
    extra = ["--method", "random"]
    if case == "no model folder":
        model = str(tmp_path / "nowhere")
    elif case == "malformed JSONL":
        (tmp_path / "bad.jsonl").write_text('{"id": 1, "video": "v.mp4", "question": "q"}\n{"id": 2,\n')
        data = str(tmp_path / "bad.jsonl")
    elif case == "unknown option":
        extra += ["--option", "nope=1"]
    elif case == "budget below DyCoke's floor":  # found once, at the start, on a blank video of --frames frames
        extra = ["--method", "dycoke", "--budget", "0.1"]
    else:
        from vtc.testing import tiny_llava

        tiny_llava().save_pretrained(tmp_path / "llava")
        for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
            if (workspace["model"] / name).exists():
                (tmp_path / "llava" / name).write_bytes((workspace["model"] / name).read_bytes())
        model = str(tmp_path / "llava")
    args = ["videoqa", "--model", model, "--data", data, "--out", str(tmp_path / "o.jsonl"), "--frames", "8", *extra]
    assert main([*args, "--no-progress"]) == 1
    _one_line_and_a_hint(capsys.readouterr().err, words)
    assert not (tmp_path / "o.jsonl").exists()  # nothing ran


def test_no_method_says_it_runs_uncompressed(workspace, tmp_path, capsys):
    assert _cli(workspace, tmp_path / "o.jsonl", "--limit", "1", "--no-timing") == 0
    assert "no --method given: answering uncompressed" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["random", "divprune", "uniform", "pool", "fastv"])
def test_compressed_runs_record_fewer_visual_tokens(loaded, workspace, method):
    model, processor = loaded
    sample = load_samples(workspace["data"])[0]
    plain = VideoQA(model, processor, method=None, num_frames=8, timing=False, **FAST).answer(sample)
    assert plain["visual_tokens_before"] == plain["visual_tokens_after"] == 64 and plain["error"] is None
    row = VideoQA(model, processor, method=method, budget=0.25, num_frames=8, timing=False, **FAST).answer(sample)
    assert row["error"] is None and row["visual_tokens_before"] == 64 and row["visual_tokens_after"] == 16
    assert not vtc.is_compressed(model)  # compressed only inside the call


def test_compare_gives_both_accuracies_and_prefill_times(loaded, workspace, tmp_path, capsys):
    model, processor = loaded
    qa = VideoQA(model, processor, method="divprune", budget=0.25, fps=8, max_frames=6, compare=True, **FAST)
    summary = qa.run(workspace["data"], tmp_path / "r.jsonl", limit=2, progress=False)
    rows = read_rows(tmp_path / "r.jsonl")
    assert all(isinstance(r["correct_uncompressed"], bool) and r["frames"] == 6 for r in rows)
    assert summary.scored == summary.scored_uncompressed == 2 and summary.timed == 2
    assert summary.prefill_s > 0 and summary.prefill_s_uncompressed > 0
    text = capsys.readouterr().out
    assert "| uncompressed: " in text and "prefill mean over 2 samples: uncompressed" in text


def test_plain_prompt_without_a_chat_template(workspace, tmp_path):
    model, processor = load_checkpoint(save_tiny_qwen2_vl(tmp_path / "plain", chat_template=False))
    qa = VideoQA(model, processor, method="pool", budget=0.5, num_frames=4, timing=False, **FAST)
    sample = load_samples(workspace["data"])[0]
    assert qa.prompt(sample).startswith("<|video_pad|>\nwhich way does the square move ?\nA. left\nB. right")
    row = qa.answer(sample)
    assert row["error"] is None and row["visual_tokens_before"] == 32 and row["visual_tokens_after"] == 16


def test_torchrun_style_shards_are_merged_by_rank_0(loaded, workspace, tmp_path):
    """Two ranks at once (threads, separate model copies); rank 0 waits for rank 1's shard, then merges."""
    model, processor = loaded
    out = tmp_path / "results.jsonl"
    other, other_proc = load_checkpoint(workspace["model"], device="cpu")
    results = {}

    def rank(r, m, p):
        qa = VideoQA(m, p, method="uniform", budget=0.25, num_frames=4, timing=False, **FAST)
        results[r] = qa.run(workspace["data"], out, rank=r, world_size=2, progress=False, poll=0.05, verbose=False)

    worker = threading.Thread(target=rank, args=(1, other, other_proc))
    worker.start()
    rank(0, model, processor)
    worker.join()
    assert results[1] is None and results[0].done == 6 and results[0].failed == 2
    assert [str(r["id"]) for r in read_rows(out)] == ["0", "1", "2", "3", "4", "5"]
    assert not list(tmp_path.glob("results.jsonl.shard-*"))  # merged and removed


def test_rank_0_resumes_leftover_shards_and_times_out_on_a_missing_rank(loaded, workspace, tmp_path):
    model, processor = loaded
    out = tmp_path / "results.jsonl"
    qa = VideoQA(model, processor, method="uniform", budget=0.25, num_frames=4, timing=False, **FAST)
    qa.run(workspace["data"], out, rank=1, world_size=3, progress=False)  # a world of 3, interrupted after rank 1
    assert len(read_rows(shard_path(out, 1, 3))) == 2  # samples 1 and 4
    with pytest.raises(TimeoutError, match=r"rank 1: 2 samples missing"):
        # ranks of 2: rank 1 owns ids 1, 3, 5; id 1 is done in the world-of-3 shard
        qa.run(workspace["data"], out, rank=0, world_size=2, progress=False, shard_timeout=0.2, poll=0.05)
    # run alone (world of 1): the world-of-3 shard counts as done and is merged in
    summary = qa.run(workspace["data"], out, progress=False, verbose=False)
    assert summary.done == 6 and not list(tmp_path.glob("results.jsonl.shard-*"))


def test_code_errors_stop_the_run_and_keep_finished_rows(loaded, workspace, tmp_path, monkeypatch):
    model, processor = loaded
    out = tmp_path / "results.jsonl"
    qa = VideoQA(model, processor, method="random", budget=0.25, num_frames=4, timing=False, **FAST)
    calls = []
    original = VideoQA._generate

    def broken_generate(self, inputs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in the model")
        return original(self, inputs)

    monkeypatch.setattr(VideoQA, "_generate", broken_generate)
    with pytest.raises(RuntimeError, match="a bug in the model"):
        qa.run(workspace["data"], out, progress=False)
    assert [str(r["id"]) for r in read_rows(out)] == ["0"]


def test_many_data_failures_in_a_row_stop_the_run(loaded, tmp_path):
    model, processor = loaded
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": i, "video": f"nope{i}.mp4", "question": "q"}) + "\n" for i in range(5)))
    qa = VideoQA(model, processor, method="random", num_frames=4, max_consecutive_failures=3)
    with pytest.raises(RuntimeError, match="3 samples in a row failed"):
        qa.run(data, tmp_path / "r.jsonl", progress=False)
    assert len(read_rows(tmp_path / "r.jsonl")) == 3


def test_processor_rejections_are_data_errors(loaded, workspace, monkeypatch):
    model, processor = loaded
    qa = VideoQA(model, processor, method="random", num_frames=4, timing=False, **FAST)

    def reject(*args, **kwargs):
        raise ValueError("absolute aspect ratio must be smaller than 200")

    monkeypatch.setattr(qa, "processor", reject)
    monkeypatch.setattr(VideoQA, "prompt", lambda self, sample: "q")
    row = qa.answer(load_samples(workspace["data"])[0])
    assert row["error_stage"] == "processor" and "aspect ratio" in row["error"]


def test_setup_errors_fail_before_any_sample(loaded, workspace, tmp_path):
    model, processor = loaded
    with pytest.raises(ValueError, match="processor"):
        VideoQA(model)
    with pytest.raises(TypeError, match="valid"):  # unknown method option: vtc's own error, at construction
        VideoQA(model, processor, method="random", options={"nope": 1})
    with pytest.raises(FileNotFoundError, match="checkpoint folder"):
        VideoQA(tmp_path / "none")
    with pytest.raises(ValueError, match="max_frames"):
        VideoQA(model, processor, num_frames=100, max_frames=64)
    with pytest.raises(ValueError, match="budget >= 0.250"):  # DyCoke's floor, on a blank video, once
        VideoQA(model, processor, method="dycoke", budget=0.1, num_frames=8)
    vtc.compress(model, "random", budget=0.5)
    try:
        with pytest.raises(ValueError, match="already compressed"):
            VideoQA(model, processor, method="random")
    finally:
        vtc.restore(model)


@pytest.mark.parametrize(
    "extra",
    [
        ["--frames", "4", "--fps", "1"],
        ["--option", "novalue"],
        ["--method", "nope"],
        ["--frames", "0"],
        ["--frames", "100"],  # over --max-frames: found once, at the start
    ],
)
def test_cli_argument_errors(workspace, tmp_path, extra, capsys):
    with pytest.raises(SystemExit) as err:
        main(["videoqa", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"), *extra])
    assert err.value.code == 2
    _one_line_and_a_hint(capsys.readouterr().err, "error")


@pytest.mark.slow
def test_a_real_torchrun_launch_merges_to_the_single_process_results(workspace, tmp_path):
    """``torchrun --nproc_per_node=2`` (two CPU processes, c10d rendezvous on localhost) = one process."""
    import os
    import subprocess
    import sys

    common = ["--model", str(workspace["model"]), "--data", str(workspace["data"]), "--frames", "8"]
    common += ["--max-new-tokens", "3", "--no-progress", "--method", "uniform", "--budget", "0.25"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    dist = subprocess.run(
        [*launch, "-m", "vtc.cli", "videoqa", *common, "--out", str(tmp_path / "dist.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert dist.returncode == 0, dist.stderr[-2000:]
    assert main(["videoqa", *common, "--out", str(tmp_path / "single.jsonl")]) == 0
    compared = ("id", "prediction", "raw", "correct", "error", "visual_tokens_before", "visual_tokens_after")
    merged, single = read_rows(tmp_path / "dist.jsonl"), read_rows(tmp_path / "single.jsonl")
    assert [{k: r.get(k) for k in compared} for r in merged] == [{k: r.get(k) for k in compared} for r in single]
    assert any(r["error"] for r in merged)  # the broken clips: their errors compared too
    assert len(merged) == 6 and not list(tmp_path.glob("dist.jsonl.shard-*"))
    assert "accuracy" in dist.stdout  # rank 0 printed the summary line
