"""diffusers' step caches (MagCache, FirstBlockCache, TaylorSeer, FasterCache, PAB) on dvdquant-quantized
transformers with 8-bit attention, inside stock pipelines; δ-GBS's schedule and indicator with steps
served from a cache (nn/step_hooks.py, algorithms/gbs.py)."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                             TaylorSeerCacheConfig)

import dvdquant
from dvdquant import DVDQuantConfig, GBSConfig
from dvdquant.algorithms import GBSController
from dvdquant.errors import DVDQuantError
from dvdquant.nn import attention as qattn
from dvdquant.nn.step_hooks import schedule_string
from dvdquant.pipeline import diffusers_pipelines as dp
from tiny_models import tiny_wan
from tiny_pipelines import build_pipeline, call_kwargs

STEPS, GUIDANCE = 6, 4.0
# head_dim 64: the 8-bit attention (DVDQuantConfig's default) runs its emulated kernel on the CPU
W4A4_GBS = DVDQuantConfig(w_bits=4, a_bits=4, gbs=GBSConfig(delta=0.3, warmup_steps=1, indicator="raw"))


def _fp_wan():
    torch.manual_seed(1)
    model, _ = tiny_wan(head_dim=64)
    return model.eval()


@pytest.fixture(scope="module")
def wan_ckpt(tmp_path_factory):
    """The tiny Wan quantized once (W4A4, δ-GBS, 8-bit attention); each test loads a fresh copy."""
    model = _fp_wan()
    dvdquant.quantize_(model, W4A4_GBS)
    path = tmp_path_factory.mktemp("caches") / "wan.safetensors"
    dvdquant.save(model, path)
    return path


def _wan(ckpt, model=None):
    """A quantized tiny Wan loaded from ``ckpt`` (into ``model`` if given)."""
    return dvdquant.load(ckpt, model=model).eval()


def _pipe(transformer):
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, steps=STEPS, **kw):
    g = torch.Generator().manual_seed(0)
    pe, ne, lat = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g), \
        torch.randn(1, 4, 2, 8, 8, generator=g)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=lat, num_inference_steps=steps,
                guidance_scale=GUIDANCE, height=16, width=16, num_frames=5, output_type="latent", **kw).frames


def _mag(steps=STEPS, threshold=10.0):
    return MagCacheConfig(threshold=threshold, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=steps,
                          mag_ratios=[1.0] * steps)


def _record(pipe):
    """Per transformer call: (timestep, output, whether the last block's FFN ran) — what really ran."""
    calls, ran = [], []
    model = pipe.transformer
    model.blocks[-1].ffn.register_forward_pre_hook(lambda m, a: ran.append(True))

    def hook(m, args, kwargs, out):
        calls.append((float(kwargs["timestep"].max()), out[0].detach().float().clone(), bool(ran)))
        ran.clear()
    model.register_forward_hook(hook, with_kwargs=True)
    return calls


def _per_step(calls):
    steps = []
    for t, out, ran in calls:
        if not steps or steps[-1][0] != t:
            steps.append((t, [], []))
        steps[-1][1].append(out)
        steps[-1][2].append(ran)
    return [(outs, any(r)) for _, outs, r in steps]


# ----------------------------------------------------------------------------- each cache runs
def _cache_configs(pipe):
    return {
        "magcache": _mag(),
        "firstblock": FirstBlockCacheConfig(threshold=10.0),
        "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, use_lite_mode=True,
                                            taylor_factors_dtype=torch.float32),
        "pab": PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(-1, 1001),
                                               current_timestep_callback=lambda: pipe.current_timestep),
    }


@pytest.mark.parametrize("cache", ["magcache", "firstblock", "taylorseer", "pab"])
def test_cache_on_quantized_wan_with_8bit_attention(cache, monkeypatch, wan_ckpt):
    ran_8bit = []
    real = qattn.run_quantized
    monkeypatch.setattr(qattn, "run_quantized", lambda *a, **k: ran_8bit.append(1) or real(*a, **k))
    model = _wan(wan_ckpt)
    assert qattn.quantized_attention_mode(model) == "int8"
    pipe = _pipe(model)
    model.enable_cache(_cache_configs(pipe)[cache])
    calls = _record(pipe)
    out = _run(pipe)
    assert torch.isfinite(out).all() and ran_8bit                 # the quantized attention kernel ran
    ctrl = dvdquant.step_controller(model)
    steps = _per_step(calls)
    assert len(ctrl.schedule) == len(steps) == STEPS
    # a step is skipped exactly when none of its calls ran the last block (FirstBlockCache runs block 0)
    skipped = [i for i, (_, ran) in enumerate(steps) if not ran]
    if cache in ("magcache", "taylorseer"):
        assert skipped and ctrl.skipped_steps() == skipped
    else:
        assert ctrl.skipped_steps() == []
    if cache == "firstblock":                                     # block 0 of 2 ran: half the work
        assert skipped and all(ctrl.coverage[i] == pytest.approx(0.5, abs=0.01) for i in skipped)
        assert all(ctrl.schedule[i] in (4, 8) for i in skipped)
    if cache == "pab":                                            # the uncond call's self-attention is broadcast
        assert all(0.5 < c < 1 for c in ctrl.coverage)


