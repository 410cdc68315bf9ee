"""Shipped embedded model and classifier: hash check, loading, generation, accuracy."""

import shutil

import pytest
import torch

from dvdquant.data import generate_clips
from dvdquant.errors import CheckpointError
from dvdquant.eval.classifier import CLASSIFIER_DIR, classify, load_classifier
from dvdquant.models.embedded import EMBEDDED_DIR, TRANSFORMER_CONFIG, load_embedded
from dvdquant.pipeline import generate


@pytest.fixture(scope="module")
def model():
    return load_embedded()


def test_config_fits_the_kernels(model):
    cfg = model.transformer.config
    assert (cfg.num_attention_heads * cfg.attention_head_dim) % 128 == 0 and cfg.ffn_dim % 128 == 0
    assert dict(model.config.transformer) == TRANSFORMER_CONFIG
    size = sum(p.stat().st_size for d in (EMBEDDED_DIR, CLASSIFIER_DIR) for p in d.glob("*.safetensors"))
    assert size <= 30e6


def test_corrupted_file_is_rejected(tmp_path):
    copy = tmp_path / "embedded"
    shutil.copytree(EMBEDDED_DIR, copy)
    data = bytearray((copy / "transformer.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (copy / "transformer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="transformer.safetensors is corrupted: sha256 mismatch"):
        load_embedded(directory=copy)
    shutil.copy(EMBEDDED_DIR / "transformer.safetensors", copy / "transformer.safetensors")
    (copy / "text_encoder.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_embedded(directory=copy)


def test_two_step_generation_is_deterministic(model):
    prompts = ["a red square moving left on a striped background"]
    a = generate(model, prompts, seed=3, steps=2, progress=False)
    b = generate(model, prompts, seed=3, steps=2, progress=False)
    assert torch.equal(a.videos, b.videos) and torch.isfinite(a.latents).all()
    assert a.videos.shape == (1, 16, 32, 32, 3)


def test_bf16_generation_runs():
    m = load_embedded(dtype=torch.bfloat16)
    r = generate(m, "a blue circle growing on a dark background", steps=1, guidance=1.0, progress=False)
    assert torch.isfinite(r.latents).all()


def test_classifier_reads_real_clips():
    clf = load_classifier()
    batch = generate_clips(48, seed=2024)
    pred = classify(batch.videos, clf)
    for name, want in batch.labels.items():
        assert (pred[name] == want).float().mean() >= 0.95, name
    assert clf.features(batch.videos[:4]).shape == (4, 256)


def test_corrupted_classifier_is_rejected(tmp_path):
    copy = tmp_path / "classifier"
    shutil.copytree(CLASSIFIER_DIR, copy)
    (copy / "classifier.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_classifier(directory=copy)


def test_viditq_calibration_is_keyed_by_denoising_step(model):
    """quantize_ installs a step hook while calibrating, so statistics are keyed by the step index."""
    import copy

    import dvdquant
    from dvdquant import ViDiTQConfig

    transformer = copy.deepcopy(model.transformer)

    def calibrate(t):
        m = copy.copy(model)
        m.transformer = t
        generate(m, ["a red circle moving left on a dark background"], steps=3, progress=False)

    report = dvdquant.quantize_(transformer, ViDiTQConfig(w_bits=8, a_bits=8), calibration=calibrate)
    assert {l.extras["calibrated_steps"] for l in report.layers} == {3}
    assert report.calibration_passes == 3              # CFG batches cond + uncond in one pass
