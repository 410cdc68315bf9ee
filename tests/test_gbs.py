"""δ-GBS: the bit schedule on synthetic trajectories, driven through the StepTracker."""
import pytest
import torch

from dvdquant.algorithms.gbs import FixedBits, GBSController
from dvdquant.config import GBSConfig
from dvdquant.nn.state import RuntimeState
from dvdquant.nn.step_hooks import StepTracker


def _tracker(config: GBSConfig, state=None, total_steps=None) -> StepTracker:
    tr = StepTracker([state or RuntimeState()], GBSController(config), configured_bits=4)
    tr.total_steps = total_steps
    return tr


def _step(tr: StepTracker, i: int, out: torch.Tensor) -> None:
    """One denoising step: a transformer call at step index ``i`` returning ``out``."""
    tr.before_call(i, None, None, None)
    tr.after_call(out)


def _run(tr: StepTracker, outputs):
    for i, out in enumerate(outputs):
        _step(tr, i, out)
    tr.finish()
    return list(tr.schedule)


def _trajectory(changes):
    """Outputs whose consecutive relative L1 change is exactly ``changes[i]``."""
    out = [torch.ones(8)]
    for c in changes:
        out.append(out[-1] * (1 + c))
    return out


def test_extremes():
    traj = _trajectory([0.05] * 9)
    assert _run(_tracker(GBSConfig(delta=0.0, warmup_steps=1)), traj) == [8] * 10          # W4A8
    assert _run(_tracker(GBSConfig(delta=1e9, warmup_steps=2)), traj) == [8, 8] + [4] * 8   # W4A4


def test_accumulates_and_resets():
    # change 0.05 per step, δ = 0.12: the sum reaches δ after 3 changes → one high step, which resets it
    traj = _trajectory([0.05] * 11)
    tr = _tracker(GBSConfig(delta=0.12, warmup_steps=1))
    sched = _run(tr, traj)
    assert sched[0] == 8
    assert sched == [8, 4, 4, 4, 8, 4, 4, 8, 4, 4, 8, 4]
    assert tr.mean_bits() == pytest.approx((4 * 8 + 8 * 4) / 12)
    assert len(tr.changes) == 12 and tr.changes[1] == pytest.approx(0.05, abs=1e-6)


def test_final_high_steps_and_state():
    st = RuntimeState()
    tr = _tracker(GBSConfig(delta=1e9, warmup_steps=1, final_high_steps=2), st, total_steps=6)
    sched = _run(tr, _trajectory([0.01] * 5))
    assert sched == [8, 4, 4, 4, 8, 8]
    assert st.a_bits == 8 and st.step_index == 5 and len(st.history) == 6
    tr.reset()
    assert st.a_bits is None and st.step_index is None and tr.schedule == []


def test_big_change_triggers_high():
    traj = _trajectory([0.01, 0.01, 0.5, 0.01, 0.01])
    sched = _run(_tracker(GBSConfig(delta=0.2, warmup_steps=1)), traj)
    assert sched == [8, 4, 4, 4, 8, 4]


def test_fixed_bits_publishes_the_step_index():
    st = RuntimeState()
    tr = StepTracker([st], FixedBits(), configured_bits=6)
    _step(tr, 3, torch.ones(2))
    assert st.step_index == 3 and st.a_bits is None and tr.schedule == [6]
    tr.reset()
    assert st.step_index is None


def _noisy_trajectory(n, change, low_noise, schedule_fn):
    """Outputs that move by ``change`` per step, plus a fixed offset whenever a step runs at 4 bits."""
    base = [torch.ones(8) * (1 + change) ** i for i in range(n)]
    offset = torch.tensor([1.0, -1.0] * 4) * low_noise

    def output(i):
        return base[i] + (offset * base[i] if schedule_fn() == 4 else 0)
    return output


def test_same_bits_indicator_ignores_the_switch_noise():
    # content changes 0.03 per step; a 4-bit step adds a 0.2 offset: the raw indicator sees ~0.2 at
    # every switch and forces high steps after each low one; same_bits follows the content
    # (δ = 0.1: one high step, then three low ones, as on a noise-free trajectory)
    results = {}
    for indicator in ("raw", "same_bits"):
        tr = _tracker(GBSConfig(delta=0.1, warmup_steps=2, indicator=indicator))
        out = _noisy_trajectory(16, 0.03, 0.2, lambda: tr.schedule[-1])
        for i in range(16):
            tr.before_call(i, None, None, None)
            tr.after_call(out(i))
        tr.finish()
        results[indicator] = tr.schedule
    assert results["raw"] == [8, 8] + [4, 8, 8] * 4 + [4, 8]
    assert results["same_bits"] == [8, 8, 4, 4, 4, 8, 4, 4, 4, 8, 4, 4, 4, 8, 4, 4]
    assert tr.changes[2] > 0.15 and abs(tr.indicators[2] - 0.03) < 1e-4   # step 2: the first switch


def test_indicator_is_validated():
    import pytest
    from dvdquant.errors import ConfigError
    with pytest.raises(ConfigError, match="indicator"):
        GBSConfig(indicator="l2")


def test_step_tracker_raises_on_the_nonfinite_flag():
    """The FP8 path records NaN/Inf inputs in a device flag instead of syncing per layer; the step
    tracker reads it after each transformer call, raises naming the layer, and resets it
    (dvdquant.kernels.finite)."""
    from dvdquant import NonFiniteError
    from dvdquant.kernels import finite

    for policy in (FixedBits(), GBSController(GBSConfig())):
        tr = StepTracker([RuntimeState()], policy, configured_bits=4)
        tr.before_call(0, None, None, None)
        finite.device_flag("cpu").fill_(finite.layer_id("blocks.1.ffn.net.2"))
        with pytest.raises(NonFiniteError, match="blocks.1.ffn.net.2"):
            tr.after_call(torch.ones(3))
        _step(tr, 1, torch.ones(3))                   # the flag was reset: no error
        assert finite.first_nonfinite_layer("cpu") is None


def test_finite_check_mode_from_environment(monkeypatch):
    from dvdquant import ConfigError
    from dvdquant.kernels.finite import finite_check_mode

    monkeypatch.delenv("DVDQUANT_SKIP_FINITE_CHECK", raising=False)
    monkeypatch.delenv("DVDQUANT_FINITE_CHECK", raising=False)
    assert finite_check_mode() == "step"
    monkeypatch.setenv("DVDQUANT_FINITE_CHECK", "layer")
    assert finite_check_mode() == "layer"
    monkeypatch.setenv("DVDQUANT_SKIP_FINITE_CHECK", "1")
    assert finite_check_mode() == "off"
    monkeypatch.delenv("DVDQUANT_SKIP_FINITE_CHECK")
    monkeypatch.setenv("DVDQUANT_FINITE_CHECK", "sometimes")
    with pytest.raises(ConfigError, match="DVDQUANT_FINITE_CHECK"):
        finite_check_mode()
