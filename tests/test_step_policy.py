"""dvdquant's step policy (algorithms/step_policy.py, nn/policy_hooks.py): skip / A4 / A8 per step and sample
from block 0's accumulated residual change; the budget controller; header round trip; CLI flags."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

import dvdquant
from dvdquant import DVDQuantConfig, GBSConfig
from dvdquant.algorithms.step_policy import SKIP, StepCosts, StepPolicy
from dvdquant.api import set_step_policy
from dvdquant.cli import main
from dvdquant.config import StepPolicyConfig
from dvdquant.errors import ConfigError
from tiny_models import tiny_wan

LAYERS = 3
COSTS = StepCosts(overhead=0.0, low_ratio=0.5, source="test")


def _policy_model(policy: StepPolicyConfig, per_sample_fp: bool = False):
    """A quantized tiny Wan of 3 blocks with the step policy; ``per_sample_fp``: its float layers run one sample
    at a time (test_batch_independence's harness: CPU BLAS gives float rows bits that vary with the batch)."""
    torch.manual_seed(1)
    model, _ = tiny_wan(head_dim=64, layers=LAYERS)
    dvdquant.quantize_(model.eval(), DVDQuantConfig(w_bits=4, a_bits=4, attention="none", policy=policy))
    if per_sample_fp:
        from test_batch_independence import _fp_layers_per_sample
        _fp_layers_per_sample(model)
    return model


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, needle", [
    (dict(skip_threshold=-1), "skip_threshold"), (dict(bits_threshold="x"), "bits_threshold"),
    (dict(skip_threshold=0.5, bits_threshold=0.1), "≤ bits_threshold"), (dict(low_bits=8, high_bits=4), "bits"),
    (dict(max_skips=-1), "max_skips"), (dict(warmup_steps=1.5), "warmup_steps"), (dict(budget=0), "budget"),
    (dict(budget=1.5), "budget"),
])
def test_config_refuses_bad_values(kw, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        StepPolicyConfig(**kw)
    assert "\n" not in str(e.value)


def test_policy_and_gbs_exclude_each_other():
    with pytest.raises(ConfigError, match="gbs=None"):
        DVDQuantConfig(gbs=GBSConfig(), policy=StepPolicyConfig())


@pytest.mark.parametrize("kw, needle", [(dict(schedule="88X4"), "policy.schedule must be"),
                                         (dict(schedule=""), "policy.schedule must be"),
                                         (dict(schedule="88S4", budget=0.5), "exclude each other")])
def test_schedule_is_validated(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        StepPolicyConfig(**kw)


# ----------------------------------------------------------------------------- decisions (no model)
def test_a_schedule_is_replayed_whatever_the_indicator():
    p = StepPolicy(StepPolicyConfig(schedule="8S46S"), COSTS, probe_share=0.25)
    got = [p.decide(0, i, 7, 10.0 if i else None, True) for i in range(7)]
    assert got == [8, SKIP, 4, 6, SKIP, 8, 8]           # past its end: high bits


def test_decisions_follow_the_accumulated_indicator():
    cfg = StepPolicyConfig(skip_threshold=0.1, bits_threshold=0.3, warmup_steps=1, final_steps=1, max_skips=2)
    p = StepPolicy(cfg, COSTS, probe_share=0.25)
    changes = [None, 0.05, 0.04, 0.5, 0.2, 0.03, 0.03, 0.03, 0.03, 0.01]
    acts = [p.decide(0, t, len(changes), c, can_skip=True) for t, c in enumerate(changes)]
    # warm-up 8; 0.05 < τ skip; 0.09 < τ skip; 0.59 ≥ δ: 8 (reset); 0.2: 4; skip, skip (0.06),
    # max_skips reached: 0.09 runs at 4; 0.03 skip; the last step never skips: 0.04 → 4
    assert acts == [8, SKIP, SKIP, 8, 4, SKIP, SKIP, 4, SKIP, 4]
    assert math.isnan(p.indicators[0]) and p.indicators[2] == pytest.approx(0.09)
    assert p.mean_cost() == pytest.approx(sum(p.cost(a) for a in acts) / len(acts))
    assert p.cost(SKIP) == pytest.approx(0.25) and p.cost(4) == pytest.approx(0.25 + 0.75 * 0.5)


def test_no_skip_without_a_cached_residual():
    p = StepPolicy(StepPolicyConfig(warmup_steps=0), COSTS, probe_share=0.25)
    assert p.decide(0, 0, None, None, can_skip=False) == 8          # a sample's first step runs in full
    assert p.decide(0, 1, None, 0.0, can_skip=False) == 4


def _synthetic(t, n, scale):
    return scale * (0.02 + 0.3 * math.exp(-t / 2) + 0.1 * (t / n) ** 4)


@pytest.mark.parametrize("steps", [20, 50])
def test_budget_controller_tracks_the_budget(steps):
    errs = []
    for scale in (0.1, 1.0, 10.0):                 # thresholds far too high, right, far too low for the signal
        for budget in (0.5, 0.6, 0.75, 0.9):
            p = StepPolicy(StepPolicyConfig(budget=budget, max_skips=3), COSTS, probe_share=1 / 6)
            for t in range(steps):
                p.decide(0, t, steps, None if t == 0 else _synthetic(t, steps, scale), can_skip=t > 0)
            errs.append(abs(p.mean_cost() - budget))
    assert max(errs) < (0.06 if steps == 20 else 0.03), errs


def test_budget_without_the_number_of_steps_plans_b_per_step():
    p = StepPolicy(StepPolicyConfig(budget=0.7, final_steps=0), COSTS, probe_share=1 / 6)
    for t in range(60):
        p.decide(0, t, None, None if t == 0 else _synthetic(t, 60, 1.0), can_skip=t > 0)
    assert abs(p.mean_cost() - 0.7) < 0.03


# ----------------------------------------------------------------------------- hooks on a tiny Wan
def _drive(model, xs, ctx, mode: str):
    """Call ``model`` per step as a pipeline does: CFG as two calls ("two") or one batched call ("batched").
    ``xs``: per step the latents (B, C, F, H, W); ``ctx``: (cond, uncond) text. Returns per step the outputs
    (cond, uncond)."""
    outs = []
    steps = len(xs)
    for i, x in enumerate(xs):
        t = torch.full((x.shape[0],), 500.0)
        if mode == "two":
            pair = []
            for name, c in zip(("cond", "uncond"), ctx):
                with model.cache_context(name, step_index=i, num_inference_steps=steps):
                    pair.append(model(x, timestep=t, encoder_hidden_states=c, return_dict=False)[0])
        else:
            with model.cache_context("cond_uncond", step_index=i, num_inference_steps=steps):
                o = model(torch.cat([x, x]), timestep=torch.cat([t, t]), encoder_hidden_states=torch.cat(ctx),
                          return_dict=False)[0]
            pair = list(o.chunk(2))
        outs.append(pair)
    model._reset_stateful_cache()
    return outs


def _inputs(steps=8):
    """Two samples at a fixed timestep: the first does not move between steps (it skips when it may), the
    second is fresh noise at every step (it always runs)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 2, 8, 8, generator=g)
    xs = [torch.cat([x0, torch.randn(1, 4, 2, 8, 8, generator=g)]) for _ in range(steps)]
    ctx = (torch.randn(2, 8, 32, generator=g), torch.randn(2, 8, 32, generator=g))
    return xs, ctx


POLICY = StepPolicyConfig(skip_threshold=0.05, bits_threshold=0.2, warmup_steps=1, final_steps=1, max_skips=2)


def test_skip_really_skips_the_tail_blocks():
    model = _policy_model(POLICY)
    rows = []
    model.blocks[-1].ffn.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    res = {}
    model.norm_out.register_forward_pre_hook(lambda m, a: res.setdefault("h", []).append(a[0].clone()))
    outs0 = {}
    model.blocks[0].register_forward_hook(lambda m, a, k, o: outs0.setdefault("b0", []).append(o.clone()),
                                          with_kwargs=True)
    xs, ctx = _inputs()
    per_step = []
    with torch.no_grad():
        for i in range(len(xs)):
            rows.clear()
            _drive_one(model, xs, ctx, i)
            per_step.append(sum(rows))
    ctrl = dvdquant.step_controller(model)
    dec = ctrl.policy.decisions
    assert any(d[0] == SKIP for d in dec) and all(d[1] != SKIP for d in dec)   # sample 0 skips, sample 1 never
    for i, d in enumerate(dec):
        ran = sum(1 for a in d.values() if a != SKIP)
        assert per_step[i] == 2 * ran                   # the last block saw only the rows that ran (2 branches)
        if ran < 2:
            assert 0 < ctrl.coverage[i] < 1
    assert ctrl.schedule == [max(a for a in d.values() if a != SKIP) for d in dec]
    # a skipped row's hidden state after the blocks = block 0's output + the tail residual of its last run
    s = next(i for i, d in enumerate(dec) if d[0] == SKIP)
    last_run = max(i for i in range(s) if dec[i][0] != SKIP)
    for call in range(2):                               # cond, uncond: each its own cache
        a, b = 2 * s + call, 2 * last_run + call
        expect = outs0["b0"][a][0] + (res["h"][b][0] - outs0["b0"][b][0])
        torch.testing.assert_close(res["h"][a][0], expect)


def _replayed(schedule: str, steps: int):
    """A tiny policy model that replayed ``schedule`` over ``steps`` steps (CFG as two calls)."""
    model = _policy_model(StepPolicyConfig(schedule=schedule))
    xs, ctx = _inputs(steps=steps)
    with torch.no_grad():
        for i in range(len(xs)):
            _drive_one(model, xs, ctx, i)
    return model


def test_a_replayed_schedule_runs_on_the_model():
    model = _replayed("8S4S", 5)
    ctrl = dvdquant.step_controller(model)
    assert ctrl.schedule == [8, SKIP, 4, SKIP, 8]
    assert [sorted(set(d.values())) for d in ctrl.policy.decisions] == [[8], [SKIP], [4], [SKIP], [8]]


def test_replacing_the_policy_releases_the_old_cached_residuals():
    """set_step_policy drops the replaced run's residuals even while something still references that run."""
    import weakref
    model = _replayed("8S4S", 3)
    old = model.blocks[0]._diffusers_hook.get_hook("dvdquant_policy_head").run
    held = [weakref.ref(old.tail["cond"][0]), weakref.ref(old.prev_r0["cond"])]
    set_step_policy(model, StepPolicyConfig(schedule="884S8"))
    assert old.tail == {} and old.prev_r0 == {} and all(r() is None for r in held)
    assert model.blocks[0]._diffusers_hook.get_hook("dvdquant_policy_head").run is not old


def _drive_one(model, xs, ctx, i):
    steps = len(xs)
    t = torch.full((2,), 500.0)
    for name, c in zip(("cond", "uncond"), ctx):
        with model.cache_context(name, step_index=i, num_inference_steps=steps):
            model(xs[i], timestep=t, encoder_hidden_states=c, return_dict=False)


def _drive_and_decisions(model, xs, ctx, mode):
    """The outputs of a run and the policy's decisions in it."""
    with torch.no_grad():
        out = _drive(model, xs, ctx, mode)
    return out, list(dvdquant.step_controller(model).policy.decisions)


def test_cfg_two_calls_and_batched_decide_the_same():
    xs, ctx = _inputs()
    model = _policy_model(POLICY, per_sample_fp=True)
    two, dec_two = _drive_and_decisions(model, xs, ctx, "two")
    batched, dec_batched = _drive_and_decisions(model, xs, ctx, "batched")
    assert dec_two == dec_batched and any(SKIP in d.values() for d in dec_two)
    for a, b in zip(two, batched):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_a_sample_decides_and_computes_the_same_alone_or_in_a_batch():
    xs, ctx = _inputs()
    model = _policy_model(POLICY, per_sample_fp=True)
    both, dec_both = _drive_and_decisions(model, xs, ctx, "two")
    alone, dec_alone = _drive_and_decisions(model, [x[:1] for x in xs], tuple(c[:1] for c in ctx), "two")
    assert [d[0] for d in dec_both] == [d[0] for d in dec_alone]
    assert any(len(set(d.values())) > 1 for d in dec_both)           # mixed steps: sub-batches ran
    for a, b in zip(both, alone):
        for x, y in zip(a, b):
            assert torch.equal(x[:1], y)


def test_budget_on_a_stock_pipeline_and_the_progress_characters():
    model = _policy_model(StepPolicyConfig(budget=0.6, warmup_steps=1))
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    pipe(prompt_embeds=torch.randn(1, 8, 32, generator=g), negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
         latents=torch.randn(1, 4, 2, 8, 8, generator=g), num_inference_steps=12, guidance_scale=4.0, height=16,
         width=16, num_frames=5, output_type="latent")
    ctrl = dvdquant.step_controller(model)
    assert len(ctrl.schedule) == 12 and SKIP in ctrl.schedule
    assert abs(ctrl.policy.mean_cost() - 0.6) < 0.15
    from dvdquant.nn.step_hooks import schedule_string
    assert set(schedule_string(ctrl.schedule)) <= {"S", "4", "8"} and schedule_string([8, 0, 4]) == "8S4"


# ----------------------------------------------------------------------------- header and CLI
def test_policy_round_trips_through_the_checkpoint_header(tmp_path):
    model = _policy_model(POLICY)
    dvdquant.save(model, tmp_path / "q.safetensors")
    meta = dvdquant.read_metadata(tmp_path / "q.safetensors")
    assert meta["config"]["fields"]["policy"]["skip_threshold"] == POLICY.skip_threshold
    loaded = dvdquant.load(tmp_path / "q.safetensors")
    assert loaded._dvdquant_config.policy == POLICY
    assert isinstance(dvdquant.step_controller(loaded).policy, StepPolicy)
    set_step_policy(loaded, None)
    assert not isinstance(dvdquant.step_controller(loaded).policy, StepPolicy)
    assert all("dvdquant_policy_tail" not in getattr(b, "_diffusers_hook").hooks for b in loaded.blocks[1:])


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from tiny_pipelines import save_pipeline
    return save_pipeline("wan22", tmp_path_factory.mktemp("policy") / "wan22")


VIDEO = ["--frames", "9", "--height", "32", "--width", "32", "--quiet"]


def test_cli_generate_with_a_budget(wan_folder, tmp_path, capsys):
    """Wan 2.2: both experts quantized now, one shared controller with the step policy."""
    assert main(["generate", "--pipeline", str(wan_folder), "--prompt", "a red ball moving left", "--steps", "6",
                 "--budget", "0.7", "--warmup-steps", "1", "--max-skips", "1", "--out", str(tmp_path / "c.mp4")]
                + VIDEO) == 0
    assert "schedule (6 steps)" in capsys.readouterr().out and (tmp_path / "c.mp4").stat().st_size > 0


@pytest.mark.parametrize("argv, needle", [
    (["--budget", "1.5"], "policy.budget must be in (0, 1]"),
    (["--skip-threshold", "-0.1"], "policy.skip_threshold"),
    (["--schedule", "88x"], "policy.schedule must be"),
    (["--budget", "0.5", "--delta", "0.1"], "not both"),
    (["--budget", "0.5", "--method", "fp"], "needs a quantized model"),
])
def test_cli_policy_errors_are_one_line(wan_folder, tmp_path, capsys, argv, needle):
    rc = main(["generate", "--pipeline", str(wan_folder), "--prompt", "a red ball", "--steps", "2",
               "--out", str(tmp_path / "c.mp4")] + VIDEO + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "c.mp4").exists()


def test_cli_policy_flags_on_the_unquantized_embedded_model(tmp_path, capsys):
    rc = main(["generate", "--prompt", "a red circle moving left on a dark background", "--budget", "0.5",
               "--steps", "2", "--out", str(tmp_path / "c.mp4"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--budget needs a quantized model" in err[0], err
