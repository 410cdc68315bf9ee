"""The ``dvdquant`` command line: thin wrappers over the library.

    dvdquant demo                                     # embedded model, FP vs W4A4, videos + report
    dvdquant quantize --model embedded --method dvdquant --w-bits 4 --a-bits 4 --out q/
    dvdquant generate --model q/quantized.safetensors --prompt "a red circle moving left on a dark background"
    dvdquant quantize --model Wan2.1-T2V-14B-Diffusers --delta 0.05 --out q14b/      # a diffusers pipeline folder
    dvdquant generate --pipeline Wan2.1-T2V-14B-Diffusers --checkpoint q14b/ --prompt "a cat surfing" --out cat.mp4
    dvdquant eval --layers --out eval_out             # methods × bits vs FP → quality.md, plots, JSON

Errors caused by input (bad bits, unknown words, broken checkpoints, unwritable outputs) print one
line and exit 2, before any work where the input can be checked first; Ctrl-C prints one line and
exits 130. Outputs are written atomically; a folder a failed command created is removed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import get_args

from .errors import DVDQuantError

log = logging.getLogger("dvdquant")



def _method_names() -> list[str]:
    """``--method`` choices: the registered quantization methods (algorithms/registry.py)."""
    from .algorithms import registered_methods
    return sorted(registered_methods())


def _fields(cls) -> set:
    import dataclasses
    return {f.name for f in dataclasses.fields(cls)}


def _config_from_args(args):
    """The method's config class from the registry, with the options its fields take: ``--delta`` sets
    ``gbs``; ``--attention``, ``--rotation``, ``--rotation-block``, ``--auto-scale``, ``--smoothing``,
    ``--smooth-alpha``, ``--smooth-master-bits`` set the fields of those names where the config has them
    (an explicit value for a method without the field is an error)."""
    from .algorithms import method_by_name, registered_methods
    from .config import GBSConfig
    cls = method_by_name(args.method).config_cls
    kw = dict(w_bits=args.w_bits, a_bits=args.a_bits, group_size=args.group_size,
              quantize_modulation=args.quantize_modulation)
    if "gbs" in _fields(cls) and args.delta is not None:
        kw["gbs"] = GBSConfig(delta=args.delta)
    rotation = {"auto": "auto", "on": True, "off": False}.get(getattr(args, "rotation", None))
    given = {"attention": args.attention, "rotation": rotation, "rotation_block": getattr(args, "rotation_block", None),
             "auto_scale": getattr(args, "auto_scale", None), "smoothing": getattr(args, "smoothing", None),
             "smooth_alpha": getattr(args, "smooth_alpha", None),
             "smooth_master_bits": getattr(args, "smooth_master_bits", None)}
    for field, value in given.items():
        if field in _fields(cls):
            if value is not None:
                kw[field] = value
        elif value not in (None, "int8" if field == "attention" else None):
            takers = " / ".join(n for n, m in registered_methods().items() if field in _fields(m.config_cls))
            raise DVDQuantError(f"--{field.replace('_', '-')} applies to --method {takers} only "
                                f"(got --method {args.method})")
    return cls(**kw)


def _set_backend(transformer, args) -> None:
    """The execution options of ``generate`` on a quantized transformer (no-op on an FP one): the flags are
    :class:`~dvdquant.kernels.ExecutionConfig`'s fields by name; --backend defaults to the kernels ("auto")
    on a CUDA device and to the simulated reference elsewhere."""
    import dataclasses

    from . import api
    from .kernels import ExecutionConfig
    if api.get_state(transformer) is None:
        return
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExecutionConfig)}
    kw["backend"] = args.backend or ("auto" if str(args.device).startswith("cuda") else "simulated")
    api.set_backend(transformer, **kw)



POLICY_FLAGS = ("skip_threshold", "bits_threshold", "warmup_steps", "final_steps", "max_skips", "budget", "schedule")


def _policy_from_args(args, transformer):
    """The step policy the ``generate`` flags ask for (the fields of StepPolicyConfig by the same names, over the
    checkpoint's own policy or the defaults), or None when no flag is given."""
    from dataclasses import replace
    from . import api
    from .config import StepPolicyConfig
    given = {k: getattr(args, k) for k in POLICY_FLAGS if getattr(args, k) is not None}
    if not given:
        return None
    if api.get_state(transformer) is None:
        raise DVDQuantError(f"--{next(iter(given)).replace('_', '-')} needs a quantized model (a checkpoint, or "
                            "--pipeline with a --method other than fp)")
    base = getattr(getattr(transformer, api.CONFIG_ATTR, None), "policy", None) or StepPolicyConfig()
    if "schedule" in given and "budget" not in given:
        given["budget"] = None                  # a fixed schedule replaces the checkpoint's budget
    return replace(base, **given)


def _apply_policy(transformers, args) -> None:
    """Give the quantized ``transformers`` the step policy of the ``generate`` flags (no flags: unchanged)."""
    from . import api
    policies = [_policy_from_args(args, t) for t in transformers]
    if policies and policies[0] is not None:
        for t, p in zip(transformers, policies):
            api.set_step_policy(t, p)
        if len(transformers) > 1:
            api.share_step_controller(*transformers)


def _add_policy_args(g) -> None:
    p = g.add_argument_group("step policy (a quantized model): per step skip the tail blocks, run A4 or A8")
    p.add_argument("--skip-threshold", type=float, default=None,
                   help="accumulated block-0 residual change below which a step is skipped (default 0.05)")
    p.add_argument("--bits-threshold", type=float, default=None,
                   help="at or above it the step runs at 8 bits, below at 4 (default 0.15)")
    p.add_argument("--warmup-steps", type=int, default=None, help="first steps run in full at 8 bits (default 2)")
    p.add_argument("--final-steps", type=int, default=None, help="last steps never skipped (default 1)")
    p.add_argument("--max-skips", type=int, default=None, help="consecutive skipped steps at most (default 2)")
    p.add_argument("--budget", type=float, default=None,
                   help="mean step cost relative to an 8-bit step, in (0, 1] (1 / the target speed-up); the "
                        "thresholds then adapt during the run")
    p.add_argument("--schedule", default=None,
                   help="a fixed action per step instead of the indicator: S (skip), 4, 6 or 8 (bits), e.g. 88S4S48; "
                        "steps past its end run at 8 bits")

def cmd_demo(args) -> int:
    from .config import DVDQuantConfig
    from .pipeline.demo import DEMO_PROMPTS, format_report, run_demo
    result = run_demo(args.out, steps=args.steps, seed=args.seed, prompts=tuple(args.prompt or DEMO_PROMPTS),
                      config=DVDQuantConfig(w_bits=4, a_bits=4, attention=args.attention),
                      progress=not args.quiet)
    print(format_report(result), end="")
    print(f"wrote {args.out}/side_by_side.mp4, side_by_side.gif, frames.png, report.txt, report.json")
    return 0


CALIBRATION_PROMPTS = ("a red circle moving left on a dark background", "a blue square growing on a striped background")


def _calibration(base: str, cfg):
    """``quantize``'s calibration for methods that need statistics: 8 steps of the embedded model on two
    captions (None for data-free methods, and for other models: the library then raises)."""
    from .algorithms import get_method
    from .pipeline.models_io import EMBEDDED
    if base != EMBEDDED or get_method(cfg).data_free:
        return None
    from .models.embedded import load_embedded
    from .pipeline.generate import calibration_generation
    return calibration_generation(load_embedded(), CALIBRATION_PROMPTS, steps=8)


def cmd_quantize(args) -> int:
    from .fileio import check_output_dir, output_dir
    from .pipeline.diffusers_pipelines import is_pipeline_folder
    pipeline = args.model != "embedded" and is_pipeline_folder(args.model)
    if pipeline and args.nproc != 1:
        raise DVDQuantError("--nproc applies to a transformer folder or 'embedded', not to a pipeline folder "
                            f"({args.model}): pass its transformer/ subfolder")
    cfg = _config_from_args(args)
    with output_dir(check_output_dir(args.out)) as out:
        return _quantize_pipeline(args, cfg, out) if pipeline else _quantize(args, cfg, out)


def _quantize(args, cfg, out: Path) -> int:
    from . import api, serialization
    from .fileio import atomic_write_text
    from .pipeline.models_io import CHECKPOINT_NAME, load_transformer
    if args.nproc != 1:                     # layers split over N processes; rank 0 writes the checkpoint
        from .distributed import quantize_multiprocess
        report, ckpt = quantize_multiprocess(args.model, cfg, out, nproc=args.nproc, device=args.device,
                                             progress=not args.quiet)
        if report is None:                  # a rank other than 0 of a torchrun launch
            return 0
    else:
        transformer, base = load_transformer(args.model, device=args.device)
        calibration = _calibration(base, cfg)
        report = api.quantize_(transformer, cfg, calibration=calibration, progress=not args.quiet)
        ckpt = serialization.save(transformer, out / CHECKPOINT_NAME, extra={"base_model": base})
    atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2, default=str))
    print(f"{report.method}: {len(report.layers)} layers in {report.seconds:.2f} s, mean weight rel. error "
          f"{report.mean_w_err:.4f} (MinMax {report.mean_w_err_minmax:.4f}) → {ckpt}")
    return 0


