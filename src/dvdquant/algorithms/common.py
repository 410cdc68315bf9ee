"""Layer-level building blocks shared by DVD-Quant and the baselines."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..numerics import grids
from ..numerics.metrics import relative_error
from .registry import LayerInfo


def linear_weight_fp32(linear: nn.Linear, name: str) -> torch.Tensor:
    """The layer's weight as fp32 (N, K), checked for NaN/Inf."""
    w = linear.weight.detach().float()
    grids.check_finite(w, f"weight of {name}")
    return w


def minmax_params(w: torch.Tensor, cfg) -> grids.WeightQParams:
    return grids.quantize_weight_minmax(w, cfg.w_bits, cfg.group_size, cfg.symmetric)


def rtn_with_info(w: torch.Tensor, cfg) -> tuple[grids.WeightQParams, LayerInfo]:
    """MinMax/RTN weights; its error is also the MinMax reference error."""
    p = minmax_params(w, cfg)
    err = relative_error(w, grids.dequantize_weight(p))
    return p, LayerInfo(w_err=err, w_err_minmax=err)


def check_group_size(in_features: int, cfg, name: str) -> Optional[int]:
    """The group size to use for this layer (per channel if the layer is not divisible)."""
    gs = cfg.group_size
    if gs is not None and in_features % gs != 0:
        raise grids.ConfigError(f"layer {name}: in_features {in_features} is not a multiple of group_size {gs}")
    return gs
