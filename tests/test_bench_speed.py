"""Smoke tests of the speed benchmark (``eval/bench_speed.py``): outputs produced and sane, presets consistent.

No timing is asserted (``docs/design.md``, "What runs where"): only that every number is there, finite and
consistent with the token counts and FLOPs it must agree with.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

import bench_speed  # noqa: E402
import speed_presets  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full benchmark run on the tiny preset (1 repeat), in its own process like a user's run."""
    out = tmp_path_factory.mktemp("speed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "eval" / "bench_speed.py"),
        "--preset",
        "tiny",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "speed.json").read_text())


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_json_has_machine_settings_and_every_configuration(tiny_run):
    _, results = tiny_run
    assert results["machine"]["torch_threads"] == 1 and results["machine"]["device"] == "cpu"
    assert results["settings"]["repeats"] == 1 and results["settings"]["random_weights"] is True
    (entry,) = results["presets"]
    assert entry["preset"] == "tiny" and "skipped" not in entry
    preset = speed_presets.get_preset("tiny")
    assert [(r["method"], r["budget"]) for r in entry["runs"]] == [
        (m, b) for m in preset.methods for b in preset.budgets
    ]
    base = entry["baseline"]
    assert len(base["trials"]) == 2 and _finite(base["ttft_ms"]) and base["ttft_ms"] > 0
    assert _finite(base["decode_tok_s"]) and base["decode_tok_s"] > 0
    for run in entry["runs"]:
        assert len(run["trials"]) == 1
        assert run["visual_tokens_in"] == 16 and run["visual_tokens_kept"] == 8 and run["equivalent_budget"] == 0.5
        for key in ("ttft_ms", "speedup", "decode_tok_s", "vtc_ms", "vtc_record_ms", "vtc_share"):
            assert _finite(run[key]) and run[key] >= 0, key
        assert run["speedup"] == pytest.approx(base["ttft_ms"] / run["ttft_ms"])
        # the benchmark's own measurement contains everything the record counts (prepare covers it)
        assert run["vtc_ms"] >= 0.5 * run["vtc_record_ms"]


def test_flops_are_consistent(tiny_run):
    _, results = tiny_run
    entry = results["presets"][0]
    base = entry["baseline"]
    # counted LLM FLOPs (torch's counter, SDPA included) equal the analytic ones vtc.flops gives the record
    assert base["flops"]["llm"] == pytest.approx(base["llm_flops_analytic"], rel=1e-6)
    assert base["flops"]["model"] == pytest.approx(sum(base["flops"][g] for g in bench_speed.MODULE_GROUPS))
    for run in entry["runs"]:
        assert run["flops"]["llm"] == pytest.approx(run["llm_flops_analytic"], rel=1e-6)
        assert run["flops"]["vision"] == base["flops"]["vision"]  # the tower runs at full cost
        # pre-LLM methods: the end-to-end ideal is the LLM-only one diluted by the tower's fixed cost
        assert 1.0 < run["ideal_e2e"] < run["ideal_llm"]
        assert run["ideal_llm"] == pytest.approx(1.0 / run["llm_flops_ratio"])


def test_markdown_and_plot(tiny_run):
    out, results = tiny_run
    text = (out / "speed.md").read_text()
    assert "| method | budget | visual tokens |" in text
    assert "| hired | 0.5 | 8 / 16 |" in text and "| divprune | 0.5 | 8 / 16 |" in text
    assert "python eval/bench_speed.py --preset tiny --repeats 1" in text
    assert "Random weights" in text and "1 thread(s)" in text
    assert (out / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS needs Linux /proc")
def test_peak_memory_is_measured(tiny_run):
    _, results = tiny_run
    assert "VmHWM" in results["settings"]["memory_method"]
    # the method sees a 64 MiB tensor made and freed inside the measured call
    assert 60 < results["settings"]["memory_calibration_mib"] < 80
    entry = results["presets"][0]
    for value in [entry["baseline"]["peak_mib"]] + [r["peak_mib"] for r in entry["runs"]]:
        assert _finite(value) and value >= 0


def test_unsupported_family_is_marked_skipped():
    """A model vtc cannot compress gives a 'skipped' entry and nothing is timed."""
    from transformers import LlamaForCausalLM

    from vtc.testing import llama_text_config

    def build(seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM._from_config(llama_text_config()).eval()

    preset = speed_presets.Preset(
        "plain_llm", "a text-only model", build, lambda m, s: {"input_ids": torch.ones(1, 4).long()}
    )
    entry = bench_speed.run_preset(preset, bench_speed.Options(repeats=1), torch.device("cpu"), lambda _: None)
    assert entry["skipped"].startswith("skipped: model family not supported by this vtc build")
    assert entry["runs"] == []
    text = bench_speed.markdown(
        {
            "machine": bench_speed.machine(torch.device("cpu")),
            "settings": {
                "command": "x",
                "repeats": 1,
                "dtype": "float32",
                "load_start": None,
                "load_end": None,
                "seconds": 1.0,
                "memory_method": "n/a",
                "random_weights": True,
            },
            "presets": [entry],
        }
    )
    assert "**skipped: model family not supported by this vtc build" in text


def test_checkpoint_folder_without_processor_uses_the_family_prompt(tmp_path):
    model = speed_presets.get_preset("tiny").build(0)
    model.save_pretrained(tmp_path)
    preset = speed_presets.checkpoint_preset(str(tmp_path))
    opts = bench_speed.Options(repeats=1, methods=("divprune",), budgets=(0.5,), new_tokens=2)
    entry = bench_speed.run_preset(preset, opts, torch.device("cpu"), lambda _: None)
    (run,) = entry["runs"]
    assert run["visual_tokens_kept"] == 8 and run["speedup"] > 0


def _visual_tokens(model, inputs) -> int:
    """Visual tokens the stock model produces for ``inputs`` (its own encoder), to check the placeholders."""
    with torch.no_grad():
        if "pixel_values_videos" in inputs:
            out = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True)
            return sum(f.shape[0] for f in out.pooler_output)
        extra = {k: inputs[k] for k in ("image_grid_thw",) if k in inputs}
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True, **extra)
        return sum(f.shape[0] for f in out.pooler_output)


