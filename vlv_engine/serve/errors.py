"""Errors the service answers with: an HTTP status, a stable machine-readable reason
and a message for people. Every error body is ``{"error": message, "reason": reason}``."""

from __future__ import annotations

from vlv_engine.images import ImageInputError


class ServiceError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    def body(self) -> dict:
        return {"error": self.message, "reason": self.reason}


# (substring of ImageInputError.reason, status, reason), first match wins. The image path
# words its reasons for people; tests/serve/test_hostile.py pins each kind to its code.
_IMAGE_REASONS = (
    ("pixel limit", 413, "too_many_pixels"),
    ("decompression-bomb", 413, "too_many_pixels"),
    ("empty", 400, "empty_image"),
    ("zero-size", 400, "empty_image"),
    ("not a recognised image", 415, "not_an_image"),
    ("unsupported image mode", 415, "unsupported_image"),
    ("truncated or corrupt", 400, "corrupt_image"),
    ("unreadable image header", 400, "corrupt_image"),
)


def classify_image_error(err: ImageInputError) -> tuple[int, str]:
    """(HTTP status, reason code) for an image the image path refused."""
    text = err.reason
    for needle, status, reason in _IMAGE_REASONS:
        if needle in text:
            return status, reason
    return 400, "bad_image"


def image_error(err: ImageInputError, index: int, name: str) -> ServiceError:
    status, reason = classify_image_error(err)
    return ServiceError(status, reason, f"image {index} ({name!r}): {err.reason}")
