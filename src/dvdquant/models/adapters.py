"""Model adapters as data: which Linear layers of each diffusers video transformer to quantize.

An adapter lists regexes (``re.search`` on the module's qualified name) for the layers that are
quantized (attention projections and MLPs inside the transformer blocks) and for the AdaLN /
modulation layers (quantized *weight-only*, W4A16, when ``quantize_modulation=True``; kept in
high precision otherwise). Everything else — patch, timestep and text embedders, the final
projection and norm — stays in high precision. Algorithms never look at the model type; they
receive the selected layers and, from :func:`weight_only_layers`, which of them are modulation
layers (their input is one timestep embedding per sample: nothing to gain from quantizing it).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn

from ..errors import DVDQuantError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusedProjection:
    """Sibling projections of one attention module that its diffusers processor can call as one.

    On modules of class ``module_class`` whose attributes match ``when`` ((name, value) pairs; the
    value ``"present"`` means "not None"), the processor calls ``fused`` (e.g. ``to_qkv``) instead of
    ``members`` once ``module.fused_projections`` is set, and splits the output. The fp8 path then
    quantizes the shared tokens once and runs one GEMM (:mod:`dvdquant.nn.fused`). ``processor``: the
    class name of a diffusers processor that has no fused form; the entry then applies only to modules
    with that processor, which runs as dvdquant's fused-aware subclass while the fusion is installed
    (:mod:`dvdquant.nn.processors`)."""
    module_class: str
    fused: str
    members: tuple
    when: tuple = ()
    processor: str = ""


@dataclass(frozen=True)
class ModelAdapter:
    class_name: str
    quantize: tuple           # regexes of quantized Linear layers
    modulation: tuple = ()    # regexes of AdaLN/modulation Linears (quantized only on request)
    notes: str = ""
    fused_projections: tuple = ()   # FusedProjection entries the model's processors understand


ADAPTERS: dict[str, ModelAdapter] = {a.class_name: a for a in (
    ModelAdapter("WanTransformer3DModel", (r"^blocks\.\d+\.(attn1|attn2|ffn)\.",),
                 modulation=(r"^condition_embedder\.time_proj$",),
                 notes="Wan 2.1/2.2: self-attn, cross-attn (incl. image add_k/v), FFN per block; "
                       "time_proj (dim → 6·dim) feeds every block's AdaLN",
                 # WanAttnProcessor: to_qkv (self-attention), to_q + to_kv (cross), to_added_kv (I2V image keys)
                 fused_projections=(
                     FusedProjection("WanAttention", "to_qkv", ("to_q", "to_k", "to_v"),
                                     (("is_cross_attention", False),)),
                     FusedProjection("WanAttention", "to_kv", ("to_k", "to_v"), (("is_cross_attention", True),)),
                     FusedProjection("WanAttention", "to_added_kv", ("add_k_proj", "add_v_proj"),
                                     (("added_kv_proj_dim", "present"),)))),
    ModelAdapter("HunyuanVideoTransformer3DModel",
                 (r"^(transformer_blocks|single_transformer_blocks)\.\d+\.",),
                 modulation=(r"\.norm1(_context)?\.linear$", r"^single_transformer_blocks\.\d+\.norm\.linear$"),
                 notes="dual-stream and single-stream blocks; token refiner (text side) kept high",
                 # both block kinds: video (single-stream: joint) Q/K/V; dual-stream also the text add_* Q/K/V
                 fused_projections=(
                     FusedProjection("Attention", "to_qkv", ("to_q", "to_k", "to_v"),
                                     processor="HunyuanVideoAttnProcessor2_0"),
                     FusedProjection("Attention", "to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"),
                                     (("add_q_proj", "present"),), processor="HunyuanVideoAttnProcessor2_0"))),
    ModelAdapter("CogVideoXTransformer3DModel", (r"^transformer_blocks\.\d+\.(attn1|ff)\.",),
                 modulation=(r"^transformer_blocks\.\d+\.norm[12]\.linear$",)),
    ModelAdapter("LTXVideoTransformer3DModel", (r"^transformer_blocks\.\d+\.(attn1|attn2|ff)\.",),
                 modulation=(r"^time_embed\.linear$",)),
    ModelAdapter("MochiTransformer3DModel", (r"^transformer_blocks\.\d+\.(attn1|ff)\.",),
                 modulation=(r"^transformer_blocks\.\d+\.norm1(_context)?\.linear(_1)?$",)),
)}


def adapter_for(model: nn.Module) -> Optional[ModelAdapter]:
    return ADAPTERS.get(type(model).__name__)


def _matches(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns)


def select_linears(model: nn.Module, skip: tuple = (), quantize_modulation: bool = False,
                   filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> list:
    """[(qualified name, nn.Linear)] to quantize, in module order.

    With ``filter_fn`` the user decides among all Linear layers; otherwise the model's adapter
    does, or — for an unknown model — every Linear layer is taken (logged as a warning).
    ``skip`` (substrings or regexes) removes layers in every case.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kind = type(model).__name__
    if not linears:
        raise DVDQuantError(f"{kind} has no nn.Linear layers to quantize")
    adapter = adapter_for(model)
    if filter_fn is not None:
        chosen = [(n, m) for n, m in linears if filter_fn(m, n)]
        if not chosen:
            raise DVDQuantError(f"filter_fn selected none of the {len(linears)} Linear layers of {kind}")
    elif adapter is None:
        log.warning("no adapter for %s: quantizing all %d Linear layers except those in `skip`", kind, len(linears))
        chosen = linears
    else:
        pats = adapter.quantize + (adapter.modulation if quantize_modulation else ())
        chosen = [(n, m) for n, m in linears
                  if _matches(n, pats) and (quantize_modulation or not _matches(n, adapter.modulation))]
    chosen = [(n, m) for n, m in chosen if not _matches(n, skip)]
    if not chosen:
        raise DVDQuantError(f"no Linear layer of {kind} is left to quantize after `skip`={skip!r}")
    return chosen


def weight_only_layers(model: nn.Module, names) -> set:
    """The subset of ``names`` (selected layers) that the model's adapter lists as modulation layers.

    ``quantize_`` quantizes these weight-only, whichever way they were selected (adapter,
    ``filter_fn``, or a shard of the layers); a model without an adapter has none.
    """
    adapter = adapter_for(model)
    if adapter is None:
        return set()
    return {n for n in names if _matches(n, adapter.modulation)}