@pytest.mark.parametrize(
    "build, make_inputs",
    [
        (lambda: speed_presets.llava_model(0, 56, 14, (32, 64, 2, 2), (64, 2, 4, 2, 128)), speed_presets.llava_inputs),
        (
            lambda: speed_presets.qwen2_vl_model(0, (32, 2, 2), (64, 2, 4, 2, 128)),
            lambda m, s: speed_presets.qwen_image_inputs(m, s, grid=(1, 4, 6)),
        ),
        (
            lambda: speed_presets.onevision_model(0, 56, (32, 64, 2, 2), (64, 2, 4, 2, 128)),
            lambda m, s: speed_presets.onevision_video_inputs(m, s, frames=3),
        ),
        (
            lambda: speed_presets.qwen3_vl_model(0, (32, 2, 2), (64, 2, 4, 2, 128)),
            lambda m, s: speed_presets.qwen_image_inputs(m, s, grid=(1, 4, 6)),
        ),
        (
            lambda: speed_presets.internvl_model(0, 56, (32, 2, 2), (64, 2, 4, 2, 128)),
            lambda m, s: speed_presets.internvl_inputs(m, s, tiles=3),
        ),
    ],
    ids=["llava15", "qwen2vl", "onevision_video", "qwen3vl", "internvl"],
)
def test_preset_builders_small(build, make_inputs):
    """Each preset's builders at a small size: placeholder count = the model's visual tokens, forward runs,
    and the analytic ViT FLOPs used for the real-scale column equal what torch counts on the same tower."""
    model = build()
    inputs = make_inputs(model, 0)
    cfg = model.config
    ids = inputs["input_ids"]
    placeholders = int(((ids == cfg.image_token_id) | (ids == getattr(cfg, "video_token_id", -1))).sum())
    assert placeholders == _visual_tokens(model, inputs)
    flops = bench_speed.count_flops(model, inputs)
    tower = speed_presets.Tower.of(cfg.vision_config)
    if "pixel_values_videos" in inputs:
        frames = inputs["pixel_values_videos"].shape[1]
        per = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        expected = speed_presets.vit_flops(tower, frames * per, [per] * frames)
    elif "image_grid_thw" in inputs:
        patches = int(inputs["image_grid_thw"].prod())
        expected = speed_presets.vit_flops(tower, patches)
    elif cfg.model_type == "internvl":  # tiles: CLS + patches each, attention within a tile
        tiles = inputs["pixel_values"].shape[0]
        per = (cfg.vision_config.image_size[0] // cfg.vision_config.patch_size[0]) ** 2 + 1
        expected = speed_presets.vit_flops(tower, tiles * per, [per] * tiles)
    else:
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        expected = speed_presets.vit_flops(tower, side**2 + 1)
    if "image_grid_thw" in inputs:  # Qwen's mergers (and DeepStack's) sit inside model.visual: add their matmuls
        visual = model.model.visual
        mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", [])]
        merger = sum(2 * p.numel() for m in mergers for p in m.parameters() if p.dim() == 2)
        expected += merger * int(inputs["image_grid_thw"].prod()) // 4
    assert flops["vision"] == pytest.approx(expected, rel=1e-6)


def test_presets_have_what_the_docs_promise():
    assert {"llava15", "qwen2vl", "onevision_video", "qwen3vl", "internvl", "tiny"} <= set(speed_presets.PRESETS)
    assert set(bench_speed.DEFAULT_PRESETS) <= set(speed_presets.PRESETS)
    for name in bench_speed.DEFAULT_PRESETS:
        preset = speed_presets.get_preset(name)
        assert preset.reference is not None and preset.workload is not None
    with pytest.raises(ValueError, match="already registered"):
        speed_presets.register(speed_presets.get_preset("tiny"))


def test_a_configuration_failing_on_its_first_call_is_reported_and_the_rest_run(monkeypatch):
    """A method that breaks on a family (e.g. one just added) is marked FAILED; the other configurations run."""
    from vtc.pruners.divprune import DivPrunePruner

    def broken(self, image):
        raise RuntimeError("boom")

    monkeypatch.setattr(DivPrunePruner, "reduce", broken)
    opts = bench_speed.Options(repeats=1, methods=("divprune", "hired"), budgets=(0.5,), new_tokens=2)
    entry = bench_speed.run_preset(speed_presets.get_preset("tiny"), opts, torch.device("cpu"), lambda _: None)
    failed, ok = entry["runs"]
    assert failed["skipped"].startswith("FAILED on its first call: RuntimeError: boom")
    assert ok["method"] == "hired" and len(ok["trials"]) == 1 and ok["speedup"] > 0
