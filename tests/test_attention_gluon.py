"""The Gluon attention kernel without a GPU: which kernel ``quant_attention`` picks, and that the Gluon
kernel still lowers to sm_90a machine code with this Triton (ptxas ships with Triton, no GPU needed).

Gluon kernels do not run in Triton's interpreter, so CI cannot check their outputs; the GPU suite
(``test_attention_gluon_gpu.py``) does, on an H100. Compiling here catches API drift between Triton
versions (the GPU image has 3.6, CI 3.9) and resource regressions (shared memory for two programs per SM).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from dvdquant.kernels import attention_triton as at  # noqa: E402  (needs triton)

H100_SMEM_PER_SM = 228 * 1024   # bytes; each resident program also reserves 1 KB


def test_choose_impl_on_cpu_is_triton_and_gluon_refuses():
    q = torch.zeros(1, 512, 2, 128)
    assert at.choose_impl("auto", q, 512, 128) == "triton"
    assert at.choose_impl(None, q, 512, 128) == "triton"
    assert at.choose_impl("triton", q, 512, 128) == "triton"
    with pytest.raises(ValueError, match="impl='gluon' needs a Hopper"):
        at.choose_impl("gluon", q, 512, 128)
    with pytest.raises(ValueError, match="impl must be one of"):
        at.choose_impl("cuda", q, 512, 128)


def test_auto_needs_a_tested_triton(monkeypatch):
    """On an older Triton "auto" keeps the Triton kernel even where the Gluon one would apply."""
    assert at._major_minor("3.6.0+git1234") == (3, 6) and at._major_minor("3.10.1") == (3, 10)
    monkeypatch.setattr(at, "TRITON_VERSION", (3, 5))
    monkeypatch.setattr(at, "gluon_available", lambda: True)
    monkeypatch.setattr(at, "_attention_gluon", type("G", (), {"gluon_supported": staticmethod(lambda *a: True)}))
    q = torch.zeros(1, 512, 2, 128)
    assert at.choose_impl("auto", q, 512, 128) == "triton"
    assert at.choose_impl("gluon", q, 512, 128) == "gluon"
    monkeypatch.setattr(at, "TRITON_VERSION", (3, 6))
    assert at.choose_impl("auto", q, 512, 128) == "gluon"


def test_quant_attention_rejects_unknown_impl_before_any_work():
    q = torch.zeros(1, 64, 1, 64)
    with pytest.raises(ValueError, match="impl must be one of"):
        at.quant_attention(q, q, q, impl="fast")


def _compile_for_sm90(D: int, qk_format: str, stages: int, has_bias: bool):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from dvdquant.kernels.attention_gluon import GLUON_BLOCK_M, _attn_fwd_gluon_kernel
    from dvdquant.kernels.attention_ref import QMAX, block_n_for
    bn = block_n_for(D)
    k_ty, k_gl = ("i8", gl.int8) if qk_format == "int8" else ("fp8e4nv", gl.float8e4nv)
    k_layout = gl.NVMMASharedLayout.get_default_for([bn, D], k_gl)
    v_layout = gl.NVMMASharedLayout.get_default_for([D, bn], gl.float8e4nv)
    sig = {"Q": "*bf16", "k_desc": f"tensordesc<{k_ty}[{bn}, {D}],{k_layout!r}>", "KS": "*fp32",
           "v_desc": f"tensordesc<fp8e4nv[{D}, {bn}],{v_layout!r}>", "VS": "*fp32", "VOFF": "*fp32", "KM": "*fp32",
           "BIAS": "*fp32", "BIAS_FROM": "*i32", "O": "*bf16", "LSE": "*fp32",
           **{n: "i32" for n in ("Lq", "Lk", "Lkp", "H", "sqb", "sql", "sqh", "sob", "sol", "soh", "sbb", "sbh",
                                 "sfb", "sfh")},
           "qk_scale": "fp32"}
    const = dict(D=D, BLOCK_M=GLUON_BLOCK_M, BLOCK_N=bn, STAGES=stages, QK_INT8=qk_format == "int8",
                 QMAX_QK=QMAX[qk_format], RAGGED=True, RETURN_LSE=True, HAS_BIAS=has_bias)
    sig.update({n: "constexpr" for n in const})
    src = GluonASTSource(_attn_fwd_gluon_kernel, sig, constexprs={(list(sig).index(n),): v for n, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


@pytest.mark.skipif(not at.gluon_available(), reason="this Triton has no Gluon")
@pytest.mark.parametrize("D,qk_format,has_bias", [(128, "int8", False), (64, "int8", False), (128, "fp8", False),
                                                  (128, "int8", True)])
def test_gluon_kernel_lowers_to_sm90a_and_fits_two_programs_per_sm(D, qk_format, has_bias):
    from dvdquant.kernels.attention_gluon import GLUON_STAGES_BY_HEAD_DIM
    no_ptxas = None
    try:
        kernel = _compile_for_sm90(D, qk_format, GLUON_STAGES_BY_HEAD_DIM[D], has_bias)
    except (RuntimeError, FileNotFoundError) as e:       # no ptxas in this Triton build
        if "ptxas" not in str(e).lower():
            raise
        no_ptxas = str(e)
    if no_ptxas is not None:      # skip outside the handler: a chained traceback would keep the compiler's
        pytest.skip(f"no ptxas: {no_ptxas}")          # frames (and its MLIR context) alive until exit
    assert kernel.asm["cubin"] and "wgmma" in kernel.asm["ptx"]
    assert 2 * (kernel.metadata.shared + 1024) <= H100_SMEM_PER_SM, kernel.metadata.shared
