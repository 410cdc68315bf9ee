"""Hash-checked safetensors files for the assets shipped in the package.

The embedded model and its classifier are committed binary files; a truncated download,
a Git LFS pointer or a bad merge must fail loudly at load time, not produce garbage
videos. Each asset folder holds its safetensors files, a ``config.json`` and a
``sha256.json`` recording every file's SHA-256. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

log = logging.getLogger(__name__)

HASH_FILE = "sha256.json"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_asset(directory: Path, tensors: dict[str, dict[str, torch.Tensor]], config: dict,
                what: str) -> dict[str, str]:
    """Write ``{name}.safetensors`` per entry of ``tensors``, config.json and sha256.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, state in tensors.items():
        path = directory / f"{name}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        hashes[path.name] = sha256_of(path)
    _atomic_write_bytes(directory / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    hashes["config.json"] = sha256_of(directory / "config.json")
    record = {"what": what, "files": hashes}
    _atomic_write_bytes(directory / HASH_FILE, (json.dumps(record, indent=2) + "\n").encode())
    log.info("wrote %s to %s", what, directory)
    return hashes


def read_asset(directory: Path, names: list[str], what: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Check every file against sha256.json, then load the tensors and the config."""
    directory = Path(directory)
    hash_path = directory / HASH_FILE
    if not hash_path.is_file():
        raise CheckpointError(f"{what}: {hash_path} is missing (train it with the script in scripts/)")
    recorded = json.loads(hash_path.read_text())["files"]
    for fname in [f"{n}.safetensors" for n in names] + ["config.json"]:
        path = directory / fname
        if not path.is_file():
            raise CheckpointError(f"{what} file {path} is missing")
        if fname not in recorded:
            raise CheckpointError(f"{what} file {path} has no recorded hash in {hash_path}")
        actual = sha256_of(path)
        if actual != recorded[fname]:
            raise CheckpointError(
                f"{what} file {path} is corrupted: sha256 mismatch "
                f"(recorded {recorded[fname][:16]}…, found {actual[:16]}…)"
            )
    config = json.loads((directory / "config.json").read_text())
    return {n: load_file(str(directory / f"{n}.safetensors")) for n in names}, config
