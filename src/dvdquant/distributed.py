"""Several processes, one model: context-parallel inference and sharded data-free quantization.

Context parallelism (sequence parallelism)
------------------------------------------
Inference runs through diffusers' own engine (``ContextParallelConfig``, Ulysses and/or ring
attention; the model's ``_cp_plan`` says where the sequence is split and gathered). For Wan the
plan splits ``hidden_states`` along the token axis at ``blocks.0`` and all-gathers the output of
``proj_out``, so every Linear inside the blocks — i.e. every quantized layer — sees only this
rank's slice of the tokens. What that changes for a quantized layer:

* per-token activation quantization and ARQ ``per_block`` scales (per token and 128 channels)
  are local to a token: unchanged;
* ARQ ``per_channel`` auto-scaling Λ_t (and dynamic smoothing's s_t) is a *max over each
  sample's tokens*: a rank would see the max over its slice only. :func:`enable_context_parallel`
  stores the context-parallel process group on the model's :class:`~dvdquant.nn.state.RuntimeState`,
  and the layers all-reduce (MAX) that per-sample (B, K) statistic over it
  (``RuntimeState.all_tokens_max``): one small collective per layer call, and the same Λ_t as on
  one device;
* δ-GBS's indicator reads the model output, which the plan has already gathered: every rank
  computes the same L1 change and picks the same bits;
* cross-attention K/V projections see the full text on every rank (the plan does not split
  ``encoder_hidden_states``); reducing their identical maxima is a no-op.

``enable_context_parallel`` calls ``transformer.enable_parallelism``. diffusers 0.42.1 computes
``rank % torch.accelerator.device_count()`` there, which divides by zero on a CPU-only torch;
on such a build (the CPU tests, gloo) this module performs the same three steps itself with
diffusers' functions: ``ParallelConfig.setup`` on a CPU device mesh, the attention processors'
``_parallel_config``, and ``apply_context_parallel`` with the model's plan.

Sharded quantization
--------------------
:func:`quantize_sharded` splits the selected Linear layers, in model order, into contiguous
runs of about equal weight size, one per rank; each rank quantizes its run where the weights
live (BGR, rotation folding: ``quantize_`` restricted to those layers), then the quantized
tensors travel to rank ``dst`` (point-to-point) or to every rank (``dst=None``, broadcast), which
assembles the whole quantized model. Layer quantization depends only on the layer's weight,
so the result is bit-identical to one process on the same device type.
:func:`quantize_multiprocess` is what ``dvdquant quantize --nproc N`` runs: it spawns N workers
(gloo on CPU, NCCL with one GPU per rank), or, started by ``torchrun``, joins its process group;
rank 0 writes the checkpoint atomically (``serialization.save``).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from . import api, serialization
from .api import LayerReport, QuantReport
from .errors import DVDQuantError
from .models.adapters import select_linears
from .nn.quant_linear import QuantLinear
from .nn.state import get_state

log = logging.getLogger(__name__)
CP_PLAN_ATTR = "_dvdquant_cp_plan"


# =============================================================================== context parallel
def _require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise DVDQuantError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                            "(or start with torchrun) before enabling context parallelism")


def _attention_processors(model: nn.Module) -> list:
    """The attention processors that take a ``_parallel_config`` (diffusers' attention modules)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention
    classes = (Attention, MochiAttention, AttentionModuleMixin)
    return [m.processor for m in model.modules()
            if isinstance(m, classes) and getattr(m, "processor", None) is not None]


def _active_backend(model: nn.Module):
    """The attention backend (diffusers ``AttentionBackendName``) the model's processors dispatch to."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    for proc in _attention_processors(model):
        if hasattr(proc, "_attention_backend"):
            name = proc._attention_backend
            return _AttentionBackendRegistry.get_active_backend()[0] if name is None else AttentionBackendName(name)
    return _AttentionBackendRegistry.get_active_backend()[0]


def _check_cp_request(model: nn.Module, cp_config, world: int) -> None:
    degree = cp_config.ring_degree * cp_config.ulysses_degree
    if degree != world:
        raise DVDQuantError(f"ring_degree × ulysses_degree = {degree} must equal the world size {world}")
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if cp_config.ulysses_degree > 1 and heads is not None and heads % cp_config.ulysses_degree \
            and not cp_config.ulysses_anything:
        raise DVDQuantError(f"{type(model).__name__} has {heads} attention heads, not divisible by "
                            f"ulysses_degree={cp_config.ulysses_degree}")
    backend = _active_backend(model)
    if cp_config.ring_degree > 1 and backend.value == "native":
        raise DVDQuantError("ring attention needs an attention backend that returns the log-sum-exp "
                            "(e.g. '_native_cudnn', 'flash'); diffusers' 'native' (SDPA) backend does not: "
                            "call model.set_attention_backend(...) first or use ulysses_degree")


def _enable_without_accelerator(model: nn.Module, cp_config, plan: dict) -> None:
    """``enable_parallelism``'s context-parallel steps for a CPU-only torch (see the module docstring)."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from torch.distributed.device_mesh import init_device_mesh
    if getattr(model, "_parallel_config", None) is not None:
        raise DVDQuantError(f"parallelism is already applied to this {type(model).__name__}")
    backend = _active_backend(model)
    if not _AttentionBackendRegistry._is_context_parallel_available(backend):
        raise DVDQuantError(f"attention backend {backend.value!r} does not support context parallelism")
    mesh = cp_config.mesh or init_device_mesh("cpu", cp_config.mesh_shape, mesh_dim_names=cp_config.mesh_dim_names)
    config = ParallelConfig(context_parallel_config=cp_config)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    for proc in _attention_processors(model):
        if hasattr(proc, "_parallel_config"):
            proc._parallel_config = config
    apply_context_parallel(model, cp_config, plan)


def _ensure_logger_warning_once() -> None:
    """diffusers' context-parallel hooks call ``logger.warning_once``, which only exists once
    ``transformers`` has patched ``logging.Logger`` (diffusers 0.42.1 does not define it): without
    transformers installed, a benign warning path then crashes. Add a once-per-message warning."""
    if hasattr(logging.Logger, "warning_once"):
        return
    seen: set = set()

    def warning_once(self, msg, *args, **kwargs):
        if (self.name, msg) not in seen:
            seen.add((self.name, msg))
            self.warning(msg, *args, **kwargs)

    logging.Logger.warning_once = warning_once
    log.debug("added logging.Logger.warning_once for diffusers' context-parallel hooks")


def enable_context_parallel(model: nn.Module, cp_config=None, *, ulysses_degree: Optional[int] = None,
                            ring_degree: Optional[int] = None, cp_plan: Optional[dict] = None):
    """Run ``model`` (a diffusers transformer, quantized or not) context-parallel over all ranks.

    Pass a diffusers ``ContextParallelConfig`` or the degrees (default: Ulysses over every rank).
    Call it *after* ``dvdquant.quantize_`` / ``dvdquant.load``, on every rank, with the same
    weights and inputs on every rank. Returns the ``ContextParallelConfig`` in use.
    """
    _require_initialized()
    _ensure_logger_warning_once()
    if not hasattr(model, "enable_parallelism"):
        raise DVDQuantError(f"{type(model).__name__} is not a diffusers model (no enable_parallelism)")
    plan = cp_plan if cp_plan is not None else getattr(model, "_cp_plan", None)
    if plan is None:
        raise DVDQuantError(f"{type(model).__name__} has no context-parallel plan (_cp_plan): pass cp_plan=")
    from diffusers import ContextParallelConfig
    world = dist.get_world_size()
    if cp_config is None:
        if ulysses_degree is None and ring_degree is None:
            ulysses_degree = world
        cp_config = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree)
    _check_cp_request(model, cp_config, world)
    if torch.accelerator.device_count() > 0:
        model.enable_parallelism(config=cp_config, cp_plan=plan)
    else:
        _enable_without_accelerator(model, cp_config, plan)
    setattr(model, CP_PLAN_ATTR, plan)
    group = cp_config._flattened_mesh.get_group()
    state = get_state(model)
    if state is not None:
        state.process_group = group          # QuantLinear: per-channel maxima over every rank's tokens
    log.info("context parallel on %d ranks (ulysses %d × ring %d), %s", world, cp_config.ulysses_degree,
             cp_config.ring_degree, "quantized layers synchronised" if state is not None else "not quantized")
    return cp_config


