"""vtc's lmms-eval plugin inside an unmodified lmms-eval, offline: tiny LLaVA and Qwen2-VL on the shipped task.

Each run goes the way ``lmms-eval --model vtc_... --model_args ...`` goes (the registry resolves the name
from the entry point, ``create_from_arg_string`` parses the arguments), then lmms-eval's Python API
evaluates the example task in ``examples/lmms_eval_task``. A forward pre-hook on the model counts the image
placeholders that reach the language model in each prefill.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vtc

from .tiny_pretrained import QWEN3_PIXELS, QWEN_PIXELS, save_gemma3, save_internvl, save_llava, save_qwen

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("lmms_eval") is None,
        reason="lmms-eval is not installed (pip install -e '.[lmms-eval]')",
    ),
    # upstream qwen2_vl passes min/max_pixels to the processor call, which transformers 5 deprecates
    pytest.mark.filterwarnings("ignore:Passing `min_pixels` and `max_pixels`:FutureWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "examples" / "lmms_eval_task"
TASK = "vtc_shapes"
LIMIT = 3  # documents per run
N_VISUAL = 16  # visual tokens per image of every tiny checkpoint
#: upstream's qwen3_vl chat wrapper sizes images itself (qwen-vl-utils, 32 px units, the task's 96 px pictures)
#: upstream's internvl_hf tiles them (max_patches=4: 2 x 2 tiles of 32 px plus the thumbnail, 16 tokens each)
N_VISUAL_OF = {"qwen3_vl": 9, "internvl": 80}
BUDGET = 0.25
_QWEN_ARGS = ",device_map=cpu,min_pixels={min_pixels},max_pixels={max_pixels}".format(**QWEN_PIXELS)
_QWEN3_ARGS = ",device_map=cpu,min_pixels={min_pixels},max_pixels={max_pixels}".format(**QWEN3_PIXELS)

#: family -> (lmms-eval model name, extra model_args, the methods run besides method=none)
CASES = {
    "llava": ("vtc_llava_hf", "", ("hired", "fastv")),  # chat wrapper
    "qwen2_vl": ("vtc_qwen2_vl", _QWEN_ARGS, ("divprune", "pool")),  # simple wrapper
    "qwen2_5_vl": ("vtc_qwen2_5_vl", _QWEN_ARGS, ("visionzip",)),  # chat wrapper, bfloat16 upstream
    "qwen3_vl": ("vtc_qwen3_vl", _QWEN3_ARGS, ("divprune",)),  # chat wrapper (DeepStack rows gathered)
    "internvl": ("vtc_internvl", ",device_map=cpu,max_patches=4", ("hired",)),  # chat wrapper, tiles as partitions
    "gemma3": ("vtc_gemma3", ",device_map=cpu", ("divprune",)),  # simple wrapper, bfloat16 upstream
}


@pytest.fixture(scope="module")
def lmms(tmp_path_factory):
    """lmms-eval's API, offline, with a task manager that knows only the example task (run from the repo root)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}.items():
            mp.setenv(key, value)
        mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
        mp.chdir(ROOT)  # the task's JSONL path is relative to the repository root
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.models import get_model
        from lmms_eval.tasks import TaskManager

        tasks = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
        evaluate = functools.partial(
            simple_evaluate,
            tasks=[TASK],
            task_manager=tasks,
            limit=LIMIT,
            log_samples=True,
            batch_size=1,
            device="cpu",
        )
        yield SimpleNamespace(evaluate=evaluate, get_model=get_model)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    saved = {"llava": save_llava(root / "llava"), "internvl": save_internvl(root / "internvl")}
    saved["gemma3"] = save_gemma3(root / "gemma3")
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        saved[family] = save_qwen(root / family, family)
    return saved


def _model_args(family: str, checkpoints, extra: str = "") -> tuple[str, str]:
    name, family_args, _ = CASES[family]
    return name, f"pretrained={checkpoints[family]}{family_args}{extra}"


