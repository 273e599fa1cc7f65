"""``vtc demo --model tiny``: compress the timing model on the bundled photo and show what changed.

(The default ``vtc demo`` runs the real offline VLM instead: :mod:`vtc.offline.demo`.) The timing model is a
LLaVA-1.5-layout model built from a ``transformers`` config with seeded random weights (nothing is
downloaded): a CLIP tower at 336 px with 14 px patches (24 x 24 = 576 visual tokens per image, as in
LLaVA-1.5), the 2-layer MLP projector and a scaled-down Llama decoder. Its timings and token counts are
real; its text is meaningless (random weights).
"""

from __future__ import annotations

import importlib.resources
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..testing import IMAGE_TOKEN, PAD_TOKEN, llama_text_config

IMAGE_SIZE, PATCH = 336, 14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def default_model(seed: int = 0) -> nn.Module:
    """The tiny timing model (see module docstring): about 30 M random parameters."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=128,
    )
    text = llama_text_config(hidden=512, layers=8, heads=8, kv_heads=8, inter=1376)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_TOKEN,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


def default_image() -> Image.Image:
    """The bundled photo (public domain, see ``vtc/assets/README.md``)."""
    path = importlib.resources.files("vtc") / "assets" / "grace_hopper.jpg"
    with importlib.resources.as_file(path) as p:
        return Image.open(p).convert("RGB")


def pixel_values(image: Image.Image) -> torch.Tensor:
    """CLIP preprocessing at 336 px: resize the short side, center-crop, normalise. ``[1, 3, 336, 336]``."""
    from .viz import fit_square

    square = fit_square(image, IMAGE_SIZE)
    x = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0)  # [H, W, 3]
    x = (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return x.permute(2, 0, 1).unsqueeze(0)


def prompt_ids(n_visual: int) -> torch.Tensor:
    """``USER: <image>\\n<question> ASSISTANT:`` with fixed stand-in token ids (the model has no tokenizer)."""
    before, after = [1, 11, 12, 13], [14, 21, 22, 23, 24, 25, 26, 27, 15, 16, 17]
    return torch.tensor([before + [IMAGE_TOKEN] * n_visual + after])


@dataclass
class Row:
    name: str
    visual_tokens: int  # after the last stage
    equivalent: float  # layer-averaged visual tokens / uncompressed
    prefill_ms: float
    flops_ratio: float
    vtc_ms: float


def _time_prefill(model: nn.Module, inputs: dict) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(**inputs, use_cache=True)
        return (time.perf_counter() - start) * 1000


def interleaved_times(
    model: nn.Module, method: str, budget: float | int, repeats: int, time_call: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """``(compressed, uncompressed)`` times of ``time_call``, taken in turn so load drift hits both alike.

    The model comes in compressed with ``method`` and leaves compressed the same way.
    """
    import vtc

    times, base = [], []
    for _ in range(repeats):
        times.append(time_call())
        vtc.restore(model)
        base.append(time_call())
        vtc.compress(model, method, budget=budget)
    return times, base


def run(methods: Sequence[str], budget: float | int, out: str | None, repeats: int = 5, seed: int = 0) -> list[Row]:
    """Measure the uncompressed model and each method on the bundled photo; write the kept-token picture."""
    import vtc

    from .viz import contact_sheet, fit_square, kept_overlay

    model = default_model(seed)
    image = default_image()
    n = (IMAGE_SIZE // PATCH) ** 2
    inputs = {"input_ids": prompt_ids(n), "pixel_values": pixel_values(image)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    _time_prefill(model, inputs)  # warm-up
    base_times: list[float] = []
    rows, tiles = [], []
    for name in methods:
        vtc.compress(model, name, budget=budget)
        try:
            _time_prefill(model, inputs)  # warm-up of this method
            times, base = interleaved_times(model, name, budget, repeats, lambda: _time_prefill(model, inputs))
            base_times += base
            _time_prefill(model, inputs)
            rec = vtc.last_record(model)
        finally:
            vtc.restore(model)
        final = list(rec.images[0].counts.values())[-1]
        row = Row(name, final, rec.equivalent_budget, statistics.median(times), rec.flops["ratio"], rec.seconds_in_vtc)
        row.vtc_ms *= 1000
        rows.append(row)
        tiles.append((f"{name} ({final}/{n})", kept_overlay(fit_square(image, IMAGE_SIZE), rec.images[0])))
    base = Row("uncompressed", n, 1.0, statistics.median(base_times), 1.0, 0.0)
    rows.insert(0, base)
    if out:  # the image as the model sees it uncompressed, then each method's last stage
        contact_sheet([(f"uncompressed ({n}/{n})", fit_square(image, IMAGE_SIZE)), *tiles]).save(out)
    return rows


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def table(rows: list[Row]) -> str:
    base = rows[0].prefill_ms
    lines = [
        "| run | visual tokens (last stage) | equivalent budget | prefill ms (median) | speed-up | FLOPs ratio "
        "| time in vtc ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.visual_tokens} | {r.equivalent:.3f} | {r.prefill_ms:.1f} | {base / r.prefill_ms:.2f}x "
            f"| {r.flops_ratio:.3f} | {r.vtc_ms:.1f} |"
        )
    return "\n".join(lines)
