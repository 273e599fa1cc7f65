"""Compute kernels of vtc, each exposed once with a readable PyTorch reference as ground truth.

Ops: :func:`cosine_argmax`, :func:`topk_sorted`, :func:`greedy_maxmin`, :func:`weighted_merge`, and the
attention-row helpers :func:`attention_row`, :func:`attention_received`, :func:`head_mean_keys`.

Backends: ``AUTO`` (fast kernel on CUDA tensors where one exists, else the reference), ``TORCH`` (always the
reference) and ``TRITON``; override with ``VTC_KERNEL_BACKEND=auto|torch|triton`` or
:func:`set_backend`. Triton is imported lazily, so ``import vtc`` works without it.
"""

from .attention import attention_received, attention_row, head_mean_keys
from .dispatch import Backend, get_backend, set_backend
from .ops import cosine_argmax, greedy_maxmin, topk_sorted, weighted_merge
from .reference import normalize

__all__ = [
    "Backend",
    "get_backend",
    "set_backend",
    "cosine_argmax",
    "topk_sorted",
    "greedy_maxmin",
    "weighted_merge",
    "normalize",
    "attention_row",
    "attention_received",
    "head_mean_keys",
]
