"""8-bit attention for diffusers models: a registered attention backend and its installer.

Why this file exists: the quantized attention kernels (:mod:`dvdquant.kernels.attention_ref`,
:mod:`dvdquant.kernels.attention_triton`) know nothing about diffusers. This module plugs them
into diffusers' attention dispatch (``diffusers.models.attention_dispatch``), so that the
processors of Wan, HunyuanVideo and LTX-Video — which call ``dispatch_attention_fn(...,
backend=self._attention_backend, parallel_config=self._parallel_config)`` — run the quantized
kernel with no change to the model code, and so that diffusers' context parallelism (Ulysses
all-to-all, ring attention) wraps it like any other backend.

Registration: diffusers names backends by members of the ``AttentionBackendName`` enum. We add
members (``dvdquant_int8``, ``dvdquant_fp8`` and ``…_triton`` / ``…_emulated`` variants that
force one path) to that enum and register one function per member in
``_AttentionBackendRegistry`` with ``supports_context_parallel=True``. Nothing that exists is
replaced; the registration is idempotent. Under context parallelism the backend hands diffusers'
``_templated_context_parallel_attention`` a forward op that also returns the log-sum-exp (ring
attention merges partial results with it). Inference only: the backward op raises.

Installation (:func:`install_quantized_attention`) sets ``processor._attention_backend`` on
every attention module whose processor goes through dispatch (per processor, not the global
active backend), and replaces CogVideoX's processor, which calls SDPA directly, by
:class:`CogVideoXQuantAttnProcessor` (same math, through dispatch). Other processors (Mochi,
HunyuanVideo's text token refiner, fused-projection processors) keep SDPA; the installer logs
them once. :func:`remove_quantized_attention` restores what was there.

Per call, :func:`plan_attention` decides the path — ``triton`` (sm89+ CUDA), ``emulated`` (the
reference, exactly the kernel's numerics: CPU/CI) or ``sdpa`` — and logs one line per fallback
reason: head_dim not 64/128, masks that vary along queries, causal, dropout, GQA, dtypes other
than fp16/bf16/fp32, devices without a path, and cross-attention to fewer than ``MIN_CROSS_KEYS``
keys (text conditioning: negligible cost, and too few keys to average out 8-bit P·V rounding).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..kernels import device_capability
from ..kernels.execution import ATTENTION_PATHS
from ..kernels.env import interpreting, log_once, triton_available
from ..kernels.attention_ref import QK_FORMATS, is_key_padding_mask, quant_attention_reference

log = logging.getLogger(__name__)

ATTN_ATTR = "_dvdquant_attention"           # on the model: the installed mode ("int8" / "fp8")
ATTN_PATH_ATTR = "_dvdquant_attention_path"  # on the model: the installed path ("auto" / "triton" / "emulated")
PREV_ATTR = "_dvdquant_prev_backend"         # on a processor: the backend it had before
PATHS = ATTENTION_PATHS
MODES = ("none",) + QK_FORMATS
# Cross-attention to fewer keys than this stays on SDPA: its FLOPs are negligible (12–512 text tokens
# against 32k+ video keys), and averaging so few keys leaves P·V's e4m3 rounding visible (measured on
# the embedded model: 2.7–3.0 % rel. L2 at 12 keys vs 1.0–1.3 % for its 512-key self-attention).
MIN_CROSS_KEYS = 256


def _log_once(msg: str) -> None:
    log_once(log, ("attention", msg), "dvdquant attention: %s", msg)


# ----------------------------------------------------------------------------- per-call plan
@dataclass(frozen=True)
class AttnPlan:
    """``path``: "triton", "emulated" or "sdpa"; ``reason`` says why SDPA was chosen."""

    path: str
    reason: str = ""


def plan_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                   enable_gqa: bool = False, path: str = "auto",
                   capability: Optional[Tuple[int, int]] = None) -> AttnPlan:
    """Which path runs this call (tensors in dispatch layout (B, L, H, D)). Pure; ``capability``
    overrides the device's (tests)."""
    B, Lq, H, D = query.shape
    if dropout_p > 0.0:
        return AttnPlan("sdpa", "dropout is not supported")
    if is_causal:
        return AttnPlan("sdpa", "causal attention is not supported")
    if enable_gqa or key.shape[2] != H or value.shape[2] != H:
        return AttnPlan("sdpa", "grouped-query attention (key/value heads differ) is not supported")
    if key.shape[-1] != D or value.shape[-1] != D:
        return AttnPlan("sdpa", f"q/k/v head dims differ ({D}, {key.shape[-1]}, {value.shape[-1]})")
    if D not in (64, 128):
        return AttnPlan("sdpa", f"head_dim {D} (the kernel takes 64 or 128)")
    if query.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return AttnPlan("sdpa", f"dtype {query.dtype} (the kernel takes fp16, bf16, fp32)")
    if not is_key_padding_mask(attn_mask, B, H, key.shape[1]):
        return AttnPlan("sdpa", f"mask of shape {tuple(attn_mask.shape)} varies along queries "
                                "(only key-padding masks are supported)")
    if key.shape[1] != Lq and key.shape[1] < MIN_CROSS_KEYS:
        return AttnPlan("sdpa", f"cross-attention to {key.shape[1]} < {MIN_CROSS_KEYS} keys stays on SDPA "
                                "(negligible cost, too few keys to average 8-bit P·V rounding)")
    dev = query.device.type
    if path == "emulated":
        return AttnPlan("emulated") if dev in ("cpu", "cuda") else AttnPlan("sdpa", f"no emulated path on {dev}")
    cap = capability if capability is not None else device_capability(query.device)
    if cap is not None and cap >= (8, 9) and triton_available():
        return AttnPlan("triton")
    if path == "triton":
        if dev == "cpu" and interpreting() and triton_available():
            return AttnPlan("triton")                            # Triton's interpreter (CI)
        return AttnPlan("sdpa", f"the triton path needs an FP8-capable CUDA GPU (sm89+) with Triton, not {dev} "
                                f"{'' if cap is None else cap}")
    if dev == "cpu":
        return AttnPlan("emulated")
    return AttnPlan("sdpa", f"no FP8 tensor cores on {dev} {'' if cap is None else cap}: quantized attention "
                            "would only be slower")


