"""A whole text-to-video generation through a stock diffusers pipeline (``WanPipeline``,
``HunyuanVideoPipeline``): bf16 vs dvdquant.

What a user runs: ``pipe(...)`` with 50 steps; Wan with classifier-free guidance (two transformer calls a
step), HunyuanVideo with its embedded guidance (one call a step). Speed does not depend on the weight values,
so the transformer (Wan 2.1 14B or HunyuanVideo 13B config) and the VAE (the real architecture, fp32;
HunyuanVideo's with tiling, as its docs run 544p) have random weights and the text side is a random prompt
embedding (no text encoder). In one process on one GPU, in this order:

1. ``bf16``: the bf16 transformer, diffusers eager (SDPA), after an untimed 2-step warm-up call, the whole
   call timed, the denoising loop apart (from the first to the last transformer call), peak memory;
2. quantize the transformer in place with DVD-Quant W4A4 + δ-GBS (A4/A8 per step; static A4 or A8
   with ``--steps-bits``) + 8-bit attention, data-free; fp8 backend; ``transformer.compile()`` (unless
   ``--no-compile``); one 2-step warm-up call (compilation, Triton JIT, autotuning; reported apart);
   with ``--schedule``, before each timed call one untimed call whose schedule holds every kind of step of
   it (:func:`warm_up_schedule`), so a first skip or first A4 step compiles outside the timing;
3. ``dvdquant``: the same call, timed the same way; the step schedule and average bits.

With random weights the output change between steps is not a trained model's, so δ-GBS picks its
own schedule here; the JSON records it. ``--schedule`` replays a fixed step schedule instead
(dvdquant's step policy, ``StepPolicyConfig.schedule``: ``S`` skips the tail blocks, ``4`` / ``8`` runs
them at those bits; block 0 runs at A8 every step), e.g. the one the policy chose at a budget on the
embedded model (benchmarks/step_policy_budget.py --costs cuda). Writes ``<out>/pipeline_<model>.json`` after each phase.

    python benchmarks/bench_pipeline.py --model wan14b --out results/
    python benchmarks/bench_pipeline.py --model hunyuan --quantize-modulation --bf16-steps 10 --out results/
    python benchmarks/bench_pipeline.py --model tiny --device cpu --steps 3     # a smoke run on CPU (hunyuan-tiny too)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("bench_pipeline")

SIZES = {"wan14b": dict(family="wan", height=480, width=832, num_frames=81, text_len=512, text_dim=4096),
         "tiny": dict(family="wan", height=32, width=32, num_frames=5, text_len=8, text_dim=32),
         "hunyuan": dict(family="hunyuan", height=544, width=960, num_frames=129, text_len=256, text_dim=4096,
                         pooled_dim=768),
         "hunyuan-tiny": dict(family="hunyuan", height=32, width=32, num_frames=5, text_len=8, text_dim=32,
                              pooled_dim=16)}
GUIDANCE = {"wan": 5.0, "hunyuan": 6.0}      # Wan: CFG (two calls a step); HunyuanVideo: embedded guidance (one)


def build(which: str, device, dtype):
    """The stock pipeline of ``which`` with random weights and no text encoders."""
    family = SIZES[which]["family"]
    torch.set_default_dtype(dtype)                 # built in place: a 14B model in fp32 would not fit
    with torch.device(device):
        transformer = _transformer(which)
    torch.set_default_dtype(torch.float32)
    with torch.device(device):                     # the real VAE architecture (fp32), or a tiny one
        vae = _vae(which)
    transformer, vae = transformer.to(device, dtype).eval(), vae.to(device, torch.float32).eval()
    if family == "wan":
        from diffusers import UniPCMultistepScheduler, WanPipeline
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        return WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler)
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    if which == "hunyuan":
        vae.enable_tiling()                        # as HunyuanVideo's docs run 544p × 129 frames
    return HunyuanVideoPipeline(tokenizer=None, text_encoder=None, tokenizer_2=None, text_encoder_2=None,
                                transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _transformer(which: str):
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel
    if which == "wan14b":
        return WanTransformer3DModel()             # default config = Wan 2.1 14B
    if which == "hunyuan":
        return HunyuanVideoTransformer3DModel()    # default config = HunyuanVideo 13B
    if which == "tiny":
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                     in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=128,
                                     num_layers=2, rope_max_seq_len=32)
    return HunyuanVideoTransformer3DModel(num_attention_heads=2, attention_head_dim=16, num_layers=1,
                                          num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                                          text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))


def _vae(which: str):
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan
    if which == "wan14b":
        return AutoencoderKLWan()
    if which == "hunyuan":
        return AutoencoderKLHunyuanVideo()
    if which == "tiny":
        return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True])
    return AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)


def call_kwargs(which: str, device, dtype, guidance: float) -> dict:
    """Random prompt embeddings (seeded) and the sizes: the pipeline call's keyword arguments."""
    size = SIZES[which]
    g = torch.Generator().manual_seed(0)
    emb = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)       # noqa: E731
    kw = dict(guidance_scale=guidance, height=size["height"], width=size["width"], num_frames=size["num_frames"])
    if size["family"] == "wan":
        return dict(kw, prompt_embeds=emb(1, size["text_len"], size["text_dim"]),
                    negative_prompt_embeds=emb(1, size["text_len"], size["text_dim"]))
    return dict(kw, prompt_embeds=emb(1, size["text_len"], size["text_dim"]),
                pooled_prompt_embeds=emb(1, size["pooled_dim"]),
                prompt_attention_mask=torch.ones(1, size["text_len"], dtype=torch.long, device=device))


