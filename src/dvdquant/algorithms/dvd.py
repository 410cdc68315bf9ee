"""DVD-Quant as a registered method: BGR weights + ARQ activations (+ δ-GBS at run time).

Each part can be switched off through :class:`~dvdquant.config.DVDQuantConfig` (``bgr=None``,
``rotation=False``, ``auto_scale="none"``, ``gbs=None``), which is how the ablations run.
``smoothing="dynamic"`` adds run-time smoothing before the rotation (see QuantLinear).
``mean_channel="exact"`` quantizes the block-centred weight (W − its block means)·H and keeps W's
block row sums for the exact fp32 mean term of QuantLinear.
No calibration data: only the weights are looked at here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import DVDQuantConfig
from ..nn.quant_linear import QuantLinear
from ..numerics import grids
from ..numerics.metrics import relative_error
from .arq import choose_rotation_block, rotate_weight
from .bgr import bgr_quantize
from .common import check_group_size, linear_weight_fp32, rtn_with_info
from .registry import LayerInfo, QuantMethod, register_method


def center_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) → (W_c: W minus each row's mean over each block of ``block`` columns, in fp64 for the
    rotation; the block sums (N, K/block), fp32). W_c·H has a zero constant Hadamard column (to fp64
    rounding), and x·Wᵀ = x_c·W_cᵀ + x̄·sumsᵀ for x_c, x̄ the block-centred input and its block means."""
    n, k = w.shape
    wb = w.double().reshape(n, k // block, block)
    sums = wb.sum(dim=-1)
    return (wb - (sums / block).unsqueeze(-1)).reshape(n, k), sums.float()


def dvdquant_layer(name: str, linear: nn.Linear, cfg: DVDQuantConfig, stats=None):
    w = linear_weight_fp32(linear, name)
    check_group_size(linear.in_features, cfg, name)
    block = choose_rotation_block(linear.in_features, cfg.rotation_block) if cfg.rotates() else None
    block_sum = None
    if block and cfg.mean_channel == "exact":
        w, block_sum = center_blocks(w, block)           # the block means leave the quantized weight
    if block:
        w = rotate_weight(w, block)                      # W·H, (N, K)
    if cfg.bgr is not None and cfg.smoothing == "none":   # dynamic smoothing re-quantizes per step (RTN)
        params, info = bgr_quantize(w, cfg.w_bits, cfg.group_size, cfg.symmetric, cfg.bgr)
        err = relative_error(w, grids.dequantize_weight(params))
        layer_info = LayerInfo(w_err=err, w_err_minmax=info["err_minmax"],
                               extras={"bgr_iters": info["iters"], "err_init": info["err_init"]})
    else:
        params, layer_info = rtn_with_info(w, cfg)
    layer_info.extras["rotation_block"] = block
    module = QuantLinear.from_params(linear, params, a_bits=cfg.a_bits, a8_format=cfg.a8_format,
                                     rotation_block=block, auto_scale=cfg.auto_scale,
                                     scale_block=cfg.scale_block, w_block_sum=block_sum)
    if cfg.smoothing == "dynamic":
        # Weights are re-quantized every forward from this master (RTN, after x/s_t ↔ W·diag(s_t)); the
        # RTN of W·H above gives the report's weight error; qweight becomes the master's RTN at s = 1.
        module.set_dynamic_smoothing(linear_weight_fp32(linear, name), cfg.smooth_alpha, cfg.smooth_master_bits,
                                     cfg.symmetric)
        layer_info.extras["smoothing"] = f"dynamic(alpha={cfg.smooth_alpha}, master={cfg.smooth_master_bits}b)"
    return module, layer_info


register_method(QuantMethod(
    name="dvdquant", config_cls=DVDQuantConfig, quantize_layer=dvdquant_layer, data_free=True, label="DVD-Quant", baseline=False,
    description="BGR weights + ARQ rotated, auto-scaled per-token activations (+ δ-GBS)"))
