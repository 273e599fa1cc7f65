"""Measuring one call for ``eval/bench_speed.py``: clocks, vtc's own time, counted FLOPs, peak memory."""

from __future__ import annotations

import ctypes
import gc
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: model sub-modules whose FLOPs make up "the model" (paths from the top model, as torch's flop counter names them)
MODULE_GROUPS = {
    "vision": ("model.vision_tower", "model.visual"),
    "projector": ("model.multi_modal_projector",),
    "llm": ("model.language_model",),
    "lm_head": ("lm_head",),
}


# -- clocks --------------------------------------------------------------------------------


class Clock:
    """Wall clock on CPU; CUDA events on a GPU (``mark`` is asynchronous, ``ms`` synchronises)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return float(start.elapsed_time(end))
        return (end - start) * 1000.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# -- one measured call -----------------------------------------------------------------------------------


class VtcProbe:
    """vtc's own time in compressed calls, measured from outside its code, on the wall and the CPU clock.

    ``session.prepare`` (encode, select, rebuild, record) minus the model's own vision encoding
    (``get_image_features`` / ``get_video_features``), plus the time of vtc's hooks: those inside that
    encoding (signal capture and computation in the tower) and those outside ``prepare`` (the LLM and its
    layers, for in-LLM methods). Hooks are timed by hooks placed just before and just after them on every
    module vtc hooked. Everything is removed by :meth:`detach`.
    """

    def __init__(self, model: nn.Module, clock: Clock):
        import vtc

        self.session = vtc.session_of(model)
        self.clock = clock
        self.wall = self.cpu = 0.0  # seconds, accumulated over the calls since the last reset
        self._handles: list[Any] = []
        self._patched: list[tuple[Any, str]] = []
        self._in_prepare = self._in_encode = False
        self._encode = [0.0, 0.0]
        self._hooks_in_encode = [0.0, 0.0]
        hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]  # vtc's, before ours
        self._patch(self.session, "prepare", self._timed_prepare(self.session.prepare))
        base = getattr(model, "model", model)
        for name in ("get_image_features", "get_video_features"):
            fn = getattr(base, name, None)
            if fn is not None:
                self._patch(base, name, self._timed_encode(fn))
        for module in hooked:
            if module._forward_pre_hooks:
                self._bracket(module.register_forward_pre_hook)
            if module._forward_hooks:
                self._bracket(module.register_forward_hook)

    def reset(self) -> None:
        self.wall = self.cpu = 0.0

    def _now(self) -> tuple[float, float]:
        self.clock.sync()
        return time.perf_counter(), time.process_time()

    def _add(self, start: tuple[float, float], sign: float = 1.0, into: list[float] | None = None) -> None:
        wall, cpu = self._now()
        if into is not None:
            into[0] += sign * (wall - start[0])
            into[1] += sign * (cpu - start[1])
        else:
            self.wall += sign * (wall - start[0])
            self.cpu += sign * (cpu - start[1])

    def _patch(self, obj: Any, name: str, fn: Callable) -> None:
        obj.__dict__[name] = fn
        self._patched.append((obj, name))

    def _timed_prepare(self, prepare: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._encode[:] = [0.0, 0.0]
            self._hooks_in_encode[:] = [0.0, 0.0]
            self._in_prepare = True
            start = self._now()
            try:
                return prepare(*args, **kwargs)
            finally:
                self._in_prepare = False
                self._add(start)
                self.wall += self._hooks_in_encode[0] - self._encode[0]
                self.cpu += self._hooks_in_encode[1] - self._encode[1]

        return timed

    def _timed_encode(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._in_encode = True
            start = self._now()
            try:
                return fn(*args, **kwargs)
            finally:
                self._in_encode = False
                self._add(start, into=self._encode)

        return timed

    def _bracket(self, register: Callable) -> None:
        stamp: list[tuple[float, float]] = []

        def before(*_):
            stamp[:] = [self._now()]

        def after(*_):
            if not stamp:
                return
            start = stamp.pop()
            if self._in_encode:
                self._add(start, into=self._hooks_in_encode)
            elif not self._in_prepare:  # inside prepare (not encode) the time is already prepare's
                self._add(start)

        self._handles.append(register(before, prepend=True))
        self._handles.append(register(after))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for obj, name in self._patched:
            del obj.__dict__[name]
        self._handles.clear()
        self._patched.clear()


def generate_trial(model: nn.Module, inputs: dict, new_tokens: int, clock: Clock, probe: VtcProbe | None) -> dict:
    """One ``generate()`` call: TTFT and decode tokens/s (wall, and CPU time on CPU), vtc's time before the first
    token."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[Any] = []
    cpu: list[float] = []
    vtc_first: list[tuple[float, float]] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(clock.mark())
            cpu.append(time.process_time())
            if probe is not None and not vtc_first:
                vtc_first.append((probe.wall, probe.cpu))
            return scores

    if probe is not None:
        probe.reset()
    gc.collect()
    with torch.no_grad():
        cpu_start = time.process_time()
        start = clock.mark()
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([Stamp()]),
        )
    clock.sync()
    out: dict[str, Any] = {"ttft_ms": clock.ms(start, stamps[0])}
    if not clock.cuda:
        out["ttft_cpu_ms"] = (cpu[0] - cpu_start) * 1000.0
    if len(stamps) > 1:
        out["decode_tok_s"] = (len(stamps) - 1) / (clock.ms(stamps[0], stamps[-1]) / 1000.0)
        if not clock.cuda:
            out["decode_cpu_tok_s"] = (len(stamps) - 1) / max(cpu[-1] - cpu[0], 1e-9)
    if probe is not None:
        out["vtc_ms"] = vtc_first[0][0] * 1000.0
        out["vtc_decode_ms"] = (probe.wall - vtc_first[0][0]) * 1000.0
        if not clock.cuda:
            out["vtc_cpu_ms"] = vtc_first[0][1] * 1000.0
    return out


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """SDPA forward: the two matmuls, ``4 B H Lq Lk d`` with ``H`` the query heads. torch counts only its CUDA
    kernels, and asserts on grouped-query attention (fewer key heads), which these presets use."""
    b, h, lq, d = query
    return 4 * b * h * lq * key[-2] * d