def disable_context_parallel(model: nn.Module) -> None:
    """Undo :func:`enable_context_parallel`: remove the split/gather hooks, run single-device again."""
    from diffusers.hooks.context_parallel import remove_context_parallel
    config = getattr(model, "_parallel_config", None)
    if config is None or config.context_parallel_config is None:
        return
    remove_context_parallel(model, getattr(model, CP_PLAN_ATTR, None) or model._cp_plan)
    for proc in _attention_processors(model):
        if hasattr(proc, "_parallel_config"):
            proc._parallel_config = None
    model._parallel_config = None
    state = get_state(model)
    if state is not None:
        state.process_group = None


# ============================================================================ sharded quantization
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


def _quant_linear_like(meta: dict, device) -> QuantLinear:
    """An empty QuantLinear with the settings of a checkpoint layer entry (``serialization._layer_meta``)."""
    return QuantLinear(meta["in_features"], meta["out_features"], w_bits=meta["w_bits"],
                       group_size=meta["group_size"], a_bits=meta["a_bits"], a8_format=meta["a8_format"],
                       rotation_block=meta["rotation_block"], auto_scale=meta["auto_scale"],
                       scale_block=meta["scale_block"], has_bias=meta["has_bias"],
                       smooth_steps=meta["smooth_steps"], balance_steps=meta["balance_steps"],
                       bias_dtype=getattr(torch, meta["bias_dtype"]), device=device)


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
    from .algorithms import get_method
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
    entries = {l.name: (serialization._layer_meta(mods[l.name]), vars(l)) for l in local.layers}
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
            q = _quant_linear_like(table[name][0], old.weight.device)
            q.state, q.layer_name = state, name
            api._set_submodule(model, name, q)          # the FP weight is freed here
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


