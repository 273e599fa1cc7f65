"""Where the kept tokens fall on scenes pictures: the share on object patches and the share of objects that keep one.

A diagnostic for the scenes benchmark (``eval/accuracy.py --model scenes``): with budget ``--budget``, per method,
over ``--pictures`` test pictures (question "What colour is the 7?", the same prompt for all; pre-LLM methods),

* ``on objects``: kept tokens whose patch an object covers (:func:`vtc.offline.scenes.patch_owner`), against the
  share of such patches in the pictures;
* ``objects kept``: objects with at least one kept token.

A merged token (pooling, VisionZip's contextual tokens) counts at the patch it is anchored to.

``python eval/scenes_coverage.py --out docs/scenes_tower/coverage.md``
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vtc  # noqa: E402
from vtc.demo import machine  # noqa: E402

METHODS = ("random", "pool", "uniform", "divprune", "mmtok", "hired", "visionzip", "vispruner", "scope")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--budget", type=float, default=0.111)
    parser.add_argument("--pictures", type=int, default=40)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", default=None, help="markdown file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from vtc.offline import load_offline_vlm, scenes
    from vtc.offline.easyvqa import messages

    model, processor = load_offline_vlm(model="scenes", log=lambda *a: None)
    pictures = scenes.generate("test", args.pictures, args.seed)
    owners = [scenes.patch_owner(p.objects, 12) for p in pictures]
    share = sum(o >= 0 for owner in owners for o in owner) / sum(len(owner) for owner in owners)
    text = processor.apply_chat_template(messages("What colour is the 7?"), add_generation_prompt=True)
    lines = [
        f"# Where the kept tokens fall (scenes VLM, budget {args.budget}, {args.pictures} test pictures)",
        "",
        f"`python eval/scenes_coverage.py {' '.join(argv if argv is not None else sys.argv[1:])}` on {machine()}.",
        f"Object patches are {100 * share:.1f} % of all patches. A merged token (pooling, VisionZip's contextual "
        "tokens) counts at the patch it is anchored to.",
        "",
        "| method | kept tokens on objects % | objects with a kept token % |",
        "|---|---:|---:|",
    ]
    for method in args.methods:
        vtc.compress(model, method, budget=args.budget)
        on = total = hit = objects = 0
        try:
            for picture, owner in zip(pictures, owners, strict=True):
                inputs = processor(images=[picture.render()], text=[text], return_tensors="pt")
                with torch.no_grad():
                    model(**inputs, logits_to_keep=1)
                kept = [owner[i] for i in vtc.last_record(model).images[0].kept if 0 <= i < len(owner)]
                on, total = on + sum(k >= 0 for k in kept), total + len(kept)
                hit, objects = hit + len({k for k in kept if k >= 0}), objects + len(picture.objects)
        finally:
            vtc.restore(model)
        lines.append(f"| {method} | {100 * on / total:.1f} | {100 * hit / objects:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
