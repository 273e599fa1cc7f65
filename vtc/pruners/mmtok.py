"""``mmtok``: MMTok, "Multimodal Coverage Maximization for Efficient Inference of VLMs"
(arXiv 2508.18264, ICLR 2026). Official code Ironieser/MMTok @ d1522cd; the method page is
``docs/methods/mmtok.md``.

Keeps the visual tokens that best *cover* both the text prompt and the whole image, by greedy
maximisation of a soft facility-location objective (monotone submodular, so greedy is within 1 - 1/e):

    P = softmax over vision of (cos(Z, X) / tau_tv) / m      [m, n]  text tokens -> projected vision tokens
    Q = softmax over cols   of (cos(Y, Y) / tau_vv) / n      [n, n]  vision tokens -> vision tokens (ViT space)
    C = [P ; alpha * Q]                                    [(m + n), n]
    repeat k times: pick j maximising sum_r max(0, C[r, j] - best[r]); best = max(best, C[:, j])

``X`` are the projected tokens, ``Y`` the pre-projector ViT features, ``Z`` the input embeddings (the
LLM's embedding table, not contextual states) of the prompt text. Ties go to the lower index; kept
tokens return in ascending order with compact positions (LLaVA path of the official code).

Defaults (official): ``alpha = 0.5``, ``tau_tv = 0.02``, ``tau_vv = 0.2``. Deviations, all forced by the
hook point having token ids but no tokenizer: the text is every prompt token after the image (question
and template tokens alike) instead of the question's keywords after stop-word removal, and there is no
padding-border exclusion for pad-to-square preprocessing (HF's LLaVA-1.5 processor center-crops). With no
text tokens, only the vision-coverage rows remain. On Qwen2-VL ``Y`` is a 2 x 2 group's four patch
features concatenated (the merger's input, which is what the adapter exposes) where the official Qwen path
averages them; on LLaVA-NeXT the greedy runs over all the image's patch tokens at once (the official code
gives every partition the same count).
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import MethodConfig, check_float
from ..contexts import ImageTokens, Reduction, Stage
from ..kernels import normalize
from ..method import Method
from ..registry import register_method

#: coverage entries held at once; a larger image runs the lazy greedy (:func:`lazy_coverage`)
_CHUNK = 2**22


@dataclasses.dataclass
class MMTokConfig(MethodConfig):
    """MMTok options (defaults: the official code).

    Args:
        alpha: weight of the vision-coverage rows against the text-coverage rows (0.5).
        tau_tv: softmax temperature of text-to-vision similarities (0.02).
        tau_vv: softmax temperature of vision-to-vision similarities (0.2).
    """

    alpha: float = 0.5
    tau_tv: float = 0.02
    tau_vv: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("alpha", self.alpha, 0.0)
        check_float("tau_tv", self.tau_tv, 1e-6)
        check_float("tau_vv", self.tau_vv, 1e-6)


def coverage_matrix(
    x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None, alpha: float, tau_tv: float, tau_vv: float
) -> torch.Tensor:
    """``C = [P ; alpha Q]``, ``[(m + n), n]`` fp32 (see module docstring)."""
    n = x.shape[0]
    yn = normalize(y)
    q = (yn @ yn.T / tau_vv).softmax(dim=-1) / n
    if z is None or z.shape[0] == 0:
        return alpha * q
    m = z.shape[0]
    p = (normalize(z) @ normalize(x).T / tau_tv).softmax(dim=-1) / m
    return torch.cat([p, alpha * q])


def greedy_coverage(cov: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy facility location on ``cov [R, n]``: ``k`` column indices in selection order."""
    best = torch.zeros(cov.shape[0], device=cov.device)
    taken = torch.zeros(cov.shape[1], dtype=torch.bool, device=cov.device)
    picks = []
    for _ in range(k):
        gain = (cov - best[:, None]).clamp_min(0).sum(dim=0).masked_fill(taken, float("-inf"))
        j = int(gain.argmax())
        picks.append(j)
        taken[j] = True
        best = torch.maximum(best, cov[:, j])
    return torch.tensor(picks, dtype=torch.long, device=cov.device)


def lazy_coverage(
    x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None, alpha: float, tau_tv: float, tau_vv: float, k: int
) -> torch.Tensor:
    """:func:`greedy_coverage` of :func:`coverage_matrix` without holding the matrix: ``O(n + m)`` memory.

    Each row's softmax normaliser is found in one pass over row blocks, so any column ``C[:, j]`` costs one
    matrix-vector product; gains only fall as columns are chosen (submodular), so stale gains bound the true
    ones and only the leading column is recomputed until it stays ahead (lazy greedy: the same picks, ties to
    the lower index).
    """
    n = x.shape[0]
    yn = normalize(y)
    sides = [(yn, yn, tau_vv, alpha / n)]  # (row features, column features, temperature, row weight)
    if z is not None and z.shape[0] > 0:
        sides.insert(0, (normalize(z), normalize(x), tau_tv, 1.0 / z.shape[0]))
    rows = max(1, _CHUNK // n)
    lse = [
        torch.cat([torch.logsumexp(a[s : s + rows] @ b.T / tau, dim=-1) for s in range(0, a.shape[0], rows)])
        for a, b, tau, _ in sides
    ]

    def column(j: int) -> torch.Tensor:  # C[:, j]
        return torch.cat([w * torch.exp(a @ b[j] / tau - l) for (a, b, tau, w), l in zip(sides, lse, strict=True)])

    def block(start: int) -> torch.Tensor:  # C[:, start:start + rows]
        return torch.cat(
            [
                w * torch.exp(a @ b[start : start + rows].T / tau - l[:, None])
                for (a, b, tau, w), l in zip(sides, lse, strict=True)
            ]
        )

    bound = torch.cat([block(s).sum(dim=0) for s in range(0, n, rows)])
    best = torch.zeros(sum(a.shape[0] for a, *_ in sides), device=x.device)
    picks = []
    for _ in range(k):
        j = int(bound.argmax())
        while True:
            col = column(j)
            bound[j] = (col - best).clamp_min(0).sum()
            leader = int(bound.argmax())
            if leader == j:
                break
            j = leader
        picks.append(j)
        bound[j] = float("-inf")
        best = torch.maximum(best, col)
    return torch.tensor(picks, dtype=torch.long, device=x.device)


@register_method("mmtok", config=MMTokConfig, kind="pruner", stages=(Stage.PRE_LLM,))
class MMTokPruner(Method):
    """Greedy coverage of the prompt text and of the image by the kept visual tokens."""

    reads_prompt = True

    def reduce(self, image: ImageTokens) -> Reduction:
        vision = image.vision_tokens if image.vision_tokens is not None else image.tokens
        c = self.config
        m = 0 if image.text_embeds is None else image.text_embeds.shape[0]
        if (image.n + m) * image.n <= _CHUNK:  # small: the matrix itself, exactly the official computation
            cov = coverage_matrix(image.tokens, vision, image.text_embeds, c.alpha, c.tau_tv, c.tau_vv)
            picks = greedy_coverage(cov, image.k)
        else:  # no (n + m) x n matrix: columns on demand
            picks = lazy_coverage(image.tokens, vision, image.text_embeds, c.alpha, c.tau_tv, c.tau_vv, image.k)
        return Reduction.keep(picks)
