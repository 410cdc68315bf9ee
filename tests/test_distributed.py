"""Two gloo processes on a tiny Wan: sharded quantization and context-parallel inference.

One spawn of two workers (module fixture) does all the multi-process work, because starting a
process that imports diffusers costs seconds:

1. ``dvdquant quantize --method quarot --nproc 2`` (rotation folding + RTN) run as the two ranks of a torchrun-style launch (env://),
   writing a checkpoint from rank 0 — compared here with the one-process CLI;
2. ``quantize_sharded(dst=None)`` (every rank assembles the whole model, incl. the weight-only
   modulation layer) — both ranks' models compared with one-process ``quantize_``;
3. diffusers context parallelism (Ulysses, degree 2) of the unquantized and the quantized model
   (ARQ per-channel auto-scaling, simulated and emulated backends, δ-GBS over a few steps), each
   rank against its own one-process reference; plus the same without the per-channel
   all-reduce, to show what it is for.
"""
from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch

import dvdquant
from dvdquant import BGRConfig, DVDQuantConfig, GBSConfig
from dvdquant.cli import main as cli_main
from dvdquant.distributed import enable_context_parallel, partition_layers, quantize_sharded
from dvdquant.distributed.launcher import _check_launch
from dvdquant.errors import DVDQuantError
from tiny_models import tiny_wan

WORLD = 2
FAST_BGR = BGRConfig(shrink_steps=6, max_iters=10)   # full BGR on every layer, fewer search steps (speed)
SHARD_CFG = DVDQuantConfig(bgr=FAST_BGR, quantize_modulation=True)   # incl. a weight-only (A16) layer
DYN_CFG = DVDQuantConfig(smoothing="dynamic")


def _seeded_wan():
    torch.manual_seed(0)
    model, inputs = tiny_wan()
    return model.eval(), inputs


def _forward(model, inputs, timestep=None):
    kw = dict(inputs)
    if timestep is not None:
        kw["timestep"] = torch.tensor([timestep])
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _gbs_run(model, inputs, steps=4):
    """A few 'denoising steps' (changing timestep and latent) driven by the model's step hook."""
    ctrl = dvdquant.step_controller(model)
    ctrl.reset()
    outs, x = [], inputs["hidden_states"]
    for i in range(steps):
        out = _forward(model, dict(inputs, hidden_states=x), timestep=900 - 200 * i)
        x = x - 0.2 * out
        outs.append(out)
    schedule = list(ctrl.schedule)
    ctrl.reset()
    return torch.stack(outs), schedule


