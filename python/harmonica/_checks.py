"""Checks made before any work starts: output paths, and digests that key a resumable run."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["check_output_dir", "check_output_file", "digest_module", "digest_tensors", "scheduler_key"]


def check_output_file(path: str | os.PathLike[str], what: str = "output file") -> Path:
    """Raise a ValueError/FileNotFoundError naming the fix unless a file can be written at ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file path such as {path / 'router.safetensors'}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} {path}: folder {folder} does not exist; create it (mkdir -p {folder}) or write elsewhere"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path} exists and is not writable; choose another path")
    _probe(folder, f"{what} {path}: folder {folder}", "choose another path")
    return path


def check_output_dir(path: str | os.PathLike[str], what: str = "checkpoint_dir") -> Path:
    """Create ``path`` if needed; raise a ValueError naming the fix unless files can be written in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be created ({err.strerror}); choose another folder") from err
    _probe(path, f"{what} {path}", "choose another folder")
    return path


def _probe(folder: Path, subject: str, fix: str) -> None:
    """Write (and drop) a file in ``folder``: the permission bits alone miss read-only mounts, and
    say nothing for root."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{subject} is not writable ({err.strerror}); {fix}") from err


def digest_tensors(*tensors: Any) -> str | None:
    """A short content digest of tensors (dtype, shape and bytes); None when all are None."""
    if all(t is None for t in tensors):
        return None
    import torch

    h = hashlib.blake2b(digest_size=12)
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def digest_module(module: Any) -> str:
    """A content digest of a module's parameters and buffers (names, dtypes, shapes, values)."""
    import torch

    h = hashlib.blake2b(digest_size=12)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(digest_tensors(t).encode())
    return h.hexdigest()


def scheduler_key(scheduler: Any) -> dict[str, Any]:
    """The sampler as it affects training: its class and its config (JSON-safe)."""
    config = dict(getattr(scheduler, "config", {}) or {})
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, "config": json.loads(json.dumps(config, default=str))}
