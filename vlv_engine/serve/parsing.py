"""Request bodies -> (uploads, generation options), with every refusal a ServiceError.

Two body kinds carry images:

* ``multipart/form-data``: every file part is an image, in order; plain fields are
  generation options (``num_beams=4``), or one ``options`` field holding a JSON object.
* ``application/json``: ``{"images": [B64 | {"data": B64, "name": str}, ...],
  "options": {...}}``; ``B64`` may be a ``data:image/...;base64,`` URL.

A malformed image entry (bad base64, not a string) costs only its own result; a
malformed body or option refuses the request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from vlv_engine.serve.captioner import Options
from vlv_engine.serve.config import ServeConfig
from vlv_engine.serve.errors import ServiceError


@dataclass(frozen=True, slots=True)
class Upload:
    name: str
    data: bytes | None  # None: the entry itself was unusable; see error
    error: ServiceError | None = None


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_options(raw: dict[str, Any], config: ServeConfig, *, from_form: bool = False) -> Options:
    """Check generation options against their bounds; returns the hashable, sorted key."""

    def bad(name: str, what: str, value: Any) -> ServiceError:
        return ServiceError(422, "invalid_option", f"option {name!r} must be {what}, got {value!r}")

    def as_int(name: str, value: Any, lo: int, hi: int) -> int:
        if from_form and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise bad(name, f"an integer in [{lo}, {hi}]", value) from None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise bad(name, f"an integer in [{lo}, {hi}]", value)
        return value

    def as_float(name: str, value: Any, lo: float, hi: float) -> float:
        if from_form and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad(name, f"a number in [{lo:g}, {hi:g}]", value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            raise bad(name, f"a number in [{lo:g}, {hi:g}]", value)
        return float(value)

    def as_bool(name: str, value: Any) -> bool:
        if from_form and isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            raise bad(name, "true or false", value)
        return value

    checks = {
        "num_beams": lambda n, v: as_int(n, v, 1, config.max_num_beams),
        "max_new_tokens": lambda n, v: as_int(n, v, 1, config.max_new_tokens_limit),
        "length_penalty": lambda n, v: as_float(n, v, -10.0, 10.0),
        "early_stopping": as_bool,
        "postprocess": as_bool,
    }
    out = {}
    for name, value in raw.items():
        if name not in checks:
            raise ServiceError(422, "invalid_option", f"unknown option {name!r}; known: {sorted(checks)}")
        out[name] = checks[name](name, value)
    return tuple(sorted(out.items()))


async def read_request(request: Request, config: ServeConfig) -> tuple[list[Upload], Options]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        uploads, raw, from_form = await _read_multipart(request, config)
    elif kind == "application/json":
        uploads, raw = await _read_json(request, config.max_images)
        from_form = False
    else:
        raise ServiceError(415, "unsupported_media_type",
                           f"content type {kind or '(none)'!r} is not accepted; send multipart/form-data "
                           f"(image files) or application/json (base64 images)")
    if not uploads:
        raise ServiceError(400, "no_images", "the request holds no images")
    if len(uploads) > config.max_images:
        raise ServiceError(413, "too_many_images",
                           f"{len(uploads)} images in one request; the limit is {config.max_images}")
    return uploads, parse_options(raw, config, from_form=from_form)


async def _read_multipart(request: Request, config: ServeConfig):
    try:
        # max_files: one past the limit is enough to say "too many" below.
        form = await request.form(max_files=config.max_images + 1, max_fields=64)
    except HTTPException as exc:  # python-multipart's refusals (malformed body, too many parts)
        if "Too many files" in str(exc.detail):
            raise ServiceError(413, "too_many_images",
                               f"more than {config.max_images} images in one request") from None
        raise ServiceError(400, "invalid_multipart", f"malformed multipart body: {exc.detail}") from None
    uploads: list[Upload] = []
    raw: dict[str, Any] = {}
    try:
        for field, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append(Upload((value.filename or field)[:MAX_NAME_CHARS], await value.read()))
            elif field == "options":
                try:
                    options = json.loads(value)
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise ServiceError(400, "invalid_json", f"the 'options' field is not JSON ({_json_error(exc)})") \
                        from None
                if not isinstance(options, dict):
                    raise ServiceError(422, "invalid_option", "the 'options' field must be a JSON object")
                raw.update(options)
            else:
                raw[field] = value
    finally:
        await form.close()  # spooled upload files
    return uploads, raw, True


async def _read_json(request: Request, max_images: int):
    body = await request.body()
    # Parsing and base64-decoding up to max_body bytes would stall the event loop.
    return await asyncio.to_thread(_parse_json, body, max_images)


def _json_error(exc: Exception) -> str:
    # The decoder recurses once per nesting level: a deep enough body exhausts the stack.
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _parse_json(body: bytes, max_images: int):
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ServiceError(400, "invalid_json", f"the body is not valid JSON ({_json_error(exc)})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ServiceError(422, "invalid_request", 'expected a JSON object {"images": [base64, ...], '
                                                   '"options": {...}}')
    unknown = sorted(set(doc) - {"images", "options"})
    if unknown:
        raise ServiceError(422, "invalid_request", f"unknown fields {unknown}; expected 'images' and 'options'")
    options = doc.get("options") or {}
    if not isinstance(options, dict):
        raise ServiceError(422, "invalid_option", "'options' must be a JSON object")
    # Counted before any entry is decoded: a 4 MB body of two million tiny entries would
    # otherwise cost a gigabyte of per-entry results before being refused.
    if len(doc["images"]) > max_images:
        raise ServiceError(413, "too_many_images",
                           f"{len(doc['images'])} images in one request; the limit is {max_images}")
    return [_decode_entry(i, entry) for i, entry in enumerate(doc["images"])], options


MAX_NAME_CHARS = 256  # of a client's image name, as results and errors repeat it


def _decode_entry(index: int, entry: Any) -> Upload:
    name = f"images[{index}]"
    if isinstance(entry, dict):
        name = str(entry.get("name") or name)[:MAX_NAME_CHARS]
        entry = entry.get("data")
    if not isinstance(entry, str):
        return Upload(name, None, ServiceError(400, "invalid_image_field",
                                               f"image {index} ({name!r}): expected a base64 string or "
                                               f'{{"data": base64, "name": ...}}, got {type(entry).__name__}'))
    text = entry
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            return Upload(name, None, ServiceError(400, "invalid_base64",
                                                   f"image {index} ({name!r}): a data URL must be base64"))
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        return Upload(name, None, ServiceError(400, "invalid_base64",
                                               f"image {index} ({name!r}): not valid base64 ({exc})"))
    return Upload(name, data)