def _quantize_pipeline(args, cfg, out: Path) -> int:
    """``quantize --model <pipeline folder>``: every transformer of the pipeline (Wan 2.2: both)."""
    from .fileio import atomic_write_text
    from .pipeline.diffusers_pipelines import quantize_pipeline_folder, resolve_dtype
    rows = quantize_pipeline_folder(args.model, cfg, out, device=args.device, dtype=resolve_dtype("auto", args.device),
                                    progress=not args.quiet)
    reports = {name: report.to_dict() for name, report, _ in rows}
    atomic_write_text(out / "report.json", json.dumps(reports[rows[0][0]] if len(rows) == 1 else reports, indent=2,
                                                      default=str))
    for name, report, ckpt in rows:
        print(f"{name}: {report.method}: {len(report.layers)} layers in {report.seconds:.2f} s, mean weight rel. "
              f"error {report.mean_w_err:.4f} (MinMax {report.mean_w_err_minmax:.4f}) → {ckpt}")
    return 0


def cmd_generate_pipeline(args) -> int:
    """``generate --pipeline DIR``: the stock diffusers pipeline with quantized transformer(s)."""
    from .fileio import check_output_file
    from .pipeline import diffusers_pipelines as dp
    from .pipeline.checks import check_prompts, check_steps
    from .pipeline.video_io import VIDEO_SUFFIXES, save_video
    check_prompts(args.prompt)
    if args.steps is not None:
        check_steps(args.steps)
    check_output_file(args.out, VIDEO_SUFFIXES)
    checkpoints = [c for c in (args.checkpoint, args.checkpoint_2) if c]
    if args.model != "embedded":
        raise DVDQuantError("give --pipeline DIR or --model, not both")
    quant_opts = [f"--{k.replace('_', '-')}" for k in ("method", "w_bits", "a_bits", "group_size", "delta")
                  if getattr(args, k) is not None]
    if checkpoints and quant_opts:
        raise DVDQuantError(f"give --checkpoint (a saved quantized transformer) or {quant_opts[0]} (quantize now), "
                            "not both")
    args.w_bits = 4 if args.w_bits is None else args.w_bits
    args.a_bits = 4 if args.a_bits is None else args.a_bits
    pipe = dp.load_pipeline(args.pipeline, device=args.device, dtype=dp.resolve_dtype(args.dtype, args.device),
                            progress=not args.quiet)
    if checkpoints:
        dp.load_checkpoints(pipe, checkpoints, device=args.device)
    elif args.method != "fp":
        args.method = args.method or "dvdquant"
        dp.quantize_pipeline(pipe, _config_from_args(args), progress=not args.quiet)
    if args.delta is not None and any(getattr(args, k) is not None for k in POLICY_FLAGS):
        raise DVDQuantError("give --delta (δ-GBS) or the step policy flags, not both")
    _apply_policy([getattr(pipe, n) for n in dp.transformer_names(pipe)], args)
    for name in dp.transformer_names(pipe):
        _set_backend(getattr(pipe, name), args)
    extra = {"true_cfg_scale": args.true_cfg_scale} if args.true_cfg_scale is not None else {}
    res = dp.run_pipeline(pipe, args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                          frames=args.frames, height=args.height, width=args.width, guidance=args.guidance,
                          seed=args.seed, max_sequence_length=args.max_sequence_length, progress=not args.quiet,
                          **extra)
    path = save_video(res.frames, args.out, fps=args.fps or dp.default_fps(pipe), scale=1)
    if res.mean_bits is None:
        print(f"{type(pipe).__name__} unquantized: {len(res.frames)} clip(s) in {res.seconds:.1f} s")
    else:
        print(f"schedule ({len(res.schedule)} steps): {dp.format_schedule(res.schedule)}; "
              f"mean activation bits {res.mean_bits:.2f}; {res.seconds:.1f} s")
    print(f"wrote {path}")
    return 0


