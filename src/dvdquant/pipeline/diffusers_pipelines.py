"""Stock diffusers video pipelines with a dvdquant transformer: load, quantize or load a checkpoint, run.

Supported folders (``model_index.json``): WanPipeline (Wan 2.1; Wan 2.2 with ``transformer_2``),
HunyuanVideoPipeline, CogVideoXPipeline, LTXPipeline, MochiPipeline. The pipeline itself runs
unchanged: ``quantize_`` / ``load`` install dvdquant's step hooks on the transformer, so δ-GBS
chooses each step's activation bits inside the stock ``pipe(...)``; Wan 2.2's two experts share
one step controller (one schedule over the whole denoising loop). :func:`run_pipeline` adds a
per-step progress bar that shows the chosen bits, through ``callback_on_step_end``, and returns
the frames (B, F, H, W, 3) in [0, 1] with the schedule and its mean activation bits.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import api, serialization
from ..nn.state import get_state
from ..nn.step_hooks import SKIP, schedule_string
from ..errors import DVDQuantError
from .models_io import CHECKPOINT_NAME, _from_pretrained, dtype_kwarg

log = logging.getLogger(__name__)

# pipeline class -> its transformer components, in denoising order (Wan 2.2: high-noise expert first)
SUPPORTED = {"WanPipeline": ("transformer", "transformer_2"), "HunyuanVideoPipeline": ("transformer",),
             "CogVideoXPipeline": ("transformer",), "LTXPipeline": ("transformer",),
             "MochiPipeline": ("transformer",)}
FPS = {"WanPipeline": 16, "HunyuanVideoPipeline": 24, "CogVideoXPipeline": 8, "LTXPipeline": 24, "MochiPipeline": 30}
CALIBRATION_PROMPTS = ("a red ball bouncing on the grass", "a white car moving left on a road at night")


def is_pipeline_folder(path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def pipeline_class_name(folder) -> str:
    """The pipeline class named by ``folder/model_index.json``; DVDQuantError if it is not a supported one."""
    folder = Path(folder)
    index = folder / "model_index.json"
    supported = ", ".join(SUPPORTED)
    if not index.is_file():
        what = ("a diffusers model folder (config.json), not a pipeline folder" if (folder / "config.json").is_file()
                else "not a diffusers pipeline folder (no model_index.json)" if folder.is_dir()
                else "does not exist")
        raise DVDQuantError(f"{folder} is {what}; supported pipelines: {supported}")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise DVDQuantError(f"{index} is not valid JSON: {e}") from None
    if name not in SUPPORTED:
        raise DVDQuantError(f"{folder} holds a {name}, which dvdquant does not drive; supported pipelines: {supported}")
    return name


def resolve_dtype(name: str, device) -> Optional[torch.dtype]:
    """``"auto"``: bfloat16 on CUDA, float32 elsewhere; else the named torch dtype."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def default_fps(pipe) -> int:
    return FPS.get(type(pipe).__name__, 16)


def transformer_names(pipe) -> list[str]:
    """The pipeline's transformer attributes that hold a model (Wan 2.2: transformer, transformer_2)."""
    names = SUPPORTED.get(type(pipe).__name__, ("transformer",))
    return [n for n in names if getattr(pipe, n, None) is not None]


@contextlib.contextmanager
def _loading_bars(show: bool):
    """diffusers' and transformers' loading progress bars on or off (their global switches, restored)."""
    import importlib
    mods = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:          # transformers: only pipelines with a text encoder need it
            continue
    was = [m.is_progress_bar_enabled() for m in mods]
    if not show:
        for m in mods:
            m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in zip(mods, was):
            (m.enable_progress_bar if on else m.disable_progress_bar)()


def load_pipeline(folder, device="cpu", dtype: Optional[torch.dtype] = None, progress: bool = True):
    """A stock diffusers pipeline from ``folder``; its transformers are loaded by dvdquant (this also
    works without ``accelerate``, which diffusers needs for Wan's fp32-kept modules)."""
    with _loading_bars(progress):
        return _load_pipeline(folder, device, dtype)


def _load_pipeline(folder, device, dtype):
    import diffusers
    name = pipeline_class_name(folder)
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    preloaded = {}
    for comp in SUPPORTED[name]:
        spec = index.get(comp)
        if not spec or spec[0] is None or spec[1] is None:
            continue
        cls = getattr(diffusers, spec[1], None)
        if cls is None:
            raise DVDQuantError(f"{folder / 'model_index.json'} names {comp} class {spec[1]!r}, "
                                "which diffusers does not provide")
        preloaded[comp] = _from_pretrained(cls, folder / comp, dtype=dtype)
    log.info("loading %s from %s", name, folder)
    pipe = getattr(diffusers, name).from_pretrained(str(folder), **preloaded, **dtype_kwarg(dtype))
    return pipe.to(device)