def run_quantized(plan: AttnPlan, query, key, value, attn_mask, scale, qk_format: str, return_lse: bool):
    """Execute a non-SDPA plan (dispatch layout in and out)."""
    if plan.path == "triton":
        from ..kernels.attention_triton import quant_attention  # imports triton: only on this path
        return quant_attention(query, key, value, attn_mask=attn_mask, scale=scale, qk_format=qk_format,
                               return_lse=return_lse)          # tiles: the head_dim's tuned config
    return quant_attention_reference(query, key, value, attn_mask=attn_mask, scale=scale, qk_format=qk_format,
                                     return_lse=return_lse)    # same key tile as the kernel (block_n_for)


# ----------------------------------------------------------------------------- diffusers backend
def backend_value(mode: str, path: str = "auto") -> str:
    """The dispatch backend name of (``mode``, ``path``): ``dvdquant_int8``, ``dvdquant_fp8_emulated``, …"""
    return f"dvdquant_{mode}" + ("" if path == "auto" else f"_{path}")


def _add_enum_member(enum_cls, value: str):
    """Add ``value`` to diffusers' ``AttentionBackendName`` (a ``str`` Enum) unless present."""
    try:
        return enum_cls(value)
    except ValueError:
        pass
    member = str.__new__(enum_cls, value)
    member._name_, member._value_ = value.upper(), value
    enum_cls._member_map_[member._name_] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(member._name_)
    return enum_cls(value)


def _cp_backward_op(ctx, grad_out, *args, **kwargs):
    raise RuntimeError("dvdquant quantized attention is inference-only (no backward)")


def _cp_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None, *, qk_format, plan):
    """The per-shard op diffusers' Ulysses/ring templates call (dispatch layout; lse (B, L, H))."""
    return run_quantized(plan, query, key, value, attn_mask, scale, qk_format, return_lse)


def _ring_degree(parallel_config) -> int:
    cp = getattr(parallel_config, "context_parallel_config", None)
    return int(getattr(cp, "ring_degree", 1) or 1)


