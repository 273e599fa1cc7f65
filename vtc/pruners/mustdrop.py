"""``mustdrop``: MustDrop, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model"
(Liu et al., arXiv 2411.10803). Official code liuting20/MustDrop @ 909afa5 (``local_merge.py`` and
``clip_encoder.py`` under ``llava/model/multimodal_encoder/``, ``modelling_sparse_llama.py`` under
``llava/model/language_model/``); read for understanding, nothing copied. The method page is
``docs/methods/mustdrop.md``.

**Stage 1, vision encoding** (in the tower, ``VISION_MERGE``):

* after block 0, *conditional pooling*: the patch grid (prefix tokens, CLS, left out) is cut into ``3 x 3`` windows;
  a window's similarity is the mean cosine similarity of its ``9 * 8`` ordered pairs of distinct tokens (of block
  0's output); ``r`` = the number of windows at or above ``merge_thr = 0.8``; each image merges its ``r`` most
  similar windows into one token each, the size-weighted mean of the window (all sizes 1: the plain mean). New
  order: prefix, the merged windows by descending similarity, then the unmerged tokens in index order (official).
  Sizes are not used afterwards (no proportional attention, official);
* at the tower's last block (official: block 23 of 24, one past LLaVA's feature block), the *key set*: the
  ``ceil(0.08 * t)`` of the ``t`` tokens after the prefix with the largest CLS attention (mean over heads) of
  that block; they are never dropped later. Towers without CLS take the attention each token receives.

**Stage 2, prefill** (``LLM_LAYER``): after LLM layers ``l = 2, 6, 10, 14`` (of 32) the *dual-attention filter*
reads layer ``l``'s attention (head mean) from the prompt text after the image (every row after it, as the
official ``text_seq``) to the visual tokens: with ``S_j`` the summed and ``M_j`` the largest attention token ``j``
receives from those rows and ``T = sum_j S_j``, the official code drops ``j`` iff ``S_j < global_thr * T`` and
``M_j < individual_thr``, key set excepted. Layers ``l + 1`` on run without the dropped rows.

**Stage 3, decode**: the official code re-indexes the KV cache of layers 2-14 to the final kept set after the
prefill. vtc keeps what a prune point already gives: every layer caches the rows it ran on, so layers 3-6, 7-10,
11-14 keep the rows kept after layers 2, 6, 10 and layer 2 keeps all (decode steps there attend to a superset of
the official rows; layers 0-1 and 15 on are identical). This keeps invariant 4 (cached decoding equals
cache-free forwards over the same selection), which a decode-only re-index breaks.

**Budget** (exact; ``budget_counts == "last_stage"``): ``k = keep_count(budget, n)`` of the image's ``n`` tokens
before any stage is what is left after the last prune layer. Stage 1 stays threshold-driven (the LLM receives
``m`` tokens, ``k <= m <= n``: at most ``(n - k) // 8`` windows merge). The filter's decision is a ranking:
``score_j = max(S_j / (global_thr * T), M_j / individual_thr)`` is ``>= 1`` exactly where the official filter keeps
``j``; each prune stage keeps the key set and then the top of that score to a geometric schedule from ``m`` to
``k`` (``vtc.budget.stage_counts``, as PyramidDrop), so the thresholds' selection is cut (or filled) to the
stage's count; when the stage's count is below the key set, the key tokens with the highest scores stay. The
official "192 / 128 / 64 tokens" are layer averages over the 32 layers (its printed "equal token number"), which
the record reports as ``equivalent_budget``; see the method page for matching budgets.

**Families**: stage 1 needs an LLM that takes the merged token set: LLaVA-1.5 (``llava``). Where the model packs
full grids (NeXT, OneVision, NeXT-Video) vtc refuses it with a pointer to ``tower_stage=False``, which runs stage 2
alone (no merge, no key set) on every family with in-LLM pruning. Images only.

Deviations: layer indices scale with depth, ``round(l * L / 32)`` (duplicates dropped; LLaVA-1.5-7B is exact);
windows tile the top-left ``(rows // 3) x (cols // 3)`` block and the tokens of a ragged border stay unmerged (the
official code asserts the grid is a multiple of 3); window similarities and the dual-attention scores are fp32;
ties (window similarity, CLS attention, score) go to the lower index (official ``topk`` leaves them unordered);
attention rows are recomputed from the layer's q/k so the model keeps SDPA; a sample with several images is
ranked as one (its ``k`` from all its images' tokens, as FastV and PyramidDrop); a prompt with no text after the
image uses its last token (the official code fails). As in the official code, the number of merged windows is
the smallest across the images of one tower call, so an image's merge can depend on the others in its batch (a
batch of one, the official evaluation, is per image).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .. import kernels
from ..budget import keep_count, stage_counts
from ..config import MethodConfig, check_float, check_int
from ..contexts import LayerTokens, Stage, TowerCall, TowerMerge
from ..mergers.tome import merge_wavg
from ..method import Method
from ..registry import register_method

__all__ = [
    "MustDropConfig",
    "MustDropPruner",
    "MustDropState",
    "window_members",
    "window_similarity",
    "window_groups",
    "key_set",
    "dual_attention_filter",
    "dual_attention_score",
    "select_rows",
    "OFFICIAL_LAYERS",
]

#: the official filter layers (the visual tokens are dropped after each) of LLaVA-1.5-7B's 32-layer LLM
OFFICIAL_LAYERS = (2, 6, 10, 14)
OFFICIAL_DEPTH = 32


@dataclasses.dataclass
class MustDropConfig(MethodConfig):
    """MustDrop options (official values as defaults; the thresholds of the README's 192-token example).

    Args:
        merge_thr: stage 1 merges the windows whose mean pairwise cosine similarity is at least this (official 0.8).
        window: side of the square windows of stage 1 (official 3).
        key_ratio: share of the tower's tokens in the key set, ``ceil(key_ratio * t)`` (official 0.08); 0: none.
        key_layer: vision block whose CLS attention picks the key set (negative counts from the end; official: the
            last block, -1). It runs after the merge, so it cannot be block 0.
        global_thr: dual-attention filter: a token is dropped only if its summed text attention is below this share
            of the text's attention to all visual tokens (official examples 0.001, 0.0012, 0.011).
        individual_thr: ... and its largest attention from one text token is below this (official 0.001, 0.01).
        layers: LLM layers after which the filter drops tokens (official indexing: layer ``l``'s attention decides,
            layer ``l + 1`` is the first without the dropped rows), strictly increasing; None: 2, 6, 10, 14 of 32,
            scaled with depth.
        tower_stage: False runs the LLM stages alone (no merge, no key set): the families whose LLM cannot take a
            merged token set (LLaVA-NeXT, OneVision, Qwen2-VL, Qwen3-VL, InternVL, Gemma 3).
    """

    merge_thr: float = 0.8
    window: int = 3
    key_ratio: float = 0.08
    key_layer: int = -1
    global_thr: float = 0.001
    individual_thr: float = 0.001
    layers: tuple[int, ...] | None = None
    tower_stage: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("merge_thr", self.merge_thr, -1.0, 1.0)
        check_int("window", self.window, minimum=2)
        check_float("key_ratio", self.key_ratio, 0.0, 1.0)
        check_int("key_layer", self.key_layer)
        if self.key_layer == 0:
            raise ValueError("key_layer=0 is the block before the merge; the key set is read after it (official: -1)")
        for name in ("global_thr", "individual_thr"):
            check_float(name, getattr(self, name), 0.0)
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (a threshold of 0 keeps every token), got {getattr(self, name)}")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers:
                raise ValueError("layers must name at least one LLM layer")
            for layer in self.layers:
                check_int("layers[i]", layer, minimum=0)
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        if not isinstance(self.tower_stage, bool):
            raise TypeError(f"tower_stage must be a bool, got {self.tower_stage!r}")


# -- stage 1: conditional pooling and the key set -------------------------------------------------------------


def window_members(rows: int, cols: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """``[W, window**2]`` grid index of every token of each window (windows and members row-major); windows tile
    the top-left ``(rows // window) x (cols // window)`` block."""
    gh, gw = rows // window, cols // window
    r = torch.arange(gh, device=device)[:, None, None, None] * window + torch.arange(window, device=device)[:, None]
    c = torch.arange(gw, device=device)[None, :, None, None] * window + torch.arange(window, device=device)
    return (r * cols + c).reshape(gh * gw, window * window)


def window_similarity(x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """``[B, W]`` mean cosine similarity over the ordered pairs of distinct tokens of each window, fp32.

    Args:
        x: ``[B, N, C]`` grid tokens (no prefix); members: ``[W, m]`` from :func:`window_members`.
    """
    m = members.shape[1]
    v = F.normalize(x.float()[:, members], dim=-1, eps=1e-8)  # [B, W, m, C]
    sims = v @ v.transpose(-1, -2)  # [B, W, m, m]
    off = sims.sum((-1, -2)) - sims.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off / (m * (m - 1))


def window_groups(
    sim: torch.Tensor, members: torch.Tensor, tokens: int, prefix: int, threshold: float, max_windows: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Which windows merge, and where every token goes: ``(groups [B, T], anchors [B, T'], r)``.

    ``r`` = the windows at or above ``threshold``, the smallest count across the batch (official), at most
    ``max_windows``; each row merges its ``r`` most similar windows (ties to the lower window). Output order: the
    ``prefix`` tokens, the merged windows by descending similarity, then the other grid tokens in index order.
    ``groups[b, i]`` is the output row of block-0 token ``i`` (prefix included), ``anchors[b, j]`` the smallest
    block-0 index among output row ``j``'s members.
    """
    bsz, device = sim.shape[0], sim.device
    r = min(int((sim >= threshold).sum(-1).min()), max_windows) if sim.shape[1] else 0
    order = torch.sort(sim, dim=-1, descending=True, stable=True).indices[:, :r]  # [B, r]
    size, n = members.shape[1], tokens - prefix
    out_rows = tokens - r * (size - 1)
    groups = torch.empty(bsz, tokens, dtype=torch.long, device=device)
    anchors = torch.empty(bsz, out_rows, dtype=torch.long, device=device)
    head = torch.arange(prefix, device=device)
    for b in range(bsz):
        merged = members.to(device)[order[b]]  # [r, m]
        rest = torch.ones(n, dtype=torch.bool, device=device)
        rest[merged.flatten()] = False
        rest = torch.nonzero(rest).flatten()
        groups[b, :prefix] = head
        groups[b, prefix + merged.flatten()] = prefix + torch.arange(r, device=device).repeat_interleave(size)
        groups[b, prefix + rest] = prefix + r + torch.arange(rest.numel(), device=device)
        anchors[b] = torch.cat([head, prefix + merged.amin(-1), prefix + rest])
    return groups, anchors, r


def key_set(attention: torch.Tensor, prefix: int, ratio: float) -> torch.Tensor:
    """``[B, ceil(ratio * t)]`` rows (after the prefix, ascending) of the key set from a block's attention
    probabilities ``[B, H, T, T]``: the largest CLS attention (head mean), or, without a prefix, the largest
    attention received (mean over heads and queries). Ties to the lower row."""
    if prefix:
        score = attention[:, :, 0, prefix:].mean(1)
    else:
        score = attention.mean(1).mean(1)
    count = math.ceil(ratio * score.shape[-1])
    return kernels.topk_sorted(score, count)


class MustDropState(TowerMerge):
    """One tower call: the conditional pooling after block 0 and the key set at ``key_block``.

    After the call, :attr:`key_anchors` ``[B, n_key]`` holds each row's key set in the consumer's token
    coordinates (the anchors the LLM's rows carry), and :attr:`windows` the number of merged windows.
    """

    wants_attention = True

    def __init__(self, call: TowerCall, grid: tuple[int, int], key_block: int, config: MustDropConfig):
        self.prefix, self.key_block, self.config = call.prefix, key_block, config
        self.drop = call.tokens - call.n  # rows the consumer does not take (LLaVA's "default": CLS)
        self.members = window_members(*grid, config.window, call.device)
        self.max_windows = (call.n - call.k) // (config.window**2 - 1)  # at least k tokens reach the LLM
        self.size = torch.ones(call.batch, call.tokens, dtype=torch.float32, device=call.device)
        self.origin = torch.arange(call.tokens, device=call.device).expand(call.batch, -1)
        self.anchor = self.origin
        self.similarity: torch.Tensor | None = None
        self.windows = 0
        self.key_anchors: torch.Tensor | None = None

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None  # the official tower runs the merged tokens without proportional attention

    def wants_metric(self, block: int) -> bool:
        return block == self.key_block

    def merge(self, block: int, x: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
        if block == self.key_block:
            if metric is None:
                raise RuntimeError(f"vision block {block} picks the key set but its runner passed no attention")
            rows = key_set(metric, self.prefix, self.config.key_ratio)
            self.key_anchors = self.anchor.gather(1, rows + self.prefix) - self.drop
        return x

    def after_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        if block != 0:
            return x
        p = self.prefix
        self.similarity = window_similarity(x[:, p:], self.members)
        groups, anchors, r = window_groups(
            self.similarity, self.members, x.shape[1], p, self.config.merge_thr, self.max_windows
        )
        self.windows = r
        if r == 0:
            return x
        x, self.size = merge_wavg(x, self.size, groups, anchors.shape[1])
        self.origin, self.anchor = groups, anchors
        return x


# -- stage 2: the dual-attention filter -----------------------------------------------------------------------


def dual_attention_filter(attention: torch.Tensor, global_thr: float, individual_thr: float) -> torch.Tensor:
    """The official decision: ``[n]`` True where a visual token stays, from the head-mean attention ``[R, n]`` of
    the text rows to the visual tokens (the key set aside)."""
    s = attention.float().sum(0)
    return ~((s < s.sum() * global_thr) & (attention.float().amax(0) < individual_thr))


def dual_attention_score(attention: torch.Tensor, global_thr: float, individual_thr: float) -> torch.Tensor:
    """``[n]`` ``max(S / (global_thr * T), M / individual_thr)``: ``>= 1`` exactly where
    :func:`dual_attention_filter` keeps the token, and the order in which the schedule keeps them."""
    s = attention.float().sum(0)
    total = (s.sum() * global_thr).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.maximum(s / total, attention.float().amax(0) / individual_thr)


def select_rows(score: torch.Tensor, key: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending indices of ``count`` tokens: the key tokens ``key [n]`` first, then the highest ``score``; when the
    key set alone exceeds ``count``, its highest-scoring tokens (ties to the lower index)."""
    keys, rest = torch.nonzero(key).flatten(), torch.nonzero(~key).flatten()
    if keys.numel() >= count:
        return torch.sort(keys[kernels.topk_sorted(score[keys], count)]).values
    chosen = rest[kernels.topk_sorted(score[rest], count - keys.numel())]
    return torch.sort(torch.cat([keys, chosen])).values


@register_method(
    "mustdrop", config=MustDropConfig, kind="pruner", stages=(Stage.VISION, Stage.VISION_MERGE, Stage.LLM_LAYER)
)
class MustDropPruner(Method):
    """MustDrop: similar 3x3 windows merged in the tower and a CLS-attention key set, then a dual-attention filter
    after LLM layers 2, 6, 10, 14."""

    default_positions = "compact"
    modalities = ("image",)
    cuts_in_llm = True

    def __init__(self, config: MustDropConfig):
        super().__init__(config)
        if not config.tower_stage:
            self.stages = (Stage.LLM_LAYER,)
        #: the state of the last tower call (its key set reaches the prune points of the same call)
        self.tower: MustDropState | None = None

    # -- stage 1 ---------------------------------------------------------------------------------------------
    def tower_merge(self, call: TowerCall) -> MustDropState | None:
        self.tower = None
        if call.k >= call.n:
            return None  # a full budget is the untouched model
        total = call.num_blocks or call.blocks
        key_block = self.config.key_layer + total if self.config.key_layer < 0 else self.config.key_layer
        if not 1 <= key_block < total:
            raise ValueError(
                f"mustdrop key_layer={self.config.key_layer} is block {key_block} of a {total}-block tower; the key "
                f"set is read after the merge of block 0: blocks 1..{total - 1}"
            )
        grid = call.grid
        if grid is None:
            side = math.isqrt(call.tokens - call.prefix)
            if side * side != call.tokens - call.prefix:
                raise ValueError(
                    f"mustdrop's windows need a square patch grid, got {call.tokens - call.prefix} tokens"
                )
            grid = (side, side)
        self.tower = MustDropState(call, grid, key_block, self.config)
        return self.tower

    # -- stage 2 ---------------------------------------------------------------------------------------------
    def filter_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers whose attention drops tokens (official indexing: after them)."""
        layers = self.config.layers or tuple(sorted({round(x * num_layers / OFFICIAL_DEPTH) for x in OFFICIAL_LAYERS}))
        if layers[-1] >= num_layers - 1:
            raise ValueError(
                f"mustdrop layers {layers} must leave a layer after the last one: the LLM has {num_layers} layers"
            )
        return layers

    def llm_score_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.filter_layers(num_layers)

    def llm_prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(x + 1 for x in self.filter_layers(num_layers))

    def prune(self, tokens: LayerTokens) -> list[torch.Tensor]:
        cfg: MustDropConfig = self.config  # type: ignore[assignment]
        layers = self.filter_layers(tokens.num_layers)
        stage = layers.index(tokens.layer - 1)
        rows = [t if t.numel() else tokens.last[b : b + 1] for b, t in enumerate(tokens.text_after)]
        probs = tokens.attention(rows, tokens.layer - 1)
        keys = self.key_rows(tokens)
        totals = tokens.n_original or tokens.n_input
        kept = []
        for vis, p, key, n, m in zip(tokens.visual, probs, keys, totals, tokens.n_input, strict=True):
            final = min(keep_count(cfg.budget, n), m)
            count = min(stage_counts(final, m, len(layers))[stage], vis.numel())
            score = dual_attention_score(p[:, vis], cfg.global_thr, cfg.individual_thr)
            kept.append(vis[select_rows(score, key.to(score.device), count)])
        return kept

    def key_rows(self, tokens: LayerTokens) -> list[torch.Tensor]:
        """Per sample ``[n_visual]`` bool: the visual rows in the key set of the tower call of this prefill."""
        none = [torch.zeros(v.numel(), dtype=torch.bool, device=v.device) for v in tokens.visual]
        state = self.tower
        if not self.config.tower_stage or state is None:
            return none
        if state.key_anchors is None or tokens.visual_image is None or tokens.visual_token is None:
            raise RuntimeError("mustdrop's key set did not reach the LLM (the tower's last block did not run)")
        anchors = state.key_anchors
        stride = int(state.origin.shape[1]) + 1
        out = []
        for image, token in zip(tokens.visual_image, tokens.visual_token, strict=True):
            if image.numel() and int(image.max()) >= anchors.shape[0]:
                raise RuntimeError(f"mustdrop: image {int(image.max())} has no row in the tower call")
            codes = (torch.arange(anchors.shape[0], device=anchors.device)[:, None] * stride + anchors).flatten()
            out.append(torch.isin(image * stride + token, codes.to(image.device)))
        return out

    def visual_schedule(self, num_layers: int, n: int) -> list[int]:
        """Per layer, assuming the tower merges nothing (``m = n``)."""
        prunes = self.llm_prune_layers(num_layers)
        counts = stage_counts(self.config.budget, n, len(prunes))
        return [
            n if not (passed := sum(p <= layer for p in prunes)) else counts[passed - 1] for layer in range(num_layers)
        ]
