"""Shared pieces of the offline-VLM training scripts (``train_scenes.py``, ``train_video.py``).

* :class:`Packer`: all questions of one image (or clip) packed behind a single copy of its visual tokens.
  A block attention mask lets each question see the shared prefix and itself, with its own position ids,
  which equals running every question alone; targets are the answer tokens and the closing ``<|im_end|>``.
* :class:`LoRA`: low-rank adapters on the language model's linear layers, added by forward hooks during
  training and merged into the weights for the checkpoint (so the saved model stays a stock one).
* :class:`Projector`: the checkpoint's projector behind a fixed per-channel standardisation that is folded
  into its first linear layer when saving.
* :class:`TowerBlocks` and :func:`align_with_tower`: the vision tower's upper blocks run on cached lower-block
  outputs with adapters, aligned on whole images so that every patch of an object learns what the object is
  (saved under ``vision_tower.`` in the adapters file, merged by :func:`vtc.offline.build.merge_adapters`).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


class Log:
    def __init__(self, path: Path | None):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w") if path else None  # noqa: SIM115

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()


class Packer:
    """Token ids of the ChatML prompt around the visual tokens, per question text and answer.

    The prompt is what the checkpoint's chat template renders for one user turn holding the image (or
    video) and the question: ``<|im_start|>user\\n<visual>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n``.
    """

    def __init__(self, tokenizer, visual_token_id: int, answers: Sequence[str]):
        self.tok = tokenizer
        self.visual = visual_token_id
        self.prefix = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._q: dict[str, list[int]] = {}
        self.answers = _Answers(tokenizer, self.end)
        self.first = {a: self.answers[a][0] for a in answers}

    def question(self, text: str) -> list[int]:
        if text not in self._q:
            self._q[text] = self.tok.encode(f"\n{text}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        return self._q[text]

    def batch(self, items: Sequence[tuple[int, Sequence[tuple[str, str]]]]) -> dict[str, torch.Tensor]:
        """``items``: per image its visual-token count and (question, answer) pairs -> packed tensors.

        ``first_rows`` holds, per question in order, ``(batch row, position)`` of the logits that predict the
        answer's first token.
        """
        rows, pos, blocks, targets, firsts = [], [], [], [], []
        for b, (k, qas) in enumerate(items):
            ids = self.prefix + [self.visual] * k
            p = list(range(len(ids)))
            blk = [0] * len(ids)
            base = len(ids)
            for j, (q, a) in enumerate(qas):
                q_ids, a_ids = self.question(q), self.answers[a]
                start = len(ids) + len(q_ids)  # index of the first answer token
                for t, target in enumerate(a_ids):
                    targets.append((b, start + t - 1, target))
                firsts.append((b, start - 1))
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
        return {
            "ids": ids,
            "position_ids": torch.tensor(pad(pos, 0)),
            "mask": mask[:, None],
            "target_rows": t[:, :2],
            "targets": t[:, 2],
            "first_rows": torch.tensor(firsts),
        }


class _Answers(dict):
    """Answer text -> its token ids and the closing ``<|im_end|>`` (encoded on first use)."""

    def __init__(self, tokenizer, end: int):
        super().__init__()
        self.tok, self.end = tokenizer, end

    def __missing__(self, answer: str) -> list[int]:
        self[answer] = ids = self.tok.encode(answer, add_special_tokens=False) + [self.end]
        return ids


def lm_hidden(model, packed: dict, visual: torch.Tensor, rows: torch.Tensor, visual_token_id: int) -> torch.Tensor:
    """Hidden states after the final norm at ``rows`` (``[N, 2]`` batch/position); ``visual`` fills the slots."""
    lm = model.model.language_model
    embeds = lm.embed_tokens(packed["ids"])
    slots = packed["ids"] == visual_token_id
    embeds = embeds.masked_scatter(slots[..., None], visual.to(embeds.dtype))
    out = lm(inputs_embeds=embeds, attention_mask=packed["mask"], position_ids=packed["position_ids"], use_cache=False)
    return out.last_hidden_state[rows[:, 0], rows[:, 1]]


#: how a training item's kept subset is chosen (``--subset-rules``)
SUBSET_RULES = ("random", "objects", "block", "grid")


def subset(
    rng: random.Random,
    n: int,
    full_prob: float,
    rule: str = "random",
    objects: Sequence[int] = (),
    grid: int | None = None,
) -> list[int]:
    """All ``n`` indices with probability ``full_prob``, else a log-uniform count ``k`` in 1..n-1 (sorted), chosen by
    ``rule``:

    * ``"random"``: ``k`` indices at random;
    * ``"objects"``: the item's ``objects`` indices first (in a random order), then the others at random: the kind of
      set a saliency-ranked method keeps;
    * ``"block"``: a random ``h x w`` rectangle of the ``grid x grid`` raster holding at least ``k`` cells, then ``k``
      of them at random (a crop);
    * ``"grid"``: every ``n / k``-th index from a random offset (an even spread).
    """
    if rng.random() < full_prob:
        return list(range(n))
    k = min(n - 1, max(1, round(math.exp(rng.uniform(0.0, math.log(n))))))
    if rule == "random":
        return sorted(rng.sample(range(n), k))
    if rule == "objects":
        first = rng.sample(list(objects), len(objects))
        rest = rng.sample(sorted(set(range(n)) - set(first)), n - len(first))
        return sorted((first + rest)[:k])
    if rule == "block":
        if grid is None or grid * grid != n:
            raise ValueError("the 'block' subset rule needs the item's square grid")
        h = rng.randint(max(1, -(-k // grid)), grid)
        w = max(-(-k // h), 1)
        top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
        cells = [r * grid + c for r in range(top, top + h) for c in range(left, left + w)]
        return sorted(rng.sample(cells, k))
    if rule == "grid":
        offset = rng.random() * n / k
        return sorted({min(n - 1, int(offset + i * n / k)) for i in range(k)})
    raise ValueError(f"unknown subset rule {rule!r}; known: {SUBSET_RULES}")


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


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: the linear layers of a DINOv2 block (attention q, k, v and output; the MLP)
TOWER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")


class TowerBlocks(torch.nn.Module):
    """Blocks ``start .. stop - 1`` of a ViT tower (DINOv2 layout), run on cached hidden states of block ``start``.

    The frozen lower blocks run once per image (their output is cached with the CLS row); adapters on these
    blocks (:meth:`adapters`) let the tower itself learn what the visual tokens must carry, at a fraction of
    the language model's cost per step. ``forward`` returns the patch rows (CLS dropped), what the checkpoint's
    projector receives with ``vision_feature_layer = stop``.
    """

    def __init__(self, tower: torch.nn.Module, start: int, stop: int):
        super().__init__()
        self.tower, self.start, self.stop = tower, start, stop

    def cache(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Hidden states after block ``start`` (CLS row included): what the training scripts cache."""
        x = self.tower.embeddings(pixel_values)
        for layer in self.tower.encoder.layer[: self.start]:
            x = layer(x)
        return x

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.float()
        for layer in self.tower.encoder.layer[self.start : self.stop]:
            x = layer(x)
        return x[..., 1:, :]

    def adapters(self, rank: int, alpha: float) -> LoRA:
        """Rank-``rank`` adapters on every linear layer of the trained blocks (keys relative to the tower)."""
        trained = {f"encoder.layer.{i}." for i in range(self.start, self.stop)}
        return LoRA(
            self.tower, rank, alpha, TOWER_TARGETS, include=lambda n: ".".join(n.split(".")[:3]) + "." in trained
        )


