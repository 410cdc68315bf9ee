"""quantize_ on tiny random-init configs of the five diffusers video transformers."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import dvdquant
from dvdquant import DVDQuantConfig, GBSConfig, MinMaxConfig, QuaRotConfig, SmoothQuantConfig, ViDiTQConfig
from dvdquant.errors import ConfigError, DVDQuantError
from dvdquant.numerics.metrics import sqnr_db
from tiny_models import TINY_MODELS, run

# quantized Linear layers per tiny model (adapters: attention + MLP inside blocks, no modulation)
EXPECTED_LAYERS = {"wan": 20, "hunyuan": 17, "cogvideox": 6, "ltx": 10, "mochi": 9}
METHODS = [DVDQuantConfig, MinMaxConfig, QuaRotConfig, SmoothQuantConfig, ViDiTQConfig]
W8A8_SQNR_FLOOR_DB = 40.0   # measured 52–64 dB across models and methods
W4A4_SQNR_FLOOR_DB = 20.0   # measured 26–40 dB


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def tiny(request):
    torch.manual_seed(0)
    model, inputs = TINY_MODELS[request.param]()
    model.eval()
    return request.param, model, inputs, run(model, inputs)


@pytest.mark.parametrize("cfg_cls", METHODS)
def test_methods_on_tiny_models(tiny, cfg_cls):
    name, model, inputs, ref = tiny
    for bits, floor in ((8, W8A8_SQNR_FLOOR_DB), (4, W4A4_SQNR_FLOOR_DB)):
        m = copy.deepcopy(model)
        report = dvdquant.quantize_(m, cfg_cls(w_bits=bits, a_bits=bits), calibration=lambda mm: run(mm, inputs))
        assert len(report.layers) == EXPECTED_LAYERS[name]
        assert len(dvdquant.quantized_layers(m)) == EXPECTED_LAYERS[name]
        out = run(m, inputs)
        assert torch.isfinite(out).all()
        assert sqnr_db(ref, out) > floor, (name, cfg_cls.__name__, bits, sqnr_db(ref, out))
        if cfg_cls in (SmoothQuantConfig, ViDiTQConfig):
            assert report.calibration_passes == 1
        else:
            assert report.calibration_passes == 0


def test_report_contents():
    model, inputs = TINY_MODELS["wan"]()
    report = dvdquant.quantize_(model, DVDQuantConfig())
    layer = report.layers[0]
    assert layer.name == "blocks.0.attn1.to_q" and layer.method == "dvdquant"
    assert 0 < layer.w_err <= layer.w_err_minmax + 1e-7
    assert "blocks.0.attn1.to_q" in str(report)
    assert report.to_dict()["model_class"] == "WanTransformer3DModel"


def test_rotation_invariance_fp():
    """A rotated FP model (weights W·H, activations x·H, nothing quantized) is the same function."""
    from dvdquant.algorithms.arq import choose_rotation_block, rotate_weight
    model, inputs = TINY_MODELS["wan"]()
    model = model.double()
    inputs = {k: (v.double() if v.is_floating_point() and k != "timestep" else v) for k, v in inputs.items()}
    ref = run(model, inputs)
    for name, lin in dvdquant.models.select_linears(model):
        block = choose_rotation_block(lin.in_features, None)
        w_rot = rotate_weight(lin.weight.detach(), block).double()
        fp = _FpRotated(w_rot, lin.bias, block)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, fp)
    out = run(model, inputs)
    assert (out - ref).norm() / ref.norm() < 1e-5


class _FpRotated(nn.Module):
    def __init__(self, w_rot, bias, block):
        super().__init__()
        from dvdquant.numerics.hadamard import hadamard_matrix
        self.w, self.b, self.h = w_rot, bias, hadamard_matrix(block, torch.float64)

    def forward(self, x):
        from dvdquant.numerics.hadamard import rotate_last_dim
        return nn.functional.linear(rotate_last_dim(x, self.h.to(x.dtype)), self.w.to(x.dtype), self.b)


def test_gbs_drives_all_layers():
    model, inputs = TINY_MODELS["wan"]()
    dvdquant.quantize_(model, DVDQuantConfig(gbs=GBSConfig(delta=0.1, warmup_steps=1)))
    ctrl = dvdquant.step_controller(model)
    seen = []
    layer = dvdquant.quantized_layers(model)[0][1]
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.current_a_bits()))
    x = inputs["hidden_states"]
    for i in range(4):                              # steps from the timestep argument alone
        out = run(model, dict(inputs, hidden_states=x, timestep=torch.tensor([900 - 200 * i])))
        x = x - 0.3 * out
    assert seen == ctrl.schedule and seen[0] == 8 and 4 in seen


def test_filter_fn_and_skip():
    model, _ = TINY_MODELS["wan"]()
    rep = dvdquant.quantize_(model, MinMaxConfig(skip=("ffn",)),
                             filter_fn=lambda m, n: n.startswith("blocks.0."))
    assert [l.name for l in rep.layers] == [f"blocks.0.attn{a}.{p}" for a in (1, 2)
                                           for p in ("to_q", "to_k", "to_v", "to_out.0")]


def test_unknown_model_falls_back_with_warning(caplog):
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    with caplog.at_level("WARNING"):
        rep = dvdquant.quantize_(model, DVDQuantConfig(skip=(r"^2$",)))
    assert [l.name for l in rep.layers] == ["0"]
    assert "no adapter" in caplog.text
    y = model(torch.randn(3, 32))
    assert y.shape == (3, 16) and torch.isfinite(y).all()


def test_errors_are_one_line():
    cases = [
        (lambda: dvdquant.quantize_(nn.Sequential(nn.ReLU()), DVDQuantConfig()), "no nn.Linear"),
        (lambda: DVDQuantConfig(a_bits=3), "a_bits must be one of"),
        (lambda: DVDQuantConfig(w_bits=9), "w_bits"),
        (lambda: DVDQuantConfig(auto_scale="bogus"), "auto_scale"),
        (lambda: GBSConfig(low_bits=8, high_bits=4), "gbs bits"),
        (lambda: dvdquant.quantize_(TINY_MODELS["wan"]()[0], MinMaxConfig(), filter_fn=lambda m, n: False),
         "filter_fn selected none"),
        (lambda: dvdquant.quantize_(TINY_MODELS["wan"]()[0], SmoothQuantConfig()), "needs activation statistics"),
        (lambda: dvdquant.quantize_(TINY_MODELS["wan"]()[0], "dvdquant"), "no quantization method registered"),
    ]
    for fn, msg in cases:
        with pytest.raises(DVDQuantError) as e:
            fn()
        assert msg in str(e.value) and "\n" not in str(e.value)


def test_configs_are_frozen():
    cfg = DVDQuantConfig()
    with pytest.raises(Exception):
        cfg.w_bits = 8  # type: ignore[misc]
    with pytest.raises(ConfigError):
        DVDQuantConfig(group_size=1)


def test_nan_activation_error():
    model, inputs = TINY_MODELS["wan"]()
    dvdquant.quantize_(model, DVDQuantConfig())
    inputs = dict(inputs, encoder_hidden_states=torch.full_like(inputs["encoder_hidden_states"], math.nan))
    with pytest.raises(dvdquant.NonFiniteError, match="NaN/Inf"):
        run(model, inputs)


def test_double_quantize_refused():
    model, _ = TINY_MODELS["wan"]()
    dvdquant.quantize_(model, MinMaxConfig())
    with pytest.raises(DVDQuantError, match="already quantized"):
        dvdquant.quantize_(model, MinMaxConfig())


def test_rotation_auto_rotates_below_8_bit_activations():
    from dvdquant.config import StepPolicyConfig
    assert DVDQuantConfig().rotation == "auto"
    assert DVDQuantConfig(w_bits=4, a_bits=4).rotates() and DVDQuantConfig(w_bits=4, a_bits=6).rotates()
    assert not DVDQuantConfig(w_bits=4, a_bits=8).rotates()
    assert DVDQuantConfig(w_bits=4, a_bits=4, gbs=GBSConfig()).rotates()
    assert DVDQuantConfig(w_bits=4, a_bits=8, policy=StepPolicyConfig()).rotates()
    assert DVDQuantConfig(w_bits=4, a_bits=8, rotation=True).rotates()
    assert not DVDQuantConfig(w_bits=4, a_bits=4, rotation=False).rotates()
    assert not DVDQuantConfig(w_bits=4, a_bits=4).weight_only().rotates()
    with pytest.raises(ConfigError, match="rotation must be"):
        DVDQuantConfig(rotation="yes")
    with pytest.raises(ConfigError, match="mean_channel='exact' needs rotation"):
        DVDQuantConfig(w_bits=4, a_bits=8, mean_channel="exact")
