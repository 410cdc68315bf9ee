"""Layer level: how DVD-Quant handles the mean of each rotation block (issue #23 item 3). CPU.

    PYTHONPATH=src python benchmarks/mean_channel_layers.py --out docs/results/mean_channel_layers_cpu.json

Protocol: the embedded model samples ``--prompts`` fixed prompts (seed 2 of the prompt
construction) for 20 steps in FP32 with CFG; forward hooks keep the input of every block Linear at
the denoising steps 0, 5, 10, 15, every ``--stride``-th token of each sample (kept as (B, L', K), so
ARQ's Λ_t stays per sample). Each variant then quantizes each of those Linears alone
(:func:`dvdquant.algorithms.dvd.dvdquant_layer`, no data) and the relative output error
‖y_q − y_fp‖ / ‖y_fp‖ over all kept calls is taken per layer, at W4A16 (weight error only), W4A8
and W4A4 (static bits, no δ-GBS). Variants:

* ``quantized``: today's DVD-Quant (the block mean rides through rotation and quantizers in the
  constant Hadamard column);
* ``exact``: ``mean_channel="exact"`` (block-centred x and W quantized, the means' product in fp32);
* ``exact_act_only``: the exact mean term with today's (uncentred) BGR weight: isolates what
  centring the weight adds (its constant column no longer widens each row's grid);
* ``bgr_col0_x{w}``: today's path, BGR's objective weighting the constant column's error by w (a
  data-free alternative);
* ``no_rotation``: DVD-Quant with ``rotation=False`` (what the rotation costs or gives);
* ``no_rotation_exact``: no rotation, the per-token mean over all K channels handled exactly as in
  ``exact`` (BGR of the row-centred W; computed here, not a library option).
* ``no_rotation_oracle``: no rotation, BGR's objective weighting each column's error by the captured
  inputs' E[x_j²] (calibration: the most any diagonal, data-free column weighting could give).

Also reported per layer: the share of the rotated input's energy in the constant column(s).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dvdquant.algorithms.arq import choose_rotation_block, rotate_weight  # noqa: E402
from dvdquant.algorithms.bgr import bgr_quantize  # noqa: E402
from dvdquant.algorithms.dvd import center_blocks, dvdquant_layer  # noqa: E402
from dvdquant.config import BGRConfig, DVDQuantConfig  # noqa: E402
from dvdquant.data import make_caption, sample_combinations  # noqa: E402
from dvdquant.models.embedded import load_embedded  # noqa: E402
from dvdquant.nn.quant_linear import QuantLinear  # noqa: E402
from dvdquant.numerics import grids  # noqa: E402
from dvdquant.numerics.hadamard import hadamard_rotate  # noqa: E402
from dvdquant.pipeline.generate import generate  # noqa: E402

STEPS, KEEP_STEPS = 20, (0, 5, 10, 15)
BITS = (16, 8, 4)


def capture(n_prompts: int, stride: int):
    """{layer name: [(B, L', K) inputs]} of the embedded model's block Linears, and the FP modules."""
    model = load_embedded()
    prompts = [make_caption(f) for f in sample_combinations(n_prompts, seed=2)]
    lin = {n: m for n, m in model.transformer.named_modules() if isinstance(m, nn.Linear) and ".blocks." in f".{n}"}
    caps, step = {}, {"i": -1}

    def hook(name):
        def f(mod, args, out):
            x = args[0]
            if step["i"] in KEEP_STEPS and x.dim() == 3:
                caps.setdefault(name, []).append(x.detach()[:, ::stride].float().clone())
        return f

    hs = [m.register_forward_hook(hook(n)) for n, m in lin.items()]
    hs.append(model.transformer.register_forward_pre_hook(lambda *a: step.__setitem__("i", step["i"] + 1)))
    with torch.no_grad():
        generate(model, prompts, seed=0, steps=STEPS, progress=False)
    for h in hs:
        h.remove()
    return caps, lin, step["i"] + 1


def bgr_weighted(w: torch.Tensor, bits: int, col_w: torch.Tensor, cfg: BGRConfig = BGRConfig()):
    """BGR with a per-column weight c_j in its objective Σ_j c_j (Δ(q_j − z) − w_j)² (asymmetric, per row)."""
    c = col_w.view(1, -1).double()
    rows = w.double()

    def err_of(scale, zero):
        q = grids.weight_codes_from_params(rows, scale, zero, bits)
        return (c * (scale * (q - zero) - rows).pow(2)).sum(1, keepdim=True), q

    lo0, hi0 = grids.minmax_bounds(rows)
    best = None
    for a in torch.linspace(1.0, cfg.shrink_min, cfg.shrink_steps).tolist():
        s, z = grids._params_from_range(lo0 * a, hi0 * a, bits, False)
        e, _ = err_of(s, z)
        best = (s, z, e) if best is None else tuple(torch.where(e < best[2], new, old)
                                                    for new, old in zip((s, z, e), best))
    s, z, e = best
    _, q = err_of(s, z)
    qmax = 2 ** bits - 1
    for _ in range(cfg.max_iters):
        d = q - z
        num, den = (c * d * rows).sum(1, keepdim=True), (c * d * d).sum(1, keepdim=True)
        s_new = torch.where((den > 0) & (num > 0), num / den.clamp_min(1e-30), s)
        z_new = torch.clamp(torch.round((c * (q - rows / s_new)).sum(1, keepdim=True) / c.sum()), 0, qmax)
        e_new, q_new = err_of(s_new, z_new)
        better = e_new < e
        s, z, e = (torch.where(better, s_new, s), torch.where(better, z_new, z), torch.where(better, e_new, e))
        q = grids.weight_codes_from_params(rows, s, z, bits)
        if not bool(better.any()):
            break
    codes = grids.weight_codes_from_params(rows, s, z, bits).to(torch.uint8)
    return grids.WeightQParams(codes, s.float(), z.float(), bits, None)


class CentredUnrotated(nn.Module):
    """y = m(x − x̄) + x̄·sumsᵀ with x̄ each token's mean over all K channels (no rotation)."""

    def __init__(self, m: QuantLinear, sums: torch.Tensor):
        super().__init__()
        self.m, self.sums = m, sums

    @property
    def a_bits(self):
        return self.m.a_bits

    @a_bits.setter
    def a_bits(self, b):
        self.m.a_bits = b

    def forward(self, x):
        xbar = x.mean(dim=-1, keepdim=True)
        return self.m(x - xbar) + xbar @ self.sums.t()


def build(variant: str, name: str, lin: nn.Linear, x_energy: torch.Tensor) -> QuantLinear:
    """The layer of ``variant``; ``x_energy`` (K,): the captured inputs' E[x_j²] (``no_rotation_oracle`` only)."""
    base = DVDQuantConfig(a_bits=4, gbs=None, attention="none")
    if variant == "quantized":
        return dvdquant_layer(name, lin, base)[0]
    if variant == "exact":
        return dvdquant_layer(name, lin, DVDQuantConfig(a_bits=4, gbs=None, attention="none",
                                                        mean_channel="exact"))[0]
    if variant == "no_rotation":
        return dvdquant_layer(name, lin, DVDQuantConfig(a_bits=4, gbs=None, attention="none", rotation=False))[0]
    if variant == "no_rotation_exact":
        wc, sums = center_blocks(lin.weight.detach().float(), lin.in_features)
        m = QuantLinear.from_params(lin, bgr_quantize(wc.float(), 4)[0], a_bits=4, auto_scale="per_channel")
        return CentredUnrotated(m, sums)
    w = lin.weight.detach().float()
    if variant == "no_rotation_oracle":
        params = bgr_weighted(w, 4, x_energy / x_energy.mean().clamp_min(1e-30))
        return QuantLinear.from_params(lin, params, a_bits=4, auto_scale="per_channel")
    block = choose_rotation_block(lin.in_features, None)
    if variant == "exact_act_only":
        m = dvdquant_layer(name, lin, base)[0]
        sums = w.double().reshape(w.shape[0], -1, block).sum(-1).float()
        return QuantLinear.from_params(lin, m.weight_params(), a_bits=4, rotation_block=block,
                                       auto_scale="per_channel", w_block_sum=sums)
    if variant.startswith("bgr_col0_x"):
        factor = float(variant.removeprefix("bgr_col0_x"))
        col = torch.ones(lin.in_features)
        col[::block] = factor                       # the constant column of each (Sylvester) block
        params = bgr_weighted(rotate_weight(w, block), 4, col)
        return QuantLinear.from_params(lin, params, a_bits=4, rotation_block=block, auto_scale="per_channel")
    raise ValueError(variant)


def mean_energy_share(x: torch.Tensor, block: int) -> float:
    """Share of the rotated input's energy (tokens ``x`` (M, K)) in the constant Hadamard column of each block."""
    xr = hadamard_rotate(x.double(), block)
    return float(xr[:, ::block].pow(2).sum() / xr.pow(2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--stride", type=int, default=4, help="keep every n-th token of each sample")
    ap.add_argument("--variants", default="quantized,exact,exact_act_only,bgr_col0_x8,bgr_col0_x64,no_rotation,"
                    "no_rotation_exact,no_rotation_oracle")
    ap.add_argument("--out", default="docs/results/mean_channel_layers_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    caps, lin, calls = capture(args.prompts, args.stride)
    variants = args.variants.split(",")
    per_layer = {f"W4A{b}": {v: {} for v in variants} for b in BITS}
    energy = {}
    for name, xs in caps.items():
        fp = lin[name]
        block = choose_rotation_block(fp.in_features, None)
        tokens = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])          # (M, K), every kept call
        energy[name] = mean_energy_share(tokens, block)
        x_energy = tokens.double().pow(2).mean(0).float()
        with torch.no_grad():
            refs = [F.linear(x, fp.weight.float(), None if fp.bias is None else fp.bias.float()) for x in xs]
            sig = sum(float(r.double().pow(2).sum()) for r in refs)
            for v in variants:
                m = build(v, name, fp, x_energy)
                for b in BITS:
                    m.a_bits = b
                    noise = sum(float((m(x) - r).double().pow(2).sum()) for x, r in zip(xs, refs))
                    per_layer[f"W4A{b}"][v][name] = math.sqrt(noise / sig)
    summary = {}
    for bits, table in per_layer.items():
        ref = torch.tensor(list(table["quantized"].values()))
        summary[bits] = {}
        for v, errs in table.items():
            e = torch.tensor(list(errs.values()))
            ffn2 = [x for n, x in errs.items() if n.endswith("ffn.net.2")]
            summary[bits][v] = {"mean_rel_err": float(e.mean()), "median_ratio_vs_quantized": float((e / ref).median()),
                                "layers_lower_than_quantized": int((e < ref).sum()), "layers": len(e),
                                "mean_rel_err_ffn_net_2": sum(ffn2) / len(ffn2)}
    out = {"what": "relative output error per block Linear of the embedded model, quantized alone, on its "
                   "FP inputs (steps 0/5/10/15 of 20, CFG)",
           "command": "PYTHONPATH=src python benchmarks/mean_channel_layers.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
           "prompts": args.prompts, "token_stride": args.stride, "forward_calls": calls,
           "seconds": round(time.time() - t0, 1),
           "summary": summary, "mean_column_energy_share": energy, "per_layer": per_layer}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for bits, rows in summary.items():
        print(bits, "  ".join(f"{v}: {r['mean_rel_err']:.4f} (ffn.net.2 {r['mean_rel_err_ffn_net_2']:.4f}, "
                              f"{r['layers_lower_than_quantized']}/{r['layers']} lower)" for v, r in rows.items()))
    print(f"[{out['seconds']} s] -> {args.out}")


if __name__ == "__main__":
    main()
