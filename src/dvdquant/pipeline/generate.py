"""Text-to-video sampling of the embedded model with classifier-free guidance.

One sampler for the FP and every quantized variant of a transformer, so that fidelity is
measured with the same prompts, seeds and initial noise. It calls the transformer as a stock
diffusers pipeline does: once per step with the CFG batch inside ``cache_context("cond_uncond",
step_index=i, num_inference_steps=steps)``, and ``_reset_stateful_cache()`` at the end, so a
quantized model's step hook (δ-GBS, step index, NaN/Inf check; :mod:`dvdquant.nn.step_hooks`)
and diffusers' cache hooks run here exactly as in ``WanPipeline``. The transformer is only
called; the progress bar shows a quantized one's steps so far (``S`` skipped, else the bits).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from ..nn.step_hooks import schedule_string, step_tracker

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    videos: torch.Tensor  # (B, F, H, W, 3) float32 in [0, 1], on the CPU
    latents: torch.Tensor  # (B, C, F, H, W) float32 final sample (model space, [-1, 1])
    initial_noise: torch.Tensor  # (B, C, F, H, W) float32 starting noise


def initial_noise(batch: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """(B, *shape) noise; clip i uses a CPU generator seeded with seed + i (batch-size free)."""
    out = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed) + i))
           for i in range(batch)]
    return torch.stack(out)


def _model_dtype_device(transformer: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """Compute dtype/device from the (never quantized) patch embedding, else any float param."""
    pe = getattr(transformer, "patch_embedding", None)
    if pe is not None and getattr(pe, "weight", None) is not None:
        return pe.weight.dtype, pe.weight.device
    for p in transformer.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _unpack_model(model_or_transformer, text_encoder, tokenizer):
    transformer = getattr(model_or_transformer, "transformer", model_or_transformer)
    text_encoder = text_encoder or getattr(model_or_transformer, "text_encoder", None)
    tokenizer = tokenizer or getattr(model_or_transformer, "tokenizer", None)
    config = getattr(model_or_transformer, "config", None)
    if text_encoder is None or tokenizer is None:
        raise ValueError("generate() needs a text_encoder and a tokenizer (pass an EmbeddedModel "
                         "or give text_encoder=... and tokenizer=...)")
    return transformer, text_encoder, tokenizer, config


def _step_context(transformer, name: str, step_index: int, steps: int):
    """diffusers' per-call cache context where the transformer has one (CacheMixin models)."""
    fn = getattr(transformer, "cache_context", None)
    return fn(name, step_index=step_index, num_inference_steps=steps) if fn is not None else nullcontext()


@torch.no_grad()
def _encode(text_encoder, tokenizer, prompts: list[str], dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and unconditional (empty caption) hidden states, each (B, L, D)."""
    enc_device = next(text_encoder.parameters()).device
    cond = text_encoder(tokenizer(prompts).to(enc_device))
    uncond = text_encoder(tokenizer([""] * len(prompts)).to(enc_device))
    return cond.to(device=device, dtype=dtype), uncond.to(device=device, dtype=dtype)


@torch.no_grad()
def generate(model_or_transformer, prompts: list[str] | str, *, seed: int = 0, steps: int = 20,
             guidance: float = 4.0, latents: torch.Tensor | None = None,
             progress: bool = True, text_encoder=None, tokenizer=None,
             num_frames: int | None = None, height: int | None = None, width: int | None = None,
             shift: float | None = None, progress_desc: str = "denoise") -> GenerationResult:
    """Sample clips for ``prompts`` with a flow-matching Euler sampler and CFG.

    ``model_or_transformer``: an :class:`~dvdquant.models.embedded.EmbeddedModel` or a bare
    transformer (then pass ``text_encoder`` and ``tokenizer``). ``latents`` (B, C, F, H, W)
    overrides the seeded initial noise. Frame count, size and scheduler shift default to the embedded
    model's config. ``progress_desc`` labels the progress bar (e.g. which model runs).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    transformer, text_encoder, tokenizer, config = _unpack_model(model_or_transformer, text_encoder, tokenizer)
    num_frames = num_frames or getattr(config, "num_frames", 16)
    height = height or getattr(config, "height", 32)
    width = width or getattr(config, "width", 32)
    shift = shift if shift is not None else getattr(config, "scheduler_shift", 3.0)
    dtype, device = _model_dtype_device(transformer)
    channels = transformer.config.in_channels

    cond, uncond = _encode(text_encoder, tokenizer, prompts, dtype, device)
    use_cfg = guidance != 1.0
    context = torch.cat([cond, uncond]) if use_cfg else cond  # (2B or B, L, D)

    if latents is None:
        noise = initial_noise(len(prompts), (channels, num_frames, height, width), seed)
    else:
        noise = latents.detach().to("cpu", torch.float32).clone()
    x = noise.to(device)  # (B, C, F, H, W), kept in fp32 between steps

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps, device=device)
    ctrl = step_tracker(transformer)
    bar = tqdm(scheduler.timesteps, disable=not progress, desc=progress_desc)
    for i, t in enumerate(bar):
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = t.expand(x_in.shape[0]).to(device)
        with _step_context(transformer, "cond_uncond" if use_cfg else "cond", i, steps):
            out = transformer(x_in.to(dtype), timestep=t_in, encoder_hidden_states=context,
                              return_dict=False)[0].float()  # (2B or B, C, F, H, W) velocity
        if use_cfg:
            v_cond, v_uncond = out.chunk(2)
            velocity = v_uncond + guidance * (v_cond - v_uncond)
        else:
            velocity = out
        x = scheduler.step(velocity, t, x, return_dict=False)[0]
        if ctrl is not None and ctrl.schedule:
            bar.set_postfix_str(schedule_string(ctrl.schedule_so_far()), refresh=False)
    if hasattr(transformer, "_reset_stateful_cache"):
        transformer._reset_stateful_cache()           # end of the call, as pipelines do
    x = x.float().cpu()
    videos = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).contiguous()  # (B, F, H, W, 3)
    return GenerationResult(videos=videos, latents=x, initial_noise=noise)


def calibration_generation(model, prompts: Sequence[str], *, steps: int, seed: int = 0,
                           guidance: float = 4.0):
    """``calibration(transformer)`` for ``quantize_``: a short FP generation of ``prompts`` with ``model``'s
    pipeline (an ``EmbeddedModel``), ``transformer`` in place of its own (for the calibrated baselines)."""
    import copy

    def calibrate(transformer):
        m = copy.copy(model)
        m.transformer = transformer
        generate(m, list(prompts), seed=seed, steps=steps, guidance=guidance, progress=False)
    return calibrate
