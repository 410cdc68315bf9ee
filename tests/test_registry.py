"""The method registry is the only list of methods: a method registered once appears in the CLI's
choices, the evaluation's baseline rows and the checkpoint round trip, with no other list to edit."""
from dataclasses import dataclass

import pytest
import torch

import dvdquant
from dvdquant.algorithms import registry
from dvdquant.algorithms.registry import QuantMethod, register_method, registered_methods
from dvdquant.baselines.methods import minmax_layer
from dvdquant.cli import _config_from_args, build_parser
from dvdquant.config import _Common
from dvdquant.eval import quality, report
from tiny_models import TINY_MODELS, run


@dataclass(frozen=True)
class DummyConfig(_Common):
    """A stand-in baseline: MinMax weights under another name."""


@pytest.fixture()
def dummy():
    method = register_method(QuantMethod("dummy", DummyConfig, minmax_layer, label="Dummy"))
    try:
        yield method
    finally:
        registry._REGISTRY.pop(DummyConfig)


def test_builtin_methods_in_one_list():
    assert list(registered_methods()) == ["dvdquant", "minmax", "smoothquant", "quarot", "viditq"]
    assert report.BASELINES == ("minmax", "smoothquant", "quarot", "viditq")
    assert [k for k, m in quality.METHODS.items() if m.family == "baseline"] == list(report.BASELINES)
    assert [quality.METHODS[k].calibrated for k in report.BASELINES] == [False, True, False, True]


def test_registered_method_reaches_cli_eval_and_checkpoints(dummy, tmp_path):
    args = build_parser().parse_args(["quantize", "--method", "dummy", "--out", str(tmp_path / "q")])
    cfg = _config_from_args(args)
    assert type(cfg) is DummyConfig and cfg.w_bits == 4 and cfg.a_bits == 4
    assert "dummy" in [a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                       if a.dest == "method"][0].choices

    spec = {s.key: s for s in quality.baseline_specs()}["dummy"]
    assert spec.label == "Dummy" and not spec.calibrated
    assert type(spec.build(quality.BITS["W4A8"])) is DummyConfig

    model, inputs = TINY_MODELS["wan"]()
    dvdquant.quantize_(model, cfg)
    path = dvdquant.save(model, tmp_path / "d.safetensors")
    loaded = dvdquant.load(path)
    assert loaded._dvdquant_config == cfg
    assert torch.equal(run(model, inputs), run(loaded, inputs))


def test_unknown_method_and_config_type():
    with pytest.raises(dvdquant.ConfigError, match="unknown method 'nope'"):
        registry.method_by_name("nope")
    with pytest.raises(dvdquant.ConfigError, match="unknown config type 'NopeConfig'"):
        registry.config_from_dict({"type": "NopeConfig", "fields": {}})
