"""Stock diffusers pipelines of the five video families with dvdquant transformers (tiny, built in code).

For each family (Wan 2.1, Wan 2.2, HunyuanVideo, CogVideoX, LTX-Video, Mochi): ``quantize_`` + the
stock ``pipe(...)``; δ-GBS inside it (one width per step with CFG, reset between calls);
save → load into a fresh pipeline gives the same frames; the CLI on a saved pipeline folder.
"""
from __future__ import annotations

import json

import pytest
import torch

import dvdquant
from dvdquant.cli import main
from dvdquant.nn.quant_linear import QuantLinear
from dvdquant.pipeline import diffusers_pipelines as dp
from tiny_pipelines import FAMILIES, build_pipeline, call_kwargs, save_pipeline

pytest.importorskip("transformers")
STEPS = 3


def _latents(pipe, family, steps=STEPS):
    """The stock pipeline's final latents (no VAE decode)."""
    with torch.no_grad():
        return pipe(**dict(call_kwargs(family, steps=steps), output_type="latent")).frames


@pytest.fixture(scope="module")
def fp_latents():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _latents(build_pipeline(family), family)
        return cache[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_stock_pipeline_close_to_fp(family, fp_latents):
    """W8A8 DVD-Quant inside the stock pipeline: finite, and the final latents within 2 % (rel. L2) of FP.

    Measured on these tiny random models (3 steps, CFG on; 2-core CPU): 0.13 % (HunyuanVideo, LTX),
    0.23 % (Wan 2.1/2.2), 0.53 % (Mochi), 0.63 % (CogVideoX); W4A4 gives 1.8-8.8 %. The bound leaves
    3x margin over the worst family and sits well under W4A4, so a broken 8-bit path fails it."""
    pipe = build_pipeline(family)
    reports = dp.quantize_pipeline(pipe, dvdquant.DVDQuantConfig(w_bits=8, a_bits=8))
    assert set(reports) == set(dp.transformer_names(pipe)) and all(r.layers for r in reports.values())
    out, ref = _latents(pipe, family), fp_latents(family)
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.02, f"{family}: W8A8 rel. L2 {rel:.4f}"


GBS_STEPS = 5


def _record_bits(pipe):
    """Per denoising step, (transformer, activation bits) of every call of one QuantLinear per transformer."""
    per_step, step, handles = {}, [0], []
    for name in dp.transformer_names(pipe):
        layer = next(m for m in getattr(pipe, name).modules() if isinstance(m, QuantLinear) and m.a_bits < 16)
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args, name=name: per_step.setdefault(step[0], []).append((name, mod.current_a_bits()))))

    def on_step_end(_pipe, i, t, kwargs):
        step[0] += 1
        return {}
    return per_step, handles, on_step_end


@pytest.mark.parametrize("family", FAMILIES)
def test_gbs_switches_inside_stock_pipeline(family):
    """δ-GBS in the stock ``pipe(...)``: one width per step although CFG calls the transformer twice
    (Wan, HunyuanVideo) or batches both halves (CogVideoX, LTX, Mochi); Wan 2.2's two experts run one
    schedule; a second call starts over and gives the same schedule. Warm-up is one step (8 bits), the
    next step starts a fresh sum (4 bits), and δ = 1e-3 is below any step's output change here, so
    δ sends the third step back to 8 bits: the schedule starts 8, 4, 8."""
    pipe = build_pipeline(family)
    dp.quantize_pipeline(pipe, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4,
                                                       gbs=dvdquant.GBSConfig(delta=1e-3, warmup_steps=1)))
    ctrl = dvdquant.step_controller(pipe.transformer)
    if family == "wan22":
        assert dvdquant.step_controller(pipe.transformer_2) is ctrl
    schedules = []
    for _ in range(2):
        per_step, handles, on_step_end = _record_bits(pipe)
        with torch.no_grad():
            pipe(**dict(call_kwargs(family, steps=GBS_STEPS), output_type="latent"), callback_on_step_end=on_step_end)
        for h in handles:
            h.remove()
        calls = 2 if family in ("wan", "wan22", "hunyuan") else 1        # CFG as two calls, or one batched call
        assert sorted(per_step) == list(range(GBS_STEPS)) and all(len(v) == calls for v in per_step.values())
        assert all(len({bits for _, bits in v}) == 1 for v in per_step.values()), per_step
        assert ctrl.schedule == [per_step[i][0][1] for i in range(GBS_STEPS)]
        used = {name for v in per_step.values() for name, _ in v}
        assert used == set(dp.transformer_names(pipe))      # Wan 2.2: both experts ran, on one schedule
        schedules.append(list(ctrl.schedule))
    assert schedules[0] == schedules[1] and schedules[0][:3] == [8, 4, 8]
    assert ctrl.mean_bits() == pytest.approx(sum(schedules[0]) / GBS_STEPS)


