"""The baselines DVD-Quant is compared with, behind the same registry and QuantLinear.

* **MinMax / RTN**: min-max weight grid, dynamic per-token activations. Data-free.
* **QuaRot**: Hadamard rotation of weights and activations, RTN weights, per-token
  activations (QuaRot pairs the rotation with GPTQ or RTN; RTN keeps it data-free here).
* **SmoothQuant**: per-channel smoothing s_j = max|X_j|^α / max|W_j|^(1−α) folded into the
  weights, RTN weights, per-token activations. *Needs calibration* (activation absmax).
* **ViDiT-Q-style**: SmoothQuant-style static channel balancing from statistics over all
  steps, plus a *timestep-aware* channel balance: per calibrated step t, activations are
  scaled by that step's channel absmax around the per-token quantizer (the calibrated
  counterpart of ARQ's dynamic Λ_t); RTN weights. *Needs per-step calibration*.
"""
from __future__ import annotations

import torch

from ..algorithms.arq import choose_rotation_block, rotate_weight
from ..algorithms.common import check_group_size, linear_weight_fp32, rtn_with_info
from ..algorithms.registry import QuantMethod, register_method
from ..config import MinMaxConfig, QuaRotConfig, SmoothQuantConfig, ViDiTQConfig
from ..nn.quant_linear import QuantLinear
from .calibration import collect_input_absmax


def _build(linear, params, cfg, **kw):
    return QuantLinear.from_params(linear, params, a_bits=cfg.a_bits, a8_format=cfg.a8_format, **kw)


def minmax_layer(name, linear, cfg: MinMaxConfig, stats=None):
    check_group_size(linear.in_features, cfg, name)
    params, info = rtn_with_info(linear_weight_fp32(linear, name), cfg)
    return _build(linear, params, cfg), info


def quarot_layer(name, linear, cfg: QuaRotConfig, stats=None):
    check_group_size(linear.in_features, cfg, name)
    block = choose_rotation_block(linear.in_features, cfg.rotation_block)
    w = linear_weight_fp32(linear, name)
    if block:
        w = rotate_weight(w, block)
    params, info = rtn_with_info(w, cfg)
    info.extras["rotation_block"] = block
    return _build(linear, params, cfg, rotation_block=block), info


def _smoothing(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α), (K,), clamped away from 0."""
    w_absmax = w.abs().amax(dim=0).clamp_min(1e-5)
    s = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.pow(1.0 - alpha)
    return s.clamp_min(1e-5)


def smoothquant_layer(name, linear, cfg: SmoothQuantConfig, stats=None):
    check_group_size(linear.in_features, cfg, name)
    w = linear_weight_fp32(linear, name)
    s = _smoothing(stats.per_layer(name)[0].to(w.device), w, cfg.alpha)
    params, info = rtn_with_info(w * s, cfg)                       # W·diag(s), (N, K)
    return _build(linear, params, cfg, smooth=s.unsqueeze(0)), info


def viditq_layer(name, linear, cfg: ViDiTQConfig, stats=None):
    check_group_size(linear.in_features, cfg, name)
    w = linear_weight_fp32(linear, name)
    per_step = stats.per_layer(name, per_step=True).to(w.device)        # (T, K)
    s = _smoothing(per_step.amax(dim=0), w, cfg.alpha)
    balance = per_step / s                                         # smoothed per-step absmax
    balance = torch.where(balance > 0, balance, torch.ones_like(balance))
    params, info = rtn_with_info(w * s, cfg)
    info.extras["calibrated_steps"] = per_step.shape[0]
    return _build(linear, params, cfg, smooth=s.unsqueeze(0), act_balance=balance), info


def _collect(label: str):
    def collect(model, targets, calibration, state, cfg):
        return collect_input_absmax(model, targets, calibration, state, label)
    return collect


# Registration order is the order of the evaluation's baseline rows.
register_method(QuantMethod("minmax", MinMaxConfig, minmax_layer, data_free=True, label="MinMax",
                            description="MinMax/RTN weights, per-token activations"))
register_method(QuantMethod("smoothquant", SmoothQuantConfig, smoothquant_layer,
                            collect=_collect("SmoothQuant"), data_free=False, label="SmoothQuant",
                            description="calibrated per-channel smoothing + RTN"))
register_method(QuantMethod("quarot", QuaRotConfig, quarot_layer, data_free=True, label="QuaRot",
                            description="Hadamard rotation + RTN weights, per-token activations"))
register_method(QuantMethod("viditq", ViDiTQConfig, viditq_layer, collect=_collect("ViDiT-Q"),
                            data_free=False, label="ViDiT-Q-style",
                            description="static smoothing + calibrated timestep-aware channel balance + RTN"))
