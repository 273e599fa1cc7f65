"""K3 (``docs/kernels.md``): greedy max-min diversity selection, no ``N x N`` buffer.

Used by DivPrune (and ToDRE v1's k-centre). Same result as ``reference.greedy_maxmin``, bit for bit:
``d(i, j) = 1 - cos(x_i, x_j)`` in fp32; unless ``first`` is given the first pick is
``argmax_j min_{i != j} d(j, i)``; every next pick is the unchosen token farthest from the chosen set.

Design: memory grows linearly in ``N`` (an hour of video is hundreds of thousands of tokens, and a distance
matrix of 50,176 tokens is 10 GB). The first pick's nearest-neighbour distances come from
``reference.nearest_distance`` (blocks of rows, ``O(chunk N)`` memory) and each pick's distance row from the
reference's very expression (``1 - xn @ xn[cur]``, one batched matrix-vector product, cuBLAS on a GPU), so
every value equals the reference's and the picks are the same on any input (ties and NaN included), not
merely up to rounding. What the kernel fuses is the rest of a step, which the reference spends four launches
on: fold the row into the running minimum (``torch.minimum`` semantics), mark the pick, and take the masked
argmax (left-most maximum; the first NaN if any, like ``torch.argmax``), writing the next pick on the device
(no host sync between steps). One program per image walks ``N`` in chunks; the state is a ``[B, N]``
minimum and a ``[B, N]`` chosen mask.

On a GPU a step is five small launches, and the host, not the GPU, sets the pace (about 100 us a step on an
H200: 1,255 picks of 6,272 tokens took 128 ms). From the second call with the same shapes and ``k`` (a VLM sees
the same image size and budget request after request) the whole loop of steps is captured once as a CUDA
graph and replayed: the same launches with the same arguments, so the same picks, without the host in the
loop. The last ``_GRAPH_CACHE`` shapes are kept (each holds a copy of its ``[B, N, D]`` input); a capture that
fails warns once and the steps run one by one. ``VTC_CUDA_GRAPHS=0`` turns graphs off.
"""

from __future__ import annotations

import collections
import os
import threading
import warnings

import torch
import triton
import triton.language as tl

from . import reference
from .triton_common import new_empty, pow2_at_least

_BIG = tl.constexpr(2**30)  # index sentinel, larger than any token index
_ALL = tl.constexpr(tl.PropagateNan.ALL)
_MAX_BLOCK = 4096  # longest chunk of a row one program holds at a time
_GRAPH_CACHE = 2  # captured step loops kept (least recently used dropped)
_MIN_GRAPH_STEPS = 16  # fewer picks than this: the launches cost less than a capture


@triton.jit
def _first_argmax(v, idx):
    """(value, index) of the first NaN of ``v`` if any, else of its left-most maximum."""
    is_nan = v != v
    has_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    nan_idx = tl.min(tl.where(is_nan, idx, _BIG), axis=0)
    num = tl.where(is_nan, float("-inf"), v)
    vmax = tl.max(num, axis=0)
    arg = tl.min(tl.where(num == vmax, idx, _BIG), axis=0)
    return tl.where(has_nan, float("nan"), vmax), tl.where(has_nan, nan_idx, arg)


@triton.jit
def _merge_best(best_val, best_idx, val, idx):
    """Fold a later chunk's winner into the running one: a held NaN is final, a new NaN wins, else strict >."""
    held_nan = best_val != best_val
    new_nan = val != val
    take = ~held_nan & (new_nan | (val > best_val))
    return tl.where(take, val, best_val), tl.where(take, idx, best_idx)


