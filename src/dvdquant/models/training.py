"""Training recipe of the embedded model: rectified flow on freshly rendered clips.

Convention of diffusers' ``FlowMatchEulerDiscreteScheduler``: x_t = (1 - s) x0 + s noise,
the transformer predicts the velocity noise - x0 from (x_t, timestep = 1000 s, caption).
Noise levels s come from a logit-normal draw pushed through the same ``shift`` that the
sampler uses. Captions are dropped (set to all padding) 10 % of the time so that the
empty caption is the unconditional branch of classifier-free guidance. Every batch is
rendered on the training device from a seed derived from (seed, step), so a run is
reproducible and never sees the same clip twice. An EMA of the weights is what is saved.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import PAD_ID, caption_token_table, combination_index, generate_clips
from .embedded import EmbeddedConfig, build_embedded, load_embedded, save_embedded

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 6000
    batch: int = 128
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ema: float = 0.999
    caption_dropout: float = 0.1
    shift: float = 3.0
    seed: int = 0
    time_budget_s: float = 0.0  # > 0: after 35 steps (25 timed), cut ``steps`` to fit this budget
    time_limit_s: float = 1e9  # hard stop (logged) if the wall time runs out anyway
    log_every: int = 250
    compile: bool = False  # regional torch.compile of the transformer blocks (falls back to eager)
    init_from: str = ""  # folder of a saved embedded model to continue from (fresh optimizer)


def sample_sigmas(n: int, shift: float, generator: torch.Generator, device) -> torch.Tensor:
    """Logit-normal noise levels (n,) in (0, 1), shifted like the sampler's schedule."""
    s = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    return shift * s / (1 + (shift - 1) * s)


