"""The activation-quantization kernels (and the INT8 GEMM) compile for Hopper (sm_90a) in every variant
the launchers use.

Why: Triton's CPU interpreter (``test_kernels_triton.py``) runs the kernels' logic but skips the
compiler's type checks (e.g. a loop-carried value whose shape changes between iterations), so a
kernel can pass every CPU test and still fail to build on the GPU. This compiles each
constexpr variant through Triton's real pipeline down to a cubin for sm_90a (no GPU needed).
"""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")


def _compile(fn, sig: dict, const: dict, num_warps: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = dict(sig, **{n: "constexpr" for n in const})
    src = ASTSource(fn, sig, constexprs={(list(sig).index(n),): v for n, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


_PTRS = ("x_ptr", "smooth_ptr", "h_ptr", "q_ptr", "s_ptr", "flag_ptr")
_INTS = ("flag_id", "M", "K", "stride_xm", "stride_qm", "stride_sm", "stride_sg")


@pytest.mark.parametrize("rot_r,block_k,per_block,rot_mode,snap_cache,x_ty,snap", [
    (128, 128, False, 1, True, "*bf16", True),      # the default: per token, one rotation block per tile
    (128, 128, False, 1, False, "*bf16", False),    # the opt-in inexact rotation (no snap)
    (128, 128, False, 1, False, "*bf16", True),
    (128, 128, True, 1, False, "*bf16", True),      # per-block scales
    (64, 128, True, 3, False, "*fp32", True),       # several rotation blocks per tile (reshape path), fp32 split
    (16, 64, False, 1, False, "*bf16", True),
    (128, 128, False, 3, True, "*fp16", True),
    (128, 256, False, 0, False, "*bf16", True),     # no rotation (ROTATE=False)
])
@pytest.mark.parametrize("q_ty", ["*fp8e4nv", "*i8"])     # e4m3 codes, or int8 codes for the INT8 GEMM
@pytest.mark.parametrize("block_m,warps", [(64, None), (16, 4)])   # DEFAULT_CONFIG (8 warps per block, 4 per
def test_act_quant_kernel_compiles_for_sm90(rot_r, block_k, per_block, rot_mode, snap_cache, x_ty, snap, q_ty,
                                            block_m, warps):             # token), SMALL_M_CONFIG (few tokens)
    from dvdquant.kernels.triton_act_quant import act_quant_kernel
    rotate = rot_mode != 0
    warps = warps or (8 if per_block else 4)
    if q_ty == "*i8" and not (snap and rot_r == block_k and not per_block):
        pytest.skip("int8 codes: one variant per rotation layout is enough")
    if block_m != 64 and not (rot_r == block_k == 128 and rot_mode == 1 and not per_block and snap):
        pytest.skip("16-row programs: the default per-token layouts are enough")
    sig = {"x_ptr": x_ty, "smooth_ptr": "*fp32", "h_ptr": "*bf16", "q_ptr": q_ty, "s_ptr": "*fp32",
           "flag_ptr": "*i32", "flag_id": "i32", "magic_ptr": "*fp32",
           **{n: "i32" for n in _INTS[1:]}, "qmax": "fp32", "inv_qmax": "fp32", "inv_sqrt_r": "fp32"}
    const = dict(BLOCK_M=block_m, BLOCK_K=block_k, HAS_SMOOTH=False, ROTATE=rotate, ROT_MODE=rot_mode if rotate else 1,
                 PER_BLOCK=per_block, FP8_FMT=False, SCALE_BY_RECIP=True, HOIST_H=True, HAS_FLAG=True,
                 ROT_R=rot_r, SNAP=snap, SNAP_CACHE=snap_cache,
                 FMA_DIV=not per_block)                # per token: the fma division (PER_TOKEN_CONFIG)
    assert _compile(act_quant_kernel, sig, const, num_warps=warps).asm["cubin"]


def test_act_quant_div_rn_second_pass_compiles_for_sm90():
    """Per-token scales with ``fma_div`` off (the second pass divides with div.rn) build too."""
    from dvdquant.kernels.triton_act_quant import act_quant_kernel
    sig = {"x_ptr": "*bf16", "smooth_ptr": "*fp32", "h_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32",
           "flag_ptr": "*i32", "flag_id": "i32", "magic_ptr": "*fp32",
           **{n: "i32" for n in _INTS[1:]}, "qmax": "fp32", "inv_qmax": "fp32", "inv_sqrt_r": "fp32"}
    const = dict(BLOCK_M=64, BLOCK_K=128, HAS_SMOOTH=False, ROTATE=True, ROT_MODE=1, PER_BLOCK=False, FP8_FMT=False,
                 SCALE_BY_RECIP=True, HOIST_H=True, HAS_FLAG=True, ROT_R=128, SNAP=True, SNAP_CACHE=True,
                 FMA_DIV=False)
    assert _compile(act_quant_kernel, sig, const, num_warps=4).asm["cubin"]


@pytest.mark.parametrize("has_bias,block_k", [(True, 128), (False, 64)])
def test_int8_gemm_kernel_compiles_for_sm90(has_bias, block_k):
    from dvdquant.kernels.int8_gemm import int8_gemm_kernel
    sig = {"a_ptr": "*i8", "s_ptr": "*fp32", "w_ptr": "*i8", "d_ptr": "*fp32", "bias_ptr": "*fp32", "c_ptr": "*bf16",
           **{n: "i32" for n in ("M", "N", "K", "stride_am", "stride_wn", "stride_cm")}}
    const = dict(HAS_BIAS=has_bias, INT32_DOT=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8)
    assert _compile(int8_gemm_kernel, sig, const, num_warps=8).asm["cubin"]


@pytest.mark.parametrize("has_bias,block_n", [(True, 256), (False, 128)])
def test_int8_gemm_tma_kernel_compiles_for_sm90(has_bias, block_n):
    from dvdquant.kernels.int8_gemm import int8_gemm_tma_kernel
    sig = {"a_desc": "tensordesc<i8[128,128]>", "w_desc": f"tensordesc<i8[{block_n},128]>", "s_ptr": "*fp32",
           "d_ptr": "*fp32", "bias_ptr": "*fp32", "c_ptr": "*bf16", **{n: "i32" for n in ("M", "N", "K", "stride_cm")}}
    const = dict(HAS_BIAS=has_bias, INT32_DOT=False, BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=8,
                 NUM_PROGRAMS=132)
    assert _compile(int8_gemm_tma_kernel, sig, const, num_warps=8).asm["cubin"]