@triton.jit
def _step_kernel(dist_ptr, mind_ptr, chosen_ptr, cur_ptr, out_ptr, N, k, step, BLOCK: tl.constexpr):
    """Image b: record pick ``cur``, fold its distance row into the minimum, write the next pick to ``cur``."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    cur = tl.load(cur_ptr + b)
    tl.store(out_ptr + b * k + step, cur)
    best_val = float("-inf")
    best_idx = 0
    for c0 in range(0, N, BLOCK):
        cols = c0 + offs
        ok = cols < N
        chosen = (tl.load(chosen_ptr + b * N + cols, mask=ok, other=1) != 0) | (cols == cur) | ~ok
        mind = tl.load(mind_ptr + b * N + cols, mask=ok, other=float("inf"))
        mind = tl.minimum(mind, tl.load(dist_ptr + b * N + cols, mask=ok, other=0.0), propagate_nan=_ALL)
        tl.store(mind_ptr + b * N + cols, mind, mask=ok)
        tl.store(chosen_ptr + b * N + cols, chosen.to(tl.int8), mask=ok)
        val, idx = _first_argmax(tl.where(chosen, float("-inf"), mind), cols)
        best_val, best_idx = _merge_best(best_val, best_idx, val, idx)
    tl.store(cur_ptr + b, best_idx.to(tl.int64))


def greedy_maxmin(
    x: torch.Tensor, k: int, first: torch.Tensor | int | None = None, *, block: int | None = None
) -> torch.Tensor:
    """Greedy max-min cosine-distance selection of ``k`` rows of ``x``, in selection order.

    Same contract as ``reference.greedy_maxmin`` (and the same picks, bit for bit). ``block`` overrides the
    chunk length (tests force several chunks per row with it).

    Args:
        x: ``[B, N, D]`` or ``[N, D]``, fp16/bf16/fp32.
        k: number of tokens to pick, ``0 <= k <= N``.
        first: optional ``[B]`` (or scalar) index of the first pick, in ``[0, N)``.

    Returns:
        ``[B, k]`` (or ``[k]``) int64 indices in selection order.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    bsz, n, _ = x.shape
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    out = new_empty((bsz, k), torch.int64, x.device)  # [B, k]
    if out.numel() == 0:
        return out[0] if squeeze else out
    first_t = None
    if first is not None:
        first_t = torch.as_tensor(first, dtype=torch.long, device=x.device).expand(bsz).contiguous()  # [B]
        if bool(((first_t < 0) | (first_t >= n)).any()):
            raise ValueError(f"first must index a token in [0, {n}), got {first_t.tolist()}")

    xn = reference.normalize(x)  # [B, N, D] fp32
    if first_t is None:
        cur = reference.nearest_distance(xn).argmax(dim=-1) if n > 1 else torch.zeros(bsz, dtype=torch.long)
        cur = cur.to(x.device)
    else:
        cur = first_t.clone()
    blk = block or pow2_at_least(n, maximum=_MAX_BLOCK)
    key = (tuple(xn.shape), xn.device, k, blk)
    if _use_graph(key):
        try:
            loop = _GRAPHS.get(key) or _Captured(xn, cur.contiguous(), k, blk)
        except Exception as exc:  # noqa: BLE001 (any capture failure: run the steps one by one)
            _NO_GRAPH.add(key)
            warnings.warn(
                f"greedy_maxmin: CUDA graph capture failed ({type(exc).__name__}: {exc}); running the steps one by "
                "one (set VTC_CUDA_GRAPHS=0 to skip the attempt)",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            _GRAPHS[key] = loop
            _GRAPHS.move_to_end(key)
            while len(_GRAPHS) > _GRAPH_CACHE:
                _GRAPHS.popitem(last=False)
            out = loop(xn, cur)
            return out[0] if squeeze else out
    state = _State.fresh(cur, bsz, n, x.device)
    _steps(xn, state, out, k, blk)
    return out[0] if squeeze else out


class _State:
    """What the steps update in place: the next pick ``[B]``, the running minimum and the chosen mask ``[B, N]``."""

    def __init__(self, cur: torch.Tensor, mind: torch.Tensor, chosen: torch.Tensor, rows: torch.Tensor):
        self.cur, self.mind, self.chosen, self.rows = cur, mind, chosen, rows

    @classmethod
    def fresh(cls, cur: torch.Tensor, bsz: int, n: int, device: torch.device) -> _State:
        return cls(
            cur.to(device).contiguous().clone(),
            torch.full((bsz, n), float("inf"), dtype=torch.float32, device=device),  # [B, N]
            torch.zeros(bsz, n, dtype=torch.int8, device=device),  # [B, N]
            torch.arange(bsz, device=device),
        )


def _steps(xn: torch.Tensor, state: _State, out: torch.Tensor, k: int, blk: int, steps: int | None = None) -> None:
    """Run the first ``steps`` (default all ``k``) picks; ``out`` is ``[B, k]``."""
    bsz, n, _ = xn.shape
    for step in range(k if steps is None else steps):
        row = xn[state.rows, state.cur].unsqueeze(-1)  # [B, D, 1]
        dist = (1.0 - torch.bmm(xn, row).squeeze(-1)).contiguous()  # the reference's distance row
        _step_kernel[(bsz,)](
            dist, state.mind, state.chosen, state.cur, out, n, k, step, BLOCK=blk, num_warps=8 if blk >= 2048 else 4
        )


_GRAPHS: collections.OrderedDict = collections.OrderedDict()
_SEEN: set = set()
_NO_GRAPH: set = set()


def forget_graphs() -> None:
    """Drop every captured loop and every shape seen (the next call of any shape runs step by step)."""
    _GRAPHS.clear()
    _SEEN.clear()
    _NO_GRAPH.clear()


def _use_graph(key: tuple) -> bool:
    """Replay a captured loop from the second call with these shapes on (the first may be the only one)."""
    xn_shape, device, k, _ = key
    if device.type != "cuda" or k < _MIN_GRAPH_STEPS or key in _NO_GRAPH:
        return False
    if os.environ.get("VTC_CUDA_GRAPHS", "1") == "0" or torch.compiler.is_compiling():
        return False
    if torch.cuda.is_current_stream_capturing():
        return False
    if key in _GRAPHS:
        return True
    seen = key in _SEEN
    _SEEN.add(key)
    return seen


class _Captured:
    """The whole step loop for one ``(shape, k)`` captured as a CUDA graph, on static input and state buffers."""

    def __init__(self, xn: torch.Tensor, cur: torch.Tensor, k: int, blk: int):
        bsz, n, _ = xn.shape
        self.xn = xn.clone()
        self.lock = threading.Lock()  # one replay at a time: the buffers are shared
        self.state = _State.fresh(cur, bsz, n, xn.device)
        self.out = torch.empty(bsz, k, dtype=torch.int64, device=xn.device)
        side = torch.cuda.Stream(xn.device)
        side.wait_stream(torch.cuda.current_stream(xn.device))
        with torch.cuda.stream(side):  # warm-up (kernel compiled, allocator primed) off the capturing stream
            _steps(self.xn, self.state, self.out, k, blk, steps=2)
        torch.cuda.current_stream(xn.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            _steps(self.xn, self.state, self.out, k, blk)

    def __call__(self, xn: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.xn.copy_(xn)
            self.state.cur.copy_(cur)
            self.state.mind.fill_(float("inf"))
            self.state.chosen.zero_()
            self.graph.replay()
            return self.out.clone()