class LoopTimer:
    """Wall time from the first to the last transformer call of a pipeline call (forward hooks)."""

    def __init__(self, module):
        self.first = self.last = None
        self.calls = 0
        self.started = None
        self.call_seconds = []       # wall time of each transformer call (synchronised)
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    @torch.compiler.disable
    def _pre(self, *_):
        _sync()
        self.started = time.perf_counter()
        if self.first is None:
            self.first = self.started

    @torch.compiler.disable
    def _post(self, *_):
        _sync()
        self.calls += 1
        self.last = time.perf_counter()
        self.call_seconds.append(round(self.last - self.started, 3))

    def seconds(self) -> float:
        return self.last - self.first

    def clear(self):
        self.first = self.last = None
        self.calls = 0
        self.call_seconds = []


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_call(pipe, timer: LoopTimer, kw: dict, steps: int) -> dict:
    timer.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t0 = time.perf_counter()
    frames = pipe(num_inference_steps=steps, output_type="np", **kw).frames
    _sync()
    total = time.perf_counter() - t0
    return {"call_s": round(total, 2), "denoise_s": round(timer.seconds(), 2), "transformer_calls": timer.calls,
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None,
            "call_seconds": list(timer.call_seconds), "frames_shape": list(frames.shape), "finite": bool(torch.isfinite(torch.as_tensor(frames)).all())}


def seeded(kw: dict) -> dict:
    """``kw`` with a fresh generator seeded 1: every call starts from the same noise."""
    return dict(kw, generator=torch.Generator().manual_seed(1))


def warm_up(pipe, kw: dict, steps: int = 2) -> float:
    """An untimed ``steps``-step call (compilation, kernel autotuning); its seconds."""
    t0 = time.perf_counter()
    pipe(num_inference_steps=steps, output_type="latent", **seeded(kw))
    _sync()
    return round(time.perf_counter() - t0, 1)


def warm_up_schedule(schedule: str) -> str:
    """A short schedule with every kind of step of ``schedule`` (``4``, ``6``, ``8``, ``S``), two A8 steps first
    (a skip needs a cached residual) and a running step last, so no first use is compiled inside a timed call."""
    kinds = "".join(k for k in "46S" if k in schedule)              # A8 runs in the first two steps
    return "88" + kinds + ("8" if kinds.endswith("S") else "")


