"""Every Triton kernel compiles for a Hopper GPU (sm_90) on a machine without one.

The interpreter checks what the kernels compute, not whether they lower: loop-carried types, layouts and
``tl.dot`` shapes are only checked by the real compiler. ``triton.compile`` with an explicit target needs no
driver (ptxas ships with triton), so this runs in CI without a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest

pytestmark = pytest.mark.slow

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are interpreted functions under TRITON_INTERPRET=1", allow_module_level=True)

# kernel, pointer types, constexpr sets (one per launch configuration the wrappers use), num_warps
CASES = [
    ("triton_cosine:_inv_norm_kernel", {"x_ptr": "*bf16", "out_ptr": "*fp32"}, [{"BLOCK_R": 64, "BLOCK_D": 64}], 4),
    *[
        (
            "triton_cosine:_cosine_argmax_kernel",
            {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "inv_a_ptr": "*fp32", "inv_b_ptr": "*fp32",
             "row_mask_ptr": "*i8", "col_mask_ptr": "*i8", "val_ptr": "*fp32", "idx_ptr": "*i64"},
            [
                {"HAS_ROW_MASK": True, "HAS_COL_MASK": True, "HOLD_A": hold, "DOT_FP32": dt == "fp32",
                 "PRECISION": "tf32x3" if dt == "fp32" else "ieee", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": bk,
                 "FINAL": final}
                for hold, bk in ([(True, 64), (False, 32)] if dt == "fp32" else [(True, 128), (False, 64)])
                for final in (True, False)
            ],
            8,
        )
        for dt in ("bf16", "fp16", "fp32")
    ],
    ("triton_topk:_topk_rank_kernel", {"s_ptr": "*bf16", "keep_ptr": "*i8"}, [{"BLOCK_I": 64, "BLOCK_J": 128}], 4),
    ("triton_topk:_topk_emit_kernel", {"keep_ptr": "*i8", "out_ptr": "*i64"}, [{"BLOCK": 1024}], 4),
    (
        "triton_greedy:_step_kernel",
        {"dist_ptr": "*fp32", "mind_ptr": "*fp32", "chosen_ptr": "*i8", "cur_ptr": "*i64", "out_ptr": "*i64"},
        [{"BLOCK": 4096}, {"BLOCK": 256}],
        8,
    ),
    *[
        (
            f"triton_attention:{kernel}",
            {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "lse_ptr": "*fp32", "scale2": "fp32"}
            | ({"out_ptr": "*fp32"} if kernel == "_colsum_kernel" else {}),
            [
                {"BLOCK_Q": bq, "BLOCK_K": bk, "BLOCK_D": bd, "DOT_FP32": dt == "fp32",
                 "PRECISION": "tf32x3" if dt == "fp32" else "ieee"}
                for bd, big in ((64, 128), (128, 64))
                for bq, bk in ((big, 64), (64, big))
            ],
            8,
        )
        for kernel in ("_lse_kernel", "_colsum_kernel")
        for dt in ("bf16", "fp32")
    ],
    (
        "triton_merge:_merge_kernel",
        {"x_ptr": "*bf16", "w_ptr": "*fp32", "order_ptr": "*i64", "offsets_ptr": "*i64", "out_ptr": "*bf16",
         "den_ptr": "*fp32"},
        [{"BLOCK_C": 512}],
        4,
    ),
]  # fmt: skip


@pytest.mark.parametrize("name, pointers, configs, num_warps", CASES, ids=[c[0] for c in CASES])
def test_kernel_compiles_for_sm90(name, pointers, configs, num_warps):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, _, attr = name.partition(":")
    fn = getattr(importlib.import_module(f"vtc.kernels.{module}"), attr)
    for constexprs in configs:
        assert set(constexprs) | set(pointers) <= set(fn.arg_names)
        signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, "i32") for arg in fn.arg_names}
        assert not any(arg.endswith("_ptr") and sig == "i32" for arg, sig in signature.items()), signature
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert compiled.asm["cubin"], constexprs