def _run(lmms, name: str, args: str, force_simple: bool = False):
    """Build the wrapper as ``simple_evaluate(model=name, model_args=args)`` does, count placeholders, evaluate."""
    lm = lmms.get_model(name, force_simple).create_from_arg_string(args, {"batch_size": 1, "device": "cpu"})
    hf = lm.model
    placeholders: list[int] = []

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[-1] > 1:  # prefill, not a decode step
            placeholders.extend((ids == hf.config.image_token_id).sum(-1).tolist())

    handle = hf.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        out = lmms.evaluate(model=lm)
    finally:
        handle.remove()
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return SimpleNamespace(
        model=hf,  # lmms-eval's evaluate() ends with lm.clean(), which drops the wrapper's reference to it
        out=out,
        answers=[s["resps"][0][0] for s in samples],  # [repeat][response]
        input_tokens=[(s["token_counts"][0] or {}).get("input_tokens") for s in samples],
        placeholders=placeholders,
    )


def test_entry_point_resolves_every_wrapper(lmms):
    from vtc.apps.lmms_eval import gemma3, internvl, llava_hf, qwen2_5_vl, qwen2_vl, qwen3_vl

    assert lmms.get_model("vtc_llava_hf") is llava_hf.VtcLlavaHfChat
    assert lmms.get_model("vtc_llava_hf", force_simple=True) is llava_hf.VtcLlavaHf
    assert lmms.get_model("vtc_qwen2_vl") is qwen2_vl.VtcQwen2VL
    assert lmms.get_model("vtc_qwen2_5_vl") is qwen2_5_vl.VtcQwen2_5VLChat
    assert lmms.get_model("vtc_qwen2_5_vl", force_simple=True) is qwen2_5_vl.VtcQwen2_5VL
    assert lmms.get_model("vtc_qwen3_vl") is qwen3_vl.VtcQwen3VLChat
    assert lmms.get_model("vtc_qwen3_vl", force_simple=True) is qwen3_vl.VtcQwen3VL
    assert lmms.get_model("vtc_internvl") is internvl.VtcInternVLChat
    assert lmms.get_model("vtc_gemma3") is gemma3.VtcGemma3


@pytest.mark.parametrize("family", sorted(CASES))
def test_baseline_and_two_methods_feed_fewer_visual_tokens(lmms, checkpoints, family):
    name, base_args = _model_args(family, checkpoints)
    base = _run(lmms, name, base_args + ",method=none")
    assert not vtc.is_compressed(base.model)
    n_visual = N_VISUAL_OF.get(family, N_VISUAL)
    assert base.placeholders == [n_visual] * LIMIT
    assert all(isinstance(a, str) for a in base.answers)
    kept = vtc.keep_count(BUDGET, n_visual)
    for method in CASES[family][2]:
        run = _run(lmms, name, f"{base_args},method={method},budget={BUDGET}")
        record = vtc.last_record(run.model)
        assert record.method == method and record.config["budget"] == BUDGET
        in_llm = vtc.Stage.LLM_LAYER in vtc.get_method(method).stages
        # pre-LLM methods: fewer placeholders reach the LLM; in-LLM ones drop rows inside it (fewer in the last layer)
        assert run.placeholders == [n_visual if in_llm else kept] * LIMIT, method
        assert record.visual_per_layer[0][-1] == kept
        # the compressed prefill length is what lmms-eval records as input tokens (samples and efficiency summary)
        assert run.input_tokens == [n - (n_visual - kept) for n in base.input_tokens], method
        assert run.out["efficiency"]["overall"]["total_input_tokens"] == sum(run.input_tokens)
        assert all(isinstance(a, str) and a for a in run.answers)


def test_error_inside_vtc_fails_the_run(lmms, checkpoints, monkeypatch):
    # Upstream's chat llava_hf catches every exception around generate() and answers "" instead.
    def boom(self, image):
        raise RuntimeError("boom inside vtc")

    monkeypatch.setattr(vtc.get_method("hired").method_class, "reduce", boom)
    name, args = _model_args("llava", checkpoints, f",method=hired,budget={BUDGET}")
    with pytest.raises(RuntimeError, match="boom inside vtc"):
        _run(lmms, name, args)
    with pytest.raises(RuntimeError, match="boom inside vtc"):
        _run(lmms, name, args, force_simple=True)
    # strict=false hands the error back to upstream, which swallows it: empty answers, no failure
    lenient = _run(lmms, name, args + ",strict=false")
    assert lenient.answers == [""] * LIMIT


