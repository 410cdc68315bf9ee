"""Checkpoints: bit-exact round trip, and clear errors for every kind of bad file."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dvdquant
from dvdquant import CheckpointError, DVDQuantConfig, GBSConfig, ViDiTQConfig
from tiny_models import TINY_MODELS, run


@pytest.fixture()
def saved(tmp_path):
    model, inputs = TINY_MODELS["wan"]()
    model.eval()
    cfg = DVDQuantConfig(gbs=GBSConfig(delta=0.08))
    dvdquant.quantize_(model, cfg)
    path = dvdquant.save(model, tmp_path / "wan_q.safetensors")
    return model, inputs, path, cfg


def test_roundtrip_bit_exact(saved, tmp_path):
    model, inputs, path, cfg = saved
    loaded = dvdquant.load(path)              # rebuilt from the header, no original weights
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.equal(run(model, inputs), run(loaded, inputs))
    assert loaded._dvdquant_config == cfg
    assert dvdquant.step_controller(loaded) is not None          # the step hook is back after load
    assert list(tmp_path.iterdir()) == [path]  # atomic write left no temporary file
    q = loaded.get_submodule("blocks.0.attn1.to_q")
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape[1] == q.in_features // 2


def test_metadata(saved):
    _, _, path, _ = saved
    meta = dvdquant.read_metadata(path)
    assert meta["format_version"] == 1 and meta["model_class"] == "WanTransformer3DModel"
    assert meta["config"]["type"] == "DVDQuantConfig"
    assert meta["layers"]["blocks.0.ffn.net.2"]["w_bits"] == 4


def test_viditq_tables_roundtrip(tmp_path):
    model, inputs = TINY_MODELS["wan"]()
    dvdquant.quantize_(model, ViDiTQConfig(), calibration=lambda m: run(m, inputs))
    path = dvdquant.save(model, tmp_path / "v.safetensors")
    assert torch.equal(run(model, inputs), run(dvdquant.load(path), inputs))


def test_corrupted_tensor_rejected(saved):
    _, _, path, _ = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["blocks.0.attn1.to_q.qweight"][0, 0] ^= 0x11
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="SHA-256"):
        dvdquant.load(path)


def test_zero_points_off_the_grid_rejected(tmp_path):
    """A well-formed file (valid SHA-256) whose zero points are not grid integers is refused at load:
    the FP8 expansion table and the int4 GEMV assume z ∈ {0, …, 15}."""
    model, _ = TINY_MODELS["wan"]()
    dvdquant.quantize_(model, DVDQuantConfig())
    with torch.no_grad():
        model.get_submodule("blocks.0.attn1.to_q").w_zero[0] = 16.0
    path = dvdquant.save(model, tmp_path / "bad_zero.safetensors")
    with pytest.raises(CheckpointError, match="blocks.0.attn1.to_q has zero points outside the integers 0..15"):
        dvdquant.load(path)


def test_truncated_rejected(saved):
    _, _, path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|unreadable"):
        dvdquant.load(path)


def test_unknown_version_rejected(saved):
    _, _, path, _ = saved
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["dvdquant"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = 99
    save_file(tensors, str(path), metadata={"dvdquant": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="format version 99"):
        dvdquant.load(path)


def test_other_model_rejected(saved):
    _, _, path, _ = saved
    other, _ = TINY_MODELS["wan"](layers=1)
    with pytest.raises(CheckpointError, match="another config"):
        dvdquant.load(path, model=other)
    hy, _ = TINY_MODELS["hunyuan"]()
    with pytest.raises(CheckpointError, match="is for WanTransformer3DModel"):
        dvdquant.load(path, model=hy)


def test_not_a_checkpoint(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a dvdquant checkpoint"):
        dvdquant.load(plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        dvdquant.load(tmp_path / "missing.safetensors")
    model, _ = TINY_MODELS["wan"]()
    with pytest.raises(CheckpointError, match="not quantized"):
        dvdquant.save(model, tmp_path / "x.safetensors")


def _rewrite_header(path, raw: str):
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={"dvdquant": raw})


@pytest.mark.parametrize("raw, needle", [("", "broken JSON header"), ("{\"format_version\": 1,", "broken JSON header"),
                                         ("[1, 2]", "a JSON list, not an object")])
def test_broken_json_header_is_one_line(saved, raw, needle):
    _, _, path, _ = saved
    _rewrite_header(path, raw)
    with pytest.raises(CheckpointError, match=needle) as e:
        dvdquant.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_mode_follows_umask(saved):
    import os
    _, _, path, _ = saved
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask          # as open() would, not mkstemp's 0600


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
def test_other_widths_stored_densely(tmp_path, bits):
    """W3/W5–W7 codes take ⌈K·b/8⌉ bytes per row in the file (version 2), load back bit-exact."""
    model, inputs = TINY_MODELS["wan"]()
    model.eval()
    dvdquant.quantize_(model, DVDQuantConfig(w_bits=bits))
    path = dvdquant.save(model, tmp_path / "q.safetensors")
    meta = dvdquant.read_metadata(path)
    assert meta["format_version"] == 2
    layers = dict(dvdquant.api.quantized_layers(model))
    stored = 0
    with safe_open(str(path), framework="pt") as f:
        for name, lm in meta["layers"].items():
            assert lm["packed_bits"] == bits
            t = f.get_tensor(f"{name}.qweight")
            assert t.shape == (lm["out_features"], (lm["in_features"] * bits + 7) // 8)
            stored += t.numel()
    codes = sum(m.qweight.numel() for m in layers.values())
    assert stored <= codes * bits / 8 + sum(m.out_features for m in layers.values())
    loaded = dvdquant.load(path)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.equal(run(model, inputs), run(loaded, inputs))


def test_w4_and_w8_stay_format_version_1(tmp_path):
    model, _ = TINY_MODELS["wan"]()
    dvdquant.quantize_(model, DVDQuantConfig(w_bits=8, a_bits=8))
    path = dvdquant.save(model, tmp_path / "q.safetensors")
    meta = dvdquant.read_metadata(path)
    assert meta["format_version"] == 1 and not any("packed_bits" in lm for lm in meta["layers"].values())
