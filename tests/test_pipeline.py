"""Sampler: calls like a diffusers pipeline (cache context, end-of-call reset); seeds; CFG batching."""

import torch
from diffusers import WanTransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from dvdquant.data import Tokenizer, VOCAB, MAX_TOKENS
from dvdquant.models.text_encoder import TinyTextEncoder
from dvdquant.pipeline import frame_grid_png, generate, initial_noise, save_video


def _tiny():
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(2, 4, 4), num_attention_heads=2, attention_head_dim=32,
                                        in_channels=3, out_channels=3, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=1, rope_max_seq_len=32).eval()
    return transformer, TinyTextEncoder(len(VOCAB), MAX_TOKENS, dim=32).eval(), Tokenizer()


class Recorder(ModelHook):
    """A stateful diffusers hook: sees each call's cache context and the end-of-call reset."""
    _is_stateful = True

    def __init__(self, log):
        super().__init__()
        self.log, self.ctx = log, StateManager(_Nothing)

    def pre_forward(self, module, *args, **kwargs):
        c = self.ctx.context
        self.log.append((c.name, c.step_index, c.num_inference_steps, float(kwargs["timestep"][0]),
                         tuple(args[0].shape)))
        return args, kwargs

    def reset_state(self, module):
        self.log.append(("reset",))
        return module


class _Nothing(BaseState):
    def reset(self):
        pass


KW = dict(num_frames=4, height=16, width=16, progress=False)


def test_sampler_calls_the_transformer_as_a_diffusers_pipeline_does():
    """One call per step inside cache_context("cond_uncond", step_index, num_inference_steps), the
    CFG batch (2B), descending timesteps, and the stateful-hook reset at the end of every call."""
    transformer, enc, tok = _tiny()
    log = []
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(Recorder(log), "recorder")
    for _ in range(2):
        generate(transformer, ["a red square moving left on a dark background"] * 2, steps=3,
                 text_encoder=enc, tokenizer=tok, **KW)
    one = [("cond_uncond", i, 3) for i in range(3)]
    assert [e[:3] for e in log[:3]] == one and log[3] == ("reset",) and log[4:] == log[:4]
    ts = [e[3] for e in log[:3]]
    assert ts[0] == 1000.0 and ts == sorted(ts, reverse=True)
    assert all(e[4] == (4, 3, 4, 16, 16) for e in log[:3])
    log.clear()
    generate(transformer, "a red square moving left on a dark background", steps=2, guidance=1.0,
             text_encoder=enc, tokenizer=tok, **KW)
    assert [e[:2] for e in log[:2]] == [("cond", 0), ("cond", 1)] and log[2] == ("reset",)


def test_seeded_noise_independent_of_batch_size():
    transformer, enc, tok = _tiny()
    prompts = ["a red square moving left on a dark background", "a blue circle growing on a striped background"]
    both = generate(transformer, prompts, seed=7, steps=2, text_encoder=enc, tokenizer=tok, **KW)
    second = generate(transformer, prompts[1:], seed=8, steps=2, text_encoder=enc, tokenizer=tok, **KW)
    assert torch.equal(both.initial_noise[1], second.initial_noise[0])
    torch.testing.assert_close(both.latents[1], second.latents[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(initial_noise(2, (3, 4, 16, 16), 7), both.initial_noise)
    assert both.videos.shape == (2, 4, 16, 16, 3) and 0 <= both.videos.min() <= both.videos.max() <= 1


def test_explicit_latents_and_no_cfg():
    transformer, enc, tok = _tiny()
    lat = torch.randn(1, 3, 4, 16, 16)
    r = generate(transformer, "a red square moving left on a dark background", latents=lat, guidance=1.0,
                 steps=2, text_encoder=enc, tokenizer=tok, **KW)
    assert torch.equal(r.initial_noise, lat)


def test_video_files(tmp_path):
    clip = torch.rand(4, 16, 16, 3)
    assert save_video(clip, tmp_path / "a.gif").stat().st_size > 0
    assert save_video(clip[None].repeat(2, 1, 1, 1, 1), tmp_path / "a.mp4").stat().st_size > 0
    png = frame_grid_png([clip, clip], tmp_path / "g.png", row_labels=["fp", "w4a4"])
    assert png.stat().st_size > 0
    batch = clip[None].repeat(3, 1, 1, 1, 1)  # rows may be batches: clips side by side
    assert frame_grid_png([batch, batch], tmp_path / "b.png", frames=[0, 3]).stat().st_size > 0
