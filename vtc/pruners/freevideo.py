"""``freevideo``: Free Video-LLM, "Free Video-LLM: Prompt-guided Visual Perception for Efficient Training-free Video
LLMs" (Han et al., Huawei Noah's Ark, arXiv 2410.10441). Official code contrastive/FreeVideoLLM @ 1d62394 (MIT, a
LLaVA-1.6 fork): ``text_guided_frames``, ``roi_crop``, ``roi_box`` and ``prepare_visual_aggregation`` in
``free_video_llm/llava/model/llava_arch.py``; settings in ``cfgs/free_video_llm_7b.yaml``.

Before the LLM, on the projected frame tokens (what the LLM receives), with ``p`` the prompt feature:

1. **prompt-guided temporal sampling**: frame ``t`` scores ``cos(mean_i x[t, i], p)``; the best frames are kept
   (stable descending order: ties go to the earlier frame), fed in time order (official ``text_guided_frames``:
   ``cos`` of the frames' and the question's CLIP features, top frames, sorted by index);
2. **prompt-guided spatial sampling** (official ``roi_crop`` / ``roi_box``): in a kept frame of ``rows x cols``
   tokens, each token scores ``cos(x[t, i], p)``; the RoI is the ``round(rows * sqrt(r)) x round(cols *
   sqrt(r))`` box (``r = roi_ratio``) centred on the mean (row, col), truncated to ints, of the ``int(rows * cols
   * r)`` best tokens, shifted inside the frame where it sticks out; its tokens are kept in raster order.

**The prompt feature.** Official: CLIP's pooled text embedding of the question, against CLIP's pooled image
embedding (frames) and CLIP's projected patch features (tokens), from a second, full CLIP model. HF VLMs ship no
text tower aligned with their vision tower, so here ``p`` is the mean of the L2-normalised LLM input embeddings of
the prompt text after the video, against the projected tokens (the same space; ``cdpruner`` makes the same
choice): ``cos(x, p)`` ranks tokens as the mean cosine to the prompt's tokens does. A frame's feature is the mean
of its projected tokens (the official code's own frame-level feature, ``top_change_frames``).

**How the budget maps.** The official setting (``slow_3frms_..._roi8``) keeps 3 prompt-selected frames, each
cropped to ``r = 0.8`` of its area. Here ``roi_ratio`` (default 0.8, ``roi8``) fixes the RoI of a frame,
``B = round(rows * sqrt(r)) * round(cols * sqrt(r))`` tokens, and ``k`` fixes how many frames get one:

* ``k <= T * B``: ``ceil(k / B)`` frames by prompt similarity; each keeps the official RoI except the least
  similar of them, which keeps the rest, ``k - (F - 1) * B`` tokens (fewer than ``B``);
* ``k > T * B``: every frame, ``k // T`` tokens each, one more for the ``k % T`` most similar (the RoI grows
  past ``r``; a whole frame at ``k = T * rows * cols``).

A frame keeping ``q != B`` tokens gets the RoI of area ratio ``q / (rows * cols)``: a ``h x ceil(q / h)`` box,
``h = round(rows * sqrt(q / (rows * cols)))`` (``ceil(q / cols)`` rows when that is wider than the frame),
centred on its ``q`` best tokens; it holds fewer than one row or column more than ``q``, and those extra
tokens (its least prompt-similar) are dropped, so exactly ``k`` tokens are kept. Ties keep raster order.

Deviations: a selection only: the official default also max-pools horizontal token pairs before the crop and
adds a "middle" pathway (5 uniform frames, cropped the same way) and a "fast" pathway (all 50 frames pooled
to 4 x 4), 2,648 tokens in all (LLaVA-1.6); those are merges and fixed layouts, left out. The official crop
reshapes its pooled ``24 x 12`` frames as ``12 x 24`` (``h, w = sqrt(N) // 2, sqrt(N)``), folding two grid
rows into one; here the RoI is on each frame's true grid. The official question is the bare question; here it
is all the prompt text after the video. Without prompt text, frames are sampled uniformly (the official middle
pathway's ``linspace``) and each RoI is centred. Separator tokens (OneVision's video newline) are not
candidates. Videos only: the temporal half is the method, and an image's crops (LLaVA-NeXT) are no frames.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..config import MethodConfig, check_float
from ..contexts import ImageTokens, Reduction, Stage
from ..mergers._video import frame_grid
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class FreeVideoConfig(MethodConfig):
    """Free Video-LLM options.

    Args:
        roi_ratio: area ratio of the RoI kept in each selected frame, in (0, 1] (official ``roi8``: 0.8); the
            number of frames follows from the budget.
    """

    roi_ratio: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("roi_ratio", self.roi_ratio, 0.0, 1.0)
        if self.roi_ratio <= 0:
            raise ValueError(f"roi_ratio must be > 0 (the area ratio of the RoI kept per frame), got {self.roi_ratio}")


def prompt_feature(text: torch.Tensor | None) -> torch.Tensor | None:
    """``[D]`` the prompt feature: mean of the L2-normalised text embeddings ``[m, D]`` (None without text)."""
    if text is None or text.shape[0] == 0:
        return None
    return F.normalize(text.float(), dim=-1).mean(dim=0)


def prompt_scores(frames: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(frame [T], token [T, P])`` cosine similarities of the frames' mean tokens and of each token of
    ``frames [T, P, D]`` to ``prompt [D]``."""
    x = frames.float()
    p = prompt.to(x.device)[None]
    return F.cosine_similarity(x.mean(dim=1), p, dim=-1), F.cosine_similarity(x, p[None], dim=-1)


