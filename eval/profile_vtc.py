"""Where vtc's own time goes in one compressed call: phases of ``Session.prepare``, and the top torch ops.

Complements ``eval/bench_speed.py`` (which measures vtc's total from outside): runs the phases of a
compressed call one by one on a preset, each timed on the CPU clock (median over ``--repeats``), then
profiles the selection with ``torch.profiler``. Phases:

* ``vision (model)``: the model's own ``get_image_features`` / ``get_video_features`` (not vtc), with vtc's
  signal hooks inside; ``signals``: the part of it spent in vtc's signal computations
  (the recorder's ``timer.signal_seconds``);
* ``encode (vtc)``: the rest of ``adapter.encode`` (signal gathering, layouts, pre-projector features,
  text embeddings);
* ``select``: the method on every image (``Reducer.reduce``), ``rebuild``: the prompt surgery
  (``adapter.rebuild``), ``record``: building ``vtc.Record`` (``Recorder.call``, which includes the
  analytic FLOPs).

    python eval/profile_vtc.py --preset llava15 --method divprune --budget 0.2
    python eval/profile_vtc.py --preset llava15 --method hired --budget 0.2 --floor   # TTFT decomposition

``--floor`` instead splits a compressed call's TTFT into what FLOPs predict and what they do not: the
uncompressed and compressed TTFT, the vision tower alone, and text-only LLM prefills at the uncompressed
length, the compressed length and 8 tokens (the fixed cost of any ``generate()`` call).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import speed_presets  # noqa: E402


def _cpu_ms(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        times.append((time.process_time() - start) * 1000.0)
    return statistics.median(times), out


def profile(preset_name: str, method: str, budget: float | int, repeats: int = 7, top: int = 12) -> str:
    import vtc
    from vtc.budget import keep_count

    preset = speed_presets.get_preset(preset_name)
    model = preset.build(0)
    inputs = preset.inputs(model, 0)
    vtc.compress(model, method, budget=budget)
    session = vtc.session_of(model)
    adapter = session.adapter
    base = model.model
    encoders = [getattr(base, n) for n in ("get_image_features", "get_video_features") if hasattr(base, n)]
    vision_ms: list[float] = []

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                vision_ms.append((time.process_time() - start) * 1000.0)

        return wrapper

    for fn in encoders:
        base.__dict__[fn.__name__] = timed(fn)
    rows = []
    with torch.no_grad():
        session.prepare(dict(inputs), True)  # warm-up
        signal_ms, vision_in_encode, encode_own = [], [], []

        def encode():
            vision_ms.clear()
            session.recorder.timer.start()  # signal seconds of this encode only
            start = time.process_time()
            out = adapter.encode(dict(inputs))
            total = (time.process_time() - start) * 1000.0
            vision_in_encode.append(sum(vision_ms))
            encode_own.append(total - sum(vision_ms))
            signal_ms.append(session.recorder.timer.signal_seconds * 1000.0)
            return out

        _, encoded = _cpu_ms(encode, repeats)
        for image in encoded.images:
            image.k = keep_count(budget, image.n)
        select_ms, reductions = _cpu_ms(lambda: [session.reducer.reduce(im) for im in encoded.images], repeats)
        rebuild_ms, rebuilt = _cpu_ms(
            lambda: adapter.rebuild(dict(inputs), encoded, reductions, session.positions, True), repeats
        )
        record_ms, _ = _cpu_ms(
            lambda: session.recorder.call(encoded.images, reductions, rebuilt, dict(inputs)), repeats
        )
        prepare_ms, _ = _cpu_ms(lambda: session.prepare(dict(inputs), True), repeats)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                [session.reducer.reduce(im) for im in encoded.images]
    for fn in encoders:
        del base.__dict__[fn.__name__]
    vtc.restore(model)
    vision = statistics.median(vision_in_encode)
    signals = statistics.median(signal_ms)
    encode_rest = statistics.median(encode_own)
    rows = [
        ("vision (model), incl. vtc signals", vision),
        ("  of which vtc signal computations", signals),
        ("encode (vtc): the rest of adapter.encode", encode_rest),
        ("select (method)", select_ms),
        ("rebuild (prompt surgery)", rebuild_ms),
        ("record (incl. analytic FLOPs)", record_ms),
    ]
    own = signals + encode_rest + select_ms + rebuild_ms + record_ms
    lines = [
        f"### vtc's own time: `{method}` at budget {budget} on the `{preset_name}` preset",
        "",
        f"CPU time per call, median of {repeats}, torch {torch.__version__}, {torch.get_num_threads()} thread(s). "
        f"Whole `Session.prepare`: {prepare_ms:.1f} ms; vtc's own part (signals + encode + select + rebuild + "
        f"record): **{own:.1f} ms**.",
        "",
        "| phase | ms |",
        "|---|---:|",
        *[f"| {name} | {ms:.1f} |" for name, ms in rows],
        "",
        f"Top torch ops inside the selection (`torch.profiler`, {repeats} calls, self CPU time):",
        "",
        "```",
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40),
        "```",
    ]
    return "\n".join(lines)


def floor(preset_name: str, method: str, budget: float | int, repeats: int = 9) -> str:
    """CPU-time decomposition of TTFT (median / min over ``repeats`` one-token ``generate`` calls)."""
    import vtc

    preset = speed_presets.get_preset(preset_name)
    model = preset.build(0)
    inputs = preset.inputs(model, 0)

    def ttft(**kwargs):
        return lambda: model.generate(**kwargs, max_new_tokens=1, min_new_tokens=1, do_sample=False)

    def timed(fn) -> tuple[float, float]:
        fn()
        times = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            times.append((time.process_time() - start) * 1000.0)
        return statistics.median(times), min(times)

    def text_only(n: int):
        ids = torch.randint(3, speed_presets.IMAGE_TOKEN, (1, n), generator=torch.Generator().manual_seed(0))
        return ttft(input_ids=ids, attention_mask=torch.ones_like(ids))

    visual = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    rows = []
    with torch.no_grad():
        rows.append(("uncompressed TTFT", timed(ttft(**inputs))))
        vtc.compress(model, method, budget=budget)
        rows.append((f"`{method}` at {budget} TTFT", timed(ttft(**inputs))))
        kept = vtc.last_record(model).samples[0].output_length
        vtc.restore(model)
        if "pixel_values" in visual and "image_grid_thw" not in visual:
            rows.append(("vision tower + projector alone", timed(lambda: model.model.get_image_features(**visual))))
        full = int(inputs["input_ids"].shape[1])
        for n, what in ((full, "uncompressed length"), (kept, "compressed length"), (8, "fixed floor")):
            rows.append((f"LLM prefill of a text-only prompt, {n} tokens ({what})", timed(text_only(n))))
    lines = [
        f"### TTFT decomposition: `{method}` at {budget} on `{preset_name}` (CPU ms, median / min of {repeats})",
        "",
        "| part | CPU ms |",
        "|---|---:|",
        *[f"| {name} | {med:.0f} / {low:.0f} |" for name, (med, low) in rows],
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llava15", help=f"one of {sorted(speed_presets.PRESETS)}")
    parser.add_argument("--method", default="divprune")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--floor", action="store_true", help="TTFT decomposition instead of vtc's phases")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.floor:
        print(floor(args.preset, args.method, args.budget, max(args.repeats, 3)))
    else:
        print(profile(args.preset, args.method, args.budget, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
