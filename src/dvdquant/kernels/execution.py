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


@dataclass(frozen=True)
class LinearLayout:
    """What the planner needs to know of one quantized linear: its static configuration, as numbers.

    ``rotation_block`` 0 = no online rotation; ``smooth`` / ``act_balance``: a static smoothing
    divisor / a calibrated channel balance is configured; ``dynamic_smoothing``: run-time smoothing
    with the weight re-quantized from a master copy every call (no kernel runs it).
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

    @property
    def per_block(self) -> bool:
        """Per-(token, block) activation scales (a block that does not divide K, or spans it, is per token)."""
        k = self.in_features
        return self.auto_scale == "per_block" and k % self.scale_block == 0 and self.scale_block != k


__all__ = ["ATTENTION_PATHS", "BACKENDS", "ExecutionConfig", "LinearLayout"]