def share_controller(pipe) -> None:
    """Wan 2.2: one step controller over both quantized experts (no-op with one transformer)."""
    models = [getattr(pipe, n) for n in transformer_names(pipe)]
    if len(models) > 1 and all(get_state(m) is not None for m in models):
        from .. import share_step_controller
        share_step_controller(*models)


def quantize_pipeline(pipe, config, progress: bool = False, calibration_steps: int = 4) -> dict:
    """``quantize_`` every transformer of ``pipe`` with ``config``; {component name: QuantReport}.

    Baselines that need activation statistics calibrate on a short stock generation
    (:data:`CALIBRATION_PROMPTS`, ``calibration_steps`` steps)."""
    reports = {}
    for name in transformer_names(pipe):
        def calibrate(_model):
            run_pipeline(pipe, list(CALIBRATION_PROMPTS), steps=calibration_steps, progress=False,
                         output_type="latent")
        reports[name] = api.quantize_(getattr(pipe, name), config, calibration=calibrate, progress=progress)
    share_controller(pipe)
    return reports


def checkpoint_files(pipe, checkpoints: Sequence) -> dict:
    """{component: checkpoint path}: one file per transformer, in :func:`transformer_names` order, or
    one folder written by ``dvdquant quantize --model <pipeline folder>``."""
    names = transformer_names(pipe)
    checkpoints = [Path(c) for c in checkpoints if c is not None]
    if len(checkpoints) == 1 and checkpoints[0].is_dir():
        d = checkpoints[0]
        files = [d / CHECKPOINT_NAME] if len(names) == 1 and (d / CHECKPOINT_NAME).is_file() \
            else [d / f"{n}.safetensors" for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DVDQuantError(f"checkpoint folder {d} has no {missing[0]} (expected one file per transformer: "
                                f"{', '.join(f.name for f in files)})")
        checkpoints = files
    if len(checkpoints) != len(names):
        raise DVDQuantError(f"{type(pipe).__name__} has {len(names)} transformer(s) ({', '.join(names)}): "
                            f"give {len(names)} checkpoint(s), got {len(checkpoints)}")
    return dict(zip(names, checkpoints))


def load_checkpoints(pipe, checkpoints: Sequence, device="cpu") -> None:
    """Load saved quantized transformers into ``pipe`` (see :func:`checkpoint_files`), in place."""
    for name, path in checkpoint_files(pipe, checkpoints).items():
        model = getattr(pipe, name)
        meta = serialization.read_metadata(path)
        if meta["model_class"] != type(model).__name__:
            raise DVDQuantError(f"checkpoint {path} holds a {meta['model_class']}, but {type(pipe).__name__}'s "
                                f"{name} is a {type(model).__name__}")
        serialization.load(path, model=model, device=device)
    share_controller(pipe)


def token_limit(pipe) -> int:
    """Text tokens the pipeline encodes: the transformer's own limit where it has one (CogVideoX,
    Mochi), else the pipeline's default ``max_sequence_length``."""
    cfg = pipe.transformer.config
    limit = cfg.get("max_text_seq_length") or cfg.get("max_sequence_length")
    if limit:
        return int(limit)
    return int(inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default)


def check_prompts(pipe, prompts: Sequence[str], limit: int) -> None:
    """One-line DVDQuantError for an empty prompt or one longer than the tokenizer's ``limit`` tokens
    (the stock pipelines would silently cut it)."""
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise DVDQuantError("empty prompt: give a caption of at least one word")
        n = len(pipe.tokenizer(p, add_special_tokens=True)["input_ids"])
        if n > limit:
            raise DVDQuantError(f"prompt {p[:40]!r}{'...' if len(p) > 40 else ''} is {n} tokens long; "
                                f"{type(pipe).__name__} takes at most {limit} (max_sequence_length)")


def check_prompt_template(pipe, prompts: Sequence[str], template: Optional[dict]) -> None:
    """HunyuanVideo embeds ``template.format(prompt)`` and drops its first ``crop_start`` tokens (the
    template's own, counted for its Llama tokenizer): a tokenizer that gives the templated prompt no
    more tokens than that would leave no prompt token (and NaN text features)."""
    if template is None:
        param = inspect.signature(type(pipe).__call__).parameters.get("prompt_template")
        template = param.default if param is not None else None
    crop = (template or {}).get("crop_start")
    if not crop:
        return
    for p in prompts:
        n = len(pipe.tokenizer(template["template"].format(p), add_special_tokens=True)["input_ids"])
        if n <= crop:
            raise DVDQuantError(f"{type(pipe).__name__}'s prompt template drops its first {crop} tokens, but this "
                                f"tokenizer makes {n} tokens of the templated prompt: pass a prompt_template "
                                "that fits the tokenizer")


@dataclass
class PipelineResult:
    frames: torch.Tensor               # (B, F, H, W, 3) float32 in [0, 1], CPU; or latents (output_type="latent")
    schedule: list                     # activation bits per step ([] for an unquantized pipeline)
    mean_bits: Optional[float]         # mean bits over the work that ran; None for an unquantized pipeline
    seconds: float


def step_label(bits: int, coverage: float = 1.0) -> str:
    """``skip`` for a step served from a cache, else ``A4`` / ``A8``, with the share of the block work that
    ran for a partly skipped step (``A4 50%``)."""
    if bits == SKIP or coverage <= 0:
        return "skip"
    return f"A{bits}" + (f" {coverage:.0%}" if coverage < 1 else "")


def _step_bar(pipe, steps: int, progress: bool):
    """(callback_on_step_end, bar): a tqdm bar advanced once per step, showing the steps so far, one character
    each: ``S`` skipped (served from a cache or by the step policy), else the activation bits."""
    ctrl = api.step_controller(pipe.transformer) if get_state(pipe.transformer) is not None else None
    bar = tqdm(total=steps, desc="denoise", disable=not progress, leave=False)

    def callback(_pipe, i, t, kwargs):
        if ctrl is not None and ctrl.schedule:
            bar.set_postfix_str(schedule_string(ctrl.schedule_so_far()), refresh=False)
        bar.update(1)
        return {}
    return callback, bar, ctrl


@torch.no_grad()
def run_pipeline(pipe, prompts, *, negative_prompt=None, steps: Optional[int] = None,
                 frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                 guidance: Optional[float] = None, seed: int = 0, max_sequence_length: Optional[int] = None,
                 progress: bool = True, output_type: str = "pt", **pipe_kwargs) -> PipelineResult:
    """Run the stock ``pipe(...)`` once; arguments left None keep the pipeline's defaults.

    ``guidance`` is ``guidance_scale`` (HunyuanVideo: its embedded guidance; pass ``true_cfg_scale``
    and a ``negative_prompt`` for classifier-free guidance). The noise comes from a CPU generator
    seeded with ``seed``, so a seed gives the same clip on every device. The pipeline's own progress
    bar is turned off; ``progress`` shows dvdquant's, one tick per step with that step's bits.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    limit = max_sequence_length or token_limit(pipe)
    check_prompts(pipe, prompts, limit)
    if negative_prompt is not None:
        negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        check_prompts(pipe, [n for n in negs if n], limit)
    if "prompt_template" in inspect.signature(type(pipe).__call__).parameters:
        check_prompt_template(pipe, prompts, pipe_kwargs.get("prompt_template"))
    kw = dict(num_inference_steps=steps, num_frames=frames, height=height, width=width, guidance_scale=guidance,
              negative_prompt=negative_prompt)
    kw = {k: v for k, v in kw.items() if v is not None}
    total = steps or inspect.signature(type(pipe).__call__).parameters["num_inference_steps"].default
    callback, bar, ctrl = _step_bar(pipe, total, progress)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    try:
        out = pipe(prompt=prompts, generator=torch.Generator().manual_seed(int(seed)), output_type=output_type,
                   max_sequence_length=limit, callback_on_step_end=callback, **kw, **pipe_kwargs).frames
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if output_type == "pt":
        out = out.float().cpu().permute(0, 1, 3, 4, 2).contiguous()   # (B, F, C, H, W) -> (B, F, H, W, 3)
    schedule = list(ctrl.schedule) if ctrl is not None else []
    mean = ctrl.mean_bits() if ctrl is not None else None
    return PipelineResult(frames=out, schedule=schedule, mean_bits=mean, seconds=seconds)


def format_schedule(schedule: Sequence[int]) -> str:
    """``A8 A8 A4 ...`` with runs compressed: ``A8x2 A4x3 A8``; a skipped step is ``skip``."""
    runs = []
    for b in schedule:
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return " ".join(step_label(b) + (f"x{n}" if n > 1 else "") for b, n in runs)


def quantize_pipeline_folder(folder, config, out, device="cpu", dtype=None, progress: bool = True) -> list:
    """Quantize every transformer of the pipeline in ``folder`` and write the checkpoint(s) to ``out``:
    ``quantized.safetensors`` for one transformer; Wan 2.2: ``transformer.safetensors`` and
    ``transformer_2.safetensors``. Returns [(component, QuantReport, checkpoint path)]."""
    pipe = load_pipeline(folder, device=device, dtype=dtype, progress=progress)
    reports = quantize_pipeline(pipe, config, progress=progress)
    out = Path(out)
    rows = []
    for name, report in reports.items():
        fname = CHECKPOINT_NAME if len(reports) == 1 else f"{name}.safetensors"
        ckpt = serialization.save(getattr(pipe, name), out / fname,
                                  extra={"base_model": str(folder), "pipeline": type(pipe).__name__,
                                         "component": name})
        rows.append((name, report, ckpt))
    return rows
