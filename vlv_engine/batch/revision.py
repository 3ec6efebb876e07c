"""What a caption depends on, as short hashes: the model revision and the generation config.

The manifest keys every result by (image sha256, model revision, generation hash), so a
rerun with the same model and settings skips finished images and any change to either
re-captions.

The revisions hash the weights the engine actually holds, not the files of a model
folder: that is exact (a retrained model with the same shapes, file sizes or headers
still gets a new revision; a model folder copied to another node, with new mtimes,
does not), it covers dtype and quantization (bf16, int8 and fp32 captions differ, so
they are different revisions) and it works for engines that never came from a folder.  The cost is one
pass over the weights at start: ~1.6 GB/s of SHA-256 on one core, a few seconds for
the paper model, nothing next to a captioning run.

Only the parts on the caption path count (the diffusion decoder does not), and the
encoder part is also its own revision: the embedding cache is keyed by it, so a new
caption decoder reuses cached embeddings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CAPTION_PATH_VERSION", "Revision", "engine_revision", "generation_hash"]

#: Bump when code (not weights) changes the captions of unchanged models, e.g. the
#: image preprocessing or the decoding loop, so that finished results are redone.
CAPTION_PATH_VERSION = 1


@dataclass(frozen=True)
class Revision:
    encoder: str  # image -> caption embedding
    decoder: str  # caption embedding -> text
    model: str  # both: what a caption depends on besides the generation settings


def engine_revision(engine: Any) -> Revision:
    model = engine.model
    config = model.config.to_dict()
    encoder = _hasher("encoder", config["encoder"], config["bottleneck"])
    _hash_modules(encoder, model.encoder, model.bottleneck)
    decoder = _hasher("decoder", config["caption_decoder"])
    if model.caption_decoder is not None:
        _hash_modules(decoder, model.caption_decoder)
    _hash_tokenizer(decoder, engine.llm_tokenizer)
    enc, dec = encoder.hexdigest()[:16], decoder.hexdigest()[:16]
    return Revision(encoder=enc, decoder=dec, model=hashlib.sha256(f"{enc}:{dec}".encode()).hexdigest()[:16])


def generation_hash(generation: Any, *, extra: dict[str, Any] | None = None) -> str:
    """A ``GenerationConfig`` (the model's defaults merged with the overrides) as a hash;
    ``extra`` (e.g. the self-check's settings) joins it when given, and without it the
    hash is what it always was, so existing manifests stay valid."""
    fields = dataclasses.asdict(generation)
    if extra:
        fields = {"generation": fields, "extra": extra}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _hasher(part: str, *configs: dict) -> "hashlib._Hash":
    h = hashlib.sha256(f"vlv-{part}-v{CAPTION_PATH_VERSION}".encode())
    for cfg in configs:
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    return h


def _hash_modules(h: "hashlib._Hash", *modules: torch.nn.Module) -> None:
    for module in modules:
        for name, value in sorted(module.state_dict().items()):
            _hash_value(h, name, value)


def _hash_value(h: "hashlib._Hash", name: str, value: Any) -> None:
    # A dynamically quantized linear (the int8 encoder) keeps (weight, bias) as a tuple
    # in its state dict; its weight is a quantized tensor.
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _hash_value(h, f"{name}.{i}", item)
    elif isinstance(value, torch.Tensor):
        _hash_tensor(h, name, value.detach())
    elif value is not None:
        h.update(f"{name}={value!r}".encode())


def _hash_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
    if t.is_quantized:  # int8 values and their scales (per channel or per tensor)
        _hash_tensor(h, f"{name}.int", t.int_repr())
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            _hash_tensor(h, f"{name}.scales", t.q_per_channel_scales())
            _hash_tensor(h, f"{name}.zero_points", t.q_per_channel_zero_points())
        else:
            h.update(f"{name}.scale={t.q_scale()}:{t.q_zero_point()}".encode())
        return
    if is_traceable_wrapper_subclass(t):  # a quantized weight (torchao): its packed data and scales
        inner, _ = t.__tensor_flatten__()
        for part in inner:
            _hash_tensor(h, f"{name}.{part}", getattr(t, part))
        return
    # Bytes through a uint8 view: numpy has no bfloat16, and the view is free.
    flat = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
    h.update(flat.cpu().numpy().tobytes())


def _hash_tokenizer(h: "hashlib._Hash", tokenizer: Any) -> None:
    # Token ids become text through the tokenizer, so its vocabulary is part of the model.
    if tokenizer is None:
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True).encode())
