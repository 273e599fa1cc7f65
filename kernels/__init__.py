"""Compute kernels of vtc, each exposed once with a readable PyTorch reference as ground truth.

Ops: :func:`cosine_argmax`, :func:`topk_sorted`, :func:`greedy_maxmin`, :func:`weighted_merge`, and the
attention-row helpers :func:`attention_row`, :func:`attention_received`, :func:`head_mean_keys`.

Backends: ``AUTO`` (fast kernel on CUDA tensors where one exists, else the reference), ``TORCH`` (always the
reference) and ``TRITON``; override with ``VTC_KERNEL_BACKEND=auto|torch|triton`` or
:func:`set_backend`. Triton is imported lazily, so ``import vtc`` works without it.
"""

if __name__ == "kernels":  # pragma: no cover - only from a Python started in a clone of the repository
    # This folder is the package ``vtc.kernels``. A Python whose path holds the clone's root (``python`` run
    # there, pytest's rootdir) also finds it as a top-level ``kernels`` and would hide the PyPI package of that
    # name, which transformers imports when it is installed. Hand the import over to the real package, or,
    # without one, look like an empty namespace (no ``__file__``) so that transformers treats it as absent.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    )
    if _spec is not None and _spec.loader is not None:
        _real = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _real  # what ``import kernels`` returns
        _spec.loader.exec_module(_real)
    else:
        del __file__
else:
    from .attention import attention_row, head_mean_keys
    from .dispatch import Backend, get_backend, set_backend
    from .ops import attention_received, cosine_argmax, greedy_maxmin, topk_sorted, weighted_merge
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
