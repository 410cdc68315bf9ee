"""Sharded data-free quantization: the layers split over the ranks of a process group.

:func:`quantize_sharded` splits the selected Linear layers, in model order, into contiguous
runs of about equal weight size, one per rank; each rank quantizes its run where the weights
live (BGR, rotation folding: ``quantize_`` restricted to those layers), then the quantized
tensors travel to rank ``dst`` (point-to-point) or to every rank (``dst=None``, broadcast), which
assembles the whole quantized model. Layer quantization depends only on the layer's weight,
so the result is bit-identical to one process on the same device type.
"""
from __future__ import annotations

import bisect
import hashlib
import logging
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import api
from ..algorithms import get_method
from ..api import LayerReport, QuantReport
from ..errors import DVDQuantError
from ..models.adapters import select_linears
from ..nn.state import get_state
from ..serialization import layer_meta, quant_linear_from_meta

log = logging.getLogger(__name__)


def partition_layers(sizes: Sequence[int], parts: int) -> list:
    """Split layers (in model order, ``sizes`` their weight numels) into ``parts`` contiguous ranges.

    Cut points sit where the running total is nearest to i/parts of the whole, every range
    non-empty. Returns ``parts`` ``range`` objects covering ``0..len(sizes)``.
    """
    n = len(sizes)
    if parts < 1:
        raise DVDQuantError(f"number of processes must be ≥ 1, got {parts}")
    if parts > n:
        raise DVDQuantError(f"{parts} processes for {n} quantizable layers: use --nproc ≤ {n}")
    prefix, total = [], 0
    for s in sizes:
        total += int(s)
        prefix.append(total)                       # prefix[j] = size of layers 0..j
    bounds = [0]
    for i in range(1, parts):
        target = total * i / parts
        j = bisect.bisect_left(prefix, target)     # first j with prefix[j] ≥ target
        cut = j + 1 if j < n and (prefix[j] - target) <= (target - (prefix[j - 1] if j else 0)) else j
        cut = min(max(cut, bounds[-1] + 1), n - (parts - i))
        bounds.append(cut)
    bounds.append(n)
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


def _comm_device(group) -> torch.device:
    """Tensors handed to the process group's backend live here (NCCL: this rank's GPU)."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange(tensors: dict, owner: int, receivers: Optional[int], rank: int, group, comm: torch.device) -> None:
    """Copy ``tensors`` (name → tensor, the same names and shapes on every rank taking part) from ``owner``.

    ``receivers`` None: broadcast to every rank; an int: point-to-point to that rank only.
    """
    for key in sorted(tensors):
        t = tensors[key]
        if receivers is None:
            buf = t.detach().to(comm).contiguous() if rank == owner else torch.empty(t.shape, dtype=t.dtype, device=comm)
            dist.broadcast(buf, src=dist.get_global_rank(group, owner) if group is not None else owner, group=group)
        elif rank == owner:
            buf = t.detach().to(comm).contiguous()
            dist.send(buf, dst=dist.get_global_rank(group, receivers) if group is not None else receivers, group=group)
            continue
        else:
            buf = torch.empty(t.shape, dtype=t.dtype, device=comm)
            dist.recv(buf, src=dist.get_global_rank(group, owner) if group is not None else owner, group=group)
        if rank != owner:
            t.copy_(buf)


def quantize_sharded(model: nn.Module, config, *, group=None, dst: Optional[int] = 0,
                     filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                     progress: bool = False) -> Optional[QuantReport]:
    """``quantize_(model, config)`` with the layers split over the ranks of ``group``.

    Every rank holds the same unquantized model. Each quantizes its share of the layers in
    place; then rank ``dst`` (or every rank, ``dst=None``) receives the other shares and holds
    the whole quantized model — bit-identical to ``quantize_`` in one process — and gets the
    full :class:`QuantReport`. Other ranks return None and keep a partly quantized model.
    Only data-free methods (no calibration passes) can be sharded.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise DVDQuantError("quantize_sharded needs torch.distributed initialized (init_process_group)")
    method = get_method(config)
    if method.collect is not None:
        raise DVDQuantError(f"method {method.name!r} calibrates with forward passes of the whole model and cannot "
                            "be sharded: use one process (data-free methods: dvdquant, minmax, quarot)")
    if get_state(model) is not None:
        raise DVDQuantError(f"{type(model).__name__} is already quantized by dvdquant")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if dst is not None and not 0 <= dst < world:
        raise DVDQuantError(f"dst must be a rank in 0..{world - 1} or None, got {dst}")
    t0 = time.perf_counter()
    targets = select_linears(model, config.skip, config.quantize_modulation, filter_fn)
    names = [n for n, _ in targets]
    ranges = partition_layers([m.weight.numel() for _, m in targets], world)
    del targets
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
    digests = [None] * world
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) != 1:
        raise DVDQuantError("the ranks hold different models (their quantizable layer names differ)")
    owner = {names[i]: r for r, rng in enumerate(ranges) for i in rng}
    mine = {names[i] for i in ranges[rank]}
    log.info("rank %d/%d quantizes layers %d..%d (%d of %d)", rank, world, ranges[rank].start,
             ranges[rank].stop - 1, len(mine), len(names))
    local = api.quantize_(model, config, filter_fn=lambda m, n: n in mine, progress=progress)
    state = get_state(model)
    # ---- what each rank made: layer settings for the skeletons, and the report rows
    mods = dict(api.quantized_layers(model))
    entries = {l.name: (layer_meta(mods[l.name]), vars(l)) for l in local.layers}
    gathered = [None] * world
    dist.all_gather_object(gathered, entries, group=group)
    table = {k: v for part in gathered for k, v in part.items()}
    comm = _comm_device(group)
    assembles = dst is None or rank == dst
    for name in names:
        src = owner[name]
        if dst is not None and src == dst:
            continue                                    # already where it is assembled
        if src == rank:
            q = mods[name]
        elif assembles:
            old = model.get_submodule(name)
            q = quant_linear_from_meta(table[name][0], old.weight.device)
            q.state, q.layer_name = state, name
            api.set_submodule(model, name, q)          # the FP weight is freed here
            del old
        else:
            continue
        _exchange(dict(q.state_dict()), src, dst, rank, group, comm)
    dist.barrier(group=group)
    if not assembles:
        return None
    rows = [LayerReport(**table[n][1]) for n in names]
    report = QuantReport(method.name, type(model).__name__, rows, time.perf_counter() - t0, 0)
    log.info("sharded %s over %d ranks: %d layers in %.2f s", method.name, world, len(rows), report.seconds)
    return report