def _check_generate_args(args) -> None:
    """Defaults of the embedded-model ``generate``; pipeline-only options without --pipeline are errors."""
    only = [f"--{k.replace('_', '-')}" for k in ("checkpoint", "checkpoint_2", "method", "w_bits", "a_bits",
                                                 "group_size", "delta", "negative_prompt", "frames", "height",
                                                 "width", "true_cfg_scale", "max_sequence_length")
            if getattr(args, k) is not None]
    if only:
        raise DVDQuantError(f"{', '.join(only)} appl{'ies' if len(only) == 1 else 'y'} with --pipeline DIR only")
    args.steps = 20 if args.steps is None else args.steps
    args.guidance = 4.0 if args.guidance is None else args.guidance


def cmd_generate(args) -> int:
    if args.pipeline:
        return cmd_generate_pipeline(args)
    _check_generate_args(args)
    from .fileio import check_output_file
    from .pipeline.checks import check_prompts, check_steps
    from .pipeline.generate import generate
    from .pipeline.models_io import load_generation_model
    from .pipeline.video_io import VIDEO_SUFFIXES, save_video
    check_prompts(args.prompt)
    check_steps(args.steps)
    check_output_file(args.out, VIDEO_SUFFIXES)
    model = load_generation_model(args.model, device=args.device)
    _apply_policy([model.transformer], args)
    _set_backend(model.transformer, args)
    res = generate(model, args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                   progress=not args.quiet, progress_desc=_model_label(model.transformer))
    path = save_video(res.videos if len(args.prompt) == 1 else _tile(res.videos), args.out)
    _print_policy(model.transformer)
    print(f"wrote {path}")
    return 0


