"""Analytic prefill FLOPs of the language model, for records and benchmarks.

Two formulas, both per decoder layer for a sequence of ``n`` tokens (FLOPs = 2 x multiply-adds):

* ``"fastv"``: the formula of the FastV paper (also used by ToDRE), ``4 n d^2 + 2 n^2 d + 2 n d m``
  (d = hidden size, m = FFN size). It counts the four d x d projections, the two attention matmuls as
  one ``n^2 d`` term and a two-matmul FFN.
* ``"exact"`` (default): the matmuls the model really runs, with grouped KV heads and a gated FFN:
  ``2 n d (H d_h + 2 H_kv d_h) + 2 n H d_h d + 2 * 2 n^2 H d_h + 2 * n_ffn n d m`` where ``n_ffn`` is 3 for a
  gated (SwiGLU) MLP and 2 otherwise. The attention term counts the full ``n x n`` score and value
  matmuls, as SDPA computes them; norms, RoPE, softmax and the LM head are left out (the LM head runs
  on the last token only during generation).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

FORMULAS = ("exact", "fastv")


def _dims(text_config: Any) -> tuple[int, int, int, int, int, int, bool]:
    d = int(text_config.hidden_size)
    heads = int(text_config.num_attention_heads)
    kv = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or d // heads)
    m = int(text_config.intermediate_size)
    layers = int(text_config.num_hidden_layers)
    act = str(getattr(text_config, "hidden_act", "silu"))
    gated = act in ("silu", "swish", "gelu_pytorch_tanh") or getattr(text_config, "model_type", "") in (
        "llama",
        "mistral",
        "qwen2",
        "qwen2_vl_text",
        "qwen2_5_vl_text",
    )
    return d, heads, kv, head_dim, m, layers, gated


def layer_flops(text_config: Any, n: int, formula: str = "exact") -> float:
    """FLOPs of one decoder layer over ``n`` tokens."""
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    d, h, kv, hd, m, _, gated = _dims(text_config)
    if formula == "fastv":
        return float(4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    proj = 2 * n * d * (h * hd + 2 * kv * hd) + 2 * n * h * hd * d
    attn = 2 * 2 * n * n * h * hd
    mlp = 2 * (3 if gated else 2) * n * d * m
    return float(proj + attn + mlp)


def prefill_flops(text_config: Any, tokens_per_layer: int | Sequence[int], formula: str = "exact") -> float:
    """Prefill FLOPs of the whole decoder.

    Args:
        text_config: the LLM's config (``hidden_size``, ``num_attention_heads``, ``intermediate_size`` ...).
        tokens_per_layer: one int (every layer sees the same sequence) or one count per layer (in-LLM
            pruning shortens the sequence from some layer on).
    """
    layers = int(text_config.num_hidden_layers)
    if isinstance(tokens_per_layer, int):
        tokens_per_layer = [tokens_per_layer] * layers
    if len(tokens_per_layer) != layers:
        raise ValueError(f"need one token count per layer ({layers}), got {len(tokens_per_layer)}")
    # one layer_flops per distinct length: it reads the config's attributes, which are slow to get on a
    # transformers config, and this runs in every compressed call (the record). Exact: integers below 2^53.
    counts = Counter(int(n) for n in tokens_per_layer)
    return sum(c * layer_flops(text_config, n, formula) for n, c in counts.items())


def flops_summary(text_config: Any, full_lengths: Sequence[int], kept_lengths: Sequence[Sequence[int] | int]) -> dict:
    """Per-batch prefill FLOPs before and after compression (sums over samples) and their ratio."""
    full = sum(prefill_flops(text_config, int(n)) for n in full_lengths)
    kept = sum(prefill_flops(text_config, n if isinstance(n, int) else list(n)) for n in kept_lengths)
    return {
        "formula": "exact",
        "prefill_full": full,
        "prefill_compressed": kept,
        "ratio": kept / full if full else 1.0,
    }


def method_flops(
    text_config: Any,
    method: str,
    budget: float | int = 0.2,
    n_visual: int = 576,
    n_text: int = 0,
    formula: str = "exact",
    **options: Any,
) -> dict:
    """Analytic prefill FLOPs of ``method`` for one prompt of ``n_visual`` image tokens and ``n_text`` others.

    Uses the method's per-layer visual-token schedule (``Method.visual_schedule``): constant for pre-LLM
    methods, ``n`` then ``k`` for FastV, the stage counts for PyramidDrop. Returns the full and compressed
    FLOPs, their ratio, the schedule and the equivalent (layer-averaged) budget.
    """
    from .registry import get_method

    info = get_method(method)
    impl = info.method_class(info.config_class(budget=budget, **options))
    layers = int(text_config.num_hidden_layers)
    schedule = impl.visual_schedule(layers, n_visual)
    full = prefill_flops(text_config, n_visual + n_text, formula)
    compressed = prefill_flops(text_config, [v + n_text for v in schedule], formula)
    return {
        "formula": formula,
        "prefill_full": full,
        "prefill_compressed": compressed,
        "ratio": compressed / full if full else 1.0,
        "schedule": schedule,
        "equivalent_budget": sum(schedule) / layers / n_visual if n_visual else 1.0,
    }
