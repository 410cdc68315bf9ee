"""Sampler: hooks called in order with step indices, reset first; seeds; CFG batching."""

import torch
from diffusers import WanTransformer3DModel

from dvdquant.data import Tokenizer, VOCAB, MAX_TOKENS
from dvdquant.models.text_encoder import TinyTextEncoder
from dvdquant.pipeline import frame_grid_png, generate, initial_noise, save_video


def _tiny():
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(2, 4, 4), num_attention_heads=2, attention_head_dim=32,
                                        in_channels=3, out_channels=3, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=1, rope_max_seq_len=32).eval()
    return transformer, TinyTextEncoder(len(VOCAB), MAX_TOKENS, dim=32).eval(), Tokenizer()


class Recorder:
    def __init__(self, log):
        self.log = log

    def reset(self):
        self.log.append(("reset",))

    def begin_step(self, i, t):
        self.log.append(("begin", i, float(t)))

    def end_step(self, i, t, out):
        self.log.append(("end", i, float(t), tuple(out.shape)))


KW = dict(num_frames=4, height=16, width=16, progress=False)


def test_hooks_reset_then_called_in_order():
    transformer, enc, tok = _tiny()
    log = []
    generate(transformer, ["a red square moving left on a dark background"] * 2, steps=3, hooks=[Recorder(log)],
             text_encoder=enc, tokenizer=tok, **KW)
    assert log[0] == ("reset",)
    kinds = [(e[0], e[1]) for e in log[1:]]
    assert kinds == [("begin", 0), ("end", 0), ("begin", 1), ("end", 1), ("begin", 2), ("end", 2)]
    ts = [e[2] for e in log[1:] if e[0] == "begin"]
    assert ts[0] == 1000.0 and ts == sorted(ts, reverse=True)
    assert all(e[3] == (2, 3, 4, 16, 16) for e in log[1:] if e[0] == "end")  # guided velocity, B not 2B


def test_hook_without_reset_and_second_run_resets_again():
    transformer, enc, tok = _tiny()
    log = []

    class NoReset:
        def begin_step(self, i, t):
            log.append(i)

        def end_step(self, i, t, out):
            pass

    rec = Recorder([])
    for _ in range(2):
        generate(transformer, "a red square moving left on a dark background", steps=2, hooks=[NoReset(), rec],
                 text_encoder=enc, tokenizer=tok, **KW)
    assert log == [0, 1, 0, 1]
    assert [e for e in rec.log if e[0] == "reset"] == [("reset",), ("reset",)]


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