def warm_up_policy(pipe, kw: dict, schedule: str) -> float:
    """Untimed: the transformer's step policy set to :func:`warm_up_schedule` for one call, then to ``schedule``."""
    import dvdquant
    warm = warm_up_schedule(schedule)
    dvdquant.set_step_policy(pipe.transformer, dvdquant.StepPolicyConfig(schedule=warm))
    seconds = warm_up(pipe, kw, len(warm))
    dvdquant.set_step_policy(pipe.transformer, dvdquant.StepPolicyConfig(schedule=schedule))
    return seconds


def profile_one_step(pipe, kw: dict, res: dict, compiled: bool) -> None:
    """Kernel time per component of a 1-step call (two transformer calls under CFG), compiled then eager."""
    from bench_step import breakdown
    one = dict(kw, generator=torch.Generator().manual_seed(1))

    def call():
        pipe(num_inference_steps=1, output_type="latent", **one)
    variants = (["compiled"] if compiled else []) + ["eager"]
    for name in variants:
        if name == "eager":
            pipe.transformer._compiled_call_impl = None        # undo Module.compile()
            call()                                               # warm-up (kernel autotuning caches)
        _sync()
        t0 = time.perf_counter()
        call()
        _sync()
        res[f"profile_{name}_1step_s"] = round(time.perf_counter() - t0, 3)
        res[f"profile_{name}_breakdown_ms"] = breakdown(call)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wan14b", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=None,
                    help="Wan: CFG scale (default 5.0); HunyuanVideo: embedded guidance (default 6.0)")
    ap.add_argument("--quantize-modulation", action="store_true",
                    help="also quantize the AdaLN modulation layers (weight-only W4A16; HunyuanVideo's step table)")
    ap.add_argument("--delta", type=float, default=0.12, help="δ-GBS threshold (default: %(default)s)")
    ap.add_argument("--steps-bits", default="gbs", choices=["gbs", "a4", "a8"],
                    help="activation bits per step: δ-GBS (A4/A8 chosen by --delta), or static A4 / A8 on every "
                         "step (random weights make δ-GBS choose A8 throughout; default: %(default)s)")
    ap.add_argument("--schedule", nargs="+", default=None,
                    help="replay these step schedules (S/4/8 per step; one timed call each) with dvdquant's step "
                         "policy instead of --steps-bits")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--auto-scale", default="none", choices=["none", "per_block", "per_channel"],
                    help="ARQ auto-scaling; per_channel has no fast kernel and runs emulated (default: %(default)s)")
    ap.add_argument("--rotation-block", type=int, default=128,
                    help="ARQ Hadamard block; 0: one full-size rotation (the config default), which the fused "
                         "activation kernel does not take: it runs in torch first (default: %(default)s)")
    ap.add_argument("--bf16-steps", type=int, default=None,
                    help="steps of the bf16 call (default: --steps; fewer gives a per-step anchor only)")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed calls, the kernel breakdown of a 1-step call, compiled and eager (CUDA)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    import dvdquant
    from dvdquant.config import config_to_dict
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    size = SIZES[args.model]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"model": args.model, "steps": args.steps, "guidance": args.guidance or GUIDANCE[size["family"]], **size,
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    path = out / f"pipeline_{args.model}.json"

    def save(phase):
        res["phase"] = phase
        path.write_text(json.dumps(res, indent=2))
        log.info("[%s] %s", phase, json.dumps({k: v for k, v in res.items() if not k.startswith("dvdquant")}))

    torch.manual_seed(0)
    pipe = build(args.model, dev, dtype)
    pipe.set_progress_bar_config(disable=True)
    kw = call_kwargs(args.model, dev, dtype, res["guidance"])
    timer = LoopTimer(pipe.transformer)
    with torch.inference_mode():
        res["bf16_steps"] = args.bf16_steps or args.steps
        res["warmup_bf16_s"] = warm_up(pipe, kw)         # first-call set-up (cuDNN plans, allocator) untimed
        res["bf16"] = timed_call(pipe, timer, seeded(kw), res["bf16_steps"])
        save("bf16")
        gbs = dvdquant.GBSConfig(delta=args.delta) if args.steps_bits == "gbs" and not args.schedule else None
        a_bits = 8 if args.steps_bits == "a8" else 4
        policy = dvdquant.StepPolicyConfig(schedule=args.schedule[0]) if args.schedule else None
        cfg = dvdquant.DVDQuantConfig(w_bits=4, a_bits=a_bits, auto_scale=args.auto_scale, gbs=gbs, policy=policy,
                                      rotation_block=args.rotation_block or None,
                                      quantize_modulation=args.quantize_modulation)
        res["config"] = config_to_dict(cfg)
        _sync()
        t0 = time.perf_counter()
        dvdquant.quantize_(pipe.transformer, cfg)
        _sync()
        res["quantize_s"] = round(time.perf_counter() - t0, 1)
        if dev.type == "cuda":
            dvdquant.set_backend(pipe.transformer, "fp8")
        res["compile"] = not args.no_compile
        if not args.no_compile:
            pipe.transformer.compile()
        res["warmup_2_steps_s"] = warm_up(pipe, kw)      # compilation, Triton JIT and autotuning: untimed
        save("warmup")
        for i, sched in enumerate(args.schedule or [None]):
            key = "dvdquant" if i == 0 else f"dvdquant_{i + 1}"
            if sched is not None:                    # every kind of step of this schedule once, untimed
                res[f"warmup_{key}_s"] = warm_up_policy(pipe, kw, sched)
            res[key] = timed_call(pipe, timer, seeded(kw), args.steps)
            ctrl = dvdquant.step_controller(pipe.transformer)
            res[key].update(schedule=list(ctrl.schedule), mean_act_bits=round(ctrl.mean_bits(), 2),
                            skipped_steps=sum(1 for b in ctrl.schedule if b == 0))
            save(key)
        if args.profile and dev.type == "cuda":
            profile_one_step(pipe, kw, res, compiled=not args.no_compile)
            save("profile")
    res["dynamo_counters"] = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if v}
    res["bf16"]["denoise_per_step_s"] = round(res["bf16"]["denoise_s"] / res["bf16_steps"], 3)
    runs = [k for k in res if k.startswith("dvdquant")]
    for key in runs:
        r = res[key]
        r["denoise_per_step_s"] = round(r["denoise_s"] / args.steps, 3)
        r["speedup_denoise_per_step"] = round(res["bf16"]["denoise_per_step_s"] / r["denoise_per_step_s"], 3)
        if res["bf16_steps"] == args.steps:
            for k in ("call_s", "denoise_s"):
                r[f"speedup_{k}"] = round(res["bf16"][k] / r[k], 3)
    save("done")
    print(f"\n{args.model} on {res['device']}, guidance {res['guidance']}: bf16 {res['bf16_steps']} steps "
          f"{res['bf16']['call_s']} s (loop {res['bf16']['denoise_s']} s, peak {res['bf16']['peak_gb']} GB)")
    for key in runs:
        r = res[key]
        print(f"{key}: {args.steps} steps {r['call_s']} s (loop {r['denoise_s']} s, peak {r['peak_gb']} GB); per step "
              f"{r['speedup_denoise_per_step']}×, {r['skipped_steps']} steps skipped, mean activation bits "
              f"{r['mean_act_bits']}" + (f"; whole call {r['speedup_call_s']}×, loop {r['speedup_denoise_s']}×"
                                         if "speedup_call_s" in r else ""))

if __name__ == "__main__":
    main()
