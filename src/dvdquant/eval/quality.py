"""Quality evaluation of every method × bit-width on the embedded model (DESIGN.md §6, issue #4).

    from dvdquant.eval import evaluate
    results = evaluate("embedded", methods=["minmax", "dvdquant"], bits=["W4A4"], prompts=48,
                       steps=20, seed=0, device="cuda", out_dir="eval_out")

What one call does:

1. **Prompts**: ``prompts=N`` builds N captions with :func:`dvdquant.data.sample_combinations`
   (seed 0, fixed: each factor cycles through its values, so every shape, colour, motion and
   background occurs; N a multiple of 24 balances every factor exactly; the default 528 gives
   paired PSNR intervals of about ±0.3 dB, one clip = 0.19 adherence points). Never tuned on results.
2. **Noise**: one initial-noise tensor, clip i seeded with ``seed + i``, shared by the FP run and
   by every quantized run; clips are sampled in fixed batches of ``batch_size`` prompts (run-time
   statistics are per sample, but δ-GBS's output change is taken over the batch, so the batch is
   held fixed across methods).
3. **FP reference**, then an FP *rerun* compared against it: the FP row must be exact.
4. **Each run**: a deep copy of the FP transformer is quantized with ``dvdquant.quantize_``
   (SmoothQuant and ViDiT-Q-style get ``calibration=`` a short generation on separate
   calibration prompts; DVD-Quant and the other baselines are data-free), clips are generated
   through the model's diffusers step hook (δ-GBS or fixed bits), then compared with FP:

   * fidelity: PSNR and SSIM of each decoded clip vs the FP clip of the same prompt and noise,
     relative L2 of the final sample;
   * temporal: flicker vs FP (mean |Δ_t(q) − Δ_t(FP)| of consecutive-frame changes) and the
     clip's own frame consistency;
   * prompt adherence (secondary: it saturates): per clip and factor, whether the evaluator
     classifier reads the captioned value;
   * distribution: Fréchet distance in the classifier's feature space to real generator clips
     of the same factor combinations, on all prompts and on ``fd_bootstrap`` seeded resamples of
     the prompts (:class:`dvdquant.eval.frechet.FrechetBootstrap`);
   * cost: seconds to quantize (calibration included), calibration forward passes;
   * δ-GBS: per-step bit schedule of every batch, low-bit fraction, average activation bits;
   * optionally (``layers=True``) per-layer, per-step SQNR of every quantized Linear's output
     against the FP layer on the same input (:mod:`dvdquant.eval.layers`).

Every per-clip value is kept (``per_clip`` of each row in results.json), so that
:mod:`dvdquant.eval.report` can give each method-vs-method difference as a paired mean with a 95 %
interval, and runs split across calls (other methods / bits, same prompts and seeds) can be merged
(:func:`dvdquant.eval.store.merge_runs`). ``out_dir`` receives the raw run (results.json,
layers.json, grid.pt); the report (quality.md, plots, intervals) is
:func:`dvdquant.eval.report.finish`.

Methods are keys of :data:`METHODS`; bit-widths keys of :data:`BITS`. "DVD-Quant" is
``DVDQuantConfig()`` with only the bit-widths replaced, its ablations ``dataclasses.replace`` of
that, so changes to the defaults flow in; ablations run at W4A4 and W4A6 (the rotation ablation at
W4A8 too, where the rotation may cost the weights more than it gives the activations). W4A6 means δ-GBS (A4/A8 mixed by δ) for DVD-Quant and
its ablations, and static 6-bit activations for the baselines; the "no δ-GBS" ablation exists
only at W4A6, where it is static A4 (what the δ-GBS steps would otherwise run).
"""
from __future__ import annotations

import copy
import datetime
import hashlib
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
from ..data import Factors, generate_clips, make_caption, parse_caption, sample_combinations
from ..errors import DVDQuantError
from ..numerics import video_metrics as vm
from . import store
from .frechet import FrechetBootstrap

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = 528         # multiple of 24 (every factor value equally often); paired PSNR intervals ±0.3 dB at
                              # the largest per-prompt SD measured (3.46 dB: n ≥ (1.96·3.46/0.3)² ≈ 512)
DEFAULT_BATCH = 40            # prompts per sampling batch (80 clips with CFG, 41k tokens per Λ_t)
RUN_PRIORITY = ("W4A4", "W4A6", "W4A8", "W8A8")   # execution order (table order is as requested)
PROMPT_SEED = 0               # construction of the prompt set (fixed, independent of `seed`)
CALIBRATION_PROMPTS = 8       # SmoothQuant / ViDiT-Q calibration captions (seed 1: not the eval set)
CALIBRATION_SEED = 1
REAL_SEED = 424242            # real generator clips for the Fréchet distance
REAL_PER_PROMPT = 4           # real clips per evaluated combination
GRID_PROMPTS = 2              # clips shown in the frame grid
FD_BOOTSTRAP = 1000           # prompt resamples for the Fréchet distance's interval
FD_BOOTSTRAP_SEED = 20261206  # fixed: every call of a split run resamples the same prompts


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


