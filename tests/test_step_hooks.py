"""The per-step runtime as a diffusers hook: stock WanPipeline vs dvdquant's sampler, CFG as one or
two calls, new-call detection, Wan 2.2's two experts under one controller, removal."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

import dvdquant
from dvdquant import DVDQuantConfig, GBSConfig
from dvdquant.errors import DVDQuantError
from dvdquant.nn.step_hooks import HOOK_NAME, remove_step_hook
from dvdquant.pipeline.generate import generate
from tiny_models import tiny_wan

STEPS, GUIDANCE = 6, 4.0
# per-token activation scales and SDPA attention: a sample's output does not depend on the other
# samples of its batch, so CFG batched (dvdquant's sampler) and CFG as two calls (WanPipeline) agree
GBS_W4A4 = DVDQuantConfig(w_bits=4, a_bits=4, attention="none", auto_scale="per_block",
                          gbs=GBSConfig(delta=0.1, warmup_steps=1))


def _quantized_wan(seed: int = 1, config=GBS_W4A4):
    torch.manual_seed(seed)
    model, _ = tiny_wan()
    dvdquant.quantize_(model.eval(), config)
    return model


def _embeds():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g), torch.randn(1, 4, 2, 8, 8,
                                                                                                 generator=g)


def _pipe(transformer, transformer_2=None, boundary_ratio=None):
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       transformer_2=transformer_2, boundary_ratio=boundary_ratio,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_pipe(pipe, steps=STEPS):
    pe, ne, lat = _embeds()
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=lat, num_inference_steps=steps,
                guidance_scale=GUIDANCE, height=16, width=16, num_frames=5, output_type="latent").frames


class _Embedder(torch.nn.Module):
    """Text side of dvdquant's sampler for the test: the caption "p" → pe, "" → ne."""

    def __init__(self, pe, ne):
        super().__init__()
        self.pe, self.ne = torch.nn.Parameter(pe, requires_grad=False), torch.nn.Parameter(ne, requires_grad=False)

    def forward(self, ids):
        return torch.cat([self.pe if int(i) else self.ne for i in ids])


def _bits_per_call(model):
    """(step index, activation bits) seen by one quantized layer at every transformer call."""
    seen = []
    layer = dvdquant.quantized_layers(model)[0][1]
    layer.register_forward_pre_hook(lambda m, a: seen.append((m.state.step_index, m.current_a_bits())))
    return seen


def test_stock_pipeline_switches_bits_one_width_per_step_and_resets_between_calls():
    model = _quantized_wan()
    seen = _bits_per_call(model)
    pipe = _pipe(model)
    _run_pipe(pipe)
    ctrl = dvdquant.step_controller(model)
    first = list(ctrl.schedule)
    assert len(first) == STEPS and first[0] == 8 and 4 in first          # warm-up high, then δ-GBS
    assert len(seen) == 2 * STEPS                                          # cond + uncond calls
    assert [b for _, b in seen] == [b for b in first for _ in range(2)]    # one width per step
    assert [i for i, _ in seen] == [i for i in range(STEPS) for _ in range(2)]
    assert len(ctrl.changes) == STEPS and all(c > 0 for c in ctrl.changes[1:])   # the last one too
    _run_pipe(pipe)
    assert ctrl.schedule == first                                          # reset at the new call


