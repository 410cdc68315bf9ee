"""Quality evaluation of every method × bit-width on the embedded model (DESIGN.md §6, issue #4).

    from dvdquant.eval import evaluate
    results = evaluate("embedded", methods=["minmax", "dvdquant"], bits=["W4A4"], prompts=48,
                       steps=20, seed=0, device="cuda", out_dir="eval_out")

What one call does:

1. **Prompts**: ``prompts=N`` builds N captions with :func:`dvdquant.data.sample_combinations`
   (seed 0, fixed: each factor cycles through its values, so every shape, colour, motion and
   background occurs; N a multiple of 24 balances every factor exactly; the default 120 makes
   one clip 0.83 adherence points, so a 1-point tolerance is resolvable). Never tuned on results.
2. **Noise**: one initial-noise tensor, clip i seeded with ``seed + i``, shared by the FP run and
   by every quantized run; clips are sampled in fixed batches of ``batch_size`` prompts (run-time
   statistics are per sample, but δ-GBS's output change is taken over the batch, so the batch is
   held fixed across methods).
3. **FP reference**, then an FP *rerun* compared against it: the FP row must be exact.
4. **Each run**: a deep copy of the FP transformer is quantized with ``dvdquant.quantize_``
   (SmoothQuant and ViDiT-Q-style get ``calibration=`` a short generation on separate
   calibration prompts; DVD-Quant and the other baselines are data-free), clips are generated
   through the model's diffusers step hook (δ-GBS or fixed bits), then compared with FP:

   * fidelity: PSNR, SSIM of the clips, relative L2 of the final sample;
   * prompt adherence: the evaluator classifier's accuracy per factor (and all four at once);
   * distribution: Fréchet distance in the classifier's feature space to real generator clips
     of the same factor combinations;
   * temporal: frame consistency of the clip and flicker relative to the FP clip;
   * cost: seconds to quantize (calibration included), calibration forward passes;
   * δ-GBS: per-step bit schedule of every batch, low-bit fraction, average activation bits;
   * optionally (``layers=True``) per-layer, per-step SQNR of every quantized Linear's output
     against the FP layer on the same input (:mod:`dvdquant.eval.layers`).

Methods are keys of :data:`METHODS`; bit-widths keys of :data:`BITS`. "DVD-Quant" is
``DVDQuantConfig()`` with only the bit-widths replaced, its ablations ``dataclasses.replace`` of
that, so changes to the defaults flow in; ablations run at W4A4 and W4A6 only. W4A6 means δ-GBS (A4/A8 mixed by δ) for DVD-Quant and
its ablations, and static 6-bit activations for the baselines; the "no δ-GBS" ablation exists
only at W4A6, where it is static A4 (what the δ-GBS steps would otherwise run).
"""
from __future__ import annotations

import copy
import datetime
import logging
import math
import platform
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import api
from ..algorithms import GBSController, registered_methods
from ..config import DVDQuantConfig, GBSConfig, config_to_dict
from ..data import FACTOR_NAMES, Factors, generate_clips, make_caption, parse_caption, sample_combinations
from ..errors import DVDQuantError
from ..numerics import video_metrics as vm

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = 120         # multiple of 24: every factor value equally often; one clip = 0.83 points
DEFAULT_BATCH = 40            # prompts per sampling batch (80 clips with CFG, 41k tokens per Λ_t)
RUN_PRIORITY = ("W4A4", "W4A6", "W4A8", "W8A8")   # execution order (table order is as requested)
PROMPT_SEED = 0               # construction of the prompt set (fixed, independent of `seed`)
CALIBRATION_PROMPTS = 8       # SmoothQuant / ViDiT-Q calibration captions (seed 1: not the eval set)
CALIBRATION_SEED = 1
REAL_SEED = 424242            # real generator clips for the Fréchet distance
REAL_PER_PROMPT = 4           # real clips per evaluated combination
GRID_PROMPTS = 2              # clips shown in the frame grid


# ----------------------------------------------------------------------------- methods × bit-widths
@dataclass(frozen=True)
class BitSpec:
    w_bits: int
    a_bits: int
    mixed: bool = False   # DVD-Quant: δ-GBS (A4/A8 by δ); baselines: static a_bits


BITS: dict[str, BitSpec] = {
    "W8A8": BitSpec(8, 8),
    "W4A8": BitSpec(4, 8),
    "W4A6": BitSpec(4, 6, mixed=True),
    "W4A4": BitSpec(4, 4),
}