LOW_BITS = ("W4A6", "W4A4")   # where rotation variants differ (static A8 does not rotate by default)
W4_BITS = ("W4A8",) + LOW_BITS


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
               lambda b: dvdquant_config(b, bgr=None), only_bits=W4_BITS, ablates="BGR"),
    MethodSpec("dvdquant-no-rotation", "DVD-Quant − rotation", "ablation",
               lambda b: dvdquant_config(b, rotation=False), only_bits=LOW_BITS, ablates="rotation"),
    MethodSpec("dvdquant-no-autoscale", "DVD-Quant − auto-scale", "ablation",
               lambda b: dvdquant_config(b, auto_scale="none"), only_bits=W4_BITS, ablates="auto-scaling"),
    MethodSpec("dvdquant-no-gbs", "DVD-Quant − δ-GBS (static A4)", "ablation", _no_gbs,
               only_bits=("W4A6",), ablates="δ-GBS"),
    MethodSpec("dvdquant-static-a6", "DVD-Quant, static A6", "variant",            # the baselines' W4A6
               lambda b: replace(dvdquant_config(b), gbs=None, a_bits=b.a_bits), only_bits=("W4A6",)),
    MethodSpec("dvdquant-no-qattn", "DVD-Quant − 8-bit attention", "ablation",
               lambda b: dvdquant_config(b, attention="none"), only_bits=("W4A8", "W4A4"),
               ablates="8-bit attention"),
    MethodSpec("dvdquant-dynsmooth", "DVD-Quant + dynamic smoothing", "variant",
               lambda b: dvdquant_config(b, smoothing="dynamic"), only_bits=W4_BITS),
    MethodSpec("dvdquant-kernel", "DVD-Quant, kernel form (per-token scales, 128-blocks)", "variant",
               lambda b: dvdquant_config(b, auto_scale="none", rotation_block=128), only_bits=W4_BITS),
    MethodSpec("dvdquant-dynsmooth-kernel", "DVD-Quant + dynamic smoothing, kernel form", "variant",
               lambda b: dvdquant_config(b, smoothing="dynamic", auto_scale="none", rotation_block=128),
               only_bits=W4_BITS),
    MethodSpec("dvdquant-rotated", "DVD-Quant + rotation at A8", "variant",      # "auto" does not rotate at A8
               lambda b: dvdquant_config(b, rotation=True), only_bits=("W4A8",)),
    MethodSpec("dvdquant-centered", "DVD-Quant + exact block mean", "variant",
               lambda b: dvdquant_config(b, mean_channel="exact", rotation=True), only_bits=W4_BITS),
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
    runs = [(m, b) for b in bkeys for m in mkeys if METHODS[m].only_bits is None or b in METHODS[m].only_bits]
    if methods not in (None, "all", ["all"]):                    # a method named explicitly must run somewhere
        idle = [m for m in mkeys if not any(r[0] == m for r in runs)]
        if idle:
            raise ValueError(f"{', '.join(idle)}: not defined at {', '.join(bkeys)} (only at "
                             f"{'; '.join(f'{m} ' + ', '.join(METHODS[m].only_bits) for m in idle)})")
    return runs


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


# ----------------------------------------------------------------------------- metrics
def _mean(t: torch.Tensor) -> float:
    return float(t.double().mean())


