"""The command line end to end on tiny settings: demo, quantize → generate, errors as one line."""

import json

import pytest
import torch

from dvdquant import serialization
from dvdquant.cli import build_parser, main

PROMPT = "a red circle moving left on a dark background"


def _err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dvdquant: error: "), err
    return err[0]


def test_help_reads_for_every_subcommand(capsys):
    for sub in ("demo", "quantize", "generate", "eval"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([sub, "--help"])
        assert e.value.code == 0
        assert "usage: dvdquant " + sub in capsys.readouterr().out


def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--prompt", PROMPT, "--quiet"]) == 0
    for f in ("side_by_side.mp4", "side_by_side.gif", "frames.png", "report.txt", "report.json"):
        assert (out / f).stat().st_size > 0, f
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"] == [PROMPT] and report["steps"] == 2 and report["layers_quantized"] == 60
    assert report["transformer_weight_mb_quantized"] < 0.3 * report["transformer_weight_mb_fp32"]
    assert "PSNR" in capsys.readouterr().out


def test_quantize_then_generate_from_checkpoint(tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", "--model", "embedded", "--out", str(q), "--quiet"]) == 0
    meta = serialization.read_metadata(q / "quantized.safetensors")
    assert meta["config"]["fields"]["w_bits"] == 4 and meta["extra"]["base_model"] == "embedded"
    assert len(json.loads((q / "report.json").read_text())["layers"]) == 60
    clip = tmp_path / "clip.mp4"
    assert main(["generate", "--model", str(q / "quantized.safetensors"), "--prompt", PROMPT,
                 "--steps", "2", "--out", str(clip), "--quiet"]) == 0
    assert clip.stat().st_size > 0
    clip2 = tmp_path / "clip_auto.mp4"             # auto = emulated on a CPU; --fast-accum only matters on fp8
    assert main(["generate", "--model", str(q / "quantized.safetensors"), "--prompt", PROMPT, "--steps", "2",
                 "--backend", "auto", "--fast-accum", "--out", str(clip2), "--quiet"]) == 0
    assert clip2.stat().st_size > 0


def test_quantize_a_diffusers_directory(tmp_path):
    from tiny_models import tiny_wan
    model, inputs = tiny_wan()
    model.save_pretrained(tmp_path / "wan")
    assert main(["quantize", "--model", str(tmp_path / "wan"), "--method", "quarot", "--a-bits", "8",
                 "--quantize-modulation", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    loaded = serialization.load(tmp_path / "q" / "quantized.safetensors")
    assert loaded.condition_embedder.time_proj.a_bits == 16                  # weight-only modulation layer
    with torch.no_grad():
        assert torch.isfinite(loaded(**inputs).sample).all()


def test_bad_prompt_word_lists_the_vocabulary(tmp_path, capsys):
    code = main(["generate", "--prompt", "a purple elephant moving left", "--steps", "2",
                 "--out", str(tmp_path / "x.mp4"), "--quiet"])
    line = _err_line(capsys)
    assert code == 2 and "unknown word 'purple'" in line and "vocabulary:" in line and "circle" in line
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("argv, needle", [
    (["quantize", "--a-bits", "3"], "a_bits"),
    (["quantize", "--w-bits", "9"], "w_bits"),
    (["quantize", "--method", "minmax", "--attention", "fp8"], "--attention applies to --method dvdquant only"),
    (["quantize", "--model", "no/such/dir"], "neither 'embedded' nor a diffusers model directory"),
    (["generate", "--model", "missing.safetensors", "--prompt", PROMPT], "missing.safetensors"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    out = ["--out", str(tmp_path / "o.mp4" if argv[0] == "generate" else tmp_path / "o")]
    assert main(argv + out + ["--quiet"]) == 2
    assert needle in _err_line(capsys)


def test_generate_flags_are_the_execution_config_fields():
    """Every ExecutionConfig field is a ``generate`` flag of the same name; the defaults agree."""
    import dataclasses

    from dvdquant.kernels import ExecutionConfig
    args = build_parser().parse_args(["generate", "--prompt", PROMPT, "--out", "o.mp4"])
    fields = {f.name for f in dataclasses.fields(ExecutionConfig)}
    assert fields <= set(vars(args))
    assert all(getattr(args, f) == getattr(ExecutionConfig(), f) for f in fields - {"backend"})
    args = build_parser().parse_args(["generate", "--prompt", PROMPT, "--out", "o.mp4", "--backend", "fp8",
                                      "--fast-accum", "--no-exact-rotation", "--no-int8-gemm",
                                      "--no-fuse-projections", "--attention-path", "emulated"])
    assert ExecutionConfig(**{f: getattr(args, f) for f in fields}) == ExecutionConfig(
        "fp8", fast_accum=True, exact_rotation=False, int8_gemm=False, fuse_projections=False,
        attention_path="emulated")
