"""Crash-safe file primitives: fsync a folder, replace a file atomically."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "replace_atomically"]


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` survive a crash (no-op where folders
    cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def replace_atomically(path: str | Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, rename it over ``path``:
    a reader (or a run after a kill) sees the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