def _sdpa_ops() -> dict:
    names = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    return {getattr(torch.ops.aten, n): _sdpa_flops for n in names if hasattr(torch.ops.aten, n)}


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    node: Any = model
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def count_flops(model: nn.Module, inputs: dict, base: dict | None = None) -> dict[str, float]:
    """FLOPs of one prefill (``generate`` of one token), counted while it runs, per module group.

    ``model`` is the model's own work and ``vtc`` everything else that ran in the call: selection and
    similarities outside the modules, and vtc's VISION-stage signals, which run in hooks inside the tower
    and so are counted as the tower's. No method of this build changes the tower's or the projector's own
    work (they read signals, then select or merge after the projector), so for a compressed call (``base``:
    the uncompressed count) those two groups are taken from ``base`` and the counted excess goes to vtc.
    """
    from torch.utils.flop_counter import FlopCounterMode

    mapping = _sdpa_ops()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    by_module = {key: float(sum(ops.values())) for key, ops in counter.get_flop_counts().items()}
    out = {"total": by_module.get("Global", 0.0)}
    top = type(model).__name__
    for group, paths in MODULE_GROUPS.items():
        out[group] = 0.0
        for path in paths:
            module = _module_at(model, path)
            if module is not None:  # named from the top model, or its own root when generate() calls it directly
                out[group] += by_module.get(f"{top}.{path}", 0.0) + by_module.get(type(module).__name__, 0.0)
    if base is not None:
        out["vision_counted"], out["projector_counted"] = out["vision"], out["projector"]
        out["vision"], out["projector"] = base["vision"], base["projector"]
    out["model"] = sum(out[g] for g in MODULE_GROUPS)
    out["vtc"] = max(0.0, out["total"] - out["model"])
    return out


# -- memory ------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory growth of one call: CUDA allocator statistics, or the process's peak RSS on Linux."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = None
        self.reason = ""
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus allocated before"
            return
        if not (os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")):
            self.reason = "needs Linux /proc/self/clear_refs"
            return
        try:
            self._reset_hwm()
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError as err:
            self.reason = f"cannot reset the RSS high-water mark: {err}"
            return
        self.method = (
            "growth of peak RSS during the call (VmHWM reset via /proc/self/clear_refs, minus VmRSS before; "
            "glibc mmap threshold 64 KiB + malloc_trim so freed tensors leave RSS; weights already resident)"
        )

    @staticmethod
    def _status(field: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # MiB
        raise OSError(f"{field} not in /proc/self/status")

    @staticmethod
    def _reset_hwm() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def enable(self) -> None:
        """CPU: from now on glibc returns every freed block >= 64 KiB to the OS (only for the memory pass)."""
        if self.device.type == "cpu" and self.method:
            m_mmap_threshold = -3
            self._libc.mallopt(m_mmap_threshold, 64 * 1024)

    def measure(self, fn: Callable[[], Any]) -> float | None:
        """MiB the call ``fn`` needed above what was live before it."""
        if self.method is None:
            return None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
        self._libc.malloc_trim(0)
        before = self._status("VmRSS")
        self._reset_hwm()
        fn()
        return self._status("VmHWM") - before

    def resident_mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return self._status("VmRSS") if self.method else None
