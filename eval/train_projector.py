"""Train the offline VLM's projector on easy-VQA (vision tower and language model frozen).

Reproduce the shipped ``vtc/assets/offline_projector.safetensors`` and ``eval/logs/train_projector.log``::

    python eval/train_projector.py

Recipe (CPU, 1 torch thread; see the log for wall and CPU time):

* the frozen DINOv2 features of every easy-VQA image (``hidden_states[-1]`` without CLS, 64 x 384 at 112 px,
  exactly what the checkpoint's projector receives) are computed once through the checkpoint's own
  processor and cached under ``$VTC_CACHE``;
* each step takes a few train images; after a first phase with all tokens (``--full-only-steps``), every
  image keeps a **random subset of its 64 visual tokens** (all 64 with probability ``--full-prob``, otherwise
  a log-uniform count in 1..63, raster order kept), so the model meets short visual sequences in training
  and a compression curve measures lost content rather than a token-count shift;
* at most ``--max-questions`` questions per image and step: all its shape/colour questions first (the
  direct perception signal, 26 % of easy-VQA), then yes/no questions at random;
* all questions of one image are packed behind a single copy of its visual tokens: a block attention mask
  lets each question see the shared prefix and itself, with its own position ids (equal to running each
  question alone); the loss is the cross-entropy of the answer tokens and the closing ``<|im_end|>``;
* the projector sees per-channel standardised features; the standardisation is folded into its first
  linear layer when saving, so the checkpoint stays a stock LLaVA projector;
* AdamW, linear warm-up then cosine decay, seeded; validation on held-out train images, test accuracy
  (first-token argmax over the 13 answers, all tokens) at the end.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _easyvqa_features import cached_features  # noqa: E402

from vtc.apps.demo import machine  # noqa: E402
from vtc.offline import build_offline_vlm  # noqa: E402
from vtc.offline.assets import asset_versions  # noqa: E402
from vtc.offline.build import PROJECTOR_ASSET  # noqa: E402
from vtc.offline.easyvqa import ANSWERS, SHAPES, YES_NO, answer_token_ids, load_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Log:
    def __init__(self, path: Path | None):
        self.file = open(path, "w") if path else None  # noqa: SIM115

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()


class Packer:
    """Token ids of the chat prompt around the image, per question text and answer."""

    def __init__(self, tokenizer, image_token_id: int):
        self.tok = tokenizer
        self.image = image_token_id
        self.prefix = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._q: dict[str, list[int]] = {}
        self.answers = {a: tokenizer.encode(a, add_special_tokens=False) + [self.end] for a in ANSWERS}
        self.first = dict(zip(ANSWERS, answer_token_ids(tokenizer), strict=True))

    def question(self, text: str) -> list[int]:
        if text not in self._q:
            self._q[text] = self.tok.encode(f"\n{text}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        return self._q[text]

    def batch(self, images: list[tuple[int, list[tuple[str, str]]]]) -> dict[str, torch.Tensor]:
        """``images``: per image its kept-token count and (question, answer) pairs -> packed tensors."""
        rows, pos, blocks, targets, firsts = [], [], [], [], []
        for b, (k, qas) in enumerate(images):
            ids = self.prefix + [self.image] * k
            p = list(range(len(ids)))
            blk = [0] * len(ids)
            base = len(ids)
            for j, (q, a) in enumerate(qas):
                q_ids, a_ids = self.question(q), self.answers[a]
                start = len(ids) + len(q_ids)  # index of the first answer token
                for t, target in enumerate(a_ids):
                    targets.append((b, start + t - 1, target))
                firsts.append((b, start - 1, ANSWERS.index(a)))
                seg = q_ids + a_ids[:-1]  # the closing <|im_end|> is only a target, never an input
                ids += seg
                p += range(base, base + len(seg))
                blk += [j + 1] * len(seg)
            rows.append(ids)
            pos.append(p)
            blocks.append(blk)
        length = max(len(r) for r in rows)
        pad = lambda x, v: [r + [v] * (length - len(r)) for r in x]  # noqa: E731
        ids = torch.tensor(pad(rows, self.end))
        blk = torch.tensor(pad(blocks, -1))
        i = torch.arange(length)
        mask = (i[None, :] <= i[:, None])[None] & ((blk[:, None, :] == 0) | (blk[:, None, :] == blk[:, :, None]))
        mask &= (blk >= 0)[:, None, :]
        mask |= torch.eye(length, dtype=torch.bool)[None]  # padding rows attend to themselves (no empty rows)
        t = torch.tensor(targets)
        f = torch.tensor(firsts)
        return {
            "ids": ids,
            "position_ids": torch.tensor(pad(pos, 0)),
            "mask": mask[:, None],
            "target_rows": t[:, :2],
            "targets": t[:, 2],
            "first_rows": f[:, :2],
            "first_answers": f[:, 2],
        }


def forward(model, packed: dict, visual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Hidden states after the final norm at ``rows`` (``[N, 2]`` batch/position) for projected ``visual``."""
    base = model.model
    embeds = base.language_model.embed_tokens(packed["ids"])
    slots = packed["ids"] == model.config.image_token_id
    embeds = embeds.masked_scatter(slots[..., None], visual.to(embeds.dtype))
    out = base.language_model(
        inputs_embeds=embeds, attention_mask=packed["mask"], position_ids=packed["position_ids"], use_cache=False
    )
    return out.last_hidden_state[rows[:, 0], rows[:, 1]]