# ======================================================================= one-command multi-process
def _report_from_dict(d: dict) -> QuantReport:
    d = dict(d)
    d["layers"] = [LayerReport(**l) for l in d["layers"]]
    return QuantReport(**d)


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _worker_device(device: str, local_rank: int) -> str:
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return "cpu"


def _quantize_job(rank: int, device: str, model_spec: str, config, out_dir: Path, progress: bool):
    """One rank's work; returns (report, checkpoint) on rank 0 and (None, None) elsewhere."""
    from .pipeline.models_io import load_transformer
    transformer, base = load_transformer(model_spec, device=device)
    report = quantize_sharded(transformer, config, dst=0, progress=progress and rank == 0)
    ckpt = None
    if rank == 0:
        ckpt = serialization.save(transformer, out_dir / "quantized.safetensors", extra={"base_model": base})
    dist.barrier()
    return report, ckpt


def _spawned_worker(rank: int, world: int, init_method: str, model_spec: str, config, out_dir: str,
                    device: str, result_path: str, progress: bool, log_level: int) -> None:
    """Entry point of a spawned worker (module-level: pickled by name)."""
    logging.basicConfig(level=log_level, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    dev = _worker_device(device, rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world, device_id=torch.device(dev) if device == "cuda" else None)
    try:
        report, ckpt = _quantize_job(rank, dev, model_spec, config, Path(out_dir), progress)
        if rank == 0:
            Path(result_path).write_text(json.dumps({"report": report.to_dict(), "checkpoint": str(ckpt)},
                                                    default=str))
    finally:
        dist.destroy_process_group()


def _check_launch(nproc: int, device: str, config) -> None:
    from .algorithms import get_method
    if nproc < 1:
        raise DVDQuantError(f"--nproc must be ≥ 1, got {nproc}")
    if device not in ("cpu", "cuda"):
        raise DVDQuantError(f"--nproc needs --device cpu or cuda (rank i uses cuda:i), got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DVDQuantError("--device cuda: no CUDA device is available")
        if nproc > torch.cuda.device_count():
            raise DVDQuantError(f"--nproc {nproc} exceeds the {torch.cuda.device_count()} visible GPUs "
                                "(one GPU per process)")
    method = get_method(config)
    if method.collect is not None:
        raise DVDQuantError(f"--nproc: method {method.name!r} calibrates on the whole model and cannot be sharded "
                            "(data-free methods: dvdquant, minmax, quarot)")
    if device == "cpu" and nproc > (os.cpu_count() or 1):
        log.warning("--nproc %d exceeds the %d CPU cores", nproc, os.cpu_count() or 1)


def _count_layers(model_spec: str, config) -> int:
    """How many Linear layers ``config`` quantizes in ``model_spec``, from a weightless (meta) copy."""
    from .pipeline.models_io import EMBEDDED
    if model_spec == EMBEDDED:
        from .models.embedded import load_embedded
        model = load_embedded().transformer
    else:
        cfg_file = Path(model_spec) / "config.json"
        if not cfg_file.is_file():
            raise DVDQuantError(f"--model {model_spec!r} is neither 'embedded' nor a diffusers model directory "
                                "(no config.json)")
        import diffusers
        cfg = json.loads(cfg_file.read_text())
        cls = getattr(diffusers, cfg.get("_class_name") or "", None)
        if cls is None:
            raise DVDQuantError(f"{cfg_file} names class {cfg.get('_class_name')!r}, which diffusers does not provide")
        with torch.device("meta"):
            model = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    return len(select_linears(model, config.skip, config.quantize_modulation))


def quantize_multiprocess(model_spec: str, config, out_dir, *, nproc: int, device: str = "cpu",
                          progress: bool = False):
    """``dvdquant quantize --nproc N``: quantize with N processes; returns (QuantReport, checkpoint path).

    Spawns N local workers (gloo on CPU, NCCL with GPU i for rank i), or, when this process was
    started by ``torchrun``, runs as its rank (then ranks other than 0 return (None, None)).
    """
    out_dir = Path(out_dir)
    _check_launch(nproc, device, config)
    n_layers = _count_layers(model_spec, config)
    if nproc > n_layers:
        raise DVDQuantError(f"--nproc {nproc} exceeds the {n_layers} layers to quantize")
    if _launched_by_torchrun():
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world != nproc:
            raise DVDQuantError(f"--nproc {nproc} but torchrun started {world} processes")
        dev = _worker_device(device, int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        try:
            return _quantize_job(rank, dev, model_spec, config, out_dir, progress)
        finally:
            dist.destroy_process_group()
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory(prefix="dvdquant_mp_") as tmp:
        result = Path(tmp) / "result.json"
        args = (nproc, f"file://{tmp}/rendezvous", model_spec, config, str(out_dir), device, str(result), progress,
                logging.getLogger("dvdquant").getEffectiveLevel())
        log.info("spawning %d quantization workers (%s)", nproc, device)
        try:
            mp.start_processes(_spawned_worker, args=args, nprocs=nproc, join=True, start_method="spawn")
        except mp.ProcessRaisedException as e:
            lines = [l for l in str(e).strip().splitlines() if l.strip()]
            raise DVDQuantError(f"quantization worker failed: {lines[-1] if lines else e}") from None
        except mp.ProcessExitedException as e:
            raise DVDQuantError(f"quantization worker died: {e}") from None
        data = json.loads(result.read_text())
    return _report_from_dict(data["report"]), Path(data["checkpoint"])


__all__ = ["enable_context_parallel", "disable_context_parallel", "partition_layers", "quantize_sharded",
           "quantize_multiprocess"]
