"""Diagnostic: per attention call, do context-parallel (Ulysses) inputs/outputs of the 8-bit attention equal the one-GPU ones?

    torchrun --nproc_per_node 2 benchmarks/cp_attention_probe.py [wan-small]

Records the first attention calls of a one-GPU forward and of the same forward under Ulysses (the
rank's heads / query rows), compares inputs and outputs bit for bit, and reruns the kernel on the
CP call's inputs outside diffusers. Prints one JSON line per rank.
"""
import os, sys, json, torch, torch.distributed as dist
sys.path.insert(0, "benchmarks")
import bench_cp as bc
import dvdquant
from dvdquant.distributed import enable_context_parallel
from dvdquant.nn import attention as qattn
rank = int(os.environ["RANK"]); torch.cuda.set_device(rank); dev = torch.device("cuda", rank)
dist.init_process_group("nccl", device_id=dev)
which = sys.argv[1] if len(sys.argv) > 1 else "wan-small"
m, lat, kw = bc.build(which, dev)
dvdquant.quantize_(m, bc.fast_config("int8"))
dvdquant.set_backend(m, "fp8")
rec = []
orig = qattn.run_quantized
def spy(plan, q, k, v, mask, scale, fmt, lse):
    out = orig(plan, q, k, v, mask, scale, fmt, lse)
    if len(rec) < 8:
        rec.append([t.detach().cpu().clone() for t in (q, k, v, out)] + [plan.path, q.stride()])
    return out
qattn.run_quantized = spy
single = bc.forward(m, lat, kw)
ref = rec[:]; rec.clear()
enable_context_parallel(m)
cp = bc.forward(m, lat, kw)
H = ref[0][0].shape[2]; h0, h1 = rank * H // 2, (rank + 1) * H // 2
rows = []
for i, (a, b) in enumerate(zip(ref, rec)):
    qa, ka, va, oa = a[:4]; qb, kb, vb, ob = b[:4]
    if qb.shape[2] != qa.shape[2]:           # self-attention after all-to-all: full L, half heads
        qa, ka, va, oa = (t[:, :, h0:h1] for t in (qa, ka, va, oa))
    else:                                     # cross-attention: local query rows, all heads
        L = qb.shape[1]; qa, oa = qa[:, rank * L:(rank + 1) * L], oa[:, rank * L:(rank + 1) * L]
    rows.append(dict(call=i, shapes=[list(qb.shape), list(kb.shape)], path=b[4], stride=list(b[5]),
                     q_eq=bool(torch.equal(qa, qb)), k_eq=bool(torch.equal(ka, kb)), v_eq=bool(torch.equal(va, vb)),
                     out_eq=bool(torch.equal(oa, ob)), out_maxdiff=float((oa.float() - ob.float()).abs().max())))
    if not (torch.equal(qa, qb) and torch.equal(ka, kb) and torch.equal(va, vb)):
        break
    # rerun the kernel on the CP call's inputs, outside diffusers: same as ob? same as oa?
    o2 = orig(b[4] and qattn.AttnPlan(b[4]), qb.to(dev), kb.to(dev), vb.to(dev), None, None, "int8", False).cpu()
    rows[-1]["rerun_eq_cp"] = bool(torch.equal(o2, ob)); rows[-1]["rerun_eq_single"] = bool(torch.equal(o2, oa))
print(json.dumps({"rank": rank, "rel": bc.rel(cp, single), "rows": rows}), flush=True)
dist.destroy_process_group()