def flow_batch(videos: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator):
    """(N, F, H, W, 3) in [0, 1] -> model input x_t and velocity target, both (N, 3, F, H, W)."""
    x0 = videos.permute(0, 4, 1, 2, 3) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    s = sigmas.view(-1, 1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, noise - x0


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _fit_steps_to_budget(cfg: TrainConfig, elapsed: float, per_step: float, bar) -> None:
    """Fix the step count from the speed of steps 10-34 (before warmup ends, so a rerun
    with ``--steps`` set to the result reproduces the run exactly)."""
    fit = max(35, int(35 + (cfg.time_budget_s - elapsed) / per_step))
    if fit < cfg.steps:
        log.info("%.1f ms/step: %d steps fit the %.0f s budget (asked %d)", 1e3 * per_step, fit,
                 cfg.time_budget_s, cfg.steps)
        cfg.steps = fit
        bar.total = fit


def _loss(transformer, text_encoder, videos, ids, sigmas, generator, autocast) -> torch.Tensor:
    xt, target = flow_batch(videos, sigmas, generator)
    with torch.autocast(videos.device.type, dtype=torch.bfloat16, enabled=autocast):
        context = text_encoder(ids)  # (N, L, D)
        pred = transformer(xt, timestep=sigmas * 1000, encoder_hidden_states=context, return_dict=False)[0]
    return F.mse_loss(pred.float(), target)


@torch.no_grad()
def validation_loss(transformer, text_encoder, device, shift: float, n: int = 256, seed: int = 12345) -> float:
    """Flow-matching loss on a fixed held-out batch (fixed clips, noise and levels)."""
    batch = generate_clips(n, seed=seed, device=device, with_captions=False)
    ids = caption_token_table().to(device)[combination_index(batch.labels).to(device)]
    g = torch.Generator(device).manual_seed(seed)
    sigmas = sample_sigmas(n, shift, g, device)
    losses = [_loss(transformer, text_encoder, batch.videos[i:i + 64], ids[i:i + 64], sigmas[i:i + 64], g,
                    device.type == "cuda").item() for i in range(0, n, 64)]
    return sum(losses) / len(losses)


def train_embedded(cfg: TrainConfig, out_dir: Path, device: str | torch.device = "cuda") -> dict:
    """Train, save the EMA weights into ``out_dir`` (hash-checked asset), return the results."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    previous: dict = {}
    if cfg.init_from:
        model = load_embedded("cpu", torch.float32, directory=cfg.init_from)
        model.transformer.requires_grad_(True), model.text_encoder.requires_grad_(True)
        log.info("continuing from %s (%s)", cfg.init_from, model.config.training)
        previous = model.config.training
        model.config.training = {}
    else:
        model = build_embedded(EmbeddedConfig(scheduler_shift=cfg.shift), seed=cfg.seed)
    transformer, text_encoder = model.transformer.to(device).train(), model.text_encoder.to(device).train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    n_params = sum(p.numel() for p in transformer.parameters())
    log.info("transformer: %.2fM parameters; text encoder: %.2fM", n_params / 1e6,
             sum(p.numel() for p in text_encoder.parameters()) / 1e6)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = [p.detach().clone() for p in params]
    table = caption_token_table().to(device)  # (768, L)
    g = torch.Generator(device).manual_seed(cfg.seed)
    if cfg.compile:
        torch._dynamo.config.suppress_errors = True  # a block that fails to compile runs eagerly
        transformer.compile_repeated_blocks()
    autocast = device.type == "cuda"

    t0, running, history = time.time(), torch.zeros((), device=device), []
    bar = tqdm(total=cfg.steps, mininterval=20, desc="train DiT")
    done = 0
    for step in range(10**9):  # cfg.steps may shrink after 25 steps (time budget)
        if step >= cfg.steps:
            break
        bar.update(1)
        batch = generate_clips(cfg.batch, seed=cfg.seed * 1_000_003 + step, device=device, with_captions=False)
        ids = table[combination_index(batch.labels).to(device)]  # (N, L)
        drop = torch.rand(cfg.batch, generator=g, device=device) < cfg.caption_dropout
        ids = torch.where(drop[:, None], torch.full_like(ids, PAD_ID), ids)
        sigmas = sample_sigmas(cfg.batch, cfg.shift, g, device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = _loss(transformer, text_encoder, batch.videos, ids, sigmas, g, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done = step + 1
        decay = min(cfg.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        running += loss.detach()
        if step in (9, 34) and cfg.time_budget_s > 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step == 9:
                t10 = time.time()
            else:
                _fit_steps_to_budget(cfg, time.time() - t0, (time.time() - t10) / 25, bar)
        if (step + 1) % cfg.log_every == 0:
            mean = (running / cfg.log_every).item()
            running.zero_()
            history.append({"step": step + 1, "loss": mean, "time_s": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{mean:.4f}")
            log.info("step %d loss %.4f (%.0f s)", step + 1, mean, time.time() - t0)
        if time.time() - t0 > cfg.time_limit_s:
            log.warning("time limit %.0f s reached after %d of %d steps", cfg.time_limit_s, step + 1, cfg.steps)
            break
    wall = time.time() - t0
    bar.close()

    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    transformer.eval(), text_encoder.eval()
    val = validation_loss(transformer, text_encoder, device, cfg.shift)
    results = {
        "steps_done": done, "wall_time_s": round(wall, 1),
        "final_train_loss": history[-1]["loss"] if history else float("nan"),
        "val_loss_ema": val, "transformer_params": n_params,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "train_config": asdict(cfg), "history": history,
    }
    model.config.training = {k: results[k] for k in ("steps_done", "wall_time_s", "final_train_loss",
                                                       "val_loss_ema", "device")} | {"recipe": asdict(cfg)}
    if cfg.init_from:
        model.config.training["continued_from"] = previous
    save_embedded(model.to("cpu", torch.float32), Path(out_dir))
    (Path(out_dir) / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"final train loss {results['final_train_loss']:.4f}, EMA val loss {val:.4f}, "
          f"{results['steps_done']} steps in {wall:.0f} s")
    return results