def test_stock_pipeline_schedule_equals_the_dvdquant_sampler():
    """Same transformer, text embeddings, noise, scheduler and guidance: WanPipeline (CFG as two calls)
    and dvdquant's sampler (CFG as one batched call) measure the same output change each step, so they
    choose the same δ-GBS schedule and reach the same latents."""
    model = _quantized_wan()
    pipe_latents = _run_pipe(_pipe(model))
    ctrl = dvdquant.step_controller(model)
    pipe_schedule, pipe_changes = list(ctrl.schedule), list(ctrl.changes)
    pe, ne, lat = _embeds()
    res = generate(model, ["p"], latents=lat, steps=STEPS, guidance=GUIDANCE, shift=3.0, progress=False,
                   text_encoder=_Embedder(pe, ne), tokenizer=lambda ps: torch.tensor([int(bool(p)) for p in ps]))
    assert ctrl.schedule == pipe_schedule
    torch.testing.assert_close(torch.tensor(ctrl.changes[1:]), torch.tensor(pipe_changes[1:]), rtol=2e-3, atol=0)
    # the batch's float summation order differs (2 samples vs 1), so a code on a rounding boundary can
    # move one step; measured 0.16 % rel. L2 after 6 W4A4 steps
    assert float((res.latents - pipe_latents.float()).norm() / pipe_latents.norm()) < 5e-3


def test_steps_from_the_timestep_alone_and_a_new_loop_resets():
    """A hand-written loop without cache_context: a new timestep is a new step, two calls at one
    timestep are one step, and timesteps that turn back up start a new loop."""
    model = _quantized_wan()
    _, inputs = tiny_wan()
    ctrl = dvdquant.step_controller(model)
    schedules = []
    for _ in range(2):
        x = inputs["hidden_states"]
        for t in (900, 700, 500, 300):
            outs = [model(**dict(inputs, hidden_states=x, timestep=torch.tensor([t])), return_dict=False)[0]
                    for _ in range(2)]
            x = x - 0.3 * outs[0]
        schedules.append(list(ctrl.schedule))
        assert ctrl.step_index == 3
    assert len(schedules[0]) == 4 and schedules[0] == schedules[1]


def test_equal_timesteps_of_two_steps_are_told_apart_by_the_latent():
    """Timesteps cast to bf16 can round two steps to one value: a new input latent at an equal timestep
    is a new step; the second call of a step (the same latent) is not."""
    model = _quantized_wan()
    _, inputs = tiny_wan()
    ctrl = dvdquant.step_controller(model)
    x, seen = inputs["hidden_states"], []
    for t in (996, 996, 992, 988):
        for _ in range(2):
            out = model(**dict(inputs, hidden_states=x, timestep=torch.tensor([t])), return_dict=False)[0]
            seen.append(ctrl.step_index)
        x = x - 0.3 * out
    assert seen == [0, 0, 1, 1, 2, 2, 3, 3] and len(ctrl.schedule) == 4


def test_wan22_two_experts_share_one_controller():
    high, low = _quantized_wan(1), _quantized_wan(2)
    with pytest.raises(DVDQuantError, match="two or more"):
        dvdquant.share_step_controller(high)
    ctrl = dvdquant.share_step_controller(high, low)
    assert dvdquant.step_controller(high) is ctrl is dvdquant.step_controller(low)
    seen_high, seen_low = _bits_per_call(high), _bits_per_call(low)
    _run_pipe(_pipe(high, low, boundary_ratio=0.5))
    assert len(ctrl.schedule) == STEPS
    assert seen_high and seen_low                                        # both experts ran
    steps_high = sorted({i for i, _ in seen_high})
    steps_low = sorted({i for i, _ in seen_low})
    assert steps_high + steps_low == list(range(STEPS))                 # one step index across both
    assert all(b == ctrl.schedule[i] for i, b in seen_high + seen_low)


def test_share_step_controller_refuses_other_gbs_settings():
    a = _quantized_wan(1)
    b = _quantized_wan(2, config=DVDQuantConfig(w_bits=4, a_bits=4, attention="none"))
    with pytest.raises(DVDQuantError, match="δ-GBS settings differ"):
        dvdquant.share_step_controller(a, b)


def test_hook_registered_once_and_removable():
    model = _quantized_wan()
    assert model._diffusers_hook.get_hook(HOOK_NAME) is not None
    remove_step_hook(model)
    assert dvdquant.step_controller(model) is None
    _, inputs = tiny_wan()
    model(**inputs, return_dict=False)                                   # runs at the configured bits
    assert dvdquant.get_state(model).a_bits is None
