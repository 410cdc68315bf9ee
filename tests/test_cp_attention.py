"""dvdquant's 8-bit attention under diffusers' context parallelism, two gloo processes (CPU).

A tiny Wan with head_dim 64, so self-attention really runs the 8-bit path (the emulated reference
on CPU, the same numerics as the Triton kernel), quantized W4A4 with ``attention="int8"``:

* **Ulysses** (all-to-all over heads): each rank holds whole sequences of its heads and the K/V
  statistics are per head, so the output must equal the one-process output bit for bit;
* **ring** (K/V chunks passed around, merged by log-sum-exp): each rank quantizes its own K/V chunk,
  so the output is close but not identical; the lse the backend returns must include the q·mean(K)
  term of the K smoothing, or the merge weights chunks wrongly (a few % off instead of < 1 %).
"""
from __future__ import annotations


import pytest
import torch

import dvdquant
from dvdquant import BGRConfig, DVDQuantConfig
from tiny_models import tiny_wan

WORLD = 2
CFG = DVDQuantConfig(bgr=BGRConfig(shrink_steps=4, max_iters=5), attention="int8")


def _model():
    torch.manual_seed(0)
    m, inputs = tiny_wan(hidden_heads=2, head_dim=64)
    m.eval()
    dvdquant.quantize_(m, CFG)
    return m, inputs


def _forward(m, inputs):
    with torch.no_grad():
        return m(**inputs, return_dict=False)[0]


def _worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist
    from dvdquant.distributed import disable_context_parallel, enable_context_parallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        m, inputs = _model()
        res = {"single": _forward(m, inputs)}
        enable_context_parallel(m, ulysses_degree=world)
        res["ulysses"] = _forward(m, inputs)
        disable_context_parallel(m)
        enable_context_parallel(m, ring_degree=world)
        res["ring"] = _forward(m, inputs)
        disable_context_parallel(m)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(res, f"{tmp}/rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp
    tmp = tmp_path_factory.mktemp("cp_attn")
    mp.start_processes(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_self_attention_takes_the_8bit_path():
    from dvdquant.nn.attention import plan_attention
    q = torch.zeros(1, 32, 2, 64)
    assert plan_attention(q, q, q).path == "emulated"


def test_ulysses_bit_identical(runs):
    for r in runs:
        assert torch.equal(r["ulysses"], r["single"])


def test_ring_close_to_single(runs):
    for r in runs:
        rel = _rel(r["ring"], r["single"])
        print(f"ring vs single rel. L2 {rel:.2e}")
        assert 0.0 < rel < 1e-2, rel          # per-chunk K/V quantization: close, not identical
    assert torch.equal(runs[0]["ring"], runs[1]["ring"])