def compare(fp: Samples, q: Samples, factors: list[Factors], classifier, fd: FrechetBootstrap,
            fp_correct: Optional[dict] = None) -> dict:
    """Clip metrics of ``q`` against the FP samples: {"metrics": means, "per_clip", "fd_bootstrap"}."""
    from .classifier import adherence_per_clip
    clip = {
        "psnr_db": vm.psnr(fp.videos, q.videos),
        "ssim": vm.ssim(fp.videos, q.videos),
        "rel_l2": vm.relative_l2(fp.latents, q.latents),
        "flicker_vs_fp": vm.flicker_vs(fp.videos, q.videos),
        "frame_consistency": vm.frame_consistency(q.videos),
    }
    correct = adherence_per_clip(q.videos, factors, classifier)
    adh = {k: 100.0 * _mean(v) for k, v in correct.items()}
    feats = classifier_features(classifier, q.videos)
    metrics = {k: _mean(v) for k, v in clip.items()}
    metrics.update(psnr_db_min=float(clip["psnr_db"].min()), adherence=adh, fd=fd.point(feats),
                   generation_seconds=q.seconds)
    if fp_correct is not None:
        metrics["adherence_drop"] = {k: 100.0 * (sum(fp_correct[k]) / len(fp_correct[k])) - adh[k] for k in adh}
    per_clip = {k: v.double().tolist() for k, v in clip.items()}
    per_clip["correct"] = {k: v.int().tolist() for k, v in correct.items()}
    return {"metrics": metrics, "per_clip": per_clip, "fd_bootstrap": fd.replicates(feats)}


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
def _one_run(model, mkey: str, bkey: str, captions, factors, noise, fp: Samples, fp_correct: dict, classifier,
             fd: FrechetBootstrap, fp_weights: Optional[dict], gen: dict):
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
    t0 = time.perf_counter()
    cmp = compare(fp, q, factors, classifier, fd, fp_correct)
    compare_seconds = time.perf_counter() - t0
    gbs = _gbs_summary(q, qcfg)
    row = {
        "method": mkey, "label": spec.label, "family": spec.family, "bits": bkey, "ablates": spec.ablates,
        "config": config_to_dict(qcfg), **cmp,
        "avg_act_bits": gbs["avg_act_bits"] if gbs else float(qcfg.a_bits),
        "cost": {"quantize_seconds": report.seconds, "calibration_passes": report.calibration_passes,
                 "metrics_seconds": compare_seconds,
                 "layers": len(report.layers), "mean_w_err": report.mean_w_err,
                 "mean_w_err_minmax": report.mean_w_err_minmax,
                 "calibrated_steps": report.layers[0].extras.get("calibrated_steps") if report.layers else None},
        "gbs": gbs,
    }
    lr = recorder.result() if recorder is not None else None
    if lr is not None:
        row["layer_sqnr_mean_db"] = lr["mean_db"]
    return row, q.videos, lr


def _references(model, classifier, factors, captions, noise, gen: dict, fd_bootstrap: int):
    """FP samples, the FP block of results.json, the FD bootstrap and the real-clip statistics."""
    fp = _generate_all(model, captions, noise, **gen)
    fp2 = _generate_all(model, captions, noise, **gen)
    real = generate_clips(len(factors) * REAL_PER_PROMPT, seed=REAL_SEED, factors=factors * REAL_PER_PROMPT)
    fd = FrechetBootstrap(classifier_features(classifier, real.videos), len(factors), fd_bootstrap,
                          FD_BOOTSTRAP_SEED, device=gen["device"])
    floor = generate_clips(len(factors), seed=REAL_SEED + 1, factors=factors)
    from .classifier import adherence
    floor_adh = adherence(floor.videos, factors, classifier)
    real_stats = {"real_clips": len(real),
                  "fd_real_floor": fd.point(classifier_features(classifier, floor.videos)),
                  "real_clip_adherence": {k: 100.0 * v for k, v in floor_adh.items()}}
    ref = compare(fp, fp, factors, classifier, fd)
    row = compare(fp, fp2, factors, classifier, fd, ref["per_clip"]["correct"])
    row["metrics"]["generation_seconds"] = fp.seconds
    exact = bool(torch.equal(fp.videos, fp2.videos) and torch.equal(fp.latents, fp2.latents))
    if not exact:
        log.warning("FP rerun differs from the FP reference (non-deterministic kernels on %s)", gen["device"])
    fp_block = {"label": "FP (fp32)", "bits": "FP", "metrics": row["metrics"], "per_clip": row["per_clip"],
                "fd_bootstrap": row["fd_bootstrap"], "rerun_exact": exact,
                "adherence": ref["metrics"]["adherence"], "fd": ref["metrics"]["fd"],
                "frame_consistency": ref["metrics"]["frame_consistency"],
                "reference": {"correct": ref["per_clip"]["correct"],
                              "frame_consistency": ref["per_clip"]["frame_consistency"],
                              "fd_bootstrap": ref["fd_bootstrap"]}}
    sha = hashlib.sha256(fp.videos.float().contiguous().numpy().tobytes()).hexdigest()[:16]
    return fp, fp_block, fd, dict(real_stats, fp_sha256=sha)


