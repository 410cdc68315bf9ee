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
    quantize_act_per_token_fp8_e4m3,
    quantize_weight_minmax,
    quantize_weight_with_range,
    weight_codes_from_params,
    weight_int_max,
)
from .packing import pack_int4, unpack_int4
from .hadamard import (hadamard_matrix, block_hadamard, can_build_hadamard, hadamard_rotate_exact, rotate_last_dim,
                       snap_to_rotation_grid)
from .linear import exact_code_matmul, linear_per_token_per_channel
from .metrics import sqnr_db, relative_error

__all__ = [
    "WeightQParams", "act_qmax", "check_finite", "dequantize_weight",
    "fake_quant_act_per_token_int", "fake_quant_act_per_token_fp8_e4m3",
    "quantize_act_per_token_int", "quantize_act_per_token_fp8_e4m3", "quantize_weight_minmax", "quantize_weight_with_range",
    "weight_codes_from_params", "weight_int_max", "pack_int4", "unpack_int4", "hadamard_matrix", "block_hadamard",
    "can_build_hadamard", "hadamard_rotate_exact", "rotate_last_dim", "snap_to_rotation_grid",
    "exact_code_matmul", "linear_per_token_per_channel", "sqnr_db", "relative_error",
]
