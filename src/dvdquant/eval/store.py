"""Files of one evaluation run, and the merge of runs split across several calls.

A run folder holds ``results.json`` (``results.partial.json`` while running or when cut short),
``layers.json`` (with ``layers=True``) and ``grid.pt`` (the first prompts' clips of the W4A4 rows,
for the frame grid). :func:`merge_runs` joins folders made by calls that share prompts, steps,
seed, guidance, batch size and bootstrap resamples, each with other (method, bits) rows; the FP
reference is generated in every call and compared by hash.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import DVDQuantError

log = logging.getLogger(__name__)

RESULTS, PARTIAL, LAYERS, GRID = "results.json", "results.partial.json", "layers.json", "grid.pt"
# meta fields that must agree between the parts of a split run
SHARED_META = ("model", "prompts", "prompt_seed", "steps", "seed", "guidance", "batch_size", "real_seed",
               "real_clips", "fd_bootstrap")


def json_safe(x, ndigits: int = 6):
    if isinstance(x, float):
        if not math.isfinite(x):
            return None
        return round(x, ndigits)
    if isinstance(x, dict):
        return {k: json_safe(v, ndigits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v, ndigits) for v in x]
    return x


def dump(obj, path: Path, ndigits: int = 6) -> None:
    """Write JSON atomically (temporary file, then rename); non-finite floats become null."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj, ndigits), indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def save_grid(grid: dict, path: Path) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    torch.save({k: v.contiguous() for k, v in grid.items()}, tmp)
    tmp.replace(path)


def load_grid(run_dir) -> dict:
    path = Path(run_dir) / GRID
    return torch.load(path, weights_only=True) if path.exists() else {}


def load_run(run_dir) -> tuple[dict, Optional[dict]]:
    """(results, layers or None) of a run folder; results.partial.json when results.json is absent."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS
    if not path.exists():
        path = run_dir / PARTIAL
    if not path.exists():
        raise DVDQuantError(f"{run_dir} holds no {RESULTS} (nor {PARTIAL})")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DVDQuantError(f"{path}: not valid JSON ({e})") from None
    if "runs" not in results or "meta" not in results or "fp" not in results:
        raise DVDQuantError(f"{path}: not an evaluation result (no meta / fp / runs)")
    layers_path = run_dir / LAYERS
    return results, (json.loads(layers_path.read_text()) if layers_path.exists() else None)


def _ordered(items, order: Sequence[str]) -> list:
    known = [x for x in order if x in items]
    return known + [x for x in items if x not in known]


def merge_runs(run_dirs: Sequence, method_order: Sequence[str] = (), bits_order: Sequence[str] = ()
               ) -> tuple[dict, Optional[dict], dict]:
    """(results, layers, grid) of several run folders of one evaluation split by method / bits.

    Raises DVDQuantError when the folders disagree on a field of :data:`SHARED_META` or hold the
    same (method, bits) row twice.
    """
    if not run_dirs:
        raise DVDQuantError("no run folders to merge")
    parts = [(Path(d), *load_run(d)) for d in run_dirs]
    first_dir, first, _ = parts[0]
    if len(parts) == 1:
        return first, parts[0][2], load_grid(first_dir)
    meta = dict(first["meta"])
    seen: dict = {}
    runs, failed, layers, grid, info = [], [], {}, {}, []
    fp_hashes = set()
    for d, res, lay in parts:
        m = res["meta"]
        for key in SHARED_META:
            if m.get(key) != meta.get(key):
                raise DVDQuantError(f"cannot merge {d} with {first_dir}: '{key}' differs "
                                    f"({str(m.get(key))[:60]!r} vs {str(meta.get(key))[:60]!r})")
        for r in res["runs"]:
            key = (r["method"], r["bits"])
            if key in seen:
                raise DVDQuantError(f"cannot merge: {key[0]} {key[1]} is in both {seen[key]} and {d}")
            seen[key] = d
            runs.append(r)
        failed += res.get("failed", [])
        layers.update(lay or {})
        for k, v in load_grid(d).items():
            grid.setdefault(k, v)
        fp_hashes.add(m.get("fp_sha256"))
        info.append({"dir": str(d), "methods": m["methods"], "bits": m["bits"], "layers": m.get("layers"),
                     "device": m.get("device"), "created": m.get("created"),
                     "wall_seconds": m.get("wall_seconds")})
    methods = _ordered(list(dict.fromkeys(x for _, r, _ in parts for x in r["meta"]["methods"])), method_order)
    bits = _ordered(list(dict.fromkeys(x for _, r, _ in parts for x in r["meta"]["bits"])), bits_order)
    runs.sort(key=lambda r: (bits.index(r["bits"]) if r["bits"] in bits else len(bits),
                             methods.index(r["method"]) if r["method"] in methods else len(methods)))
    if len(fp_hashes) > 1:
        log.warning("the FP clips differ between the merged calls (non-deterministic kernels?)")
    devices = list(dict.fromkeys(p["device"] for p in info))
    meta.update(methods=methods, bits=bits, parts=info, layers=any(p["layers"] for p in info),
                device=" + ".join(devices),
                created=max(p["created"] for p in info), wall_seconds=sum(p["wall_seconds"] or 0 for p in info),
                fp_identical_across_parts=len(fp_hashes) == 1)
    failed = [f for f in failed if (f["method"], f["bits"]) not in seen]     # failed once, run again later
    meta.pop("incomplete", None)
    planned = [tuple(x) for _, r, _ in parts for x in r["meta"].get("planned", [])]
    done = set(seen) | {(f["method"], f["bits"]) for f in failed}
    missing = list(dict.fromkeys(f"{m} {b}" for m, b in planned if (m, b) not in done))
    if missing:
        meta["incomplete"] = f"not run: {', '.join(missing)}"
    meta["planned"] = [list(x) for x in dict.fromkeys(planned)]
    merged = {**first, "meta": meta, "runs": runs, "failed": failed}
    merged["fp"] = dict(first["fp"], rerun_exact=all(r["fp"].get("rerun_exact") for _, r, _ in parts))
    return merged, (layers or None), grid
