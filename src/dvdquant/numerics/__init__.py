"""Pure-tensor numerics: integer grids, int4 packing, FP8 helpers, Hadamard matrices, metrics.

Nothing here knows about models or diffusers; everything runs on CPU and GPU alike.
"""
from .grids import (
    WeightQParams,
    act_qmax,
    check_finite,
    dequantize_weight,
    fake_quant_act_per_token_int,
    fake_quant_act_per_token_fp8_e4m3,
    quantize_act_per_token_int,
    quantize_weight_minmax,
    quantize_weight_with_range,
    weight_codes_from_params,
)
from .packing import pack_int4, unpack_int4
from .hadamard import hadamard_matrix, block_hadamard, can_build_hadamard, rotate_last_dim
from .metrics import sqnr_db, relative_error

__all__ = [
    "WeightQParams", "act_qmax", "check_finite", "dequantize_weight",
    "fake_quant_act_per_token_int", "fake_quant_act_per_token_fp8_e4m3",
    "quantize_act_per_token_int", "quantize_weight_minmax", "quantize_weight_with_range",
    "weight_codes_from_params", "pack_int4", "unpack_int4", "hadamard_matrix", "block_hadamard",
    "can_build_hadamard", "rotate_last_dim", "sqnr_db", "relative_error",
]