def test_arguments_are_validated_before_the_model_loads(lmms, checkpoints):
    name, args = _model_args("llava", checkpoints)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['alpa'\] for method 'hired'"):
        lmms.get_model(name).create_from_arg_string(args + ",method=hired,alpa=0.3", {"device": "cpu"})
    with pytest.raises(ValueError, match="budget=0 keeps no tokens"):
        lmms.get_model(name).create_from_arg_string(args + ",method=hired,budget=0", {"device": "cpu"})


def test_loglikelihood_logits_are_laid_out_on_input_positions(checkpoints):
    from vtc import testing
    from vtc.apps.lmms_eval.wrapper import _logits_in_input_rows

    model = testing.tiny_llava()
    inputs = testing.llava_inputs(model)
    with torch.no_grad():
        plain = model(**inputs).logits
        vtc.compress(model, method="hired", budget=1.0)
        with _logits_in_input_rows(model):
            full = model(**inputs).logits
        vtc.restore(model)
        vtc.compress(model, method="hired", budget=BUDGET)
        with _logits_in_input_rows(model):
            remapped = model(**inputs).logits
        short = model(**inputs).logits
    assert "forward" not in model.__dict__
    torch.testing.assert_close(full, plain, rtol=0, atol=0)
    source = torch.tensor(vtc.last_record(model).samples[0].source_positions)
    assert remapped.shape == plain.shape and short.shape[1] == len(source) < plain.shape[1]
    torch.testing.assert_close(remapped[0, source], short[0], rtol=0, atol=0)


def _offline_assets_missing() -> bool:
    from vtc.offline import assets

    return bool(assets.missing_assets())


@pytest.mark.slow
@pytest.mark.skipif(_offline_assets_missing(), reason="offline VLM assets missing (see tests/test_offline.py)")
def test_readme_command_on_the_offline_vlm_and_a_local_easyvqa_task(lmms, tmp_path):
    """The README's lmms-eval command: the real offline VLM, easy-VQA questions as a local JSONL task."""
    from lmms_eval.tasks import TaskManager

    from vtc.offline import build_offline_vlm
    from vtc.offline.easyvqa import write_jsonl

    limit = 8
    assert write_jsonl(str(TASK_DIR / "easyvqa_test.jsonl"), questions=limit) == limit  # the YAML's data file
    vlm = build_offline_vlm(log=lambda m: None)
    tasks = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    runs = {}
    for args in ("method=none", f"method=pool,budget={BUDGET}"):
        lm = lmms.get_model("vtc_llava_hf").create_from_arg_string(
            f"pretrained={vlm},{args}", {"batch_size": 1, "device": "cpu"}
        )
        hf = lm.model
        out = lmms.evaluate(model=lm, tasks=["vtc_easyvqa"], task_manager=tasks, limit=limit)
        samples = sorted(out["samples"]["vtc_easyvqa"], key=lambda s: s["doc_id"])
        runs[args.split(",")[0]] = (out["results"]["vtc_easyvqa"]["exact_match,none"], samples, hf)
    base_acc, base_samples, _ = runs["method=none"]
    pool_acc, pool_samples, pool_model = runs["method=pool"]
    assert base_acc >= 0.5  # a trained model (about 80 % on easy-VQA), not a babbling one
    assert vtc.last_record(pool_model).images[0].counts == {"input": 64, "pre_llm": 16}
    base_tokens = [s["token_counts"][0]["input_tokens"] for s in base_samples]
    pool_tokens = [s["token_counts"][0]["input_tokens"] for s in pool_samples]
    assert pool_tokens == [n - 48 for n in base_tokens]