def _saved_checkpoints(pipe, folder):
    return [dvdquant.save(getattr(pipe, n), folder / f"{n}.safetensors") for n in dp.transformer_names(pipe)]


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_into_fresh_pipeline_identical_frames(family, tmp_path):
    pipe = build_pipeline(family)
    dp.quantize_pipeline(pipe, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4))
    frames = dp.run_pipeline(pipe, "a red ball moving left", steps=2, seed=3, progress=False,
                             **_run_kwargs(family)).frames
    fresh = build_pipeline(family)
    dp.load_checkpoints(fresh, _saved_checkpoints(pipe, tmp_path))
    again = dp.run_pipeline(fresh, "a red ball moving left", steps=2, seed=3, progress=False,
                            **_run_kwargs(family)).frames
    assert frames.shape[-1] == 3 and frames.ndim == 5 and torch.isfinite(frames).all()
    assert torch.equal(frames, again)


def _run_kwargs(family):
    kw = dict(call_kwargs(family))
    kw = {k: kw[k] for k in ("height", "width", "num_frames", "guidance_scale", "negative_prompt",
                             "true_cfg_scale", "prompt_template") if k in kw}
    kw["frames"] = kw.pop("num_frames")
    if "guidance_scale" in kw:
        kw["guidance"] = kw.pop("guidance_scale")
    return kw


# ---------------------------------------------------------------- errors of the library
def test_checkpoint_of_another_transformer_names_both(tmp_path):
    wan = build_pipeline("wan")
    dp.quantize_pipeline(wan, dvdquant.MinMaxConfig(w_bits=8, a_bits=8))
    ckpt = dvdquant.save(wan.transformer, tmp_path / "wan.safetensors")
    with pytest.raises(dvdquant.DVDQuantError, match="WanTransformer3DModel.*MochiTransformer3DModel"):
        dp.load_checkpoints(build_pipeline("mochi"), [ckpt])


def test_prompt_errors():
    pipe = build_pipeline("mochi")
    with pytest.raises(dvdquant.DVDQuantError, match="empty prompt"):
        dp.run_pipeline(pipe, "  ", steps=1, progress=False)
    with pytest.raises(dvdquant.DVDQuantError, match="at most 16"):
        dp.run_pipeline(pipe, " ".join(["red"] * 20), steps=1, progress=False)
    # HunyuanVideo's default template crops 95 tokens of its Llama tokenizer; the tiny tokenizer makes fewer
    with pytest.raises(dvdquant.DVDQuantError, match="drops its first 95 tokens"):
        dp.run_pipeline(build_pipeline("hunyuan"), "a cat", steps=1, progress=False)


def test_unsupported_folders(tmp_path):
    with pytest.raises(dvdquant.DVDQuantError, match="no model_index.json.*WanPipeline"):
        dp.pipeline_class_name(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(dvdquant.DVDQuantError, match="StableDiffusionPipeline.*supported pipelines"):
        dp.pipeline_class_name(tmp_path)


# ---------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {f: save_pipeline(f, root / f) for f in ("wan", "wan22", "mochi")}


def _tiny_video_args(family):
    kw = call_kwargs(family)
    return ["--steps", "2", "--frames", str(kw["num_frames"]), "--height", str(kw["height"]),
            "--width", str(kw["width"]), "--quiet"]


def test_cli_generate_pipeline_on_the_fly(saved_folders, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    rc = main(["generate", "--pipeline", str(saved_folders["mochi"]), "--prompt", "a red ball moving left",
               "--negative-prompt", "dark", "--method", "dvdquant", "--w-bits", "4", "--a-bits", "4",
               "--out", str(out)] + _tiny_video_args("mochi"))
    text = capsys.readouterr().out
    assert rc == 0 and out.stat().st_size > 0
    assert "schedule (2 steps): A4x2" in text and "mean activation bits 4.00" in text


def test_cli_quantize_pipeline_then_generate_wan22(saved_folders, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(saved_folders["wan22"]), "--a-bits", "8", "--out", str(q),
                 "--quiet"]) == 0
    assert (q / "transformer.safetensors").is_file() and (q / "transformer_2.safetensors").is_file()
    assert set(json.loads((q / "report.json").read_text())) == {"transformer", "transformer_2"}
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--pipeline", str(saved_folders["wan22"]), "--checkpoint", str(q),
                 "--prompt", "a cat", "--out", str(out)] + _tiny_video_args("wan22")) == 0
    assert out.stat().st_size > 0 and "A8x2" in capsys.readouterr().out
    # the two files named one by one give the same run
    assert main(["generate", "--pipeline", str(saved_folders["wan22"]), "--checkpoint",
                 str(q / "transformer.safetensors"), "--checkpoint-2", str(q / "transformer_2.safetensors"),
                 "--prompt", "a cat", "--out", str(out)] + _tiny_video_args("wan22")) == 0


