"""``aim``: AIM, "Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning" (Zhong et al., ICCV 2025,
arXiv 2412.03248). Official code dragonlzm/AIM @ 4f4bb81 (``llava/model/token_merge.py``, ``get_2dPool`` in
``llava/model/llava_arch.py``, the pruning in its forked ``models/qwen2/modeling_qwen2.py``); the method page is
``docs/methods/aim.md``.

**Before the LLM** (per frame, or per partition of an image): rounds of bipartite soft matching on the
projected tokens. Tokens at even places are sources, odd places destinations; each source finds its most
cosine-similar destination; the ``r`` best-matched sources are averaged into their destinations
(``scatter_reduce(mean)`` including the destination itself: an unweighted mean, not ToMe's size-weighted one);
the new order is the unmerged sources, best-matched first, then the destinations in place. The official code
runs two rounds of ``r = t / 2`` (25 % kept); here rounds of ``r = min(t // 2, t - k)`` continue until the
partition's share of ``k`` is reached, so ``budget=0.25`` is the official setting on even grids.

**Inside the LLM**: from layer ``l0`` on (official 14 of 28: ``start=0.5`` of the depth) the visual tokens are
ranked after every layer ``l`` by a PageRank importance of layer ``l``'s own attention and the top
``floor(n * max(0, 1 - (l - l0 + 1) * step))`` go on to layer ``l + 1`` (``n``: visual tokens the LLM
received; official ``step = 0.125``, so nothing visual is left after layer ``l0 + 7``). Importance: per
head ``M = softmax(logits / tau)`` over the causal attention logits (``tau = 0.1``), five power iterations
``d <- d M`` from the uniform distribution, then the root mean square of ``d`` over heads. Text tokens are
always kept (the official code gives them score 1.0).

Deviations: pruned rows leave the sequence (the official code only masks them as keys, so they still pass
PageRank mass as queries and are still computed); attention logits are recomputed from the layer's input
norm, q/k projections and RoPE with grouped KV heads repeated, a few heads at a time, so the model keeps SDPA
(the official code needs eager attention); the layer schedule scales with depth; sources are ranked with a
stable sort (the official ``argsort`` leaves ties unordered). ``budget`` counts the tokens the LLM receives
(after the merge); the in-LLM schedule acts on top of it, as the official one does.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import kernels
from ..config import MethodConfig, check_float, check_int
from ..contexts import ImageTokens, LayerTokens, Reduction, Stage
from ..grids import per_partition_counts
from ..method import Method
from ..registry import register_method

#: logits of at most this many (head, query, key) entries are held at once while ranking
_CHUNK = 2**25


@dataclasses.dataclass
class AIMConfig(MethodConfig):
    """AIM options.

    Args:
        start: the first LLM layer whose attention ranks the visual tokens, as a fraction of the depth (official:
            layer 14 of 28 = 0.5).
        step: the share of the visual tokens dropped after each layer from there on (official 0.125).
        tau: softmax temperature of the PageRank transition matrix (official 0.1).
        iters: PageRank power iterations (official 5).
        llm_stage: False keeps only the merge before the LLM.
    """

    start: float = 0.5
    step: float = 0.125
    tau: float = 0.1
    iters: int = 5
    llm_stage: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("start", self.start, 0.0, 1.0)
        check_float("step", self.step, 0.0, 1.0)
        check_float("tau", self.tau, 1e-6)
        check_int("iters", self.iters, minimum=1)
        if not isinstance(self.llm_stage, bool):
            raise TypeError(f"llm_stage must be a bool, got {self.llm_stage!r}")


def bipartite_merge(x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AIM round on ``x [t, D]``: ``(merged [t - r, D], row [t], stands [t - r])``: ``row[i]`` is the output
    row of token ``i``, ``stands[j]`` the token output row ``j`` stands at (itself, or the destination).

    Even places are sources, odd places destinations; the ``r`` sources most similar (cosine) to their best
    destination are averaged into it (unweighted mean with the destination); output: unmerged sources in
    descending similarity, then every destination in place.
    """
    t = x.shape[0]
    r = min(r, t // 2)
    src, dst = torch.arange(0, t, 2, device=x.device), torch.arange(1, t, 2, device=x.device)
    best, match = kernels.cosine_argmax(x[src].float(), x[dst].float())  # no |src| x |dst| matrix; ties: lower
    order = torch.argsort(best, descending=True, stable=True)
    merged_src, kept_src = order[:r], order[r:]
    sums = x[dst].float().clone()
    counts = torch.ones(dst.numel(), device=x.device)
    sums.index_add_(0, match[merged_src], x[src[merged_src]].float())
    counts.index_add_(0, match[merged_src], torch.ones(r, device=x.device))
    out = torch.cat([x[src[kept_src]].float(), sums / counts[:, None]])
    row = torch.empty(t, dtype=torch.long, device=x.device)
    row[src[kept_src]] = torch.arange(kept_src.numel(), device=x.device)
    row[dst] = kept_src.numel() + torch.arange(dst.numel(), device=x.device)
    row[src[merged_src]] = kept_src.numel() + match[merged_src]
    return out.to(x.dtype), row, torch.cat([src[kept_src], dst])


def pagerank(logits: torch.Tensor, tau: float, iters: int) -> torch.Tensor:
    """``[H, N, N]`` masked attention logits -> ``[H, N]`` PageRank distribution per head (AIM's
    ``get_importance`` before its mean over heads)."""
    m = torch.softmax(logits / tau, dim=-1)
    d = torch.full((m.shape[0], 1, m.shape[-1]), 1.0 / m.shape[-1], device=m.device)
    for _ in range(iters):
        d = d @ m
    return d[:, 0]


@register_method("aim", config=AIMConfig, kind="merger", stages=(Stage.PRE_LLM, Stage.LLM_LAYER))
class AIMMerger(Method):
    """Bipartite merging per frame before the LLM, then progressive PageRank pruning inside it (AIM)."""

    default_positions = "compact"

    # -- before the LLM -----------------------------------------------------------------------------
    def reduce(self, image: ImageTokens) -> Reduction:
        layout = image.layout
        groups = torch.full((image.n,), -1, dtype=torch.long, device=image.tokens.device)
        anchors, tokens = [], []
        for p, k in enumerate(per_partition_counts(layout, image.k)):
            idx = torch.nonzero(layout.partition == p).flatten().to(image.tokens.device)
            if k == 0 or idx.numel() == 0:
                continue
            x, row, anchor = image.tokens[idx], torch.arange(idx.numel(), device=idx.device), idx
            while x.shape[0] > k:
                x, step, stands = bipartite_merge(x, x.shape[0] - k)
                row, anchor = step[row], anchor[stands]
            groups[idx] = row + sum(len(a) for a in anchors)
            anchors.append(anchor)
            tokens.append(x)
        return Reduction(index=torch.cat(anchors), tokens=torch.cat(tokens), groups=groups)

    # -- inside the LLM -----------------------------------------------------------------------------
    def _first(self, num_layers: int) -> int:
        return round(num_layers * self.config.start)

    def _rate(self, layer: int, num_layers: int) -> float:
        """Share of the received visual tokens that go on after ``layer``."""
        return max(0.0, 1.0 - (layer - self._first(num_layers) + 1) * self.config.step)

    def llm_score_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(p - 1 for p in self.llm_prune_layers(num_layers))

    def llm_prune_layers(self, num_layers: int) -> tuple[int, ...]:
        if not self.config.llm_stage or self.config.step == 0:
            return ()
        out = []
        for layer in range(self._first(num_layers), num_layers - 1):
            out.append(layer + 1)
            if self._rate(layer, num_layers) == 0:
                break
        return tuple(out)

    def prune(self, tokens: LayerTokens) -> list[torch.Tensor]:
        layer = tokens.layer - 1  # the layer whose attention ranks (official: after it ran)
        rate = self._rate(layer, tokens.num_layers)
        counts = [min(int(n * rate), rows.numel()) for rows, n in zip(tokens.visual, tokens.n_input, strict=True)]
        cut = [k < rows.numel() for k, rows in zip(counts, tokens.visual, strict=True)]
        scores = self.importance(tokens, layer, cut)
        return [
            rows[kernels.topk_sorted(score[rows], k)] if score is not None else rows
            for rows, k, score in zip(tokens.visual, counts, scores, strict=True)
        ]

    def importance(self, tokens: LayerTokens, layer: int, wanted: list[bool]) -> list[torch.Tensor | None]:
        """Per sample ``[L]`` PageRank importance of its current rows from ``layer``'s attention (0 on padding);
        None for the samples not ``wanted``. One logits call per chunk of heads serves every sample."""
        empty = tokens.last[:0]
        # the last prompt token sees every real row of its sample: its finite logits name them; all heads
        lasts = [tokens.last[b : b + 1] if w else empty for b, w in enumerate(wanted)]
        last = tokens.attention_logits(lasts, slice(0, None), layer)
        pairs = list(zip(last, wanted, strict=True))
        valid = [torch.nonzero(torch.isfinite(x[0, 0])).flatten() if w else empty for x, w in pairs]
        heads = max((x.shape[0] for x, w in pairs if w), default=0)
        chunk = max(1, _CHUNK // max(1, max(v.numel() for v in valid) ** 2))
        totals = [torch.zeros(v.numel(), device=v.device) for v in valid]
        for h in range(0, heads, chunk):
            logits = tokens.attention_logits(valid, slice(h, h + chunk), layer)  # per sample [h', n_b, L]
            for b, v in enumerate(valid):
                if wanted[b]:
                    totals[b] += pagerank(logits[b][:, :, v], self.config.tau, self.config.iters).pow(2).sum(0)
        out: list[torch.Tensor | None] = []
        for v, total, w in zip(valid, totals, wanted, strict=True):
            if not w:
                out.append(None)
                continue
            score = torch.zeros(tokens.hidden.shape[1], device=v.device)
            score[v] = (total / heads).sqrt()
            out.append(score)
        return out
