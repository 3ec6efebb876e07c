"""Loading the native extension once, and saying why when it cannot be used.

No torch here: the batch decode workers resize through this module and must
start without importing torch.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np

logger = logging.getLogger("vlv_engine.native")

#: Set to 0 / false / off to use the Pillow path even where the extension is built.
DISABLE_ENV = "VLV_NATIVE"
#: Threads of the native CPU path (default: the CPUs this process may run on).
THREADS_ENV = "VLV_NATIVE_THREADS"

BUILD_HINT = "build it with `pip install -e .` (README: 'Building the native extension')"


@dataclass(frozen=True)
class Native:
    module: ModuleType | None  # vlv_engine.native._preprocess, None when unusable
    order: int  # Pillow's pass order the extension reproduces (see kernels/preprocess/resample.h)
    reason: str  # why `module` is None ("" when it is usable)


def _disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "off", "no")


@functools.cache
def _load() -> Native:
    if _disabled_by_env():
        return Native(None, 0, f"{DISABLE_ENV}=0 in the environment")
    try:
        module = importlib.import_module("vlv_engine.native._preprocess")
    except ImportError as exc:
        return Native(None, 0, f"the native extension is not built ({exc}); {BUILD_HINT}")
    order = _pillow_pass_order(module)
    if order is None:
        from PIL import __version__ as pillow_version

        return Native(None, 0, f"the native resize does not reproduce the installed Pillow {pillow_version}")
    return Native(module, order, "")


def _pillow_pass_order(module: ModuleType) -> int | None:
    """Which of the extension's pass orders the installed Pillow uses, checked on a
    small image where the two differ (and on one where they agree): None if neither
    reproduces Pillow bit for bit."""
    from PIL import Image

    y, x = np.mgrid[0:64, 0:16]
    probe = ((y * 37 + x * 91 + (x * y) % 7 * 29) % 256).astype(np.uint8)
    probe = np.ascontiguousarray(np.stack([probe, probe[::-1], 255 - probe], axis=-1))  # [64, 16, 3]
    cases = [(probe, (8, 12)), (np.ascontiguousarray(probe.transpose(1, 0, 2)), (12, 8))]
    for order in (1, 0):
        ok = True
        for image, (h, w) in cases:
            want = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC, reducing_gap=None))
            got = np.empty((1, h, w, 3), np.uint8)
            module.resize_u8([image], got, order, 1)
            ok = ok and np.array_equal(got[0], want)
        if ok:
            return order
    return None


_noticed = False


def native() -> Native:
    """The extension, loaded once; the first caller that finds it unusable logs why."""
    global _noticed
    state = _load()
    if state.module is None and not _noticed:
        _noticed = True
        level = logging.INFO if _disabled_by_env() else logging.WARNING
        logger.log(level, "vlv_engine.native: using the Pillow + torch image path: %s", state.reason)
    return state


def num_threads(requested: int | None = None) -> int:
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"num_threads must be a positive int, got {requested!r}")
        return requested
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be a positive int, got {env!r}") from None
        if value < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive int, got {env!r}")
        return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