def dvdquant_config(b: BitSpec, **changes) -> DVDQuantConfig:
    """``DVDQuantConfig()`` at bit-width ``b`` (δ-GBS when ``b.mixed``), then ``changes``."""
    base = DVDQuantConfig()
    if b.mixed:
        gbs = base.gbs or GBSConfig()
        cfg = replace(base, w_bits=b.w_bits, a_bits=gbs.low_bits, gbs=gbs)
    else:
        cfg = replace(base, w_bits=b.w_bits, a_bits=b.a_bits, gbs=None)
    return replace(cfg, **changes)


def _no_gbs(b: BitSpec) -> DVDQuantConfig:
    cfg = dvdquant_config(b)
    return replace(cfg, gbs=None, a_bits=cfg.gbs.low_bits if cfg.gbs is not None else cfg.a_bits)


@dataclass(frozen=True)
class MethodSpec:
    key: str
    label: str
    family: str                                   # "baseline", "dvdquant", "ablation" or "variant"
    build: Callable[[BitSpec], object]            # bit-width -> config
    calibrated: bool = False                      # needs calibration=fn(model)
    only_bits: Optional[tuple] = None             # restrict to these bit-width keys
    ablates: str = ""


LOW_BITS = ("W4A6", "W4A4")   # ablations run where the parts matter (as the paper's ablation: W4A4)


def _static(cls):
    return lambda b: cls(w_bits=b.w_bits, a_bits=b.a_bits)


def baseline_specs() -> tuple:
    """One row per registered baseline method (algorithms/registry.py), in registration order."""
    return tuple(MethodSpec(m.name, m.display(), "baseline", _static(m.config_cls), calibrated=not m.data_free)
                 for m in registered_methods().values() if m.baseline)


METHODS: dict[str, MethodSpec] = {m.key: m for m in (
    *baseline_specs(),
    MethodSpec("dvdquant", "DVD-Quant", "dvdquant", dvdquant_config),
    MethodSpec("dvdquant-no-bgr", "DVD-Quant − BGR", "ablation",
               lambda b: dvdquant_config(b, bgr=None), only_bits=LOW_BITS, ablates="BGR"),
    MethodSpec("dvdquant-no-rotation", "DVD-Quant − rotation", "ablation",
               lambda b: dvdquant_config(b, rotation=False), only_bits=LOW_BITS, ablates="rotation"),
    MethodSpec("dvdquant-no-autoscale", "DVD-Quant − auto-scale", "ablation",
               lambda b: dvdquant_config(b, auto_scale="none"), only_bits=LOW_BITS, ablates="auto-scaling"),
    MethodSpec("dvdquant-no-gbs", "DVD-Quant − δ-GBS (static A4)", "ablation", _no_gbs,
               only_bits=("W4A6",), ablates="δ-GBS"),
    MethodSpec("dvdquant-no-qattn", "DVD-Quant − 8-bit attention", "ablation",
               lambda b: dvdquant_config(b, attention="none"), only_bits=("W4A8", "W4A4"),
               ablates="8-bit attention"),
    MethodSpec("dvdquant-dynsmooth", "DVD-Quant + dynamic smoothing", "variant",
               lambda b: dvdquant_config(b, smoothing="dynamic"), only_bits=LOW_BITS),
    MethodSpec("dvdquant-modulation", "DVD-Quant + W4A16 modulation", "variant",
               lambda b: dvdquant_config(b, quantize_modulation=True), only_bits=("W4A8", "W4A4")),
)}


def _parse_list(value, known: dict, what: str) -> list[str]:
    if value is None or value == "all" or value == ["all"]:
        return list(known)
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in known]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(map(repr, bad))} (known: {', '.join(known)})")
    return items


def plan_runs(methods=None, bits=None) -> list[tuple[str, str]]:
    """[(method key, bits key)] in table order: bit-widths as listed, methods as listed."""
    mkeys, bkeys = _parse_list(methods, METHODS, "method"), _parse_list(bits, BITS, "bit-width")
    return [(m, b) for b in bkeys for m in mkeys
            if METHODS[m].only_bits is None or b in METHODS[m].only_bits]


def eval_prompts(prompts=None) -> list[Factors]:
    """The factor combinations evaluated: N from the fixed construction, or parsed captions."""
    if prompts is None:
        prompts = DEFAULT_PROMPTS
    if isinstance(prompts, int):
        if prompts < 1:
            raise ValueError(f"need at least one prompt, got {prompts}")
        return sample_combinations(prompts, seed=PROMPT_SEED)
    return [parse_caption(p) for p in prompts]