def _print_policy(transformer) -> None:
    from . import api
    from .nn.step_hooks import schedule_string
    ctrl = api.step_controller(transformer)
    policy = getattr(ctrl, "policy", None)
    if policy is not None and hasattr(policy, "mean_cost"):
        budget = policy.config.budget
        print(f"step policy: {schedule_string(ctrl.schedule)}; mean step cost {policy.mean_cost():.3f} of an "
              f"8-bit step" + ("" if budget is None else f" (budget {budget})"))


def cmd_eval(args) -> int:
    from pathlib import Path
    from .eval.report import DOCS_SCRIPT, IMG_FRAMES, finish, render_markdown
    if args.from_results:
        out = args.out or (args.from_results[0] if len(args.from_results) == 1 else None)
        results = finish(args.from_results, out)
    else:
        from .eval.quality import evaluate
        out = args.out or "eval_out"
        evaluate(args.model, methods=args.methods, bits=args.bits, prompts=args.prompts, steps=args.steps,
                 seed=args.seed, device=args.device, out_dir=out, layers=args.layers, guidance=args.guidance,
                 batch_size=args.batch_size, fd_bootstrap=args.fd_bootstrap,
                 time_limit=None if args.time_limit is None else 60.0 * args.time_limit, progress=not args.quiet)
        results = finish([out])
    print(render_markdown(results, img_prefix="", frames=(Path(out) / IMG_FRAMES).exists()), end="")
    print(f"wrote {out}/results.json, quality.md and plots (into the repository's docs/: python {DOCS_SCRIPT} {out})")
    return 0