def roi_shape(rows: int, cols: int, ratio: float) -> tuple[int, int]:
    """The official RoI ``(h, w)`` of area ratio ``ratio`` in a ``rows x cols`` frame (``roi_box``), at least 1 x 1."""
    s = math.sqrt(ratio)
    return max(1, min(rows, round(rows * s))), max(1, min(cols, round(cols * s)))


def fitted_shape(rows: int, cols: int, q: int) -> tuple[int, int]:
    """The smallest box ``(h, w)`` of about the frame's aspect that holds ``q`` tokens (``h * w - q < max(h, w)``)."""
    h = max(1, min(rows, round(rows * math.sqrt(q / (rows * cols)))))
    w = -(-q // h)
    if w > cols:
        w, h = cols, -(-q // cols)
    return h, w


def frame_quotas(order: list[int], k: int, box: int) -> list[int]:
    """Tokens kept per frame (time order) for frames ranked ``order`` (best first): the RoI ``box`` in as many of
    the best frames as ``k`` needs, the last of them the rest; past ``T * box``, ``k`` spread over every frame."""
    t = len(order)
    quotas = [0] * t
    if k > t * box:
        base, extra = divmod(k, t)
        for rank, f in enumerate(order):
            quotas[f] = base + (rank < extra)
        return quotas
    for rank, f in enumerate(order[: -(-k // box)]):
        quotas[f] = min(box, k - rank * box)
    return quotas


def uniform_order(t: int, n: int) -> list[int]:
    """``n`` frames of ``t`` evenly spread (the official middle pathway's ``linspace(0, T, n + 1)``), then the rest."""
    picks = torch.linspace(0, t, n + 1).to(torch.int32).tolist()[:-1]
    return picks + [f for f in range(t) if f not in picks]


def roi_cells(scores: torch.Tensor, rows: int, cols: int, q: int, ratio: float, centred: bool = False) -> torch.Tensor:
    """Raster cells (ascending) of the RoI keeping ``q`` tokens of a ``rows x cols`` frame whose tokens score
    ``scores [rows * cols]``: the official box when ``q`` is its area, else a fitted one; centred on the mean
    position of the best tokens (of all of them when ``centred``)."""
    p = rows * cols
    if q >= p:
        return torch.arange(p, device=scores.device)
    h, w = roi_shape(rows, cols, ratio)
    count = max(1, int(p * ratio))
    if h * w != q:
        h, w = fitted_shape(rows, cols, q)
        count = q
    ranked = torch.sort(scores, descending=True, stable=True).indices
    best = ranked if centred else ranked[:count]
    y, x = int((best // cols).float().mean()), int((best % cols).float().mean())
    top = min(max(y - h // 2, 0), rows - h)
    left = min(max(x - w // 2, 0), cols - w)
    rr = torch.arange(top, top + h, device=scores.device)
    cc = torch.arange(left, left + w, device=scores.device)
    box = (rr[:, None] * cols + cc[None, :]).flatten()
    if box.numel() > q:  # a fitted box: drop its least prompt-similar tokens
        box = box[torch.sort(scores[box], descending=True, stable=True).indices[:q]]
    return box.sort().values


@register_method("freevideo", config=FreeVideoConfig, kind="pruner", stages=(Stage.PRE_LLM,))
class FreeVideoPruner(Method):
    """Keep the frames most similar to the prompt, each cropped to the RoI around its most prompt-similar tokens."""

    modalities = ("video",)
    default_newlines = "keep_rows"  # OneVision's video newline stays at the end
    reads_prompt = True

    def reduce(self, image: ImageTokens) -> Reduction:
        frames, index = frame_grid(image)  # [T, P, D], [T, P]
        t, p = index.shape
        rows, cols = image.layout.grids[0]
        ratio = self.config.roi_ratio
        h, w = roi_shape(rows, cols, ratio)
        box, k = h * w, min(image.k, t * p)
        prompt = prompt_feature(image.text_embeds)
        if prompt is None:  # no prompt text: uniform frames, centred RoIs
            frame, token = None, torch.zeros(t, p, device=frames.device)
            order = uniform_order(t, min(t, -(-k // box)))
        else:
            frame, token = prompt_scores(frames, prompt)
            order = torch.sort(frame, descending=True, stable=True).indices.tolist()
        picks = []
        for f, q in enumerate(frame_quotas(order, k, box)):
            if q:
                picks.append(index[f, roi_cells(token[f], rows, cols, q, ratio, centred=prompt is None)])
        per_token = torch.full((image.n,), float("nan"), device=token.device)
        per_token[index.flatten()] = token.flatten()
        return Reduction.keep(torch.cat(picks), scores=per_token)