def evaluate(model_spec: str = "embedded", methods: Sequence[str] | str | None = None,
             bits: Sequence[str] | str | None = None, prompts: int | Sequence[str] | None = None,
             steps: int = 20, seed: int = 0, device=None, out_dir=None, *, layers: bool = False,
             guidance: float = 4.0, batch_size: int = DEFAULT_BATCH, fd_bootstrap: int = FD_BOOTSTRAP,
             time_limit: Optional[float] = None, progress: bool = True) -> dict:
    """Evaluate methods × bit-widths against the FP model; returns (and optionally writes) the raw run.

    ``methods``/``bits``: keys of :data:`METHODS` / :data:`BITS` (list or comma string; None = all).
    ``prompts``: an int N (fixed construction, default :data:`DEFAULT_PROMPTS`) or a list of captions.
    ``fd_bootstrap``: prompt resamples for the Fréchet distance's interval (seeded, fixed).
    ``time_limit``: seconds; a row is not started when the time so far plus the longest row yet
    would pass it (the rows left are listed in ``meta["incomplete"]``; run them in another call
    and merge).
    ``out_dir``: if given, receives results.json (results.partial.json after each row while
    running), layers.json (``layers=True``) and grid.pt; :func:`dvdquant.eval.report.finish`
    turns one or several such folders into the report.
    """
    runs = plan_runs(methods, bits)
    if fd_bootstrap < 0:
        raise ValueError(f"fd_bootstrap must be >= 0, got {fd_bootstrap}")
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
    fp, fp_block, fd, ref_meta = _references(model, classifier, factors, captions, noise, gen, fd_bootstrap)

    grid = {"FP": fp.videos[:GRID_PROMPTS]}
    rows, layer_out, failed = [], {}, []
    fp_weights = None
    if layers:
        from .layers import fp_linear_weights
        fp_weights = fp_linear_weights(model.transformer)
    order = sorted(runs, key=lambda r: RUN_PRIORITY.index(r[1]) if r[1] in RUN_PRIORITY else len(RUN_PRIORITY))
    out = None
    if out_dir is not None:
        from pathlib import Path
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)

    def assemble(complete: bool) -> dict:
        import diffusers
        res = {
            "meta": {
                "model": model_spec, "model_description": model_desc, "device": _device_name(dev),
                "torch": torch.__version__, "diffusers": diffusers.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "prompts": captions, "n_prompts": len(captions), "prompt_seed": PROMPT_SEED,
                "steps": steps, "seed": seed, "guidance": guidance, "batch_size": batch_size,
                "methods": _parse_list(methods, METHODS, "method"), "bits": _parse_list(bits, BITS, "bit-width"),
                "layers": layers, "real_seed": REAL_SEED, **ref_meta,
                "fd_bootstrap": {"reps": fd_bootstrap, "seed": FD_BOOTSTRAP_SEED},
                "calibration": {"prompts": CALIBRATION_PROMPTS, "prompt_seed": CALIBRATION_SEED, "steps": steps},
                "wall_seconds": time.perf_counter() - t_start,
            },
            "fp": fp_block,
            "runs": sorted(rows, key=lambda r: runs.index((r["method"], r["bits"]))),
            "failed": failed,
        }
        res["meta"]["planned"] = [list(r) for r in runs]
        if not complete:
            done = {(r["method"], r["bits"]) for r in rows} | {(f["method"], f["bits"]) for f in failed}
            left = [f"{m} {b}" for m, b in order if (m, b) not in done]
            res["meta"]["incomplete"] = f"{len(done)} of {len(runs)} runs done; not run: {', '.join(left)}"
        return res

    bar = tqdm(order, desc="eval", disable=not progress)
    longest, stopped = 0.0, False
    for mkey, bkey in bar:
        if time_limit is not None and time.perf_counter() - t_start + longest > time_limit:
            log.warning("time limit of %.0f s: %s %s and the rows after it are not run", time_limit, mkey, bkey)
            stopped = True
            break
        bar.set_postfix_str(f"{METHODS[mkey].label} {bkey}")
        t_row = time.perf_counter()
        try:
            row, videos, lr = _one_run(model, mkey, bkey, captions, factors, noise, fp,
                                       fp_block["reference"]["correct"], classifier, fd, fp_weights, gen)
        except (DVDQuantError, RuntimeError, ValueError) as e:      # keep the other runs' results
            log.error("%s %s failed: %s", mkey, bkey, e)
            failed.append({"method": mkey, "bits": bkey, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append(row)
        if lr is not None:
            layer_out[f"{mkey}@{bkey}"] = lr
        if bkey == "W4A4":
            grid[row["label"]] = videos[:GRID_PROMPTS]
        if out is not None:                           # what survives a run cut short
            store.dump(assemble(complete=False), out / store.PARTIAL)
            if layers:
                store.dump(layer_out, out / store.LAYERS, 3)
            store.save_grid(grid, out / store.GRID)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        longest = max(longest, time.perf_counter() - t_row)

    results = assemble(complete=not stopped)
    if out is not None:
        store.dump(results, out / store.RESULTS)
        if layers:
            store.dump(layer_out, out / store.LAYERS, 3)
        store.save_grid(grid, out / store.GRID)
        (out / store.PARTIAL).unlink(missing_ok=True)
    results["layers"] = layer_out if layers else None
    return results