def sdpa_with_lse(query, key, value, attn_mask=None, scale=None, is_causal=False, enable_gqa=False,
                  max_chunk: int = 1 << 26):
    """Exact softmax attention in plain torch (fp32 math) that also returns the log-sum-exp.

    Dispatch layout: ``query`` (B, Lq, H, D), ``key``/``value`` (B, Lk, Hkv, D) → out (B, Lq, H, D)
    in ``query.dtype``, lse (B, Lq, H) fp32 (natural log). For the SDPA fallbacks under ring attention
    only (rare shapes); queries are processed in chunks of at most ``max_chunk`` score elements per
    batch element (chunks independent of the batch size, so a sample's bits do not depend on its batch).
    """
    B, Lq, H, D = query.shape
    Lk = key.shape[1]
    q, k, v = (t.float().permute(0, 2, 1, 3) for t in (query, key, value))      # (B, H, L, D)
    if enable_gqa and k.shape[1] != H:
        k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
    c = scale if scale is not None else D ** -0.5
    bias = None
    if attn_mask is not None:
        bias = attn_mask if attn_mask.dtype != torch.bool else \
            torch.zeros(attn_mask.shape, device=q.device).masked_fill_(~attn_mask, float("-inf"))
        bias = bias.float()
    step = max(1, max_chunk // max(H * Lk, 1))
    outs, lses = [], []
    for b in range(B):
        bb = bias if bias is None or bias.ndim < 4 else bias[b if bias.shape[0] > 1 else 0]
        for q0 in range(0, Lq, step):
            s = torch.einsum("hqd,hkd->hqk", q[b, :, q0:q0 + step], k[b]) * c      # (H, chunk, Lk)
            if bb is not None:
                s = s + (bb if bb.shape[-2] == 1 else bb[..., q0:q0 + step, :])
            if is_causal:
                rows = torch.arange(q0, q0 + s.shape[1], device=s.device)[:, None]
                s = s.masked_fill(torch.arange(Lk, device=s.device)[None, :] > rows, float("-inf"))
            lse = torch.logsumexp(s, dim=-1)                                      # (H, chunk)
            outs.append(torch.einsum("hqk,hkd->hqd", torch.exp(s - lse[..., None]).nan_to_num_(0.0), v[b]))
            lses.append(lse)
    n = -(-Lq // step)                                                            # chunks per batch element
    out = torch.stack([torch.cat(outs[i * n:(i + 1) * n], dim=1) for i in range(B)])   # (B, H, Lq, D)
    lse = torch.stack([torch.cat(lses[i * n:(i + 1) * n], dim=1) for i in range(B)])   # (B, H, Lq)
    return out.permute(0, 2, 1, 3).to(query.dtype), lse.permute(0, 2, 1)


def _cp_sdpa_lse_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """Ring attention's per-chunk op for SDPA fallbacks: exact attention with its lse."""
    if dropout_p > 0.0:
        raise NotImplementedError("dvdquant's SDPA fallback under ring attention is inference-only (no dropout)")
    out, lse = sdpa_with_lse(query, key, value, attn_mask, scale, is_causal, enable_gqa)
    return (out, lse) if return_lse else out


def _make_backend(mode: str, path: str, native):
    def dvdquant_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False, return_lse=False, _parallel_config=None):
        plan = plan_attention(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, path)
        if plan.path == "sdpa":
            _log_once(f"falling back to SDPA: {plan.reason}")
            if _parallel_config is None or _ring_degree(_parallel_config) == 1:
                return native(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, return_lse=return_lse,
                              _parallel_config=_parallel_config)
            forward_op = _cp_sdpa_lse_op      # ring merges chunks by their lse, which native SDPA cannot return
        elif _parallel_config is None:
            return run_quantized(plan, query, key, value, attn_mask, scale, mode, return_lse)
        else:
            forward_op = partial(_cp_forward_op, qk_format=mode, plan=plan)
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention
        return _templated_context_parallel_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
            forward_op=forward_op, backward_op=_cp_backward_op, _parallel_config=_parallel_config)

    dvdquant_attention.__name__ = backend_value(mode, path)
    return dvdquant_attention


def register_backends():
    """Register every dvdquant backend with diffusers' dispatch (idempotent); returns {value: member}."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]
    members = {}
    for mode in QK_FORMATS:
        for path in PATHS:
            value = backend_value(mode, path)
            member = _add_enum_member(AttentionBackendName, value)
            if member not in _AttentionBackendRegistry._backends:
                _AttentionBackendRegistry.register(member, constraints=[], supports_context_parallel=True)(
                    _make_backend(mode, path, native))
            members[value] = member
    return members


# ----------------------------------------------------------------------------- processors
class CogVideoXQuantAttnProcessor:
    """CogVideoX's ``CogVideoXAttnProcessor2_0`` (joint text+video self-attention with RoPE on the
    video part), with the attention call routed through diffusers' dispatch."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)   # (B, Lt + Lv, C)
        batch, seq, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:                          # (B, H, L, D) here
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
        out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)          # (B, L, H, D)
        hidden_states = out.flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split([text_len, seq - text_len], dim=1)
        return hidden_states, encoder_hidden_states


