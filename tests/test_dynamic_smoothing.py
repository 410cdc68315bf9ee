"""DVD-Quant ``smoothing="dynamic"`` end to end: checkpoint format version 4 (bit-exact round trip, one-line
refusals), the backends (per-token layers on the kernels' pipeline, the others on the simulated path with one log
line per layer), torch.compile, the CLI."""
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dvdquant
from dvdquant import CheckpointError, DVDQuantConfig, serialization
from dvdquant.api import quantized_layers
from dvdquant.kernels import ExecutionConfig, env
from dvdquant.nn.execution import plan
from tiny_models import TINY_MODELS, run

LAYER = "blocks.0.attn1.to_q"


def _wan_batches(inputs: dict) -> dict:
    """Two samples of their own, and a CFG-like pair (the same latents and step, conditional and zero context)."""
    g = torch.Generator().manual_seed(7)
    two = dict(hidden_states=torch.cat([inputs["hidden_states"], torch.randn(1, 4, 2, 8, 8, generator=g) * 2]),
               timestep=torch.tensor([500, 120]),
               encoder_hidden_states=torch.cat([inputs["encoder_hidden_states"], torch.randn(1, 8, 32, generator=g)]))
    cfg = {k: torch.cat([v, v]) for k, v in inputs.items()}
    cfg["encoder_hidden_states"][1:] = 0
    return {"one": inputs, "two": two, "cfg": cfg}


@pytest.fixture(scope="module", params=[8, 16], ids=["master8", "master16"])
def saved(request, tmp_path_factory):
    model, inputs = TINY_MODELS["wan"]()
    model.eval()
    cfg = DVDQuantConfig(smoothing="dynamic", smooth_alpha=0.4, smooth_master_bits=request.param)
    dvdquant.quantize_(model, cfg)
    path = dvdquant.save(model, tmp_path_factory.mktemp("dyn") / "q.safetensors")
    return model, inputs, path, cfg


@pytest.fixture(scope="module")
def saved8(tmp_path_factory):
    """The 8-bit master (the default) with its outputs on two samples and a CFG-like pair."""
    model, inputs = TINY_MODELS["wan"]()
    model.eval()
    dvdquant.quantize_(model, DVDQuantConfig(smoothing="dynamic"))
    path = dvdquant.save(model, tmp_path_factory.mktemp("dyn8") / "q.safetensors")
    batches = {k: v for k, v in _wan_batches(inputs).items() if k != "one"}
    return path, batches, {k: run(model, b) for k, b in batches.items()}


def test_round_trip_is_bit_exact(saved):
    model, inputs, path, cfg = saved
    loaded = dvdquant.load(path)                  # rebuilt from the header, no original weights
    assert loaded._dvdquant_config == cfg
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and any(k.endswith(".w_master") for k in sd_a)
    assert all(torch.equal(sd_a[k], sd_b[k]) and sd_a[k].dtype == sd_b[k].dtype for k in sd_a)
    for name, batch in _wan_batches(inputs).items():
        assert torch.equal(run(model, batch), run(loaded, batch)), name
    q = loaded.get_submodule(LAYER)
    assert q.dyn_alpha == 0.4 and q.w_symmetric is False


def test_header_and_stored_tensors(saved):
    model, _, path, cfg = saved
    meta = dvdquant.read_metadata(path)
    assert meta["format_version"] == 4 == serialization.FORMAT_VERSION
    master = cfg.smooth_master_bits
    dynamic = dict(quantized_layers(model))
    assert set(meta["layers"]) == set(dynamic)
    assert all(lm["smoothing"] == {"alpha": 0.4, "master_bits": master, "symmetric": False}
               for lm in meta["layers"].values())
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        wm = f.get_tensor(f"{LAYER}.w_master")
    n, k = dynamic[LAYER].out_features, dynamic[LAYER].in_features
    assert wm.shape == (n, k) and wm.dtype == (torch.int8 if master == 8 else torch.float32)
    assert (f"{LAYER}.w_master_scale" in keys) == (master == 8) and f"{LAYER}.w_colmax" in keys
    # the int4 codes are not stored: no forward of such a layer reads them (load rebuilds them from the master)
    assert not any(k.endswith((".qweight", ".w_scale", ".w_zero")) for k in keys)


