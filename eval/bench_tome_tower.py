"""ToMe's vision-tower speed-up in models that pack full grids: the LLaVA-OneVision video and Qwen2-VL presets, CPU.

ToMe merges inside the SigLIP tower of LLaVA-OneVision and copies the merged tokens back onto each frame's grid
after the feature block (``docs/tome.md``), so the tower's later blocks run on fewer tokens while the model still
pools and packs the full grid. This benchmark times, per configuration, the **vision tower** alone (forward
hooks on ``model.model.vision_tower``: every block, merging included) and the whole **prefill**
(``model(**inputs)``: tower, projector, pooling, vtc's own work, LLM), median over rounds that time every row in
turn (machine drift hits all rows alike):

* ``none``: the untouched model;
* ``tome @ b``: ToMe alone (a tower speed-up: the LLM still receives every visual token);
* ``divprune @ 0.1`` and ``tome+divprune @ 0.1``: the same LLM budget, with and without merging in the tower
  (the stack's first share, about 32 % of each frame's tokens, sizes the tower merge).

``--preset onevision_video`` (default): the OneVision video preset's layout with a deeper tower than the CPU speed
preset (which has two SigLIP blocks): ``--vision hidden,mlp,layers,heads`` (default 192,768,12,3; the real
SigLIP-400M is 1152,4304,27,16) over ``--frames`` frames at 384 px (729 patches each). ``--preset qwen2vl``: the
Qwen2-VL speed preset's layout (one 784 x 1176 image, 4,704 patches in 1,176 merge groups) with its ViT at
``--vision`` width and depth (hidden and layers; MLP ratio 4, heads as given; the real one is 1280 wide, 32 deep).
Random weights, fp32, no grad.

    python eval/bench_tome_tower.py --out docs/tome_tower                       # about 3 minutes on 1 thread
    python eval/bench_tome_tower.py --preset qwen2vl --out docs/tome_tower_qwen  # about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import speed_presets  # noqa: E402

import vtc  # noqa: E402
from vtc.demo import machine  # noqa: E402

ROWS = (("none", None, 1.0), ("tome", "tome", 0.5), ("tome", "tome", 0.25))
LLM_ROWS = (("divprune", "divprune", 0.1), ("tome+divprune", ["tome", "divprune"], 0.1))


class TowerClock:
    """Seconds spent inside ``module``'s forward (pre- and post-forward hooks)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self._start = 0.0, 0.0
        self._handles = [
            module.register_forward_pre_hook(lambda *_: self._begin()),
            module.register_forward_hook(lambda *_: self._end()),
        ]

    def _begin(self) -> None:
        self._start = time.perf_counter()

    def _end(self) -> None:
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def build(preset: str, frames: int, vision: tuple[int, int, int, int], seed: int = 0):
    if preset == "qwen2vl":
        hidden, _, layers, heads = vision
        model = speed_presets.qwen2_vl_model(seed, vision=(hidden, layers, heads))
        return model, speed_presets.qwen_image_inputs(model, seed)
    model = speed_presets.onevision_model(seed, vision=vision)
    return model, speed_presets.onevision_video_inputs(model, seed, frames=frames)


def _visual(model) -> tuple[torch.nn.Module, int]:
    """The vision tower and the placeholder id of the preset's visual input."""
    if hasattr(model.model, "visual"):  # Qwen2-VL
        return model.model.visual, model.config.image_token_id
    return model.model.vision_tower, model.config.video_token_id


def _timed(model, inputs, clock: TowerClock) -> tuple[float, float]:
    clock.seconds = 0.0
    with torch.no_grad():
        start = time.perf_counter()
        model(**inputs)
        return time.perf_counter() - start, clock.seconds


def run(
    frames: int, vision: tuple[int, int, int, int], rounds: int, seed: int = 0, preset: str = "onevision_video"
) -> list[dict]:
    model, inputs = build(preset, frames, vision, seed)
    tower, placeholder = _visual(model)
    clock = TowerClock(tower)
    rows = [*ROWS, *LLM_ROWS]
    times: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(rows))}
    visual: dict[int, int] = {}
    try:
        for round_ in range(rounds + 1):  # round 0 warms up
            for i, (_, method, budget) in enumerate(rows):
                if method is None:
                    elapsed = _timed(model, inputs, clock)
                    visual[i] = int((inputs["input_ids"] == placeholder).sum())
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # ToMe alone: "speeds up the vision tower only"
                        with vtc.compressed(model, method, budget=budget):
                            elapsed = _timed(model, inputs, clock)
                            visual[i] = sum(len(im.kept) for im in vtc.last_record(model).images)
                if round_:
                    times[i].append(elapsed)
    finally:
        clock.remove()
    out = []
    for i, (name, _, budget) in enumerate(rows):
        out.append(
            {
                "run": name if name == "none" else f"{name} @ {budget}",
                "llm_visual_tokens": visual[i],
                "prefill_s": statistics.median(t for t, _ in times[i]),
                "tower_s": statistics.median(t for _, t in times[i]),
            }
        )
    base = out[0]
    for row in out:
        row["tower_speedup"] = base["tower_s"] / row["tower_s"]
        row["prefill_speedup"] = base["prefill_s"] / row["prefill_s"]
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| run | visual tokens the LLM gets | tower s | tower speed-up | prefill s | prefill speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['llm_visual_tokens']} | {r['tower_s']:.3f} | {r['tower_speedup']:.2f}x "
            f"| {r['prefill_s']:.3f} | {r['prefill_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("onevision_video", "qwen2vl"), default="onevision_video")
    parser.add_argument("--frames", type=int, default=32, help="video frames (onevision_video)")
    parser.add_argument("--vision", default="192,768,12,3", help="SigLIP hidden,mlp,layers,heads")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for bench_tome_tower.json and .md")
    args = parser.parse_args(argv)
    vision = tuple(int(v) for v in args.vision.split(","))
    if len(vision) != 4:
        parser.error("--vision takes four integers: hidden,mlp,layers,heads")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = run(args.frames, vision, args.rounds, preset=args.preset)
    if args.preset == "qwen2vl":
        what = f"Qwen2-VL layout, one 784 x 1176 image (4,704 patches), ViT {args.vision} (hidden, -, layers, heads)"
    else:
        frames = f"{args.frames} frames at 384 px"
        what = f"OneVision video layout, {frames}, SigLIP {args.vision} (hidden, mlp, layers, heads)"
    head = (
        f"Machine: {machine()}. {what}, fp32; median of {args.rounds} rounds; "
        f"{time.perf_counter() - started:.0f} s in all."
    )
    text = f"{head}\n\n{table(rows)}\n"
    print(text)
    if args.out:
        folder = pathlib.Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "bench_tome_tower.md").write_text(text)
        payload = {"machine": machine(), "args": vars(args), "rows": rows}
        (folder / "bench_tome_tower.json").write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