def attention_modules(model: nn.Module) -> list:
    """(name, module) of ``model``'s diffusers attention modules that have a processor."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention
    classes = (Attention, MochiAttention, AttentionModuleMixin)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes) and getattr(m, "processor", None)]


def install_quantized_attention(model: nn.Module, mode: str = "int8", backend: str = "auto") -> dict:
    """Route ``model``'s attention through dvdquant's 8-bit attention; returns counts per outcome.

    ``mode``: "int8" (INT8 Q·Kᵀ, FP8 P·V) or "fp8" (FP8 both); ``backend``: "auto" (Triton kernel
    on sm89+ CUDA, the emulated reference on CPU, SDPA elsewhere), "triton" or "emulated".
    """
    if mode not in QK_FORMATS:
        raise ConfigError(f"attention mode must be one of {QK_FORMATS}, got {mode!r}")
    if backend not in PATHS:
        raise ConfigError(f"attention backend must be one of {PATHS}, got {backend!r}")
    if getattr(model, ATTN_ATTR, None) is not None:
        remove_quantized_attention(model)
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
    member = register_backends()[backend_value(mode, backend)]
    counts = {"dispatch": 0, "replaced": 0, "sdpa": 0}
    for name, module in attention_modules(model):
        proc = module.processor
        if type(proc) is CogVideoXAttnProcessor2_0:
            new = CogVideoXQuantAttnProcessor()
            new._dvdquant_original = proc
            new._parallel_config = getattr(proc, "_parallel_config", None)
            module.processor = new                                # plain attribute: keeps no other state
            proc = new
            counts["replaced"] += 1
        elif hasattr(proc, "_attention_backend"):
            counts["dispatch"] += 1
        else:
            _log_once(f"{type(proc).__name__} does not go through diffusers' attention dispatch: keeps SDPA")
            counts["sdpa"] += 1
            continue
        setattr(proc, PREV_ATTR, proc._attention_backend)
        proc._attention_backend = member
    setattr(model, ATTN_ATTR, mode)
    setattr(model, ATTN_PATH_ATTR, backend)
    log.info("quantized attention (%s, %s) on %d modules of %s (%d processors replaced, %d kept on SDPA)",
             mode, backend, counts["dispatch"] + counts["replaced"], type(model).__name__, counts["replaced"],
             counts["sdpa"])
    return counts


_CAPTURE: list = []                                # callbacks of active capture_attention_inputs()


def _capture_backend(native):
    def dvdquant_capture(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False, return_lse=False, _parallel_config=None):
        if _CAPTURE:
            _CAPTURE[-1](query, key, value, attn_mask, scale)
        return native(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
                      is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, return_lse=return_lse,
                      _parallel_config=_parallel_config)
    return dvdquant_capture


@contextlib.contextmanager
def capture_attention_inputs(model: nn.Module, callback):
    """Within the block, every dispatched attention call of ``model`` runs bf16/fp32 SDPA and first calls
    ``callback(query, key, value, attn_mask, scale)`` (dispatch layout), in call order. For accuracy
    studies on real inputs (``benchmarks/attention_accuracy.py``)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    member = _add_enum_member(AttentionBackendName, "dvdquant_capture")
    if member not in _AttentionBackendRegistry._backends:
        native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]
        _AttentionBackendRegistry.register(member, constraints=[])(_capture_backend(native))
    procs = [m.processor for _, m in attention_modules(model) if hasattr(m.processor, "_attention_backend")]
    saved = [p._attention_backend for p in procs]
    for p in procs:
        p._attention_backend = member
    _CAPTURE.append(callback)
    try:
        yield
    finally:
        _CAPTURE.pop()
        for p, b in zip(procs, saved):
            p._attention_backend = b


def remove_quantized_attention(model: nn.Module) -> int:
    """Undo :func:`install_quantized_attention`; returns the number of modules restored."""
    restored = 0
    for _, module in attention_modules(model):
        proc = module.processor
        if not hasattr(proc, PREV_ATTR):
            continue
        original = getattr(proc, "_dvdquant_original", None)
        if original is not None:
            module.processor = original
        else:
            proc._attention_backend = getattr(proc, PREV_ATTR)
            delattr(proc, PREV_ATTR)
        restored += 1
    for attr in (ATTN_ATTR, ATTN_PATH_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return restored


def quantized_attention_mode(model: nn.Module) -> Optional[str]:
    """The installed mode ("int8"/"fp8"), or None."""
    return getattr(model, ATTN_ATTR, None)


def quantized_attention_path(model: nn.Module) -> Optional[str]:
    """The installed path ("auto" / "triton" / "emulated"), or None."""
    return getattr(model, ATTN_PATH_ATTR, None)


def apply_config(model: nn.Module, config) -> Optional[dict]:
    """Install what ``config.attention`` asks for (configs without the field: nothing)."""
    mode = getattr(config, "attention", "none")
    if mode == "none":
        return None
    return install_quantized_attention(model, mode)


__all__ = ["AttnPlan", "plan_attention", "install_quantized_attention", "remove_quantized_attention",
           "quantized_attention_mode", "quantized_attention_path",
           "register_backends", "capture_attention_inputs", "backend_value", "apply_config",
           "CogVideoXQuantAttnProcessor", "MODES"]
