"""Backend choice for every op: AUTO / TORCH / TRITON, with the ``VTC_KERNEL_BACKEND`` override."""

from __future__ import annotations

import enum
import importlib
import os
import warnings
from collections.abc import Callable

import torch

from . import reference


class Backend(str, enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


ENV_VAR = "VTC_KERNEL_BACKEND"
_override: Backend | None = None

#: op name -> "module:function" of its Triton implementation (modules are imported lazily, so importing
#: ``vtc.kernels`` never imports triton).
TRITON_OPS: dict[str, str] = {
    "cosine_argmax": ".triton_cosine:cosine_argmax",
    "topk_sorted": ".triton_topk:topk_sorted",
    "greedy_maxmin": ".triton_greedy:greedy_maxmin",
    "weighted_merge": ".triton_merge:weighted_merge",
    "attention_received": ".triton_attention:attention_received",
}

_warned: set[str] = set()


def set_backend(backend: Backend | str | None) -> None:
    """Force a backend for this process (``None`` goes back to the environment / AUTO)."""
    global _override
    _override = None if backend is None else _parse(backend, "set_backend")


def get_backend() -> Backend:
    if _override is not None:
        return _override
    return _parse(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def _parse(value: Backend | str, where: str) -> Backend:
    try:
        return Backend(str(value.value if isinstance(value, Backend) else value).lower())
    except ValueError:
        raise ValueError(f"{where}: unknown kernel backend {value!r}; valid: {[b.value for b in Backend]}") from None


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def _load_triton(op: str) -> Callable:
    module, _, name = TRITON_OPS[op].partition(":")
    return getattr(importlib.import_module(module, __package__), name)


def implementation(op: str, device: torch.device) -> Callable:
    """The function that runs ``op`` for tensors on ``device`` under the current backend."""
    backend = get_backend()
    if backend is Backend.TORCH:
        return getattr(reference, op)
    if backend is Backend.TRITON:
        if op not in TRITON_OPS:
            _warn_once(op, f"vtc.kernels: no Triton kernel for {op!r}; running the PyTorch reference")
            return getattr(reference, op)
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{ENV_VAR}=triton on a {device.type} tensor needs a CUDA device, or TRITON_INTERPRET=1 set before "
                f"triton is imported (the interpreter is for tests: slow)"
            )
        return _load_triton(op)
    # AUTO
    if device.type == "cuda" and op in TRITON_OPS:
        if _triton_available():
            return _load_triton(op)
        _warn_once("no-triton", "vtc.kernels: triton is not installed; CUDA tensors use the slower PyTorch reference")
    return getattr(reference, op)