@pytest.mark.parametrize("family,cache", [("hunyuan", "magcache"), ("hunyuan", "pab"), ("cogvideox", "faster"),
                                          ("cogvideox", "taylorseer"), ("ltx", "magcache"), ("mochi", "faster"),
                                          ("mochi", "pab")])
def test_cache_on_quantized_stock_pipelines(family, cache):
    pipe = build_pipeline(family)
    dvdquant.quantize_(pipe.transformer, W4A4_GBS)
    configs = _cache_configs(pipe)
    configs["magcache"] = _mag(4)
    configs["faster"] = FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep, attention_weight_callback=lambda _: 0.5,
        tensor_format="BFCHW" if family == "cogvideox" else "BCFHW")
    pipe.transformer.enable_cache(configs[cache])
    if cache == "faster":
        dvdquant.restack_step_hook(pipe.transformer)
    out = pipe(**call_kwargs(family, steps=4)).frames
    assert torch.isfinite(out).all()
    ctrl = dvdquant.step_controller(pipe.transformer)
    assert len(ctrl.schedule) == 4 and len(ctrl.coverage) == 4
    if cache in ("magcache", "taylorseer"):
        assert ctrl.skipped_steps()
    if cache == "faster":                                       # the uncond half is approximated on odd steps
        assert ctrl.coverage[0] == 1.0 and min(ctrl.coverage) < 0.6
        assert all(not math.isnan(c) for c in ctrl.changes[1:])  # the step hook sees the whole batch


# ----------------------------------------------------------------------------- δ-GBS with skipped steps
def _reference_schedule(coverage, changes, cfg: GBSConfig):
    """δ-GBS by its definition: skipped steps leave the sum and a pending high step as they were; a step
    that ran at high bits resets the share it covered; the change of each step that ran is added."""
    acc, force, bits = 0.0, False, []
    for i, (c, ch) in enumerate(zip(coverage, changes)):
        b = cfg.high_bits if i < cfg.warmup_steps or force else cfg.low_bits
        if c == 0:
            bits.append(0)
            continue
        bits.append(b)
        if b == cfg.high_bits:
            acc *= 1 - c
        force = False
        acc += 0.0 if math.isnan(ch) else ch
        force = acc >= cfg.delta
    return bits


def test_gbs_indicator_measures_between_steps_that_ran(wan_ckpt):
    model = _wan(wan_ckpt)
    pipe = _pipe(model)
    model.enable_cache(_mag())
    calls = _record(pipe)
    _run(pipe)
    ctrl = dvdquant.step_controller(model)
    steps = _per_step(calls)
    assert ctrl.skipped_steps() and ctrl.schedule[0] == 8
    last = None
    for i, (outs, ran) in enumerate(steps):
        if not ran:
            assert ctrl.schedule[i] == 0 and math.isnan(ctrl.changes[i]) and math.isnan(ctrl.indicators[i])
            continue
        if last is None:
            assert math.isnan(ctrl.changes[i])
        else:                                                    # against the last step that ran, both branches
            num = sum((o - p).abs().sum() for o, p in zip(outs, last))
            den = sum(p.abs().sum() for p in last)
            assert ctrl.changes[i] == pytest.approx(float(num / den), rel=1e-5)
        last = outs
    assert ctrl.schedule == _reference_schedule(ctrl.coverage, ctrl.changes, W4A4_GBS.gbs)
    ran = [(c, b) for c, b in zip(ctrl.coverage, ctrl.schedule) if b]
    assert ctrl.mean_bits() == pytest.approx(sum(b for _, b in ran) / len(ran))


def test_gbs_controller_skip_carries_the_choice_over_and_partial_high_resets_its_share():
    cfg = GBSConfig(delta=0.5, warmup_steps=1, indicator="raw")
    g = GBSController(cfg)
    assert g.choose(0, None) == 8
    g.observe(0, 8, None)
    assert g.choose(1, None) == 4
    g.observe(1, 4, 0.6)                              # acc 0.6 ≥ δ: the next step runs high
    assert g.choose(2, None) == 8
    g.observe(2, 8, None, coverage=0.0)               # ... but a cache served it
    assert g.acc == pytest.approx(0.6) and math.isnan(g.indicators[-1])
    assert g.choose(3, None) == 8                     # the high step carries over
    g.observe(3, 8, 0.1, coverage=0.5)                # half of it ran at high bits: half the sum is reset
    assert g.acc == pytest.approx(0.6 * 0.5 + 0.1)
    assert g.choose(4, None) == 4                     # 0.4 < δ