def _model_label(transformer) -> str:
    """'FP', or the method and bits of a quantized transformer (its progress bar's label)."""
    from . import api
    cfg = getattr(transformer, api.CONFIG_ATTR, None)
    if cfg is None:
        return "FP"
    name = type(cfg).__name__.removesuffix("Config").replace("DVDQuant", "DVD-Quant")
    return f"{name} W{cfg.w_bits}A{cfg.a_bits}"


def _tile(videos):
    import torch
    return torch.cat(list(videos), dim=2).unsqueeze(0)  # clips side by side along the width


def _add_pipeline_args(g) -> None:
    """``generate --pipeline`` options: the pipeline, its quantization, the clip."""
    p = g.add_argument_group("diffusers pipeline (Wan 2.1/2.2, HunyuanVideo, CogVideoX, LTX-Video, Mochi)")
    p.add_argument("--pipeline", metavar="DIR", help="a diffusers pipeline folder (model_index.json)")
    p.add_argument("--checkpoint", metavar="PATH", help="quantized transformer (.safetensors), or the --out folder "
                   "of `dvdquant quantize --model DIR` (Wan 2.2: transformer.safetensors + transformer_2.safetensors)")
    p.add_argument("--checkpoint-2", metavar="PATH", help="Wan 2.2: the low-noise expert's (transformer_2) checkpoint")
    p.add_argument("--method", choices=_method_names() + ["fp"], default=None,
                   help="no --checkpoint: quantize now with this method (default: dvdquant), or 'fp' for none")
    p.add_argument("--w-bits", type=int, default=None, help="weight bits, 2..8 (default: 4)")
    p.add_argument("--a-bits", type=int, default=None, help="activation bits: 4, 6, 8 or 16 (default: 4)")
    p.add_argument("--group-size", type=int, default=None, help="weight group size (default: per channel)")
    p.add_argument("--delta", type=float, default=None, help="δ-GBS threshold (dvdquant; default: fixed bits)")
    p.add_argument("--quantize-modulation", action="store_true", help="also quantize AdaLN modulation, weight-only")
    p.add_argument("--attention", choices=["int8", "fp8", "none"], default="int8",
                   help="8-bit attention with --method dvdquant (default: %(default)s)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--frames", type=int, default=None, help="frames (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the pipeline's)")
    p.add_argument("--true-cfg-scale", type=float, default=None,
                   help="HunyuanVideo: classifier-free guidance scale (with --negative-prompt)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="text tokens (default: the transformer's limit or the pipeline's default)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights dtype (default auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--fps", type=int, default=None, help="frames per second of the video (default: the family's)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dvdquant", description="Data-free W4A4/W4A8 quantization of video "
                                "diffusion transformers (DVD-Quant: BGR, ARQ, δ-GBS).")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="quantize the embedded model W4A4 and write FP-vs-quantized videos + report")
    d.add_argument("--out", default="dvdquant_demo", help="output folder (default: %(default)s)")
    d.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--attention", choices=["int8", "fp8", "none"], default="int8",
                   help="8-bit attention of the quantized model, or none (default: %(default)s)")
    d.add_argument("--prompt", action="append", help="caption to generate (repeatable; default: 4 built-in "
                   "prompts covering shapes, colours, motions and backgrounds)")
    d.set_defaults(func=cmd_demo)

    q = sub.add_parser("quantize", help="quantize a model and write a checkpoint")
    q.add_argument("--model", default="embedded", help="'embedded', a diffusers transformer directory, or a "
                   "diffusers pipeline folder (its transformer; Wan 2.2: both, as transformer.safetensors and "
                   "transformer_2.safetensors)")
    q.add_argument("--method", choices=_method_names(), default="dvdquant")
    q.add_argument("--w-bits", type=int, default=4, help="weight bits, 2..8 (default: %(default)s)")
    q.add_argument("--a-bits", type=int, default=4, help="activation bits: 4, 6, 8 or 16 (default: %(default)s)")
    q.add_argument("--group-size", type=int, default=None, help="weight group size (default: per channel)")
    q.add_argument("--delta", type=float, default=None, help="enable δ-GBS with this threshold (dvdquant only)")
    q.add_argument("--quantize-modulation", action="store_true",
                   help="also quantize AdaLN modulation layers, weight-only (W4A16): HunyuanVideo weights "
                        "0.47x -> 0.27x bf16")
    q.add_argument("--attention", choices=["int8", "fp8", "none"], default="int8",
                   help="8-bit attention installed with DVD-Quant: INT8 Q·Kᵀ + FP8 P·V, FP8 both, or none "
                   "(keep SDPA) (default: %(default)s)")
    q.add_argument("--rotation", choices=["auto", "on", "off"], default=None,
                   help="ARQ Hadamard rotation (default: auto, on when activations go below 8 bits: A4, A6, "
                   "--delta; off for static A8)")
    q.add_argument("--rotation-block", type=int, default=None,
                   help="Hadamard rotation in blocks of this order (default: one full-size rotation); the fused "
                   "GPU activation kernel takes powers of two 16-128, other orders rotate in torch first (slower)")
    q.add_argument("--auto-scale", choices=["per_channel", "per_block", "none"], default=None,
                   help="ARQ run-time scaling (default: per_channel, which the GPU kernels do not take: its layers "
                   "run the emulated path; none / per_block run on the kernels)")
    from .config import Smoothing
    q.add_argument("--smoothing", choices=list(get_args(Smoothing)), default=None,
                   help="DVD-Quant run-time smoothing before the rotation: dynamic re-quantizes each layer's weight "
                   "per sample from a master copy (more memory; on the GPU kernels with --auto-scale none and a "
                   "rotation block of 16-128, else the simulated path) (default: none)")
    q.add_argument("--smooth-alpha", type=float, default=None,
                   help="dynamic smoothing's migration strength α in [0, 1] (default: 0.5)")
    q.add_argument("--smooth-master-bits", type=int, choices=[8, 16], default=None,
                   help="dynamic smoothing's master weight: int8 codes (8) or fp32 (16) (default: 8)")
    q.add_argument("--out", required=True, help="output folder for quantized.safetensors and report.json")
    q.add_argument("--device", default="cpu")
    q.add_argument("--nproc", type=int, default=1, help="quantize with N processes, layers split between them "
                   "(gloo on cpu; one GPU each with --device cuda; also under torchrun) (default: %(default)s)")
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", help="generate clips with the embedded model or a quantized checkpoint of it, "
                       "or with a diffusers video pipeline (--pipeline) and a quantized transformer")
    g.add_argument("--model", default="embedded", help="'embedded' or a quantized checkpoint (.safetensors) "
                   "of the embedded model")
    g.add_argument("--prompt", action="append", required=True,
                   help="caption, e.g. 'a red circle moving left on a dark background' (repeatable)")
    g.add_argument("--out", required=True, help="output .mp4 or .gif")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: 20; --pipeline: the "
                   "pipeline's own default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: 4.0; --pipeline: the "
                   "pipeline's own default; HunyuanVideo: its embedded guidance)")
    g.add_argument("--backend", default=None, choices=["simulated", "emulated", "fp8", "auto"],
                   help="execution path of quantized layers (default: auto — the FP8/INT8 kernels where they "
                        "apply — on a CUDA --device, else simulated, the exact fp32 reference)")
    on_off = argparse.BooleanOptionalAction
    g.add_argument("--fast-accum", action=on_off, default=False,
                   help="fp8 path: cuBLAS fast FP8 accumulation (faster, not the exact integer GEMM; default: off)")
    g.add_argument("--exact-rotation", action=on_off, default=True,
                   help="fp8 path: the exact rotation's snap (--no-exact-rotation: cheaper activation kernel, codes "
                        "can move one step; default: on)")
    g.add_argument("--int8-gemm", action=on_off, default=True,
                   help="fp8 path: int-grid steps on the exact INT8 GEMM (--no-int8-gemm: on the FP8 GEMM, A4 codes as "
                        "e4m3, A6/A8 as FP8 e4m3 values, a different grid; default: on)")
    g.add_argument("--fuse-projections", action=on_off, default=True,
                   help="sibling projections (Wan's Q/K/V) as one fused GEMM (--no-fuse-projections: separate layers; "
                        "default: on)")
    from .kernels.execution import ATTENTION_PATHS
    g.add_argument("--attention-path", choices=ATTENTION_PATHS, default="auto",
                   help="where installed 8-bit attention runs: auto (the Triton kernel on sm89+, the emulated "
                        "reference on CPU), triton or emulated (default: %(default)s)")
    g.add_argument("--device", default="cpu")
    _add_policy_args(g)
    _add_pipeline_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="quality of methods × bit-widths vs FP on the embedded model: table, plots, JSON")
    e.add_argument("--model", default="embedded", help="'embedded', 'random' (untrained, development) or a model folder")
    from .eval.quality import METHODS
    e.add_argument("--methods", default="all", help=f"comma list of {', '.join(METHODS)} (default: all)")
    e.add_argument("--bits", default="all", help="comma list of W8A8, W4A8, W4A6, W4A4 (default: all)")
    e.add_argument("--prompts", type=int, default=None, help="number of fixed prompts; a multiple of 24 balances "
                   "every factor (default: 528, enough for ±0.3 dB paired PSNR intervals on the embedded model)")
    e.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="noise seed of clip i is seed + i (default: %(default)s)")
    e.add_argument("--guidance", type=float, default=4.0)
    e.add_argument("--batch-size", type=int, default=40,
                   help="prompts per sampling batch, the same for every method (default: %(default)s)")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto (default: %(default)s)")
    e.add_argument("--layers", action="store_true", help="also per-layer, per-step SQNR of every quantized Linear")
    e.add_argument("--fd-bootstrap", type=int, default=1000, metavar="N",
                   help="seeded prompt resamples for the Fréchet distance's interval (default: %(default)s)")
    e.add_argument("--time-limit", type=float, metavar="MIN",
                   help="start no row that would end past MIN minutes (estimated by the longest row so far); "
                   "the rows left are listed, to run in another call and merge")
    e.add_argument("--out", help="output folder (default: eval_out; with --from-results: its folder if only one)")
    e.add_argument("--from-results", metavar="DIR", nargs="+",
                   help="no evaluation: report finished runs (one DIR, or the parts of a run split by --methods / "
                   "--bits with the same prompts, steps and seed: merged into --out)")
    e.set_defaults(func=cmd_eval)

    for sp in (d, q, g, e):
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dvdquant: interrupted", file=sys.stderr)
        return 130
    except (DVDQuantError, ValueError, OSError) as e:
        if isinstance(e, OSError) and e.strerror:        # e.g. disk full, permissions changed mid-run
            msg = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        else:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"dvdquant: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
