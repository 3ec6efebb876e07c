"""On-disk artifact cache shared by the ONNX and TensorRT backends.

An artifact (an ONNX file, a TensorRT engine) lives in its own folder named by a key,
the SHA-256 of a canonical JSON of everything that determines its bytes: the
weights' digest, the architecture, the I/O contract, and the tool versions. Any
change gives a new key (a new folder); the same inputs give the same key, so a
second process loads what the first one built. Folders are written under a
temporary name and renamed into place, so a crash never leaves a half-written
artifact where a later run would load it.

Location: ``$VLV_CACHE_DIR/backends``, else ``$XDG_CACHE_HOME/vlv_engine/backends``,
else ``~/.cache/vlv_engine/backends``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

CACHE_ENV = "VLV_CACHE_DIR"
META_FILE = "meta.json"


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / "backends"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vlv_engine" / "backends"


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer: name, dtype, shape and bytes.

    Reads the weights once (about 1 GB/s: a few seconds for an SD-sized UNet)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def key_of(parts: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of `parts` (sorted keys, no whitespace)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def entry_dir(cache_dir: Path, kind: str, key: str) -> Path:
    return Path(cache_dir) / f"{kind}-{key[:24]}"


def build_entry(folder: Path, parts: Mapping[str, Any], build: Callable[[Path], None]) -> None:
    """Run build(tmp_folder), write meta.json beside what it wrote, rename into `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build(tmp)
        (tmp / META_FILE).write_text(json.dumps(parts, indent=2, sort_keys=True, default=repr) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / META_FILE).exists():  # not "another process got there first"
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def entry_ready(folder: Path, artifact: str) -> bool:
    return (folder / META_FILE).is_file() and (folder / artifact).is_file()