# ----------------------------------------------------------------------------- model and classifier
def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_models(model_spec: str, device: torch.device):
    """(EmbeddedModel, ClipClassifier, description). ``"random"``: untrained weights (development)."""
    from ..models.embedded import build_embedded, load_embedded
    from .classifier import ClipClassifier, load_classifier
    if model_spec == "random":
        model = build_embedded()
        model.transformer.eval().requires_grad_(False)
        model.text_encoder.eval().requires_grad_(False)
        model.to(device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clf = ClipClassifier().eval().requires_grad_(False).to(device)
        return model, clf, "random-init embedded model and classifier (development only: numbers meaningless)"
    directory = None if model_spec == "embedded" else model_spec
    model = load_embedded(device=device, directory=directory)
    clf = load_classifier(device)
    return model, clf, f"embedded model ({'shipped assets' if directory is None else directory}), shipped classifier"


# ----------------------------------------------------------------------------- generation
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Samples:
    videos: torch.Tensor        # (N, F, H, W, 3) CPU
    latents: torch.Tensor       # (N, C, F, H, W) CPU
    seconds: float
    schedules: list             # δ-GBS: bits per step, one list per batch
    indicators: list            # δ-GBS: L1_t per step, one list per batch


def _generate_all(model, prompts: list[str], noise: torch.Tensor, *, steps: int, guidance: float,
                  batch_size: int, device: torch.device) -> Samples:
    from ..pipeline.generate import generate
    vids, lats, scheds, inds = [], [], [], []
    _sync(device)
    t0 = time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        res = generate(model, prompts[lo:lo + batch_size], steps=steps, guidance=guidance,
                       latents=noise[lo:lo + batch_size], progress=False)
        vids.append(res.videos)
        lats.append(res.latents)
        ctrl = api.step_controller(model.transformer)
        if ctrl is not None and isinstance(ctrl.policy, GBSController):
            scheds.append(list(ctrl.schedule))
            inds.append([None if math.isnan(v) else float(v) for v in ctrl.indicators])
    _sync(device)
    return Samples(torch.cat(vids), torch.cat(lats), time.perf_counter() - t0, scheds, inds)


@torch.no_grad()
def classifier_features(classifier, videos: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    return torch.cat([classifier.features(videos[i:i + chunk]).double().cpu()
                      for i in range(0, videos.shape[0], chunk)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D), float64.

    tr((Σ_a Σ_b)^½) is computed as Σ √λ of the symmetric PSD matrix Σ_a^½ Σ_b Σ_a^½.
    """
    if a.shape[0] < 2 or b.shape[0] < 2:
        return float("nan")                                   # no covariance from one sample
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    e, v = torch.linalg.eigh(s_a)
    root_a = (v * e.clamp_min(0).sqrt()) @ v.T
    m = root_a @ s_b @ root_a
    lam = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0)
    fd = (mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * lam.sqrt().sum()
    return max(float(fd), 0.0)


# ----------------------------------------------------------------------------- metrics
def _mean(t: torch.Tensor) -> float:
    return float(t.double().mean())


def compare(fp: Samples, q: Samples, factors: list[Factors], classifier, real_feats: torch.Tensor,
            fp_adherence: Optional[dict] = None) -> dict:
    """All clip-level metrics of ``q`` against the FP samples (and real clips for the FD)."""
    from .classifier import adherence
    p = vm.psnr(fp.videos, q.videos)
    adh = {k: 100.0 * v for k, v in adherence(q.videos, factors, classifier).items()}
    out = {
        "psnr_db": _mean(p), "psnr_db_min": float(p.min()),
        "ssim": _mean(vm.ssim(fp.videos, q.videos)),
        "rel_l2": _mean(vm.relative_l2(fp.latents, q.latents)),
        "adherence": adh,
        "fd": frechet_distance(classifier_features(classifier, q.videos), real_feats),
        "frame_consistency": _mean(vm.frame_consistency(q.videos)),
        "flicker_vs_fp": _mean(vm.flicker_vs(fp.videos, q.videos)),
        "generation_seconds": q.seconds,
    }
    if fp_adherence is not None:
        out["adherence_drop"] = {k: fp_adherence[k] - adh[k] for k in adh}
    return out


def _gbs_summary(samples: Samples, cfg) -> Optional[dict]:
    gbs = getattr(cfg, "gbs", None)
    if gbs is None or not samples.schedules:
        return None
    flat = [b for s in samples.schedules for b in s]
    steps = len(samples.schedules[0])
    return {
        "delta": gbs.delta, "low_bits": gbs.low_bits, "high_bits": gbs.high_bits,
        "warmup_steps": gbs.warmup_steps, "final_high_steps": gbs.final_high_steps,
        "low_bit_fraction": sum(b == gbs.low_bits for b in flat) / len(flat),
        "avg_act_bits": sum(flat) / len(flat),
        "high_fraction_per_step": [sum(s[i] == gbs.high_bits for s in samples.schedules) / len(samples.schedules)
                                   for i in range(steps)],
        "schedules": samples.schedules,          # one per batch of prompts
        "indicators": samples.indicators,
    }


def _calibration_fn(model, steps: int, guidance: float, seed: int) -> Callable:
    """calibration(transformer): a short FP generation on captions not in the eval set."""
    from ..pipeline.generate import calibration_generation
    prompts = [make_caption(f) for f in sample_combinations(CALIBRATION_PROMPTS, seed=CALIBRATION_SEED)]
    return calibration_generation(model, prompts, steps=steps, guidance=guidance, seed=seed + 100_000)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- the evaluation
def _one_run(model, mkey: str, bkey: str, captions, factors, noise, fp: Samples, fp_ref: dict, classifier,
             real_feats, fp_weights: Optional[dict], gen: dict):
    """Quantize a copy of the FP transformer with one method × bit-width, sample, compare with FP."""
    spec, dev, steps = METHODS[mkey], gen["device"], gen["steps"]
    qcfg = spec.build(BITS[bkey])
    qmodel = copy.copy(model)
    qmodel.transformer = copy.deepcopy(model.transformer)
    calibration = _calibration_fn(model, steps, gen["guidance"], 0) if spec.calibrated else None
    _sync(dev)
    report = api.quantize_(qmodel.transformer, qcfg, calibration=calibration)
    _sync(dev)
    recorder = None
    if fp_weights is not None:
        from .layers import LayerSQNR
        recorder = LayerSQNR(qmodel.transformer, fp_weights, steps)
    try:
        q = _generate_all(qmodel, captions, noise, **gen)
    finally:
        if recorder is not None:
            recorder.close()
    metrics = compare(fp, q, factors, classifier, real_feats, fp_ref["adherence"])
    gbs = _gbs_summary(q, qcfg)
    row = {
        "method": mkey, "label": spec.label, "family": spec.family, "bits": bkey, "ablates": spec.ablates,
        "config": config_to_dict(qcfg), "metrics": metrics,
        "avg_act_bits": gbs["avg_act_bits"] if gbs else float(qcfg.a_bits),
        "cost": {"quantize_seconds": report.seconds, "calibration_passes": report.calibration_passes,
                 "layers": len(report.layers), "mean_w_err": report.mean_w_err,
                 "mean_w_err_minmax": report.mean_w_err_minmax,
                 "calibrated_steps": report.layers[0].extras.get("calibrated_steps") if report.layers else None},
        "gbs": gbs,
    }
    lr = recorder.result() if recorder is not None else None
    if lr is not None:
        row["layer_sqnr_mean_db"] = lr["mean_db"]
    return row, q.videos, lr


def evaluate(model_spec: str = "embedded", methods: Sequence[str] | str | None = None,
             bits: Sequence[str] | str | None = None, prompts: int | Sequence[str] | None = None,
             steps: int = 20, seed: int = 0, device=None, out_dir=None, *, layers: bool = False,
             guidance: float = 4.0, batch_size: int = DEFAULT_BATCH, progress: bool = True) -> dict:
    """Evaluate methods × bit-widths against the FP model; returns (and optionally writes) results.

    ``methods``/``bits``: keys of :data:`METHODS` / :data:`BITS` (list or comma string; None = all).
    ``prompts``: an int N (fixed construction, default 120) or a list of captions.
    ``out_dir``: if given, writes results.json, layers.json (``layers=True``), quality.md and PNGs
    (see :func:`dvdquant.eval.report.write_outputs`).
    """
    runs = plan_runs(methods, bits)
    dev = _resolve_device(device)
    factors = eval_prompts(prompts)
    captions = [make_caption(f) for f in factors]
    model, classifier, model_desc = load_models(model_spec, dev)
    tcfg = model.transformer.config
    cfg = model.config
    from ..pipeline.generate import initial_noise
    noise = initial_noise(len(captions), (tcfg.in_channels, cfg.num_frames, cfg.height, cfg.width), seed)
    gen = dict(steps=steps, guidance=guidance, batch_size=batch_size, device=dev)
    t_start = time.perf_counter()

    # FP reference, FP rerun (must be exact), real clips for the Fréchet distance
    fp = _generate_all(model, captions, noise, **gen)
    fp2 = _generate_all(model, captions, noise, **gen)
    real = generate_clips(len(factors) * REAL_PER_PROMPT, seed=REAL_SEED, factors=factors * REAL_PER_PROMPT)
    real_feats = classifier_features(classifier, real.videos)
    floor = generate_clips(len(factors), seed=REAL_SEED + 1, factors=factors)
    fd_floor = frechet_distance(classifier_features(classifier, floor.videos), real_feats)
    from .classifier import adherence
    real_adh = {k: 100.0 * v for k, v in adherence(floor.videos, factors, classifier).items()}
    fp_ref = compare(fp, fp, factors, classifier, real_feats)
    fp_row = compare(fp, fp2, factors, classifier, real_feats, fp_ref["adherence"])
    fp_row["generation_seconds"] = fp.seconds
    fp_exact = bool(torch.equal(fp.videos, fp2.videos) and torch.equal(fp.latents, fp2.latents))
    if not fp_exact:
        log.warning("FP rerun differs from the FP reference (non-deterministic kernels on %s)", dev)

    grid = {"FP": fp.videos[:GRID_PROMPTS]}
    rows, layer_out = [], {}
    fp_weights = None
    if layers:
        from .layers import fp_linear_weights
        fp_weights = fp_linear_weights(model.transformer)
    order = sorted(runs, key=lambda r: RUN_PRIORITY.index(r[1]) if r[1] in RUN_PRIORITY else len(RUN_PRIORITY))
    partial = None
    if out_dir is not None:
        from pathlib import Path
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        partial = Path(out_dir) / "results.partial.json"
    failed: list = []

    def assemble(complete: bool) -> dict:
        import diffusers
        done = sorted(rows, key=lambda r: runs.index((r["method"], r["bits"])))
        res = {
            "meta": {
                "model": model_spec, "model_description": model_desc, "device": _device_name(dev),
                "torch": torch.__version__, "diffusers": diffusers.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "prompts": captions, "n_prompts": len(captions), "prompt_seed": PROMPT_SEED,
                "steps": steps, "seed": seed, "guidance": guidance, "batch_size": batch_size,
                "methods": _parse_list(methods, METHODS, "method"), "bits": _parse_list(bits, BITS, "bit-width"),
                "layers": layers, "real_clips": len(real), "real_seed": REAL_SEED,
                "calibration": {"prompts": CALIBRATION_PROMPTS, "prompt_seed": CALIBRATION_SEED, "steps": steps},
                "fd_real_floor": fd_floor, "real_clip_adherence": real_adh,
                "wall_seconds": time.perf_counter() - t_start,
            },
            "fp": {"label": "FP (fp32)", "bits": "FP", "metrics": fp_row, "rerun_exact": fp_exact,
                   "adherence": fp_ref["adherence"], "fd": fp_ref["fd"],
                   "frame_consistency": fp_ref["frame_consistency"]},
            "runs": done,
            "failed": failed,
        }
        if not complete:
            res["meta"]["incomplete"] = f"{len(rows) + len(failed)} of {len(runs)} runs done"
        from .report import acceptance
        res["acceptance"] = acceptance(res)
        return res

    bar = tqdm(order, desc="eval", disable=not progress)
    for mkey, bkey in bar:
        bar.set_postfix_str(f"{METHODS[mkey].label} {bkey}")
        try:
            row, videos, lr = _one_run(model, mkey, bkey, captions, factors, noise, fp, fp_ref, classifier,
                                       real_feats, fp_weights, gen)
        except (DVDQuantError, RuntimeError, ValueError) as e:      # keep the other runs' results
            log.error("%s %s failed: %s", mkey, bkey, e)
            failed.append({"method": mkey, "bits": bkey, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append(row)
        if lr is not None:
            layer_out[f"{mkey}@{bkey}"] = lr
        if bkey == "W4A4":
            grid[row["label"]] = videos[:GRID_PROMPTS]
        if partial is not None:                       # what survives a run cut short
            from .report import IMG_FRAMES, _dump
            _dump(assemble(complete=False), partial)
            if layers:
                _dump(layer_out, partial.with_name("layers.json"), 3)
            if bkey == "W4A4":
                from .plots import frame_grid
                frame_grid(grid, partial.with_name(IMG_FRAMES))
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    results = assemble(complete=True)
    from .report import write_outputs
    if out_dir is not None:
        write_outputs(results, out_dir, layer_out if layers else None, grid)
    results["layers"] = layer_out if layers else None
    if partial is not None and partial.exists():
        partial.unlink()
    return results
