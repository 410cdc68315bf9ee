"""Bad input and interruptions: one line naming the problem, rc 2 (130 for Ctrl-C), checked before any
work where it can be, and nothing half-written left behind."""
from __future__ import annotations

import json
import os

import pytest
import torch

import dvdquant
from dvdquant import fileio, serialization
from dvdquant.cli import main

PROMPT = "a red circle moving left on a dark background"


def _one_line(capsys, prefix="dvdquant: error: "):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


@pytest.fixture()
def no_work(monkeypatch):
    """Any model loading fails the test: the command had to stop before it."""
    def boom(*a, **k):
        raise AssertionError("work started before the input was checked")
    from dvdquant.models import embedded
    from dvdquant.pipeline import models_io
    for mod, name in ((models_io, "load_transformer"), (models_io, "load_generation_model"),
                      (embedded, "load_embedded")):
        monkeypatch.setattr(mod, name, boom)


@pytest.fixture()
def readonly_dir(tmp_path, monkeypatch):
    """A folder we cannot write in: chmod 0555, and where that does not stop us (root), the probe
    file's creation fails as the OS would fail it."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.access(d, os.W_OK):
        real = fileio._create_exclusive

        def create(path):
            if os.path.dirname(os.path.abspath(path)).startswith(str(d)):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)
        monkeypatch.setattr(fileio, "_create_exclusive", create)
    yield d
    d.chmod(0o755)


@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    from tiny_models import tiny_wan
    d = tmp_path_factory.mktemp("wan")
    tiny_wan()[0].save_pretrained(d)
    return d


def _leftovers(d):
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("argv", [["quantize"], ["generate", "--prompt", PROMPT], ["demo"]])
def test_out_in_a_readonly_folder(readonly_dir, no_work, capsys, argv):
    out = readonly_dir / ("clip.mp4" if argv[0] == "generate" else "out")
    assert main(argv + ["--out", str(out), "--quiet"]) == 2
    line = _one_line(capsys)
    assert "cannot write in" in line and str(readonly_dir) in line
    assert _leftovers(readonly_dir) == []


def test_quantize_out_naming_an_existing_file(tmp_path, no_work, capsys):
    f = tmp_path / "q"
    f.write_text("keep")
    assert main(["quantize", "--out", str(f), "--quiet"]) == 2
    assert "is an existing file; give a folder" in _one_line(capsys)
    assert f.read_text() == "keep"


@pytest.mark.parametrize("name, needle", [("c.avi", "extension must be one of .mp4, .gif"),
                                          ("adir", "is an existing folder")])
def test_generate_out_wrong_kind(tmp_path, no_work, capsys, name, needle):
    (tmp_path / "adir").mkdir()
    assert main(["generate", "--prompt", PROMPT, "--out", str(tmp_path / name), "--quiet"]) == 2
    assert needle in _one_line(capsys)
    assert _leftovers(tmp_path) == ["adir"]


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--prompt", "", "--out", "x.mp4"], "prompt 1 is empty"),
    (["generate", "--prompt", PROMPT, "--prompt", "  ", "--out", "x.mp4"], "prompt 2 is empty"),
    (["demo", "--prompt", " \t", "--out", "d"], "prompt 1 is empty"),
    (["generate", "--prompt", PROMPT, "--steps", "0", "--out", "x.mp4"], "steps must be an integer ≥ 1, got 0"),
    (["generate", "--prompt", PROMPT, "--steps", "-3", "--out", "x.mp4"], "got -3"),
    (["demo", "--steps", "0", "--out", "d"], "steps must be an integer ≥ 1"),
])
def test_empty_prompt_and_steps_refused(tmp_path, no_work, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--quiet"]) == 2
    assert needle in _one_line(capsys)
    assert _leftovers(tmp_path) == []


def test_ctrl_c_during_quantize_removes_the_folder_it_made(tmp_path, tiny_wan_dir, capsys, monkeypatch):
    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(serialization, "save_file", interrupted)
    out = tmp_path / "new" / "q"
    assert main(["quantize", "--model", str(tiny_wan_dir), "--method", "minmax", "--out", str(out), "--quiet"]) == 130
    assert _one_line(capsys, "dvdquant: interrupted")
    assert _leftovers(tmp_path) == []                       # new/ and new/q were made by the command
    keep = tmp_path / "mine"
    keep.mkdir()
    assert main(["quantize", "--model", str(tiny_wan_dir), "--method", "minmax", "--out", str(keep), "--quiet"]) == 130
    assert _one_line(capsys, "dvdquant: interrupted")
    assert keep.is_dir() and _leftovers(keep) == []         # the user's folder stays, no temporary file


def test_os_error_mid_run_is_one_line(tmp_path, tiny_wan_dir, capsys, monkeypatch):
    def full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device", str(filename))
    monkeypatch.setattr(serialization, "save_file", full)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_wan_dir), "--method", "minmax", "--out", str(out), "--quiet"]) == 2
    assert "No space left on device" in _one_line(capsys)
    assert _leftovers(tmp_path) == []


def test_quantize_writes_0644_files(tmp_path, tiny_wan_dir):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_wan_dir), "--method", "minmax", "--out", str(out), "--quiet"]) == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert _leftovers(out) == ["quantized.safetensors", "report.json"]
    assert {(out / f).stat().st_mode & 0o777 for f in _leftovers(out)} == {0o666 & ~umask}


def test_broken_checkpoint_header_names_the_file(tmp_path, capsys):
    from safetensors.torch import save_file
    bad = tmp_path / "bad.safetensors"
    save_file({"a": torch.zeros(2)}, str(bad), metadata={"dvdquant": "{not json"})
    assert main(["generate", "--model", str(bad), "--prompt", PROMPT, "--out", str(tmp_path / "c.mp4"),
                 "--quiet"]) == 2
    line = _one_line(capsys)
    assert "broken JSON header" in line and str(bad) in line


@pytest.fixture(scope="module")
def embedded_ckpt_dir(tmp_path_factory):
    """The folder `quantize --out` makes, for the embedded model (MinMax W8A8: quick to build)."""
    from dvdquant.models.embedded import load_embedded
    d = tmp_path_factory.mktemp("q")
    t = load_embedded().transformer
    dvdquant.quantize_(t, dvdquant.MinMaxConfig(w_bits=8, a_bits=8))
    serialization.save(t, d / "quantized.safetensors", extra={"base_model": "embedded"})
    return d


def test_generate_from_the_quantize_folder_and_replace_atomically(tmp_path, embedded_ckpt_dir, capsys,
                                                                    monkeypatch):
    clip = tmp_path / "clip.gif"
    clip.write_text("old")
    assert main(["generate", "--model", str(embedded_ckpt_dir), "--prompt", PROMPT, "--steps", "1",
                 "--out", str(clip), "--quiet"]) == 0
    assert clip.read_bytes()[:3] == b"GIF" and _leftovers(tmp_path) == ["clip.gif"]
    good = clip.read_bytes()

    import imageio.v2 as imageio

    def broken_pipe(path, frames, **kw):                    # ffmpeg dying half-way through the file
        with open(path, "wb") as f:
            f.write(b"GIF89a-partial")
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(imageio, "mimsave", broken_pipe)
    assert main(["generate", "--model", str(embedded_ckpt_dir), "--prompt", PROMPT, "--steps", "1",
                 "--out", str(clip), "--quiet"]) == 2
    assert "Broken pipe" in _one_line(capsys)
    assert clip.read_bytes() == good and _leftovers(tmp_path) == ["clip.gif"]


def test_generate_from_a_folder_without_a_checkpoint(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", PROMPT, "--out", str(tmp_path / "c.mp4"),
                 "--quiet"]) == 2
    assert "is a folder without quantized.safetensors" in _one_line(capsys)


def test_w3_checkpoint_is_packed_at_3_bits(tmp_path, tiny_wan_dir):
    sizes = {}
    for bits in (3, 4):
        out = tmp_path / f"w{bits}"
        assert main(["quantize", "--model", str(tiny_wan_dir), "--method", "minmax", "--w-bits", str(bits),
                     "--a-bits", "8", "--out", str(out), "--quiet"]) == 0
        sizes[bits] = (out / "quantized.safetensors").stat().st_size
        meta = serialization.read_metadata(out / "quantized.safetensors")
        assert json.loads((out / "report.json").read_text())["layers"]
    assert meta["format_version"] == 1 and sizes[3] < sizes[4]


def test_config_flag_for_a_method_without_the_field(tmp_path, no_work, capsys):
    assert main(["quantize", "--method", "minmax", "--rotation-block", "128", "--out", str(tmp_path / "q")]) == 2
    assert "--rotation-block applies to --method" in _one_line(capsys)
    assert not (tmp_path / "q").exists()


def test_rotation_block_and_auto_scale_flags_reach_the_checkpoint(tmp_path, tiny_wan_dir):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_wan_dir), "--rotation-block", "16", "--auto-scale", "none",
                 "--rotation", "on", "--a-bits", "8", "--out", str(out), "--quiet"]) == 0
    fields = serialization.read_metadata(out / "quantized.safetensors")["config"]["fields"]
    assert fields["rotation_block"] == 16 and fields["auto_scale"] == "none" and fields["rotation"] is True
    assert main(["quantize", "--method", "minmax", "--rotation", "off", "--out", str(tmp_path / "m")]) == 2
