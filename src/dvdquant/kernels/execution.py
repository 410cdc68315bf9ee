"""How a quantized model runs: one frozen :class:`ExecutionConfig`, and the static :class:`LinearLayout`
of a layer that the planner (:func:`dvdquant.kernels.plan_forward`) reads.

The config is held once per model, on its ``RuntimeState`` (``dvdquant.set_backend`` sets it); the
CLI's ``generate`` flags are its fields by the same names (``--backend``, ``--fast-accum``,
``--no-exact-rotation``, ``--no-int8-gemm``, ``--no-fuse-projections``, ``--attention-path``). The
defaults compute the simulated reference's bits; every opt-out trades exactness for speed
(docs/KERNELS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError

BACKENDS = ("emulated", "fp8", "auto")              # kernel backends; "simulated" is QuantLinear's own forward
ATTENTION_PATHS = ("auto", "triton", "emulated")    # 8-bit attention: kernel on sm89+ / CPU reference, or forced


@dataclass(frozen=True)
class ExecutionConfig:
    """The execution path of every quantized layer of one model.

    * ``backend``: "simulated" (fp32 reference), "emulated" (the integer pipeline in torch), "fp8"
      (FP8 / INT8 tensor-core kernels, else emulated with a log line), "auto" ("fp8" on sm89+ with
      Triton, else emulated, silently).
    * ``fast_accum``: per-token FP8 GEMMs in cuBLAS' reduced-precision accumulator (no longer the
      exact integer GEMM; sends A4 to cuBLAS).
    * ``exact_rotation``: the snapped, exact online rotation in the activation kernel (False: ~25 %
      cheaper kernel, a code on a rounding boundary can move one step).
    * ``int8_gemm``: int-grid steps with per-token scales on the exact INT8 GEMM (False: A4 codes on
      cuBLAS' FP8 GEMM, A6/A8 as FP8 e4m3 values, a different grid).
    * ``fuse_projections``: sibling projections the model adapter lists (Wan's Q/K/V) run as one
      activation quantization and one GEMM (any backend but "simulated"; same outputs).
    * ``attention_path``: where the installed 8-bit attention runs: "auto", "triton" or "emulated".
    """

    backend: str = "simulated"
    fast_accum: bool = False
    exact_rotation: bool = True
    int8_gemm: bool = True
    fuse_projections: bool = True
    attention_path: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in ("simulated",) + BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose from {('simulated',) + BACKENDS}")
        for name in ("fast_accum", "exact_rotation", "int8_gemm", "fuse_projections"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.attention_path not in ATTENTION_PATHS:
            raise ConfigError(f"attention_path must be one of {ATTENTION_PATHS}, got {self.attention_path!r}")


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fusable_rotation(k: int, r: Optional[int], block: Optional[int]) -> bool:
    """Whether a rotation of order ``r`` runs inside the Triton kernels (activation quantization, the
    dynamic-smoothing weight re-quantization) for this K and scale ``block`` (None: per token): R a
    power of two, 16 ≤ R ≤ 128, dividing the kernels' tile (``block``, else max(R, 64)), which divides K."""
    if not r:
        return True
    if not (is_pow2(r) and 16 <= r <= 128):   # 256: the ±1 tile + pipeline stages overflow SMEM
        return False
    tile = block if block else max(r, 64)
    return tile % r == 0 and k % tile == 0


@dataclass(frozen=True)
class LinearLayout:
    """What the planner needs to know of one quantized linear: its static configuration, as numbers.

    ``rotation_block`` 0 = no online rotation; ``smooth`` / ``act_balance``: a static smoothing
    divisor / a calibrated channel balance is configured; ``dynamic_smoothing``: run-time smoothing
    with the weight re-quantized per sample from a master copy of ``master_bits`` (8: int8 codes
    with row scales, 16: float) every call.
    """

    in_features: int
    out_features: int
    w_bits: int
    packed: bool
    group_size: Optional[int]
    a_bits: int
    a8_fp8: bool
    rotation_block: int
    auto_scale: str
    scale_block: int
    smooth: bool
    act_balance: bool
    exact_mean: bool = False      # an fp32 block-mean term (DVD-Quant mean_channel="exact") rides on the output
    dynamic_smoothing: bool = False   # DVD-Quant smoothing="dynamic": the weight is re-quantized per sample
    master_bits: int = 8              # dynamic smoothing: the master weight's storage (8: int8 codes, 16: float)

    @property
    def per_block(self) -> bool:
        """Per-(token, block) activation scales (a block that does not divide K, or spans it, is per token)."""
        k = self.in_features
        return self.auto_scale == "per_block" and k % self.scale_block == 0 and self.scale_block != k


def dynamic_smoothing_blocker(layout: LinearLayout) -> str:
    """'' when a dynamic-smoothing layer runs on the kernels' pipeline (per-token activation scales, an
    in-kernel rotation or none, one weight step per row, an int8 master: :mod:`.weight_requant`), else why
    not; such a layer then runs its simulated forward on every backend."""
    k, r = layout.in_features, layout.rotation_block
    why = ""
    if layout.auto_scale == "per_channel" or layout.act_balance:
        why = "a per-channel activation balance (its Λ varies along K)"
    elif layout.per_block:
        why = f"per-block activation scales (scale_block={layout.scale_block})"
    elif layout.smooth:
        why = "static smoothing on top"
    elif layout.exact_mean:
        why = "the exact block-mean term"
    elif layout.master_bits != 8:
        why = "a float (16-bit) master weight"
    elif layout.group_size not in (None, k):
        why = f"group-wise weights (group_size={layout.group_size})"
    elif not fusable_rotation(k, r, None):
        why = f"a rotation of order {r} (in-kernel: powers of two 16-128, K a multiple of max(R, 64))"
    return f"dynamic smoothing with {why} has no kernel" if why else ""


__all__ = ["ATTENTION_PATHS", "BACKENDS", "ExecutionConfig", "LinearLayout", "dynamic_smoothing_blocker",
           "fusable_rotation", "is_pow2"]
