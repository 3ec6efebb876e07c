"""The native extension (CMakeLists.txt, kernels/): C++ kernels on the image hot path.

``preprocess_batch`` (uint8 HWC images -> normalised ``[B, 3, S, S]``) and its
Pillow + torch specification ``preprocess_batch_reference``; ``available()`` says
whether the native path runs here.  Without the built extension (or with
``VLV_NATIVE=0``) everything still works through the reference path, and a notice
is logged once.  Importing this package imports neither torch nor the extension.
"""

from vlv_engine.native.preprocess import (
    available,
    preprocess_batch,
    preprocess_batch_reference,
    resize_batch,
    simd_level,
)

__all__ = ["available", "preprocess_batch", "preprocess_batch_reference", "resize_batch", "simd_level"]