def test_cli_quantize_single_transformer_pipeline(saved_folders, tmp_path):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(saved_folders["wan"]), "--method", "minmax", "--w-bits", "8",
                 "--a-bits", "8", "--out", str(q), "--quiet"]) == 0
    assert (q / "quantized.safetensors").is_file()
    assert json.loads((q / "report.json").read_text())["method"] == "minmax"


@pytest.mark.parametrize("extra, message", [
    (["--prompt", ""], "prompt 1 is empty"),
    (["--prompt", " ".join(["red"] * 20)], "at most 16"),
    (["--prompt", "a cat", "--checkpoint", "CKPT_WAN"], "WanTransformer3DModel"),
    (["--prompt", "a cat", "--checkpoint", "CKPT_WAN", "--method", "minmax"], "not both"),
    (["--prompt", "a cat", "--checkpoint", "CKPT_WAN", "--a-bits", "8"], "--a-bits (quantize now), not both"),
])
def test_cli_generate_pipeline_errors(saved_folders, tmp_path, capsys, extra, message):
    if "CKPT_WAN" in extra:
        pipe = build_pipeline("wan")
        dp.quantize_pipeline(pipe, dvdquant.MinMaxConfig(w_bits=8, a_bits=8))
        extra = [str(dvdquant.save(pipe.transformer, tmp_path / "w.safetensors")) if a == "CKPT_WAN" else a
                 for a in extra]
    rc = main(["generate", "--pipeline", str(saved_folders["mochi"]), "--out", str(tmp_path / "x.mp4")]
              + extra + _tiny_video_args("mochi"))
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [f"dvdquant: error: {err.split('error: ')[-1].strip()}"]
    assert message in err
    assert not (tmp_path / "x.mp4").exists()


def test_cli_not_a_pipeline_folder(tmp_path, capsys):
    rc = main(["generate", "--pipeline", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a diffusers pipeline folder" in err and "MochiPipeline" in err
    rc = main(["generate", "--prompt", "a cat", "--checkpoint", "x.safetensors", "--out", str(tmp_path / "x.mp4")])
    assert rc == 2 and "--pipeline DIR only" in capsys.readouterr().err
    rc = main(["generate", "--prompt", "a cat", "--a-bits", "8", "--out", str(tmp_path / "x.mp4")])
    assert rc == 2 and "--a-bits applies with --pipeline DIR only" in capsys.readouterr().err


def test_bf16_timesteps_that_round_together_stay_separate_steps():
    """HunyuanVideoPipeline gives no step index and casts the timestep to the latents' dtype: in bf16
    with shift 7, nearby early steps of a 50-step call round to one timestep. The input latent tells
    them apart; the two CFG calls of a step (same latent) stay one step."""
    steps = 50
    pipe = build_pipeline("hunyuan").to(torch.bfloat16)
    dp.quantize_pipeline(pipe, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4, attention="none"))
    layer = next(m for m in pipe.transformer.modules() if isinstance(m, QuantLinear) and m.a_bits < 16)
    seen, step = [], [0]
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.append((step[0], mod.state.step_index)))

    def on_step_end(_pipe, i, t, kwargs):
        step[0] += 1
        return {}
    with torch.no_grad():
        pipe(**dict(call_kwargs("hunyuan", steps=steps), output_type="latent"), callback_on_step_end=on_step_end)
    handle.remove()
    ts = pipe.scheduler.timesteps.to(torch.bfloat16)
    assert bool((ts[1:] == ts[:-1]).any())                         # the collision this test is about
    assert seen == [(i, i) for i in range(steps) for _ in range(2)]
    assert len(dvdquant.step_controller(pipe.transformer).schedule) == steps