def subsets(rng: random.Random, n: int, full_prob: float) -> list[int]:
    if rng.random() < full_prob:
        return list(range(n))
    k = min(n - 1, max(1, round(math.exp(rng.uniform(0.0, math.log(n))))))
    return sorted(rng.sample(range(n), k))


class Projector(torch.nn.Module):
    """The checkpoint's projector behind a fixed per-channel standardisation (folded in when saving)."""

    def __init__(self, projector: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.inner = projector
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - self.mean) / self.std)

    def folded_state(self) -> dict[str, torch.Tensor]:
        """State dict of a stock projector that computes the same function on raw features."""
        state = {k: v.detach().clone().float() for k, v in self.inner.state_dict().items()}
        w = state["linear_1.weight"] / self.std[None, :]
        state["linear_1.bias"] = state["linear_1.bias"] - w @ self.mean
        state["linear_1.weight"] = w
        return {k: v.contiguous() for k, v in state.items()}


@torch.no_grad()
def evaluate(model, proj, packer, feats, groups, keep: int | None, rng: random.Random, batch: int = 16) -> dict:
    """First-token argmax accuracy over the 13 answers; ``keep`` = visual tokens kept (random subset)."""
    answer_ids = torch.tensor([packer.first[a] for a in ANSWERS])
    right = total = yes = yn = 0
    by_kind = {"yes/no": [0, 0], "shape": [0, 0], "color": [0, 0]}
    for s in range(0, len(groups), batch):
        chunk = groups[s : s + batch]
        picks = [
            sorted(rng.sample(range(feats.shape[1]), keep)) if keep else list(range(feats.shape[1])) for _ in chunk
        ]
        packed = packer.batch([(len(p), qas) for p, (_, qas) in zip(picks, chunk, strict=True)])
        visual = torch.cat([proj(feats[i, p]) for p, (i, _) in zip(picks, chunk, strict=True)])
        hidden = forward(model, packed, visual, packed["first_rows"])
        pred = (model.lm_head(hidden)[:, answer_ids]).argmax(-1)
        gold = packed["first_answers"]
        for g, p in zip(gold.tolist(), pred.tolist(), strict=True):
            kind = "yes/no" if ANSWERS[g] in YES_NO else "shape" if ANSWERS[g] in SHAPES else "color"
            by_kind[kind][0] += int(g == p)
            by_kind[kind][1] += 1
            if kind == "yes/no":
                yn += 1
                yes += int(ANSWERS[p] == "yes")
        right += int((pred == gold).sum())
        total += len(gold)
    sc = by_kind["shape"][0] + by_kind["color"][0], by_kind["shape"][1] + by_kind["color"][1]
    return {"acc": right / total, "n": total, "shape_color": sc[0] / sc[1], "yes_share": yes / max(yn, 1)}


