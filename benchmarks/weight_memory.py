"""Transformer weight memory, bf16 vs dvdquant, for full-size HunyuanVideo 13B and Wan 2.1 14B — no GPU.

The transformers are built on the ``meta`` device from the same diffusers configs as
``bench_step.py`` (its :func:`build`), so nothing of their 13–14 B parameters is allocated.
Every Linear layer that ``dvdquant.quantize_`` would quantize (``dvdquant.api.layer_configs``:
the adapter's selection and the per-layer config, W4A4 or weight-only W4A16 for modulation
layers) is replaced by a :class:`~dvdquant.nn.QuantLinear` constructed on ``meta`` with that
config — the constructor that ``dvdquant.load`` uses — and the bytes are those of the model's
state dict: packed int4 codes (uint8, N×K/2), fp32 Δ and z per output row, the biases (kept in
the model dtype, bf16) and every unquantized tensor in bf16. The bf16 reference is the state
dict of the same model cast to bf16 (what ``bench_step.py`` measured on the GPU: 28.58 / 25.64 GB).

Runs for ``quantize_modulation`` False and True; writes ``weight_memory.json`` and
``weight_memory.md`` to ``--out`` and prints the table. A few seconds on a CPU.

    python benchmarks/weight_memory.py --out runs/weight_memory
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger("weight_memory")

MODELS = {"wan14b": "Wan 2.1 14B", "hunyuan": "HunyuanVideo 13B"}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def count_weight_bytes(model: nn.Module, config) -> dict:
    """Bytes of ``model`` as it is (bf16) and of its dvdquant-quantized form under ``config``.

    ``model`` should live on the ``meta`` device (any device works) and is mutated: quantized
    layers are swapped for ``QuantLinear`` skeletons built with the per-layer settings
    ``quantize_`` would use (biases keep the layer's dtype, as ``QuantLinear.from_params`` does).
    """
    from dvdquant import api
    from dvdquant.nn import QuantLinear
    bf16 = _bytes(model.state_dict().values())
    params = sum(p.numel() for p in model.parameters())
    plan = api.layer_configs(model, config)
    device = next(model.parameters()).device
    fp_linear = weight_only_fp = 0
    for name, cfg in plan.items():
        lin = model.get_submodule(name)
        fp_linear += _bytes([lin.weight] + ([lin.bias] if lin.bias is not None else []))
        if cfg.a_bits >= 16:
            weight_only_fp += _bytes([lin.weight])
        q = QuantLinear(lin.in_features, lin.out_features, w_bits=cfg.w_bits, group_size=cfg.group_size,
                        a_bits=cfg.a_bits, has_bias=lin.bias is not None, bias_dtype=lin.weight.dtype, device=device)
        api.set_submodule(model, name, q)
    qmods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    codes = _bytes(m.qweight for m in qmods)
    scales = _bytes(t for m in qmods for t in (m.w_scale, m.w_zero))
    qbias = _bytes(m.bias for m in qmods if m.bias is not None)
    total = _bytes(model.state_dict().values())
    return {"bf16_bytes": bf16, "quant_bytes": total, "ratio": total / bf16,
            "layers": len(plan), "weight_only_layers": sum(c.a_bits >= 16 for c in plan.values()),
            "weight_only_bf16_weight_bytes": weight_only_fp,
            "packed_codes_bytes": codes, "scales_zeros_bytes": scales, "quant_bias_bytes": qbias,
            "unquantized_bytes": total - codes - scales - qbias,
            "quant_linears_bf16_bytes": fp_linear, "quant_linears_bytes": codes + scales + qbias,
            "params_b": params / 1e9}


def measure(which: str, quantize_modulation: bool) -> dict:
    """Build the full-size ``which`` ("wan14b" / "hunyuan") on meta and count default W4A4 DVD-Quant."""
    from bench_step import build

    import dvdquant
    torch.set_default_dtype(torch.bfloat16)               # as bench_step.py builds them (no fp32 → bf16 cast)
    try:
        with torch.device("meta"):
            model, _, _ = build(which)
    finally:
        torch.set_default_dtype(torch.float32)
    cfg = dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, quantize_modulation=quantize_modulation)
    res = count_weight_bytes(model, cfg)
    res.update(model=which, quantize_modulation=quantize_modulation)
    return res


def render(rows: list, command: str) -> str:
    gb = 1e9
    lines = [f"Command: `{command}` (CPU, meta device; bytes from QuantLinear buffer shapes)", "",
             "| model | modulation | layers (weight-only) | bf16 GB | quantized GB | × bf16 | "
             "quantized linears × their bf16 | unquantized GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {MODELS[r['model']]} | {'W4A16' if r['quantize_modulation'] else 'bf16'} | "
            f"{r['layers']} ({r['weight_only_layers']}) | {r['bf16_bytes'] / gb:.2f} | {r['quant_bytes'] / gb:.2f} | "
            f"**{r['ratio']:.3f}** | {r['quant_linears_bytes'] / r['quant_linears_bf16_bytes']:.3f} | "
            f"{r['unquantized_bytes'] / gb:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/weight_memory")
    ap.add_argument("--models", default="wan14b,hunyuan")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    rows = [measure(m, qm) for m in args.models.split(",") for qm in (False, True)]
    command = "python " + " ".join(["benchmarks/weight_memory.py"] + sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "weight_memory.json").write_text(json.dumps({"command": command, "torch": torch.__version__,
                                                        "rows": rows}, indent=1))
    md = render(rows, command)
    (out / "weight_memory.md").write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