class LoRA(torch.nn.Module):
    """Rank-``r`` adapters ``W + (alpha / r) B A`` on a module's linear layers (B starts at 0).

    ``targets`` are the last components of the linear layers' names, ``include`` (optional) a predicate on the
    full names. During training each adapter is a forward hook on its stock ``nn.Linear``; :meth:`state` gives
    the factors (keys ``<module path>.lora_A`` / ``.lora_B`` relative to the module) and
    :func:`vtc.offline.build.merge_lora` folds them into a model's weights.
    """

    def __init__(
        self,
        language_model: torch.nn.Module,
        rank: int,
        alpha: float,
        targets=LORA_TARGETS,
        include: Callable[[str], bool] | None = None,
    ):
        super().__init__()
        self.scale = alpha / rank
        self.names: list[str] = []
        self.a = torch.nn.ParameterList()
        self.b = torch.nn.ParameterList()
        self.handles = []
        for name, module in language_model.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
                continue
            if include is None or include(name):
                a = torch.nn.Parameter(torch.empty(rank, module.in_features))
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                b = torch.nn.Parameter(torch.zeros(module.out_features, rank))
                self.names.append(name)
                self.a.append(a)
                self.b.append(b)
                self.handles.append(module.register_forward_hook(self._hook(len(self.a) - 1)))

    def _hook(self, i: int):
        def hook(module, args, output):
            return output + (args[0] @ self.a[i].T) @ self.b[i].T * self.scale

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def state(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        out = {}
        for name, a, b in zip(self.names, self.a, self.b, strict=True):
            out[f"{name}.lora_A"] = a.detach().to(dtype).contiguous()
            out[f"{name}.lora_B"] = (b.detach() * self.scale).to(dtype).contiguous()  # scale folded into B
        return out


@dataclass
class Source:
    """Training or evaluation items of one kind: features, questions, and how features become visual tokens.

    Attributes:
        feats: ``[N, ...]`` cached frozen-tower features (fp16), one row per image or clip.
        qas: per item its ``(question, answer, family, options)`` tuples (options: the answers scored).
        visual: ``(features of one item, kept candidate indices or None) -> [k, D]`` visual tokens in the
            order the model feeds them (projector, pooling, newline: whatever the family does).
        candidates: how many visual tokens one item offers to a random subset.
        objects: per item, the candidate indices an object covers (the ``"objects"`` subset rule), or None.
        grid: side of the items' square candidate raster (the ``"block"`` rule), or None.
    """

    feats: torch.Tensor
    qas: list[list[tuple[str, str, str, tuple[str, ...]]]]
    visual: Callable[[torch.Tensor, list[int] | None], torch.Tensor]
    candidates: int
    objects: list[list[int]] | None = None
    grid: int | None = None


@torch.no_grad()
def evaluate(
    model, packer: Packer, src: Source, keep: int | None, seed: int, items: list[int] | None = None, batch: int = 8
) -> dict[str, float]:
    """First-token argmax accuracy over each family's options, per family (``keep``: random visual subset)."""
    rng = random.Random(seed)
    token = packer.visual
    right: dict[str, list[int]] = {}
    order = [i for i in (items if items is not None else range(len(src.qas))) if src.qas[i]]
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        picks = [sorted(rng.sample(range(src.candidates), keep)) if keep else None for _ in idx]
        visual = [src.visual(src.feats[i], p) for p, i in zip(picks, idx, strict=True)]
        packed = packer.batch([(v.shape[0], [qa[:2] for qa in src.qas[i]]) for v, i in zip(visual, idx, strict=True)])
        logits = model.lm_head(lm_hidden(model, packed, torch.cat(visual), packed["first_rows"], token))
        for row, (_, answer, family, opts) in zip(logits, [qa for i in idx for qa in src.qas[i]], strict=True):
            pred = opts[int(row[[packer.first[o] for o in opts]].argmax())]
            right.setdefault(family, []).append(int(pred == answer))
    out = {f: sum(v) / len(v) for f, v in sorted(right.items())}
    out["mean of families"] = sum(out.values()) / max(1, len(out))
    out["n"] = sum(len(v) for v in right.values())
    return out


def fmt(r: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" if k != "n" else f"n={int(v)}" for k, v in r.items())


def train(
    model,
    packer: Packer,
    sources: list[Source],
    shares: Callable[[int], Sequence[float]],
    groups: list[dict],
    args,
    log: Log,
    validate: Callable[[int], None],
) -> None:
    """The optimisation loop shared by the scripts.

    Each step takes ``args.images_per_step`` items, each from a source drawn with the step's ``shares(step)``
    (a curriculum can move weight from easy to hard sources); every item keeps a subset of its candidates drawn
    by one of ``args.subset_rules`` (:func:`subset`; all of them for the first ``args.full_only_steps`` steps,
    then with probability ``args.full_prob``) and at most ``args.max_questions`` of its questions (a ``"describe"``
    question always, but only with every token kept). AdamW with the
    parameter groups' base learning rates, linear warm-up then cosine decay to ``args.min_lr_ratio``. With
    ``args.bf16`` the language model runs under bfloat16 autocast (about twice the matmul speed of fp32 on CPUs
    with AVX512-BF16); the trained weights stay fp32 and validation runs in fp32.
    """
    rng = random.Random(args.seed)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    queues: list[list[int]] = [[] for _ in sources]
    # rules a source cannot take (easy-VQA pictures have no object masks, clips no square grid) draw at random there
    lacks = [{"objects": src.objects is None, "block": src.grid is None} for src in sources]
    at_random = [{r for r in args.subset_rules if lack.get(r)} for lack in lacks]
    for s, rules in enumerate(at_random):
        if rules:
            log(f"source {s}: its {sorted(rules)} subsets are drawn at random (no object masks or square grid)")

    def lr_scale(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    start, cpu0 = time.perf_counter(), time.process_time()
    running: list[float] = []
    for step in range(args.steps):
        items, visual = [], []
        full_prob = 1.0 if step < args.full_only_steps else args.full_prob
        weights = list(shares(step))
        for _ in range(args.images_per_step):
            s = rng.choices(range(len(sources)), weights)[0]
            src = sources[s]
            if not queues[s]:
                queues[s] = [i for i, q in enumerate(src.qas) if q]
                rng.shuffle(queues[s])
            i = queues[s].pop()
            rules = args.subset_rules  # one rule draws nothing: the random stream of the shipped runs
            rule = rules[0] if len(rules) == 1 else rng.choice(rules)
            rule = "random" if rule in at_random[s] else rule
            objects = src.objects[i] if src.objects is not None else ()
            pick = subset(rng, src.candidates, full_prob, rule, objects, src.grid)
            # a description lists every object: only asked while every visual token is kept
            always = [qa for qa in src.qas[i] if qa[2] == "describe" and len(pick) == src.candidates]
            rest = [qa for qa in src.qas[i] if qa[2] != "describe"]
            qas = always + rng.sample(rest, min(len(rest), args.max_questions - len(always)))
            visual.append(src.visual(src.feats[i], pick))
            items.append((visual[-1].shape[0], [qa[:2] for qa in qas]))
        packed = packer.batch(items)
        for g in opt.param_groups:
            g["lr"] = g["base"] * lr_scale(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
            hidden = lm_hidden(model, packed, torch.cat(visual), packed["target_rows"], packer.visual)
            logits = model.lm_head(hidden)
        loss = F.cross_entropy(logits.float(), packed["targets"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % 10 == 0:
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
            log(
                f"step {step + 1}/{args.steps} loss {sum(running) / len(running):.4f} lr x{lr_scale(step):.2f} "
                f"{wall / (step + 1):.2f} s/step, {wall / 60:.1f} min wall, {cpu / 60:.1f} CPU-min"
            )
            running = []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            validate(step + 1)
    log(f"training: {args.steps} steps in {(time.perf_counter() - start) / 60:.1f} min wall (with validation)")


def _rules(text: str) -> list[str]:
    rules = [r for r in text.split(",") if r]
    unknown = sorted(set(rules) - set(SUBSET_RULES))
    if unknown or not rules:
        raise argparse.ArgumentTypeError(
            f"unknown subset rule(s) {unknown or text!r}; known: {', '.join(SUBSET_RULES)}"
        )
    return rules


def add_training_args(parser, steps: int, images_per_step: int) -> None:
    """The optimisation options both scripts share (their defaults are the shipped recipes')."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--images-per-step", type=int, default=images_per_step, help="images or clips per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="projector learning rate")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8, help="0 trains the projector alone")
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--full-prob", type=float, default=0.5, help="share of items that keep all tokens")
    parser.add_argument("--full-only-steps", type=int, default=100, help="first steps with all tokens")
    parser.add_argument("--max-questions", type=int, default=8, help="questions per item and step")
    parser.add_argument(
        "--subset-rules",
        type=_rules,
        default=["random"],
        help="comma-separated rules the kept subsets are drawn from, one per item at random: "
        + ", ".join(SUBSET_RULES),
    )
    parser.add_argument("--eval-every", type=int, default=140)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--bf16", type=int, default=0, help="1: bfloat16 autocast for the training steps (weights stay fp32)"
    )


TOWER_DEFAULTS = {"tower_lr": 2e-4, "align_batch": 16, "ce_weight": 1.0}


def add_tower_args(parser, rank: int, **defaults) -> None:
    """Options of the adapted tower blocks (both scripts); ``defaults`` replace :data:`TOWER_DEFAULTS` entries
    for one script (see :func:`check_tower_args`, which fills them in)."""
    unknown = sorted(set(defaults) - set(TOWER_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown tower options {unknown}; known: {', '.join(TOWER_DEFAULTS)}")
    parser.tower_defaults = {**TOWER_DEFAULTS, **defaults}
    d = parser.tower_defaults
    parser.add_argument(
        "--tower-rank",
        type=int,
        default=rank,
        help="rank of adapters on the tower's blocks from --tower-from to the feature layer (0: frozen tower)",
    )
    parser.add_argument("--tower-from", type=int, default=2, help="first adapted tower block (lower ones cached)")
    parser.add_argument("--tower-lr", type=float, help=f"tower adapters' rate with the questions ({d['tower_lr']:g})")
    parser.add_argument("--align-batch", type=int, help=f"images or frames per alignment step ({d['align_batch']})")
    parser.add_argument("--ce-weight", type=float, help=f"alignment's cross-entropy weight ({d['ce_weight']:g})")


def check_tower_args(parser, args) -> None:
    """Refuse adapted-tower options without an adapted tower; fill in their defaults otherwise."""
    given = [f"--{k.replace('_', '-')}" for k in TOWER_DEFAULTS if getattr(args, k) is not None]
    if given and not args.tower_rank:
        parser.error(f"{', '.join(given)}: options of an adapted tower; set --tower-rank (e.g. 16) to use them")
    for key, value in parser.tower_defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def word_targets(
    model,
    tokenizer,
    colours,
    kinds,
    background: str = "nothing",
    places: Sequence[str] = (),
    place_weight: float = 0.5,
) -> torch.Tensor:
    """Target embeddings of the alignment stage, one row per (content, place).

    Content ``c * len(kinds) + k`` is the mean of the colour and kind words' input embeddings, the last content
    is the embedding of ``background`` (first token of each word). With ``places`` (phrases such as
    ``"top left"``), row ``content * len(places) + p`` adds ``place_weight`` times the mean embedding of the
    tokens of ``" " + places[p]`` (as the phrase reads inside a question), so that every visual token also says
    where it is; without, there is one row per content.
    """
    table = model.model.language_model.embed_tokens.weight.detach()

    def word(w: str) -> torch.Tensor:
        return table[tokenizer.encode(w, add_special_tokens=False)[0]]

    content = torch.stack([0.5 * (word(c) + word(k)) for c in colours for k in kinds] + [word(background)]).float()
    if not places:
        return content
    place = torch.stack([table[tokenizer.encode(" " + p, add_special_tokens=False)].mean(0) for p in places]).float()
    return (content[:, None] + place_weight * place[None]).reshape(-1, content.shape[-1])


def patch_codes(
    owners: Sequence[int],
    objects: Sequence,
    colours: Sequence[str],
    kinds: Sequence[str],
    cells: Sequence[int] | None = None,
    n_places: int = 1,
) -> list[int]:
    """Per patch, the row of :func:`word_targets` for the object that covers it (background: the last content)
    and, with ``cells`` (per patch its place index among ``n_places``), for the place it lies in."""
    background = len(colours) * len(kinds)
    content = [
        background
        if o < 0
        else list(colours).index(objects[o].colour) * len(kinds) + list(kinds).index(objects[o].kind)
        for o in owners
    ]
    if cells is None:
        return content
    return [c * n_places + p for c, p in zip(content, cells, strict=True)]


def align_projector(
    projector: Projector,
    feats: torch.Tensor,
    codes: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    lr: float,
    log: Log,
    batch: int = 4096,
    object_weight: float = 4.0,
    seed: int = 0,
    n_places: int = 1,
) -> None:
    """Alignment stage: fit the projector so that each patch's token is the word embedding of what it shows.

    Args:
        feats: ``[M, C]`` frozen-tower features of single patches (any dtype).
        codes: ``[M]`` row of ``targets`` each patch should map to (:func:`patch_codes`).
        targets: ``[R, D]`` target embeddings (:func:`word_targets`; the last content is the background).
        object_weight: weight of object patches against background patches in the squared error.
        n_places: places per content in ``targets`` (1: no place in the targets).
    """
    gen = torch.Generator().manual_seed(seed)
    params = list(projector.inner.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    background = targets.shape[0] // n_places - 1
    weight = torch.where(codes // n_places == background, 1.0, object_weight)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, feats.shape[0], (batch,), generator=gen)
        err = projector(feats[idx].float()) - targets[codes[idx]]
        loss = (err.pow(2).sum(-1) * weight[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step == 0:
            log(f"align {step + 1}/{steps}: weighted squared error {loss.item():.3f}")
    with torch.no_grad():
        idx = torch.randint(0, feats.shape[0], (20000,), generator=gen)
        pred = torch.nn.functional.normalize(projector(feats[idx].float()), dim=-1)
        nearest = (pred @ torch.nn.functional.normalize(targets, dim=-1).T).argmax(-1)
        obj = codes[idx] // n_places != background
        acc = (nearest // n_places == codes[idx] // n_places)[obj].float().mean().item()
        where = (nearest % n_places == codes[idx] % n_places).float().mean().item()
    log(
        f"alignment: {steps} steps in {time.perf_counter() - start:.0f} s; object patches whose nearest target is "
        f"their own (colour, kind): {acc:.3f}"
        + (f"; patches whose nearest target is their place: {where:.3f}" if n_places > 1 else "")
    )


def align_with_tower(
    projector: Projector,
    blocks: TowerBlocks,
    adapters: LoRA | None,
    hidden: torch.Tensor,
    codes: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    lr: float,
    log: Log,
    batch: int = 16,
    object_weight: float = 4.0,
    ce_weight: float = 1.0,
    temperature: float = 0.05,
    seed: int = 0,
    pool: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Alignment stage with the tower's upper blocks adapted: each patch's token should be the word embedding
    of what it shows, and be nearer to it than to any other target.

    Unlike :func:`align_projector` (single patches, frozen tower), a step takes whole images, so the adapted
    blocks' attention can gather an object's evidence from all of its patches: a patch that holds one stroke of
    a digit learns to say which digit it belongs to. The loss is the weighted squared error to the target plus
    ``ce_weight`` times a cross-entropy over cosine similarities to every target (``temperature``), which
    separates targets whose mean embeddings lie close together.

    Args:
        hidden: ``[N, 1 + P, C]`` cached hidden states of block ``blocks.start`` (fp16 is fine).
        codes: ``[N, P]`` row of ``targets`` each patch should map to (the last row is the background); with
            ``pool``, ``[N, Q]``: one row per pooled token.
        pool: what the model does to an image's projected patches before the language model sees them (OneVision's
            2 x 2 pooling of video frames): the targets then apply to the pooled tokens, what the model reads.
    """
    gen = torch.Generator().manual_seed(seed)
    params = list(projector.inner.parameters()) + (list(adapters.parameters()) if adapters is not None else [])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    background = targets.shape[0] - 1
    unit = F.normalize(targets, dim=-1)

    def tokens(h: torch.Tensor) -> torch.Tensor:  # what the language model reads, flattened over the images
        x = projector(blocks(h))
        return (pool(x) if pool is not None else x).flatten(0, 1)

    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, hidden.shape[0], (batch,), generator=gen)
        pred = tokens(hidden[idx])
        code = codes[idx].flatten()
        weight = torch.where(code == background, 1.0, object_weight)
        mse = ((pred - targets[code]).pow(2).sum(-1) * weight).mean()
        logits = F.normalize(pred, dim=-1) @ unit.T / temperature
        ce = (F.cross_entropy(logits, code, reduction="none") * weight).mean()
        loss = mse + ce_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step == 0:
            log(f"align {step + 1}/{steps}: weighted squared error {mse.item():.3f}, cross-entropy {ce.item():.3f}")
    with torch.no_grad():
        idx = torch.randint(0, hidden.shape[0], (min(200, hidden.shape[0]),), generator=gen)
        pred = torch.cat([tokens(hidden[idx[s : s + 50]]) for s in range(0, len(idx), 50)])
        nearest = (F.normalize(pred, dim=-1) @ unit.T).argmax(-1)
        code = codes[idx].flatten()
        obj = code != background
        acc = (nearest == code)[obj].float().mean().item()
        bg = (nearest == code)[~obj].float().mean().item()
    what = "patches" if pool is None else "pooled tokens"
    log(
        f"alignment: {steps} steps in {time.perf_counter() - start:.0f} s; object {what} whose nearest target is "
        f"their own (colour, kind): {acc:.3f}, background {what}: {bg:.3f}"
    )