@torch.no_grad()
def check(model, processor, packer, n: int = 4) -> float:
    """Answer logits of the packed path vs ``model(**processor(...))`` on a few test questions (should be ~1e-5)."""
    from _easyvqa_features import image_features
    from PIL import Image

    from vtc.offline.easyvqa import messages

    qs = load_split("test")[:n]
    answer_ids = torch.tensor([packer.first[a] for a in ANSWERS])
    worst = 0.0
    for q in qs:
        text = processor.apply_chat_template(messages(q.question), add_generation_prompt=True)
        inputs = processor(images=[Image.open(q.image).convert("RGB")], text=[text], return_tensors="pt")
        ref = model(**inputs).logits[0, -1, answer_ids]
        feats = image_features(model, processor, [q.image])[0]
        packed = packer.batch([(feats.shape[0], [(q.question, q.answer)])])
        hidden = forward(model, packed, model.model.multi_modal_projector(feats), packed["first_rows"])
        worst = max(worst, float((model.lm_head(hidden)[0, answer_ids] - ref).abs().max()))
    return worst


def fmt(r: dict) -> str:
    return f"acc {r['acc']:.4f} (n={r['n']}), shape+colour {r['shape_color']:.4f}, yes-share {r['yes_share']:.3f}"


def group(questions, index_of: dict[int, int]) -> list[tuple[int, list[tuple[str, str]]]]:
    by_image: dict[int, list[tuple[str, str]]] = {}
    for q in questions:
        by_image.setdefault(q.image_id, []).append((q.question, q.answer))
    return [(index_of[i], qas) for i, qas in sorted(by_image.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--images-per-step", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--full-prob", type=float, default=0.5, help="share of images that keep all tokens")
    parser.add_argument("--full-only-steps", type=int, default=150, help="first steps with all tokens (curriculum)")
    parser.add_argument("--capitalize-prob", type=float, default=0.3, help="share of questions shown capitalised")
    parser.add_argument("--max-questions", type=int, default=6, help="questions per image and step (random subset)")
    parser.add_argument("--val-images", type=int, default=60, help="train images held out for validation")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine 2 threads ran slower)"
    )
    parser.add_argument("--out", default=str(REPO / "vtc" / "assets" / PROJECTOR_ASSET))
    parser.add_argument("--log", default=str(REPO / "eval" / "logs" / "train_projector.log"))
    parser.add_argument("--skip-test", action="store_true", help="no final test-set evaluation")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    log = Log(Path(args.log) if args.log else None)
    started = time.perf_counter()
    log(f"command: python eval/train_projector.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    log(f"args: {vars(args)}")
    log(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f} at start")
    log(f"packages: {asset_versions()}")

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    # the projector is re-initialised below, so any build of the checkpoint serves (vision + LM are fixed)
    path = build_offline_vlm(log=log)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    for p in model.parameters():
        p.requires_grad_(False)
    packer = Packer(processor.tokenizer, model.config.image_token_id)

    t0 = time.perf_counter()
    feats = cached_features(model, processor, log)  # {"train": [4000, 64, 384], "test": [1000, 64, 384], ...}
    log(f"features ready in {time.perf_counter() - t0:.0f} s")

    train_q, test_q = load_split("train"), load_split("test")
    rng = random.Random(args.seed)
    train_ids = sorted({q.image_id for q in train_q})
    val_ids = set(rng.sample(train_ids, args.val_images))
    index = {i: n for n, i in enumerate(feats["train_ids"])}
    train_groups = group([q for q in train_q if q.image_id not in val_ids], index)
    val_groups = group([q for q in train_q if q.image_id in val_ids], index)
    test_groups = group(test_q, {i: n for n, i in enumerate(feats["test_ids"])})
    log(f"train {len(train_groups)} images, validation {len(val_groups)} images, test {len(test_groups)} images")

    x = feats["train"][[g[0] for g in train_groups]]
    mean, std = x.mean((0, 1)), x.std((0, 1)).clamp_min(1e-3)
    torch.manual_seed(args.seed)
    inner = model.model.multi_modal_projector
    for m in inner.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    proj = Projector(inner, mean, std)
    params = list(inner.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    order: list[int] = []
    train_start, cpu_start = time.perf_counter(), time.process_time()
    running = []
    for step in range(args.steps):
        if len(order) < args.images_per_step:
            more = list(range(len(train_groups)))
            rng.shuffle(more)
            order += more
        chosen = [train_groups[order.pop()] for _ in range(args.images_per_step)]
        full_prob = 1.0 if step < args.full_only_steps else args.full_prob
        picks = [subsets(rng, feats["train"].shape[1], full_prob) for _ in chosen]
        items = []
        for p, (_, qas) in zip(picks, chosen, strict=True):
            if len(qas) > args.max_questions:  # every shape/colour question, then yes/no ones at random
                open_qs = [qa for qa in qas if qa[1] not in YES_NO]
                yes_no = [qa for qa in qas if qa[1] in YES_NO]
                qas = (open_qs + rng.sample(yes_no, len(yes_no)))[: args.max_questions]
            shown = [(q[:1].upper() + q[1:] if rng.random() < args.capitalize_prob else q, a) for q, a in qas]
            items.append((len(p), shown))
        packed = packer.batch(items)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        visual = torch.cat([proj(feats["train"][i, p]) for p, (i, _) in zip(picks, chosen, strict=True)])
        hidden = forward(model, packed, visual, packed["target_rows"])
        loss = F.cross_entropy(model.lm_head(hidden), packed["targets"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % 20 == 0:
            elapsed = time.perf_counter() - train_start
            cpu = time.process_time() - cpu_start
            log(
                f"step {step + 1}/{args.steps} loss {sum(running) / len(running):.4f} lr {lr_at(step):.2e} "
                f"{elapsed / (step + 1):.2f} s/step, {elapsed / 60:.1f} min wall, {cpu / 60:.1f} CPU-min"
            )
            running = []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            proj.eval()
            full = evaluate(model, proj, packer, feats["train"], val_groups, None, random.Random(1))
            k16 = evaluate(model, proj, packer, feats["train"], val_groups, 16, random.Random(1))
            log(f"  validation, all 64 tokens: {fmt(full)}")
            log(f"  validation, random 16 tokens: {fmt(k16)}")
    train_minutes = (time.perf_counter() - train_start) / 60
    cpu_minutes = (time.process_time() - cpu_start) / 60
    log(f"training: {args.steps} steps in {train_minutes:.1f} min wall, {cpu_minutes:.1f} CPU-min (with validation)")

    state = proj.folded_state()
    from safetensors.torch import save_file

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, args.out, metadata={"recipe": "eval/train_projector.py", "seed": str(args.seed)})
    log(f"saved the projector (folded standardisation, fp32) to {os.path.relpath(args.out, REPO)}")
    inner.load_state_dict(state)
    plain = Projector(inner, torch.zeros_like(mean), torch.ones_like(std))
    diff = check(model, processor, packer)
    log(f"packed training path vs the stock model forward: max |diff| of answer logits {diff:.2e}")
    if not args.skip_test:
        t0 = time.perf_counter()
        res = evaluate(model, plain, packer, feats["test"], test_groups, None, random.Random(2))
        log(f"test (all {len(test_q)} questions), all 64 tokens: {fmt(res)}")
        log(f"test evaluation in {(time.perf_counter() - t0) / 60:.1f} min")
    log(f"total: {(time.perf_counter() - started) / 60:.1f} min wall, {time.process_time() / 60:.1f} CPU-min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
