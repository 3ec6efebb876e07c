"""Reduced precision for the encoder path (pixels -> Florence-2 -> queries -> phi -> text
encoder) on a CPU.

| scheme | device | weights | activations | kernel |
| --- | --- | --- | --- | --- |
| int8_dynamic | CPU | int8 per output channel | int8 per tensor, scaled per call | fbgemm (AVX2 / AVX-512) |
| bf16 | CPU with AMX or AVX512-BF16 | bfloat16 | bfloat16 | oneDNN (AMX tiles) |
| auto | CPU | bf16 where the CPU has AMX, else int8_dynamic | | |

Why this exists: in fp32 the eager encoder spends ~70 % of its time in matrix products
that already run at ~80 % of a 2-core AVX2 machine's FMA peak, so no fp32 backend can make
the path much faster than ~1.8x. Int8 products do twice the multiply-adds per
instruction: every `nn.Linear` of Florence-2 (vision tower, projector, BART encoder and
decoder) becomes PyTorch's dynamically quantized linear (`int8_parts`); convolutions,
attention's own products, phi and the bottleneck stay fp32.

On a CPU with AMX (Intel Xeon since Sapphire Rapids) bf16 products run on its tile unit:
measured on a 2-core AMX Xeon, a [4096 x 768] x [768 x 3072] product took 18 ms in bf16,
55 ms in fbgemm int8 and 118 ms in fp32. There `bf16` casts all of Florence-2 (the same
parts) to bfloat16, its convolutions, norms and attention included, and the path casts
at its two edges (`VLVEncoder`: pixels in, query states out), so phi and the bottleneck
still make the caption embedding in float32. It moves the embedding less than int8 does
(rounding of 8 mantissa bits, no per-call activation scale). Without AMX or AVX512-BF16,
bf16 products are emulated and slower than fp32: `bf16` is refused there. `auto` takes
bf16 only with AMX: on AVX512-BF16 alone (AMD Zen 4) int8_dynamic is the measured one.

What they cost, measured (benchmarks/README.md), on the bundled nano model's 500 held-out
Shapes World scenes: see `tests/quant/test_encoder_quant.py` for the figures.

Both are opt-in (`Engine(encoder_quantize="int8_dynamic" | "bf16" | "auto")`,
`--encoder-quantize`), CPU only, float32 engines only, with the eager or the compile
encoder backend ("auto" picks as it does in float32: compile where a C++ compiler is
found). Compiled, each int8 product is one opaque fbgemm call (`fbgemm_int8.FbgemmLinear`)
and inductor fuses what lies between them: the norms, residual adds and window layout
copies that eager runs one by one.
"""

from __future__ import annotations

import torch
from torch import nn

from vlv_engine.engine.fbgemm_int8 import swap_linears, unavailable_reason

ENCODER_SCHEMES = ("int8_dynamic", "bf16")
ENCODER_PREFERENCES = (*ENCODER_SCHEMES, "auto")


def cpu_bf16_units() -> str:
    """The bf16 matrix instructions of this CPU that oneDNN uses: "amx", "avx512_bf16" or ""."""
    if not torch.backends.mkldnn.is_available():
        return ""
    for unit, probe in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        if getattr(torch.cpu, probe, lambda: False)():
            return unit
    return ""


def resolve_encoder_scheme(preference: str | None) -> str | None:
    """The scheme a preference names: "auto" is bf16 on a CPU with AMX, else int8_dynamic
    (see the module docstring); a scheme's name is itself."""
    if preference not in (None, *ENCODER_PREFERENCES):
        raise ValueError(f"unknown encoder quantization {preference!r}; choose one of {list(ENCODER_PREFERENCES)}")
    if preference != "auto":
        return preference
    return "bf16" if cpu_bf16_units() == "amx" else "int8_dynamic"


def check_encoder_scheme(scheme: str, device: str | torch.device, dtype: torch.dtype, backend: str) -> str:
    """Refuse a scheme that cannot run here, with the reason; return the encoder backend
    preference to use (the one given: "auto", "eager" or "compile")."""
    if scheme not in ENCODER_SCHEMES:
        raise ValueError(f"unknown encoder quantization {scheme!r}; choose one of {list(ENCODER_PREFERENCES)}")
    device = torch.device(device)
    if device.type != "cpu":
        raise ValueError(f"encoder_quantize={scheme!r} runs on a CPU only; on {device} use "
                         "encoder_backend='triton' in bfloat16 instead")
    if dtype != torch.float32:
        raise ValueError(f"encoder_quantize={scheme!r} needs a float32 engine, got dtype {dtype}")
    if scheme == "bf16" and not cpu_bf16_units():
        raise ValueError("encoder_quantize='bf16': this CPU has no bf16 matrix instructions (AMX or AVX512-BF16), "
                         "so its bf16 products would be emulated and slower than float32; use 'int8_dynamic'")
    reason = unavailable_reason() if scheme == "int8_dynamic" else ""
    if reason:
        raise ValueError(f"encoder_quantize={scheme!r}: {reason}")
    if backend not in ("auto", "eager", "compile"):
        raise ValueError(f"encoder_quantize={scheme!r} runs with the eager or compile encoder backend (the "
                         f"Triton kernels take float activations), got encoder_backend={backend!r}")
    return backend


def int8_parts(model: nn.Module) -> list[nn.Module]:
    """What either scheme converts: Florence-2 (the vision tower, its projector, the BART
    encoder over ~600 image tokens at 768 px and the query decoder that cross-attends to
    them), ~98 % of the path's time on the small preset. phi and the bottleneck (the text
    encoder and psi, over 77 tokens) make the caption embedding itself and stay float32."""
    return [model.encoder.florence]


def quantize_encoder(model: nn.Module, scheme: str) -> int:
    """Convert `int8_parts(model)` in place: int8_dynamic swaps every plain `nn.Linear` for
    its int8 dynamic version, bf16 casts every parameter and buffer to bfloat16; returns
    how many layers (int8) or tensors (bf16) were converted."""
    if scheme not in ENCODER_SCHEMES:
        raise ValueError(f"unknown encoder quantization {scheme!r}; choose one of {list(ENCODER_SCHEMES)}")
    if scheme == "int8_dynamic":
        return swap_linears(int8_parts(model))
    converted = 0
    for part in int8_parts(model):
        converted += sum(1 for t in (*part.parameters(), *part.buffers()) if t.is_floating_point())
        part.to(torch.bfloat16)
    return converted
