"""Speed benchmark: time to first token, decode speed, peak memory and FLOPs, compressed vs uncompressed.

For each preset (``eval/speed_presets.py``: real VLM layouts with random weights, scaled to a CPU) or a
local checkpoint (``--model PATH``), and each method x budget, one process measures:

* **TTFT / prefill**: time from ``generate()`` being called to the first token's logits (vision tower,
  projector, vtc, LLM prefill; a logits processor stamps the time), median over ``--repeats``;
* **decode**: tokens/s over the remaining ``new_tokens - 1`` steps of the same calls (KV cache on);
* **time inside vtc**: measured from outside (``session.prepare`` minus the model's own vision encoding
  plus vtc's hook computations inside the tower, plus vtc's hooks in the LLM layers during prefill), next
  to what the record reports (``record.seconds_in_vtc``);
* **FLOPs**: the LLM's analytic prefill FLOPs (``vtc.flops``, as in the record) and the model's FLOPs
  counted while it runs (``torch.utils.flop_counter``: vision tower, projector, LLM, LM head); ideal
  speed-ups "LLM-only" (analytic LLM FLOPs ratio) and "end-to-end" (counted model FLOPs ratio: the vision
  tower runs at full cost for pre-LLM methods);
* **peak memory** of one prefill: on CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats`` (minus
  what was allocated before); on CPU the growth of the process's peak RSS during the call (Linux
  ``VmHWM`` reset through ``/proc/self/clear_refs``, glibc told to return freed blocks of 64 KiB or more to
  the OS, measured in a separate pass after all timings so the timed runs keep the default allocator).

The uncompressed baseline is interleaved with every compressed configuration (ABBA order over the
repeats), so each speed-up is a ratio of medians taken in the same window of time.

    python eval/bench_speed.py                                 # presets llava15, qwen2vl, onevision_video
    python eval/bench_speed.py --preset llava15 --methods hired divprune --budgets 0.2 --repeats 7
    python eval/bench_speed.py --model /path/to/llava-1.5-7b-hf --budgets 0.2   # a local checkpoint
    python eval/bench_speed.py --out out/speed                 # writes speed.json, speed.md, speed.png there
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import speed_presets  # noqa: E402

DEFAULT_PRESETS = ("llava15", "qwen2vl", "onevision_video")
#: model sub-modules whose FLOPs make up "the model" (keys of torch's flop counter, after the top module name)
MODULE_GROUPS = {
    "vision": ("model.vision_tower", "model.visual"),
    "projector": ("model.multi_modal_projector",),
    "llm": ("model.language_model",),
    "lm_head": ("lm_head",),
}


# -- clocks and machine --------------------------------------------------------------------------------


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


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import transformers

    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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
        from vtc.api import _SESSIONS

        self.session = _SESSIONS[model]
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


def _generate_trial(model: nn.Module, inputs: dict, new_tokens: int, clock: Clock, probe: VtcProbe | None) -> dict:
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


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """CPU SDPA (flash kernel): the two matmuls, ``4 B H Lq Lk d`` (torch counts only the CUDA kernels)."""
    b, h, lq, d = query
    return 4 * b * h * lq * key[-2] * d


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

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
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


# -- one preset --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    repeats: int = 5
    new_tokens: int | None = None  # None: the preset's
    methods: tuple[str, ...] | None = None
    budgets: tuple[float | int, ...] | None = None
    seed: int = 0
    dtype: torch.dtype = torch.float32


def _to(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
        for k, v in inputs.items()
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _medians(trials: list[dict], keys: tuple[str, ...]) -> dict[str, float | None]:
    """Median of each key over the trials that have it (CPU-time keys exist only on CPU)."""
    return {key: _median([t[key] for t in trials if key in t]) for key in keys}


def _reference_flops(preset: speed_presets.Preset, method: str | None, budget: float | int | None) -> dict | None:
    """FLOPs of the real checkpoint the preset stands for (analytic): vision tower, projector, LLM."""
    import vtc

    ref, work = preset.reference, preset.workload
    if ref is None or work is None:
        return None
    cfg = types.SimpleNamespace(**ref.llm)
    tokens = work.vit_tokens * work.units
    segments = [work.vit_segment] * (tokens // work.vit_segment)
    vision = speed_presets.vit_flops(ref.tower, tokens, segments) + work.units * ref.projector(work.vit_tokens)
    if method is None:
        llm = vtc.flops.prefill_flops(cfg, work.visual_tokens + work.text_tokens)
    else:
        llm = vtc.flops.method_flops(cfg, method, budget, work.visual_tokens, work.text_tokens)["prefill_compressed"]
    return {"vision": vision, "llm": llm, "total": vision + llm}


def run_preset(preset: speed_presets.Preset, opts: Options, device: torch.device, log: Callable) -> dict:
    """Measure the uncompressed model and every (method, budget) of ``preset`` (see module docstring)."""
    import vtc
    from vtc.adapters import UnsupportedModelError

    clock = Clock(device)
    methods = opts.methods or preset.methods
    budgets = opts.budgets or preset.budgets
    new_tokens = opts.new_tokens or preset.new_tokens
    started = time.perf_counter()
    model = preset.build(opts.seed).to(device, opts.dtype)
    inputs = _to(preset.inputs(model, opts.seed), device, opts.dtype)
    entry: dict[str, Any] = {
        "preset": preset.name,
        "summary": preset.summary,
        "reference": None if preset.reference is None else preset.reference.name,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "load_before": load(),
        "runs": [],
    }
    try:
        vtc.compress(model, methods[0], budget=budgets[0])
        vtc.restore(model)
    except UnsupportedModelError as err:
        entry["skipped"] = f"skipped: model family not supported by this vtc build ({err})"
        log(f"[{preset.name}] {entry['skipped']}")
        return entry
    except (ValueError, TypeError):
        pass  # this method alone does not apply here; each configuration records its own reason

    base_flops = count_flops(model, inputs)  # also the warm-up call of the uncompressed model
    base_llm = vtc.flops.prefill_flops(model.config.get_text_config(), entry["prompt_tokens"])
    for method in methods:
        for budget in budgets:
            run = _prepare_config(model, inputs, method, budget, clock, base_flops, base_llm)
            run["reference"] = _reference_flops(preset, method, budget)
            entry["runs"].append(run)
    active = [run for run in entry["runs"] if "skipped" not in run]
    for run in entry["runs"]:
        if "skipped" in run:
            log(_progress_line(preset.name, run))

    # Round-robin: every round times each configuration once and the baseline twice, in a shuffled order,
    # so slow drift of the machine's load hits the baseline and every configuration alike.
    rng = random.Random(opts.seed)
    base_trials: list[dict] = []
    for r in range(opts.repeats):
        order = [None, None, *active]
        rng.shuffle(order)
        for run in order:
            if run is None:
                base_trials.append(_generate_trial(model, inputs, new_tokens, clock, None))
            else:
                run["trials"].append(_compressed_trial(model, inputs, run, new_tokens, clock))
        log(f"[{preset.name}] round {r + 1}/{opts.repeats} done")
    entry["baseline"] = {
        "flops": base_flops,
        "llm_flops_analytic": base_llm,
        "reference": _reference_flops(preset, None, None),
        **_medians(base_trials, ("ttft_ms", "ttft_cpu_ms", "decode_tok_s", "decode_cpu_tok_s")),
        "trials": base_trials,
    }
    base = entry["baseline"]
    for run in active:
        trials = run["trials"]
        for t in trials:
            t["vtc_share"] = t["vtc_ms"] / t["ttft_ms"]
            if "vtc_cpu_ms" in t:
                t["vtc_share_cpu"] = t["vtc_cpu_ms"] / t["ttft_cpu_ms"]
        keys = ("ttft_ms", "ttft_cpu_ms", "decode_tok_s", "decode_cpu_tok_s", "vtc_ms", "vtc_cpu_ms", "vtc_record_ms")
        run.update(_medians(trials, keys + ("vtc_share", "vtc_share_cpu")))
        steps = max(new_tokens - 1, 1)
        run["vtc_decode_step_ms"] = _median([t["vtc_decode_ms"] / steps for t in trials])
        # best-of-N: the fastest call of each side, on the CPU clock where there is one (least disturbed by
        # other processes: the estimate of an idle machine; medians above are the primary numbers)
        key = "ttft_cpu_ms" if "ttft_cpu_ms" in trials[0] else "ttft_ms"
        run["speedup_best"] = min(t[key] for t in base_trials) / min(t[key] for t in trials)
        run["of_ideal_e2e_best"] = run["speedup_best"] / run["ideal_e2e"] if run["ideal_e2e"] else None
        for suffix in ("", "_cpu"):
            b, c = base.get(f"ttft{suffix}_ms"), run.get(f"ttft{suffix}_ms")
            speedup = b / c if b and c else None
            run[f"speedup{suffix}"] = speedup
            run[f"of_ideal_e2e{suffix}"] = speedup / run["ideal_e2e"] if speedup and run["ideal_e2e"] else None
            run[f"of_ideal_llm{suffix}"] = speedup / run["ideal_llm"] if speedup else None
        log(_progress_line(preset.name, run))
    entry["load_after"] = load()
    entry["seconds"] = round(time.perf_counter() - started, 1)
    entry["_model"], entry["_inputs"] = model, inputs  # kept for the memory pass
    return entry


def _prepare_config(model, inputs, method, budget, clock, base_flops, base_llm) -> dict:
    """Compress once: count FLOPs, warm up, read the record (token counts, analytic FLOPs); then restore."""
    import vtc

    run: dict[str, Any] = {"method": method, "budget": budget}
    try:
        vtc.compress(model, method, budget=budget)
    except (ValueError, TypeError) as err:  # e.g. a method acting at a stage this family does not provide
        run["skipped"] = f"skipped: {err}"
        return run
    try:
        flops = count_flops(model, inputs, base_flops)  # also this configuration's warm-up call
        rec = vtc.last_record(model)
    except Exception as err:  # noqa: BLE001  a new family or method failing must not stop the other runs
        run["skipped"] = f"FAILED on its first call: {type(err).__name__}: {err}"
        return run
    finally:
        vtc.restore(model)
    if abs(rec.flops["prefill_full"] - base_llm) > 1e-6 * base_llm:
        raise RuntimeError(f"{method}: the record's uncompressed FLOPs differ from the benchmark's")
    run.update(
        visual_tokens_in=rec.visual_tokens["input"],
        visual_tokens_kept=sum(list(im.counts.values())[-1] for im in rec.images),  # after the last stage
        equivalent_budget=rec.equivalent_budget,
        prompt_tokens_kept=sum(s.output_length for s in rec.samples),
        llm_flops_analytic=rec.flops["prefill_compressed"],
        llm_flops_ratio=rec.flops["ratio"],
        flops=flops,
        ideal_llm=1.0 / rec.flops["ratio"],
        ideal_e2e=base_flops["model"] / flops["model"] if flops["model"] else None,
        trials=[],
    )
    return run


def _compressed_trial(model, inputs, run: dict, new_tokens: int, clock: Clock) -> dict:
    import vtc

    vtc.compress(model, run["method"], budget=run["budget"])
    probe = VtcProbe(model, clock)
    try:
        trial = _generate_trial(model, inputs, new_tokens, clock, probe)
        trial["vtc_record_ms"] = vtc.last_record(model).seconds_in_vtc * 1000.0
    finally:
        probe.detach()
        vtc.restore(model)
    return trial


def _progress_line(name: str, run: dict) -> str:
    if "skipped" in run:
        return f"[{name}] {run['method']} @ {run['budget']}: {run['skipped']}"
    return (
        f"[{name}] {run['method']} @ {run['budget']}: TTFT {_pair(run, 'ttft{}_ms', '.0f')} ms (wall / CPU) -> "
        f"{_pair(run, 'speedup{}', '.2f')}x (ideal e2e {run['ideal_e2e']:.2f}x, LLM-only {run['ideal_llm']:.2f}x); "
        f"vtc {_pair(run, 'vtc{}_ms', '.1f')} ms = {_pair(run, 'vtc_share{}', '.1%')}"
    )


def _prefill_call(model: nn.Module, inputs: dict) -> Callable[[], None]:
    def prefill() -> None:
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)

    return prefill


def memory_pass(entries: list[dict], memory: PeakMemory, log: Callable) -> float | None:
    """Peak memory of one prefill forward per configuration.

    Returns what the method reads for a known 64 MiB allocation (a calibration printed with the results).
    """
    import vtc

    memory.enable()
    calibration = memory.measure(lambda: torch.ones(16 * 2**20, device=memory.device).sum())
    log(f"memory: a 64 MiB tensor made and freed inside the measured call reads as {calibration:.1f} MiB")
    for entry in entries:
        model, inputs = entry.pop("_model", None), entry.pop("_inputs", None)
        if model is None:
            continue
        prefill = _prefill_call(model, inputs)  # every shape here already ran in the timing phase
        entry["baseline"]["peak_mib"] = memory.measure(prefill)
        entry["resident_mib"] = memory.resident_mib()
        for run in entry["runs"]:
            if "skipped" in run:
                continue
            with vtc.compressed(model, run["method"], budget=run["budget"]):
                run["peak_mib"] = memory.measure(prefill)
        log(f"[{entry['preset']}] memory: baseline {entry['baseline']['peak_mib']:.0f} MiB")
        del model, inputs, prefill
        gc.collect()
    return calibration


# -- reports -------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _pair(row: dict, key: str, spec: str) -> str:
    """``wall / cpu`` for a key pattern like ``"ttft{}_ms"`` (just the wall value where there is no CPU one)."""
    wall, cpu = row.get(key.format("")), row.get(key.format("_cpu"))
    return _fmt(wall, spec) if cpu is None else f"{_fmt(wall, spec)} / {_fmt(cpu, spec)}"


def markdown(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        "# vtc speed benchmark",
        "",
        f"Machine: {m['device_name']}, {m['cpu_count']} CPU cores, torch {m['torch']} ({m['torch_threads']} "
        f"thread(s)), transformers {m['transformers']}, {s['dtype']}. Load average (1, 5, 15 min) at start "
        f"{s['load_start']}, at end {s['load_end']}. Wall time {s['seconds']:.0f} s.",
        "",
        f"Command: `{s['command']}`",
        "",
        (
            "Random weights: timings, token counts and FLOPs are real; generated text is meaningless. "
            if s["random_weights"]
            else ""
        )
        + "TTFT = `generate()` call to first-token logits (vision tower + projector + vtc + LLM prefill); decode = "
        "the following `new_tokens - 1` steps of the same calls. On a CPU each is measured on two clocks: wall time "
        "(what a user waits) and the process's CPU time (`time.process_time`, all threads), which time slices "
        "taken by other processes on a shared machine do not inflate. "
        f"Medians of {s['repeats']} calls per configuration and {2 * s['repeats']} for the uncompressed baseline, "
        "interleaved round-robin in shuffled order; [best] = fastest call over fastest call, on the CPU clock "
        "(the idle-machine estimate). Ideal "
        "speed-ups: *LLM-only* = analytic LLM prefill FLOPs ratio (`vtc.flops`, as in the record); *end-to-end* = "
        "ratio of the model FLOPs counted while it runs (vision tower + projector + LLM + LM head; the vision tower "
        "runs at full cost for every method here); *real-scale* = end-to-end ratio computed analytically for the "
        "real checkpoint on the same prompt. vtc ms = vtc's own time before the first token measured from outside "
        "(`session.prepare` minus the model's own vision encoding, plus vtc's hook computations), in brackets "
        "`record.seconds_in_vtc`; per decode step: vtc's hooks during decoding (in-LLM methods). vtc GFLOPs = FLOPs "
        "of vtc's own ops (similarities, vision signals) beyond the model's.",
        "",
        f"Peak memory of one prefill: {s['memory_method']}"
        + (
            f"; a 64 MiB tensor made and freed inside a measured call reads {s['memory_calibration_mib']:.1f} MiB."
            if s.get("memory_calibration_mib") is not None
            else "."
        ),
    ]
    for entry in results["presets"]:
        lines += ["", f"## {entry['preset']}", "", entry["summary"] + ".", ""]
        if "skipped" in entry:
            lines.append(f"**{entry['skipped']}**")
            continue
        base = entry["baseline"]
        flops = base["flops"]
        clocks = " (wall / CPU)" if base.get("ttft_cpu_ms") is not None else ""
        vision = flops["vision"] + flops["projector"]
        ref = base.get("reference")
        ref_text = ""
        if ref:
            ref_text = (
                f" The real `{entry['reference']}` on the same prompt: {ref['total'] / 1e12:.2f} TFLOPs, vision "
                f"tower + projector {100 * ref['vision'] / ref['total']:.1f} %."
            )
        lines += [
            f"{entry['params_m']} M parameters, {entry['prompt_tokens']} prompt tokens, {entry['new_tokens']} new "
            f"tokens per call. Uncompressed prefill {flops['model'] / 1e9:.1f} GFLOPs, vision tower + projector "
            f"{100 * vision / flops['model']:.1f} %.{ref_text} "
            f"**Uncompressed: TTFT {_pair(base, 'ttft{}_ms', '.0f')} ms{clocks}, "
            f"decode {_pair(base, 'decode{}_tok_s', '.1f')} tok/s, peak memory {_fmt(base.get('peak_mib'), '.0f')} "
            f"MiB.** Measured in {entry['seconds']:.0f} s; load {entry['load_before']} -> {entry['load_after']}.",
            "",
            f"| method | budget | visual tokens | equiv. budget | TTFT ms{clocks} | speed-up{clocks} [best] "
            f"| ideal e2e | ideal LLM-only | % of e2e ideal{clocks} [best] | real-scale ideal "
            f"| vtc ms{clocks} (record) | vtc % of TTFT{clocks} | decode tok/s{clocks} | vtc ms per decode step "
            "| peak MiB | vtc GFLOPs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for run in entry["runs"]:
            if "skipped" in run:
                lines.append(f"| {run['method']} | {run['budget']} | {run['skipped']} |" + " |" * 13)
                continue
            real = ""
            if run.get("reference") and ref:
                real = f"{ref['total'] / run['reference']['total']:.2f}x"
            lines.append(
                f"| {run['method']} | {run['budget']} | {run['visual_tokens_kept']} / {run['visual_tokens_in']} "
                f"| {run['equivalent_budget']:.3f} | {_pair(run, 'ttft{}_ms', '.0f')} "
                f"| {_pair(run, 'speedup{}', '.2f')} [{run['speedup_best']:.2f}] | {run['ideal_e2e']:.2f} "
                f"| {run['ideal_llm']:.2f} | {_pair(run, 'of_ideal_e2e{}', '.0%')} [{run['of_ideal_e2e_best']:.0%}] "
                f"| {real} "
                f"| {_pair(run, 'vtc{}_ms', '.1f')} ({run['vtc_record_ms']:.1f}) | {_pair(run, 'vtc_share{}', '.1%')} "
                f"| {_pair(run, 'decode{}_tok_s', '.1f')} | {run['vtc_decode_step_ms']:.1f} "
                f"| {_fmt(run.get('peak_mib'), '.0f')} "
                f"| {run['flops']['vtc'] / 1e9:.2f} |"
            )
    rows = results.get("acceptance")
    if rows:
        lines += ["", "## Acceptance (issue 9): LLaVA-1.5 preset, budget 0.2 (wall / CPU time)", ""]
        for row in rows:
            lines.append(
                f"- {row['method']}: speed-up {_pair(row, 'speedup{}', '.2f')}x "
                f"[best-of-N {row['speedup_best']:.2f}x] = {_pair(row, 'of_ideal_e2e{}', '.0%')} "
                f"[{row['of_ideal_e2e_best']:.0%}] of the end-to-end ideal {row['ideal_e2e']:.2f}x "
                f"(>= 80 %: {_pair(row, 'speed_ok{}', '')}); vtc "
                f"{_pair(row, 'vtc_share{}', '.1%')} of TTFT (< 5 %: {_pair(row, 'vtc_ok{}', '')})"
            )
    return "\n".join(lines) + "\n"


def acceptance(results: dict) -> list[dict]:
    """Issue 9's criteria on the LLaVA-1.5 preset at budget 0.2, on both clocks."""
    rows = []
    for entry in results["presets"]:
        if entry["preset"] != "llava15" or "skipped" in entry:
            continue
        for run in entry["runs"]:
            if run["method"] not in ("hired", "visionzip", "divprune") or run["budget"] != 0.2 or "skipped" in run:
                continue
            row = {key: run[key] for key in ("method", "ideal_e2e", "speedup_best", "of_ideal_e2e_best")}
            for suffix in ("", "_cpu"):
                of_ideal, share = run.get(f"of_ideal_e2e{suffix}"), run.get(f"vtc_share{suffix}")
                row[f"speedup{suffix}"] = run.get(f"speedup{suffix}")
                row[f"of_ideal_e2e{suffix}"] = of_ideal
                row[f"vtc_share{suffix}"] = share
                row[f"speed_ok{suffix}"] = None if of_ideal is None else ("yes" if of_ideal >= 0.8 else "NO")
                row[f"vtc_ok{suffix}"] = None if share is None else ("yes" if share < 0.05 else "NO")
            rows.append(row)
    return rows


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in results["presets"] if "skipped" not in e and any("skipped" not in r for r in e["runs"])]
    if not entries:
        return
    counts = [sum("skipped" not in r for r in e["runs"]) for e in entries]
    fig, axes = plt.subplots(
        1, len(entries), figsize=(sum(1.5 + 0.75 * c for c in counts), 4.4), squeeze=False,
        gridspec_kw={"width_ratios": [1.5 + 0.75 * c for c in counts]},
    )  # fmt: skip
    for ax, entry in zip(axes[0], entries, strict=True):
        runs = [r for r in entry["runs"] if "skipped" not in r]
        ref = entry["baseline"].get("reference")
        labels = [f"{r['method']}\n{r['budget']}" for r in runs]
        x = range(len(runs))
        width = 0.2
        ax.bar([i - 1.5 * width for i in x], [r["speedup"] for r in runs], width, label="measured TTFT (wall)")
        if all(r.get("speedup_cpu") for r in runs):
            ax.bar([i - 0.5 * width for i in x], [r["speedup_cpu"] for r in runs], width, label="measured (CPU time)")
        ax.bar([i + 0.5 * width for i in x], [r["ideal_e2e"] for r in runs], width, label="ideal, end-to-end FLOPs")
        ax.bar([i + 1.5 * width for i in x], [r["ideal_llm"] for r in runs], width, label="ideal, LLM FLOPs only")
        if ref and all(r.get("reference") for r in runs):
            real = [ref["total"] / r["reference"]["total"] for r in runs]
            ax.scatter([i + 0.5 * width for i in x], real, marker="_", s=120, color="black", zorder=3,
                       label="ideal end-to-end, real checkpoint")  # fmt: skip
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("speed-up over uncompressed")
        ax.set_title(f"{entry['preset']} ({entry['prompt_tokens']} prompt tokens)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    m = results["machine"]
    fig.suptitle(
        f"vtc prefill speed-up, {m['device_name']}, {m['torch_threads']} thread(s); random weights", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------------------


def _budget(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=None, help=f"presets (default {' '.join(DEFAULT_PRESETS)}); "
                        f"known: {sorted(speed_presets.PRESETS)}")  # fmt: skip
    parser.add_argument("--model", help="a local checkpoint folder instead of presets (from_pretrained)")
    parser.add_argument("--methods", nargs="+", help="methods (default: each preset's)")
    parser.add_argument("--budgets", nargs="+", type=_budget, help="budgets (default: each preset's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per configuration and for its baseline")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per call (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; see docs/speed.md)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, ...")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--out", default="out/speed", help="folder for speed.json, speed.md and speed.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.model and args.preset:
        parser.error("pass --preset or --model, not both")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    opts = Options(
        repeats=args.repeats,
        new_tokens=args.new_tokens,
        methods=tuple(args.methods) if args.methods else None,
        budgets=tuple(args.budgets) if args.budgets else None,
        seed=args.seed,
        dtype=getattr(torch, dtype_name),
    )
    if args.model:
        presets = [speed_presets.checkpoint_preset(args.model)]
    else:
        presets = [speed_presets.get_preset(n) for n in (args.preset or DEFAULT_PRESETS)]

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {text}", flush=True)

    memory = PeakMemory(device)
    results: dict[str, Any] = {
        "machine": machine(device),
        "settings": {
            "command": "python eval/bench_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "repeats": args.repeats,
            "dtype": dtype_name,
            "load_start": load(),
            "memory_method": memory.method or f"not measured ({memory.reason})",
            "random_weights": not args.model,
        },
        "presets": [],
    }
    log(f"machine: {results['machine']}")
    for preset in presets:
        log(f"[{preset.name}] {preset.summary}")
        results["presets"].append(run_preset(preset, opts, device, log))
    if args.no_memory or memory.method is None:
        for entry in results["presets"]:
            entry.pop("_model", None), entry.pop("_inputs", None)
    else:
        results["settings"]["memory_calibration_mib"] = memory_pass(results["presets"], memory, log)
    results["acceptance"] = acceptance(results)
    results["settings"].update(load_end=load(), seconds=time.perf_counter() - started)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "speed.md").write_text(markdown(results))
    plot(results, out / "speed.png")
    print(markdown(results))
    log(f"wrote {out / 'speed.json'}, {out / 'speed.md'}, {out / 'speed.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