def _worker(rank: int, world: int, tmp: str, port: int) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    res = {}
    # --- 1. the CLI's torchrun path: this process is rank `rank` of an env:// launch
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    res["cli_rc"] = cli_main(["quantize", "--model", f"{tmp}/wan_fp", "--method", "quarot", "--nproc", str(world),
                              "--out", f"{tmp}/cli_sharded", "--quiet"])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        del os.environ[k]
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        # --- 2. library: every rank assembles the whole quantized model
        model, inputs = _seeded_wan()
        rep = quantize_sharded(model, SHARD_CFG, dst=None)
        res["sharded_state"] = {k: v.clone() for k, v in model.state_dict().items()}
        res["sharded_report_layers"] = [l.name for l in rep.layers]
        dyn, _ = _seeded_wan()                          # dynamic smoothing: the master weights travel too
        quantize_sharded(dyn, DYN_CFG, dst=None)
        res["dynamic_state"] = {k: v.clone() for k, v in dyn.state_dict().items()}
        # --- 3. context parallelism: single-process reference first, then the same model CP
        fp, inputs = _seeded_wan()
        ref = _forward(fp, inputs)
        enable_context_parallel(fp, ulysses_degree=world)
        res["fp32_rel"] = _rel(_forward(fp, inputs), ref)

        q, inputs = _seeded_wan()
        dvdquant.quantize_(q, DVDQuantConfig(a_bits=4, bgr=FAST_BGR, gbs=GBSConfig(delta=0.05, warmup_steps=1)))
        ref_q = _forward(q, inputs)
        # a batch of 2: the sample of `inputs` plus another one with larger activations
        g = torch.Generator().manual_seed(5)
        inputs2 = {k: torch.cat([v, torch.randn(v.shape, generator=g) * 3 if v.is_floating_point() else v])
                   for k, v in inputs.items()}
        ref_q2 = _forward(q, inputs2)
        ref_gbs, ref_sched = _gbs_run(q, inputs)
        dvdquant.set_backend(q, "emulated")
        ref_emu = _forward(q, inputs)
        dvdquant.set_backend(q, "simulated")
        enable_context_parallel(q)
        state = dvdquant.get_state(q)
        res["group_set"] = state.process_group is not None
        res["q_rel"] = _rel(_forward(q, inputs), ref_q)
        out2 = _forward(q, inputs2)                       # per-sample Λ_t (2, K) all-reduced over ranks
        res["q2_rel"] = _rel(out2, ref_q2)
        group, state.process_group = state.process_group, None        # what the all-reduce is for
        res["q_rel_no_reduce"] = _rel(_forward(q, inputs), ref_q)
        state.process_group = group
        dvdquant.set_backend(q, "emulated")
        res["emu_rel"] = _rel(_forward(q, inputs), ref_emu)
        dvdquant.set_backend(q, "simulated")
        cp_gbs, cp_sched = _gbs_run(q, inputs)
        res["gbs_rel"] = _rel(cp_gbs, ref_gbs)
        res["gbs_sched"] = (ref_sched, cp_sched)
        from dvdquant.distributed import disable_context_parallel
        disable_context_parallel(q)
        res["after_disable_equal"] = torch.equal(_forward(q, inputs), ref_q)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(res, f"{tmp}/rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp
    tmp = tmp_path_factory.mktemp("dist")
    model, _ = _seeded_wan()
    model.save_pretrained(tmp / "wan_fp")
    mp.start_processes(_worker, args=(WORLD, str(tmp), _free_port()), nprocs=WORLD, start_method="spawn")
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _header(path) -> dict:
    meta = dvdquant.read_metadata(path)
    meta["model_config"] = {k: v for k, v in meta["model_config"].items() if not k.startswith("_")}
    return meta


def test_cli_sharded_checkpoint_identical(two_ranks, tmp_path):
    tmp, res = two_ranks
    assert [r["cli_rc"] for r in res] == [0, 0]
    assert cli_main(["quantize", "--model", str(tmp / "wan_fp"), "--method", "quarot", "--out", str(tmp_path),
                     "--quiet"]) == 0
    single, sharded = tmp_path / "quantized.safetensors", tmp / "cli_sharded" / "quantized.safetensors"
    a, b = dvdquant.load(single), dvdquant.load(sharded)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # identical header: config, per-layer settings, tensor SHA-256 (diffusers' private
    # `_use_default_values` list has a per-process order and is ignored)
    assert _header(single) == _header(sharded)
    rep_a = json.loads((tmp_path / "report.json").read_text())
    rep_b = json.loads((tmp / "cli_sharded" / "report.json").read_text())
    assert [(l["name"], l["w_err"]) for l in rep_a["layers"]] == [(l["name"], l["w_err"]) for l in rep_b["layers"]]


def test_sharded_every_rank_assembles(two_ranks):
    _, res = two_ranks
    model, _ = _seeded_wan()
    report = dvdquant.quantize_(model, SHARD_CFG)
    assert report.layers[0].name == "condition_embedder.time_proj" and report.layers[0].a_bits == 16
    ref = model.state_dict()
    for r in res:
        assert r["sharded_state"].keys() == ref.keys()
        assert all(torch.equal(r["sharded_state"][k], ref[k]) for k in ref)
        assert r["sharded_report_layers"] == [l.name for l in report.layers]


def test_sharded_dynamic_smoothing_every_rank_assembles(two_ranks):
    _, res = two_ranks
    model, _ = _seeded_wan()
    dvdquant.quantize_(model, DYN_CFG)
    ref = model.state_dict()
    assert any(k.endswith(".w_master") for k in ref)
    for r in res:
        assert r["dynamic_state"].keys() == ref.keys()
        assert all(torch.equal(r["dynamic_state"][k], ref[k]) for k in ref)


def test_context_parallel_matches_single_process(two_ranks):
    _, res = two_ranks
    for r in res:
        assert r["group_set"]
        assert r["fp32_rel"] < 1e-6
        # per-channel Λ_t all-reduced: the same numbers as one process (up to fp32 summation order)
        assert r["q_rel"] < 1e-5 and r["emu_rel"] < 1e-5
        # a batch of 2 under CP: the per-sample Λ_t (2, K) reduced over ranks = one device's per-sample Λ_t
        # (tests/test_batch_independence.py: one device's output for a sample does not depend on the batch)
        assert r["q2_rel"] < 1e-5
        assert r["q_rel_no_reduce"] > 100 * max(r["q_rel"], 1e-7)    # rank-local Λ_t is visibly wrong
        assert r["gbs_rel"] < 1e-4
        ref_sched, cp_sched = r["gbs_sched"]
        assert ref_sched == cp_sched and 4 in ref_sched and 8 in ref_sched
        assert r["after_disable_equal"]


def test_partition_layers():
    assert [list(r) for r in partition_layers([1, 1, 1, 1], 2)] == [[0, 1], [2, 3]]
    assert [list(r) for r in partition_layers([10, 1, 1, 1, 1, 10], 2)] == [[0, 1, 2], [3, 4, 5]]
    assert [len(r) for r in partition_layers([5] * 7, 7)] == [1] * 7
    parts = partition_layers([100, 1, 1, 1], 3)
    assert [list(r) for r in parts] == [[0], [1], [2, 3]]
    with pytest.raises(DVDQuantError, match="3 processes for 2 quantizable layers"):
        partition_layers([1, 1], 3)


def test_bad_requests_fail_with_one_line(tmp_path, capsys):
    with pytest.raises(DVDQuantError, match="calibrates"):
        _check_launch(2, "cpu", dvdquant.SmoothQuantConfig())
    with pytest.raises(DVDQuantError, match="--device cpu or cuda"):
        _check_launch(2, "cuda:1", DVDQuantConfig())
    with pytest.raises(DVDQuantError, match="≥ 1"):
        _check_launch(0, "cpu", DVDQuantConfig())
    if not torch.cuda.is_available():
        with pytest.raises(DVDQuantError, match="no CUDA device"):
            _check_launch(2, "cuda", DVDQuantConfig())
    assert cli_main(["quantize", "--nproc", "2", "--method", "smoothquant", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be sharded" in err[0]
    assert cli_main(["quantize", "--model", "embedded", "--nproc", "500", "--out", str(tmp_path)]) == 2
    assert "--nproc 500 exceeds the 60 layers" in capsys.readouterr().err      # checked before any spawn
    model, _ = _seeded_wan()
    with pytest.raises(DVDQuantError, match="not initialized"):
        enable_context_parallel(model)


if __name__ == "__main__":   # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
