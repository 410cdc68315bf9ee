"""δ-GBS: the bit schedule on synthetic trajectories, and the shared RuntimeState."""
import torch

from dvdquant.algorithms.gbs import GBSController, StepIndexHook
from dvdquant.config import GBSConfig
from dvdquant.nn.state import RuntimeState


def _run(ctrl: GBSController, outputs):
    for i, out in enumerate(outputs):
        ctrl.begin_step(i, None)
        ctrl.end_step(i, None, out)
    return list(ctrl.schedule)


def _trajectory(changes):
    """Outputs whose consecutive relative L1 change is exactly ``changes[i]``."""
    out = [torch.ones(8)]
    for c in changes:
        out.append(out[-1] * (1 + c))
    return out


def test_extremes():
    traj = _trajectory([0.05] * 9)
    st = RuntimeState()
    assert _run(GBSController(st, GBSConfig(delta=0.0, warmup_steps=1)), traj) == [8] * 10          # W4A8
    assert _run(GBSController(st, GBSConfig(delta=1e9, warmup_steps=2)), traj) == [8, 8] + [4] * 8   # W4A4


def test_accumulates_and_resets():
    # change 0.05 per step, δ = 0.12: the sum reaches δ after 3 changes → one high step, which resets it
    traj = _trajectory([0.05] * 11)
    ctrl = GBSController(RuntimeState(), GBSConfig(delta=0.12, warmup_steps=1))
    sched = _run(ctrl, traj)
    assert sched[0] == 8
    assert sched == [8, 4, 4, 4, 8, 4, 4, 8, 4, 4, 8, 4]
    assert 0 < ctrl.low_bit_fraction() < 1


def test_final_high_steps_and_state():
    st = RuntimeState()
    ctrl = GBSController(st, GBSConfig(delta=1e9, warmup_steps=1, final_high_steps=2), total_steps=6)
    sched = _run(ctrl, _trajectory([0.01] * 5))
    assert sched == [8, 4, 4, 4, 8, 8]
    assert st.a_bits == 8 and st.step_index == 5 and len(st.history) == 6
    ctrl.reset()
    assert st.a_bits is None and st.step_index is None and ctrl.schedule == []


def test_big_change_triggers_high():
    traj = _trajectory([0.01, 0.01, 0.5, 0.01, 0.01])
    sched = _run(GBSController(RuntimeState(), GBSConfig(delta=0.2, warmup_steps=1)), traj)
    assert sched == [8, 4, 4, 4, 8, 4]


def test_step_index_hook():
    st = RuntimeState()
    h = StepIndexHook(st)
    h.begin_step(3)
    assert st.step_index == 3
    h.reset()
    assert st.step_index is None
