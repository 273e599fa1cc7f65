"""Host-side helpers shared by the Triton kernels: allocation (with a poison switch for tests) and tiling.

This module imports no Triton, so it is safe to import anywhere. The kernel modules (``triton_*.py``) import
Triton at their top and are only loaded lazily through ``dispatch.TRITON_OPS``.

``VTC_KERNEL_POISON=1`` makes every buffer the Triton wrappers allocate start as garbage (NaN for floats, a
large sentinel for integers) instead of ``torch.empty``'s arbitrary but often-zero memory, so a kernel that
skips a write, or forgets to initialise its scratch, fails its parity test instead of passing by luck.
"""

from __future__ import annotations

import os

import torch

POISON_ENV_VAR = "VTC_KERNEL_POISON"

#: fill values used by ``VTC_KERNEL_POISON=1`` (chosen so that no correct output can equal them by accident)
_POISON_INT = {torch.int64: 0x5A5A5A5A5A5A5A5A, torch.int32: 0x5A5A5A5A, torch.int8: 0x5A, torch.uint8: 0xA5}


def poisoning() -> bool:
    return os.environ.get(POISON_ENV_VAR) == "1"


def new_empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a garbage-filled buffer when ``VTC_KERNEL_POISON=1`` (tests)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if dtype.is_floating_point else _POISON_INT.get(dtype, -7))
    return out


def interpreting(device: torch.device) -> bool:
    """True when kernels run under ``TRITON_INTERPRET=1`` (CPU tensors): tiles are kept tiny and the
    interpreter's gaps (no bf16 ``tl.dot``) are avoided."""
    return device.type != "cuda"


def pow2_at_least(n: int, minimum: int = 16, maximum: int | None = None) -> int:
    """Smallest power of two ``>= max(n, minimum)``, capped at ``maximum``."""
    p = minimum
    while p < n:
        p *= 2
    return p if maximum is None else min(p, maximum)


def float_input(x: torch.Tensor) -> torch.Tensor:
    """Keep fp16/bf16/fp32 as they are (kernels upcast on load); cast anything else to fp32."""
    return x if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else x.float()


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd would record through one of ``tensors``: the kernels have no backward, so the
    wrappers hand such calls to the PyTorch reference (``docs/kernels.md``, "Correctness contract")."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
