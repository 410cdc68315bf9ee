"""The simulated path's numerics as they were before the fast CPU reference (test-only, frozen),
with run-time statistics per sample (ARQ's Λ_t, dynamic smoothing's s_t; numerics/samples.py).

``tests/test_fast_reference.py`` asserts that today's faster implementations compute exactly
these bits (``torch.equal``) on the same machine. A frozen copy, not stored outputs: the fp32
GEMMs of the fake-quant order and of P·V round in a BLAS- and thread-dependent order, so stored
outputs would only hold on the machine that wrote them. Do not "optimise" this file.
"""
from __future__ import annotations

import torch

from dvdquant.kernels.attention_ref import E4M3, L_FLOOR, LN2, LOG2_P_SCALE
from dvdquant.numerics import grids
from dvdquant.numerics.hadamard import _pm1_factors_f64, fp32_matmul_is_ieee, inv_sqrt_r, snap_magic
from dvdquant.numerics.samples import (matmul_per_sample, per_sample_absmax, rows_per_sample, sample_count,
                                       scale_per_sample)


# ----------------------------------------------------------------------------- rotation
def _snap(x, block):
    xf = x.float()
    n = xf.shape[-1]
    seg = xf.reshape(*xf.shape[:-1], n // block, block)
    magic = snap_magic(seg.abs().amax(dim=-1, keepdim=True))
    return ((seg + magic) - magic).reshape(xf.shape)


def _exact_stage(v, f, bound_units):
    if bound_units <= 2 ** 24 and fp32_matmul_is_ieee(v.device):
        return v.float() @ f.to(dtype=torch.float32, device=v.device)
    return v.double() @ f.to(device=v.device)


def hadamard_rotate_exact(x, block):
    n = x.shape[-1]
    a, b = _pm1_factors_f64(block)
    base, p2 = a.shape[0], b.shape[0]
    xs = _snap(x, block)
    v = xs.reshape(*xs.shape[:-1], n // block, base, p2)
    v = _exact_stage(v, b, 2 ** 15 * p2)
    v = _exact_stage(v.transpose(-1, -2), a, 2 ** 15 * block).transpose(-1, -2)
    return v.float().reshape(xs.shape) * inv_sqrt_r(block)


# ----------------------------------------------------------------------------- QuantLinear.forward_simulated
def _quantize_tokens(m, x2, bits):
    if bits == 8 and m.a8_format == "fp8_e4m3":
        return grids.quantize_act_per_token_fp8_e4m3(x2)
    return grids.quantize_act_per_token_int(x2, bits)


def _fake_quant_tokens(m, x2, bits):
    codes, scale = _quantize_tokens(m, x2, bits)
    return codes.float() * scale


def _transform_input(m, x2):
    if m.smooth is not None:
        x2 = x2 / m.smooth[min(m._step(), m.smooth.shape[0] - 1)]
    if m.rotation_block:
        x2 = hadamard_rotate_exact(x2, m.rotation_block)
    return x2


def quantize_input(m, x2, bits, samples=1):
    if bits >= 16:
        return x2
    m._require_finite(x2)
    if m.act_balance is not None:
        lam = m.act_balance[min(m._step(), m.act_balance.shape[0] - 1)].unsqueeze(0)
        return _fake_quant_tokens(m, x2 / lam, bits) * lam
    if m.auto_scale == "per_channel":
        lam = m._all_tokens(per_sample_absmax(x2, samples))
        lam = torch.where(lam > 0, lam, torch.ones_like(lam))
        return scale_per_sample(_fake_quant_tokens(m, scale_per_sample(x2, lam, True), bits), lam, False)
    if m.auto_scale == "per_block":
        mm, k = x2.shape
        b = m.scale_block if k % m.scale_block == 0 else k
        return _fake_quant_tokens(m, x2.reshape(mm * (k // b), b), bits).reshape(mm, k)
    return _fake_quant_tokens(m, x2, bits)


def forward_simulated(m, x):
    from dvdquant.numerics.linear import linear_per_token_per_channel
    shape = x.shape
    x2 = x.reshape(-1, m.in_features).float()
    samples = sample_count(shape)
    bits = m.current_a_bits()
    if m.dyn_alpha is not None and bits < 16 and m.per_token_scaling(bits):
        # per-token scales (changed with the FP8 kernel path): each sample in the code-GEMM order
        s = m.dynamic_smoothing(x2, samples)
        xt = _transform_input(m, scale_per_sample(x2, s, True))
        m._require_finite(xt)
        codes, sc = _quantize_tokens(m, xt, bits)
        pmax = None if codes.dtype == torch.float8_e4m3fn else grids.act_qmax(bits) * grids.weight_int_max(m.w_bits)
        ys = []
        for cg, scg, sg in zip(rows_per_sample(codes, samples), rows_per_sample(sc, samples), s):
            p = m.smoothed_weight_params(sg.reshape(1, -1))
            ys.append(linear_per_token_per_channel(cg, scg, p.codes.float() - p.zero, p.scale, m.bias, pmax))
        return torch.cat(ys).to(x.dtype).reshape(*shape[:-1], m.out_features)
    if m.dyn_alpha is not None and bits < 16:
        s = m.dynamic_smoothing(x2, samples)
        xq = quantize_input(m, _transform_input(m, scale_per_sample(x2, s, True)), bits, samples)
        ys = [xg @ m.smoothed_weight(sg).t() for xg, sg in zip(rows_per_sample(xq, samples), s)]
        y = torch.cat(ys) if m.bias is None else torch.cat(ys) + m.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], m.out_features)
    if m.dyn_alpha is not None:
        w = m.smoothed_weight(torch.ones_like(m.w_colmax))
    elif m.per_token_scaling(bits):
        xt = _transform_input(m, x2)
        m._require_finite(xt)
        codes, s = _quantize_tokens(m, xt, bits)
        p = m.weight_params()
        w_int = p.codes.float() - p.zero
        pmax = None if codes.dtype == torch.float8_e4m3fn else grids.act_qmax(bits) * grids.weight_int_max(m.w_bits)
        y = linear_per_token_per_channel(codes, s, w_int, m.w_scale, m.bias, pmax)
        return y.to(x.dtype).reshape(*shape[:-1], m.out_features)
    else:
        w = m.dequantized_weight(torch.float32)
    xq = quantize_input(m, _transform_input(m, x2), bits, samples)
    y = matmul_per_sample(xq, w, samples)
    if m.bias is not None:
        y = y + m.bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], m.out_features)


# ----------------------------------------------------------------------------- 8-bit attention, online softmax
def attend(q8, rowfac, k8, k_scale, v8t, bias, lk, block_n):
    B, H, Lq, _ = q8.shape
    lkp = k8.shape[2]
    nb = lkp // block_n
    col = k_scale[:, :, None, :]
    s = (q8 @ k8.transpose(-1, -2)).mul_(col).mul_(rowfac[..., None])
    if bias is not None:
        s += bias[:, :, None, :]
    elif lk < lkp:
        s[..., lk:] = float("-inf")
    s = s.view(B, H, Lq, nb, block_n)
    m_run = torch.cummax(s.amax(dim=-1), dim=-1).values
    dead = m_run == float("-inf")
    m_use = m_run.masked_fill(dead, 0.0)
    p = s.sub_((m_use - LOG2_P_SCALE)[..., None]).exp2_()
    m_last = m_use[..., -1:]
    w = torch.exp2(m_use - m_last).masked_fill_(dead, 0.0)
    l = (p.sum(dim=-1) * w).sum(dim=-1)
    p8 = p.to(E4M3).float().mul_(w[..., None])
    acc = p8.view(B, H, Lq, lkp) @ v8t.transpose(-1, -2)
    lc = l.clamp_min(L_FLOOR)
    lse = (m_run[..., -1] + torch.log2(lc) - LOG2_P_SCALE) * LN2
    return acc / lc[..., None], lse


# ----------------------------------------------------------------------------- 8-bit attention, K/V/Q codes
def _round_codes(y, qk_format):
    if qk_format == "int8":
        return torch.round(y).clamp_(-127.0, 127.0)
    return y.clamp(-448.0, 448.0).to(E4M3).float()


def quantize_kv(k, v, qk_format, block_n):
    """(k8 int8/e4m3, k_scale, v8t e4m3, v_scale, v_offset, k_mean) as quantize_kv_reference computed them."""
    from dvdquant.kernels.attention_ref import QMAX, TINY, kv_stats, v_offset_reference
    B, Lk, H, D = k.shape
    lkp = -(-Lk // block_n) * block_n
    k_mean, v_mean, v_inv = kv_stats(k, v)
    kc = k.float().permute(0, 2, 1, 3) - k_mean[:, :, None, :]
    kc = torch.nn.functional.pad(kc, (0, 0, 0, lkp - Lk))
    amax = kc.abs().amax(dim=-1).clamp_min(TINY)
    qmax = QMAX[qk_format]
    k8 = _round_codes(kc * (qmax / amax)[..., None], qk_format)
    vc = v.float().permute(0, 2, 1, 3) - v_mean[:, :, None, :]
    v8 = (vc * v_inv[:, :, None, :]).clamp(-448.0, 448.0).to(E4M3)
    v8p = torch.nn.functional.pad(v8.float(), (0, 0, 0, lkp - Lk))
    v_scale = 1.0 / v_inv
    k8 = k8.to(torch.int8) if qk_format == "int8" else k8.to(E4M3)
    return (k8, amax / qmax, v8p.transpose(2, 3).to(E4M3).contiguous(), v_scale,
            v_offset_reference(v8p, v_mean, v_scale, Lk, block_n), k_mean)


def quant_attention(q, k, v, attn_mask=None, qk_format="int8", return_lse=True):
    """quant_attention_reference as it was (default scale and key tile, one batch chunk), with :func:`attend`."""
    import math
    from dvdquant.kernels.attention_ref import LOG2E, QMAX, TINY, block_n_for, key_bias
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    c = (1.0 / math.sqrt(D)) * LOG2E
    block_n = block_n_for(D)
    k8, k_scale, v8t, v_scale, v_offset, k_mean = quantize_kv(k, v, qk_format, block_n)
    qf = q.float().permute(0, 2, 1, 3)
    amax = qf.abs().amax(dim=-1).clamp_min(TINY)
    q8, sq = _round_codes(qf * (QMAX[qk_format] / amax)[..., None], qk_format), amax / QMAX[qk_format]
    bias = key_bias(attn_mask, B, H, Lk)
    lkp = k8.shape[2]
    if bias is not None:
        bias = torch.nn.functional.pad(bias * LOG2E, (0, lkp - Lk), value=float("-inf"))
    o, lse = attend(q8, sq * c, k8.float(), k_scale, v8t.float(), bias, Lk, block_n)
    out = torch.cat([o * v_scale[:, :, None, :] + v_offset[:, :, None, :]]).permute(0, 2, 1, 3).to(q.dtype)
    shift = (q.float().permute(0, 2, 1, 3) * k_mean[:, :, None, :]).sum(dim=-1) * (c / LOG2E)
    return out, (torch.cat([lse]) + shift).permute(0, 2, 1).contiguous()