def test_qweight_is_the_master_weight_at_s_1(saved):
    model, _, _, _ = saved
    q = model.get_submodule(LAYER)
    assert torch.equal(q.dequantized_weight(), q.smoothed_weight(torch.ones_like(q.w_colmax)))


def test_older_readers_refuse_a_version_4_file(saved, monkeypatch):
    _, _, path, _ = saved
    monkeypatch.setattr(serialization, "READ_VERSIONS", (1, 2, 3))
    with pytest.raises(CheckpointError, match="format version 4; .* reads versions 1, 2, 3") as e:
        dvdquant.load(path)
    assert "\n" not in str(e.value)


def _rewrite(src, dst, edit_meta=None, edit_tensors=None):
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["dvdquant"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    meta["tensors_sha256"] = serialization.tensors_sha256(tensors)   # a well-formed file: only the content is off
    save_file(tensors, str(dst), metadata={"dvdquant": json.dumps(meta)})
    return dst


def _version(v):
    def edit(meta):
        meta["format_version"] = v
    return edit


def _entry(**kw):
    def edit(meta):
        meta["layers"][LAYER]["smoothing"].update(kw)
    return edit


@pytest.mark.parametrize("edit_meta, edit_tensors, needle", [
    (None, lambda t: t.pop(f"{LAYER}.w_colmax"), f"layer {LAYER} has dynamic smoothing in its header but no w_colmax"),
    (None, lambda t: t.pop(f"{LAYER}.w_master"), "no w_master tensor"),
    (None, lambda t: t.update({f"{LAYER}.w_colmax": t[f"{LAYER}.w_colmax"].double()}), "w_colmax is torch.float64"),
    (None, lambda t: t.update({f"{LAYER}.w_master": t[f"{LAYER}.w_master"][:, :-1].contiguous()}), "w_master is"),
    (_version(3), None, "has dynamic smoothing in a format version 3 header"),
    (_entry(master_bits=4), None, "smoothing="),
    (_entry(alpha=1.5), None, "smoothing="),
    (_entry(symmetric="no"), None, "smoothing="),
])
def test_inconsistent_file_is_one_line(saved, tmp_path, edit_meta, edit_tensors, needle):
    _, _, path, _ = saved
    bad = _rewrite(path, tmp_path / "bad.safetensors", edit_meta, edit_tensors)
    with pytest.raises(CheckpointError, match=needle) as e:
        dvdquant.load(bad)
    assert "\n" not in str(e.value)


def test_master_bits_disagreeing_with_the_tensors_is_refused(saved, tmp_path):
    _, _, path, cfg = saved
    other = 16 if cfg.smooth_master_bits == 8 else 8
    bad = _rewrite(path, tmp_path / "bad.safetensors", _entry(master_bits=other))
    with pytest.raises(CheckpointError, match=f"layer {LAYER}"):
        dvdquant.load(bad)


# ------------------------------------------------------------------------------------------ backends
PER_CHANNEL = "dynamic smoothing with a per-channel activation balance (its Λ varies along K) has no kernel"


@pytest.mark.parametrize("backend", ["emulated", "fp8", "auto"])
def test_per_channel_layers_run_the_simulated_path_on_every_backend(saved8, backend, caplog, monkeypatch):
    """The default (auto_scale="per_channel"): Λ_t varies along K inside the dot product, so no kernel runs
    it; every backend runs the simulated forward, with one log line per layer."""
    path, batches, ref = saved8
    model = dvdquant.load(path)
    monkeypatch.setattr(env, "_LOGGED", set())
    dvdquant.set_backend(model, backend)
    q = model.get_submodule(LAYER)
    for cap in (None, (9, 0)):                          # on this CPU, and as planned on an H100
        p = plan(q, "cpu", 4, capability=cap)
        assert p.path == "simulated" and p.reason == PER_CHANNEL
    with caplog.at_level(logging.INFO, logger="dvdquant.nn.execution"):
        for k, b in batches.items():
            assert torch.equal(run(model, b), ref[k]), k
    lines = [r.getMessage() for r in caplog.records if PER_CHANNEL in r.getMessage()]
    assert len(lines) == len(dict(quantized_layers(model)))              # one per layer, not per call
    assert f"layer {LAYER}: falling back to simulated: {PER_CHANNEL}" in lines


@pytest.mark.parametrize("backend", ["emulated", "fp8", "auto"])
def test_per_token_layers_run_the_kernel_pipeline(backend, caplog, monkeypatch):
    """auto_scale="none" with an in-kernel rotation: the kernels' pipeline (emulated on this CPU; the FP8
    op on an H100), the simulated outputs bit for bit, no fallback line."""
    model, inputs = TINY_MODELS["wan"]()
    model.eval()
    dvdquant.quantize_(model, DVDQuantConfig(smoothing="dynamic", auto_scale="none", rotation_block=32))
    batches = _wan_batches(inputs)
    ref = {k: run(model, b) for k, b in batches.items()}
    monkeypatch.setattr(env, "_LOGGED", set())
    dvdquant.set_backend(model, backend)
    q = model.get_submodule(LAYER)
    on_h100 = "emulated" if backend == "emulated" else "fp8"
    assert plan(q, "cpu", 4).path == "emulated" and plan(q, "cpu", 4, capability=(9, 0)).path == on_h100
    with caplog.at_level(logging.INFO, logger="dvdquant.nn.execution"):
        for k, b in batches.items():
            assert torch.equal(run(model, b), ref[k]), k
    assert not [r for r in caplog.records if "dynamic smoothing" in r.getMessage()]


def test_plan_without_dynamic_smoothing_is_unchanged():
    from dvdquant.kernels import LinearLayout, plan_forward
    lay = LinearLayout(256, 256, 4, True, None, 4, False, 128, "none", 128, False, False)
    assert plan_forward(lay, ExecutionConfig("emulated"), "cpu", 4).path == "emulated"
    dyn = LinearLayout(256, 256, 4, True, None, 4, False, 128, "per_channel", 128, False, False,
                       dynamic_smoothing=True)
    assert plan_forward(dyn, ExecutionConfig("emulated"), "cpu", 4).path == "simulated"


@pytest.mark.parametrize("auto_scale", ["per_channel", "none"])
def test_torch_compile_on_the_fp8_backend(auto_scale):
    """A compiled model (eager backend: dynamo's tracing, no codegen) on a non-simulated backend gives the
    eager simulated outputs: the plan sends every per-channel dynamic layer to its simulated forward, and
    per-token ones to the kernels' pipeline (emulated on this CPU)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    dvdquant.quantize_(model, DVDQuantConfig(smoothing="dynamic", auto_scale=auto_scale, rotation_block=32),
                       filter_fn=lambda m, n: True)
    x = torch.randn(2, 5, 64)
    x[1, :, 3] *= 40                                     # the second sample has an outlier channel of its own
    with torch.no_grad():
        ref = model(x)
        dvdquant.set_backend(model, "fp8")
        torch._dynamo.reset()
        try:
            assert torch.equal(torch.compile(model, backend="eager")(x), ref)
        finally:
            torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ CLI
def test_cli_quantize_dynamic_then_generate(tmp_path, capsys):
    from dvdquant.cli import main
    q = tmp_path / "q"
    assert main(["quantize", "--model", "embedded", "--smoothing", "dynamic", "--smooth-alpha", "0.6",
                 "--out", str(q), "--quiet"]) == 0
    meta = serialization.read_metadata(q / "quantized.safetensors")
    fields = meta["config"]["fields"]
    assert (fields["smoothing"], fields["smooth_alpha"], fields["smooth_master_bits"]) == ("dynamic", 0.6, 8)
    assert meta["format_version"] == 4 and all(lm["smoothing"]["alpha"] == 0.6 for lm in meta["layers"].values())
    clip = tmp_path / "clip.mp4"                       # fp8 on this CPU: the simulated path, layer by layer
    assert main(["generate", "--model", str(q), "--prompt", "a red circle moving left on a dark background",
                 "--steps", "1", "--backend", "fp8", "--out", str(clip), "--quiet"]) == 0
    assert clip.stat().st_size > 0


def test_cli_smoothing_flags_for_a_method_without_them(tmp_path, capsys):
    from dvdquant.cli import main
    assert main(["quantize", "--method", "minmax", "--smoothing", "dynamic", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--smoothing applies to --method dvdquant only" in err[0]
    assert not (tmp_path / "q").exists()
