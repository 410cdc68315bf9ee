""":func:`quantize_multiprocess` is what ``dvdquant quantize --nproc N`` runs: it spawns N workers
(gloo on CPU, NCCL with one GPU per rank), or, started by ``torchrun``, joins its process group;
rank 0 writes the checkpoint atomically (``serialization.save``).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from .. import serialization
from ..algorithms import get_method
from ..api import LayerReport, QuantReport
from ..errors import DVDQuantError
from ..models.adapters import select_linears
from .sharded import quantize_sharded

log = logging.getLogger(__name__)


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
    from ..pipeline.models_io import load_transformer
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
    from ..pipeline.models_io import EMBEDDED, diffusers_model_class
    if model_spec == EMBEDDED:
        from ..models.embedded import load_embedded
        model = load_embedded().transformer
    else:
        cls, cfg = diffusers_model_class(model_spec)
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