# ----------------------------------------------------------------------------- reset, removal, order
def test_reset_between_calls_and_disable_cache_restores_the_uncached_schedule(wan_ckpt):
    model = _wan(wan_ckpt)
    pipe = _pipe(model)
    ctrl = dvdquant.step_controller(model)
    plain = _run(pipe)
    uncached = (list(ctrl.schedule), list(ctrl.changes))
    assert ctrl.coverage == [1.0] * STEPS and not ctrl.skipped_steps()
    model.enable_cache(_mag())
    _run(pipe)
    cached = (list(ctrl.schedule), list(ctrl.coverage))
    assert ctrl.skipped_steps()
    _run(pipe)
    assert (ctrl.schedule, ctrl.coverage) == cached               # the cache and the controller reset together
    model.disable_cache()
    again = _run(pipe)
    assert (ctrl.schedule, ctrl.changes) == uncached and ctrl.coverage == [1.0] * STEPS
    assert torch.equal(again, plain)


def test_cache_enabled_before_or_after_loading_gives_the_same_run(wan_ckpt):
    a = _wan(wan_ckpt)
    a.enable_cache(_mag())
    b = _fp_wan()
    b.enable_cache(_mag())
    _wan(wan_ckpt, model=b)
    outs = [_run(_pipe(m)) for m in (a, b)]
    assert torch.equal(outs[0], outs[1])
    assert dvdquant.step_controller(a).schedule == dvdquant.step_controller(b).schedule
    assert dvdquant.step_controller(b).skipped_steps()


def test_fastercache_order_and_branch_refusals(wan_ckpt):
    def faster(pipe):
        return FasterCacheConfig(spatial_attention_block_skip_range=2, unconditional_batch_skip_range=2,
                                 spatial_attention_timestep_skip_range=(-1, 1001),
                                 unconditional_batch_timestep_skip_range=(-1, 1001),
                                 current_timestep_callback=lambda: pipe.current_timestep,
                                 attention_weight_callback=lambda _: 0.5, tensor_format="BFCHW")
    results = []
    for order in ("quantize_first", "cache_first"):
        pipe = build_pipeline("cogvideox")
        if order == "cache_first":
            pipe.transformer.enable_cache(faster(pipe))
        dvdquant.quantize_(pipe.transformer, W4A4_GBS)
        if order == "quantize_first":
            pipe.transformer.enable_cache(faster(pipe))
            with pytest.raises(DVDQuantError, match="restack_step_hook"):
                pipe(**call_kwargs("cogvideox", steps=3))
            dvdquant.restack_step_hook(pipe.transformer)
        out = pipe(**call_kwargs("cogvideox", steps=3)).frames
        ctrl = dvdquant.step_controller(pipe.transformer)
        results.append((out, list(ctrl.schedule), list(ctrl.coverage)))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1:] == results[1][1:]
    model = _wan(wan_ckpt)                                        # Wan calls cond and uncond apart
    pipe = _pipe(model)
    model.enable_cache(faster(pipe))
    dvdquant.restack_step_hook(model)
    with pytest.raises(DVDQuantError, match="batched in one transformer call"):
        _run(pipe)


def test_quantize_and_load_refuse_layers_a_cache_hooked(wan_ckpt):
    """TaylorSeer can hook Linear layers: replacing them would drop its hooks silently."""
    model = _fp_wan()
    model.enable_cache(TaylorSeerCacheConfig(cache_identifiers=[r"blocks\.0\.ffn\.net\.2"]))
    with pytest.raises(DVDQuantError, match=r"blocks\.0\.ffn\.net\.2 carries diffusers hooks"):
        dvdquant.quantize_(model, W4A4_GBS)
    with pytest.raises(DVDQuantError, match="carries diffusers hooks"):
        dvdquant.load(wan_ckpt, model=model)
    assert dvdquant.get_state(model) is None and not dvdquant.quantized_layers(model)


# ----------------------------------------------------------------------------- progress bar
def test_progress_bar_shows_skip(wan_ckpt):
    model = _wan(wan_ckpt)
    pipe = _pipe(model)
    model.enable_cache(_mag())
    callback, bar, ctrl = dp._step_bar(pipe, STEPS, progress=True)
    labels = []

    def record(*args):
        out = callback(*args)
        labels.append(bar.postfix)
        return out
    try:
        _run(pipe, callback_on_step_end=record)
    finally:
        bar.close()
    assert labels == [schedule_string(ctrl.schedule[:i + 1]) for i in range(STEPS)]
    assert "S" in labels[-1] and labels[0] == "8"
    assert dp.format_schedule([8, 4, 0, 0, 4]) == "A8 A4 skipx2 A4"
    assert dp.step_label(4, 0.5) == "A4 50%"


# ----------------------------------------------------------------------------- the work counter compiles
def test_work_probe_counts_under_torch_compile_without_graph_breaks():
    from dvdquant.nn.step_work import WorkCounter, install_probes
    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    counter = WorkCounter()
    install_probes(net, torch.nn.Linear, counter)
    x = torch.randn(2, 3, 8)
    net(x)
    eager = counter.read()
    assert eager == 2 * 3 * (8 * 16 + 16 * 4)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    counter.reset()
    for _ in range(3):
        compiled(x)
    assert counter.read() == 3 * eager
